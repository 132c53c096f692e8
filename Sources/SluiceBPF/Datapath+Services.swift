import CSluiceLinux
import Glibc
import SluiceModel

/// A services-map key in host terms.
struct ServiceKey: Hashable {
    var raw: sl_service_key

    static func == (a: ServiceKey, b: ServiceKey) -> Bool {
        a.raw.addr == b.raw.addr && a.raw.port == b.raw.port && a.raw.proto == b.raw.proto
    }
    func hash(into h: inout Hasher) {
        h.combine(raw.addr)
        h.combine(raw.port)
        h.combine(raw.proto)
    }
}

/// What is in the maps for one service: the value written and the entry it came from (nil when adopted from a
/// previous agent, whose entries are unknown and get rewritten on the first update).
struct Installed {
    var value: sl_service
    var entry: NodeSnapshot.BPFService?
}

/// First-fit allocator over the slots array, in ranges. Ranges are handed out for a service's new table before
/// its old one is freed, so a table is never rewritten in place.
struct SlotAllocator {
    /// Free ranges, sorted by start, never adjacent.
    private(set) var free: [Range<Int>]

    init(capacity: Int) { free = [0..<capacity] }

    var available: Int { free.reduce(0) { $0 + $1.count } }

    mutating func allocate(_ n: Int) -> Int? {
        guard n > 0, let i = free.firstIndex(where: { $0.count >= n }) else { return nil }
        let start = free[i].lowerBound
        free[i] = (start + n)..<free[i].upperBound
        if free[i].isEmpty { free.remove(at: i) }
        return start
    }

    mutating func release(_ r: Range<Int>) {
        guard !r.isEmpty else { return }
        let i = free.firstIndex { $0.lowerBound > r.lowerBound } ?? free.count
        free.insert(r, at: i)
        // Coalesce with the neighbours.
        if i + 1 < free.count, free[i].upperBound == free[i + 1].lowerBound {
            free[i] = free[i].lowerBound..<free[i + 1].upperBound
            free.remove(at: i + 1)
        }
        if i > 0, free[i - 1].upperBound == free[i].lowerBound {
            free[i - 1] = free[i - 1].lowerBound..<free[i].upperBound
            free.remove(at: i)
        }
    }

    /// Marks `r` used (adopting a previous agent's tables).
    mutating func reserve(_ r: Range<Int>) {
        guard let i = free.firstIndex(where: { $0.contains(r.lowerBound) }), free[i].upperBound >= r.upperBound
        else { return }
        let f = free[i]
        free.remove(at: i)
        if r.upperBound < f.upperBound { free.insert(r.upperBound..<f.upperBound, at: i) }
        if f.lowerBound < r.lowerBound { free.insert(f.lowerBound..<r.lowerBound, at: i) }
    }
}

extension Datapath {
    /// Slots per backend of a weighted-random table: shares are exact to 1/(32 x backends) of the traffic.
    static let randomSlotsPerBackend = 32

    /// Makes the services map equal to `entries` (a node snapshot's BPF services), writing only what changed.
    /// A connect never sees a half-written table: new tables go to fresh slots, then the service entry flips.
    /// If the update does not fit, nothing is written and the error says by how much.
    public func apply(_ entries: [NodeSnapshot.BPFService]) throws(BPFError) {
        var desired: [ServiceKey: NodeSnapshot.BPFService] = [:]
        for e in entries {
            guard case .v4(let addr) = e.address.ip else { continue }  // IPv6 arrives with connect6
            var k = sl_service_key()
            k.addr = addr
            k.port = e.address.port.bigEndian
            k.proto = UInt8(e.protocol == .udp ? IPPROTO_UDP : IPPROTO_TCP)
            desired[ServiceKey(raw: k)] = e
        }
        if desired.count > Int(SL_MAX_SERVICES) {
            throw BPFError("\(desired.count) service addresses exceed the services map's \(SL_MAX_SERVICES)")
        }
        let changed = desired.filter { installed[$0.key]?.entry != $0.value }
        let tables = changed.mapValues(Self.slotTable)
        let needed = tables.values.reduce(0) { $0 + $1.count }
        if needed > allocator.available {
            throw BPFError("the update needs \(needed) backend slots; \(allocator.available) of \(SL_MAX_SLOTS) are free")
        }
        for (key, entry) in changed.sorted(by: { $0.value.address < $1.value.address }) {
            try install(key, entry, table: tables[key]!)
        }
        for key in installed.keys where desired[key] == nil {
            var k = key.raw
            bpf_map_delete_elem(servicesFD, &k)
            if let old = installed.removeValue(forKey: key) { allocator.release(Self.range(of: old.value)) }
        }
    }

    private func install(_ key: ServiceKey, _ entry: NodeSnapshot.BPFService, table: [sl_backend]) throws(BPFError) {
        var value = sl_service()
        value.id = entry.host.utf8.reduce(2_166_136_261 as UInt32) { ($0 ^ UInt32($1)) &* 16_777_619 }  // FNV-1a
        switch entry.action {
        case .proxy:
            value.action = UInt8(SL_ACTION_PROXY.rawValue)
        case .balance(let lb, _):
            value.action = UInt8(SL_ACTION_BALANCE.rawValue)
            value.lb = UInt8(lb == .maglev ? SL_LB_MAGLEV.rawValue : SL_LB_RANDOM.rawValue)
            // Checked against the free total before any write.
            let base = allocator.allocate(table.count)!
            for (i, var b) in table.enumerated() {
                var slot = UInt32(base + i)
                let rc = bpf_map_update_elem(slotsFD, &slot, &b, 0)
                if rc != 0 {
                    allocator.release(base..<(base + table.count))
                    throw .errno("write sl_slots[\(slot)]", rc)
                }
            }
            value.slot_base = UInt32(base)
            value.slots = UInt16(table.count)
        }
        var k = key.raw
        let rc = bpf_map_update_elem(servicesFD, &k, &value, 0)
        if rc != 0 {
            allocator.release(Self.range(of: value))
            throw .errno("write sl_services for \(entry.address)", rc)
        }
        if let old = installed[key] { allocator.release(Self.range(of: old.value)) }
        installed[key] = Installed(value: value, entry: entry)
    }

    static func range(of v: sl_service) -> Range<Int> { Int(v.slot_base)..<(Int(v.slot_base) + Int(v.slots)) }

    /// The slots of one service: weights apportioned over `32 x backends` slots (largest remainder) for random
    /// choice, or a weighted Maglev table for consistent hashing.
    static func slotTable(_ entry: NodeSnapshot.BPFService) -> [sl_backend] {
        guard case .balance(let lb, let backends) = entry.action, !backends.isEmpty else { return [] }
        let kernel: [sl_backend] = backends.map { b in
            var k = sl_backend()
            if case .v4(let a) = b.address.ip { k.addr = a }
            k.port = b.address.port.bigEndian
            return k
        }
        let weights = backends.map { max($0.weight, 1) }
        if lb == .maglev {
            let size = min(MaglevTable.tableSize(backends: backends.count, requested: 1), Int(SL_MAX_SLOTS_PER_SERVICE))
            let table = MaglevTable(keys: backends.map(\.address.description), weights: weights, size: size)
            return table.table.map { kernel[Int($0)] }
        }
        let total = min(backends.count * randomSlotsPerBackend, Int(SL_MAX_SLOTS_PER_SERVICE))
        let sum = weights.reduce(0) { $0 + Int($1) }
        var counts = weights.map { Int($0) * total / sum }
        let remainders = weights.indices.sorted { (Int(weights[$0]) * total % sum, -$0) > (Int(weights[$1]) * total % sum, -$1) }
        for i in remainders.prefix(total - counts.reduce(0, +)) { counts[i] += 1 }
        var out: [sl_backend] = []
        out.reserveCapacity(total)
        for (i, n) in counts.enumerated() { out += repeatElement(kernel[i], count: n) }
        return out
    }

    /// Reads the services a previous agent left pinned, so their slots are not handed out twice.
    func adoptInstalledServices() {
        var key = sl_service_key()
        var next = sl_service_key()
        var first = true
        while true {
            let rc = first ? bpf_map_get_next_key(servicesFD, nil, &next) : bpf_map_get_next_key(servicesFD, &key, &next)
            if rc != 0 { break }
            first = false
            key = next
            var value = sl_service()
            if bpf_map_lookup_elem(servicesFD, &key, &value) == 0 {
                allocator.reserve(Self.range(of: value))
                installed[ServiceKey(raw: key)] = Installed(value: value, entry: nil)
            }
        }
    }
}
