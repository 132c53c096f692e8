import CSluiceLinux
import Glibc
import SluiceModel

/// A services-map key: which map (IPv4 or IPv6) and the address, port and protocol in it.
struct ServiceKey: Hashable {
    var address: EndpointAddress
    var proto: UInt8

    var isV4: Bool { address.ip.isIPv4 }

    /// Calls `body` with the key as the map stores it.
    func withRaw<R>(_ body: (UnsafeMutableRawPointer) -> R) -> R {
        switch address.ip {
        case .v4(let a):
            var k = sl_service_key()
            k.addr = a
            k.port = address.port.bigEndian
            k.proto = proto
            return body(&k)
        case .v6(let hi, let lo):
            var k = sl_service_key6()
            withUnsafeMutableBytes(of: &k.addr) { raw in
                raw.storeBytes(of: hi, toByteOffset: 0, as: UInt64.self)
                raw.storeBytes(of: lo, toByteOffset: 8, as: UInt64.self)
            }
            k.port = address.port.bigEndian
            k.proto = proto
            return body(&k)
        }
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
            desired[ServiceKey(address: e.address, proto: UInt8(e.protocol == .udp ? IPPROTO_UDP : IPPROTO_TCP))] = e
        }
        for v4 in [true, false] {
            let count = desired.keys.filter { $0.isV4 == v4 }.count
            if count > Int(SL_MAX_SERVICES) {
                throw BPFError("\(count) IPv\(v4 ? 4 : 6) service addresses exceed the services map's \(SL_MAX_SERVICES)")
            }
        }
        let changed = desired.filter { installed[$0.key]?.entry != $0.value }
        let tables = changed.mapValues(Self.slotTable)
        for v4 in [true, false] {
            let needed = tables.filter { $0.key.isV4 == v4 }.values.reduce(0) { $0 + $1.count }
            let free = v4 ? allocator.available : allocator6.available
            if needed > free {
                throw BPFError("the update needs \(needed) IPv\(v4 ? 4 : 6) backend slots; \(free) are free")
            }
        }
        // Stale entries go first, so replacing many addresses never needs room for both sets.
        for key in installed.keys where desired[key] == nil {
            _ = key.withRaw { bpf_map_delete_elem(key.isV4 ? servicesFD : services6FD, $0) }
            if let old = installed.removeValue(forKey: key) { retired.append((old.value, key.isV4)) }
        }
        // Ranges replaced during this update are freed only once it is over: a connect that read an old entry
        // must not find its range rewritten for another service by the next install.
        defer {
            for (v, v4) in retired { release(v, v4: v4) }
            retired = []
        }
        for (key, entry) in changed.sorted(by: { $0.value.address < $1.value.address }) {
            try install(key, entry, table: tables[key]!)
        }
    }

    private func release(_ v: sl_service, v4: Bool) {
        if v4 { allocator.release(Self.range(of: v)) } else { allocator6.release(Self.range(of: v)) }
    }

    private func install(_ key: ServiceKey, _ entry: NodeSnapshot.BPFService, table: SlotTable) throws(BPFError) {
        var value = sl_service()
        value.id = entry.host.utf8.reduce(2_166_136_261 as UInt32) { ($0 ^ UInt32($1)) &* 16_777_619 }  // FNV-1a
        switch entry.action {
        case .balance where table.count == 0:
            // No backend of the address's family (an IPv6 address of a service with IPv4 endpoints only): the
            // agent takes these connections.
            value.action = UInt8(SL_ACTION_PROXY.rawValue)
        case .proxy:
            value.action = UInt8(SL_ACTION_PROXY.rawValue)
        case .balance(let lb, _):
            value.action = UInt8(SL_ACTION_BALANCE.rawValue)
            value.lb = UInt8(lb == .maglev ? SL_LB_MAGLEV.rawValue : SL_LB_RANDOM.rawValue)
            // The total was checked before any write; a fragmented array can still lack one contiguous range.
            guard let base = key.isV4 ? allocator.allocate(table.count) : allocator6.allocate(table.count) else {
                throw BPFError("no \(table.count) contiguous backend slots are free for \(entry.address); "
                               + "\(key.isV4 ? allocator.available : allocator6.available) are free in pieces")
            }
            value.slot_base = UInt32(base)
            value.slots = UInt16(table.count)
            for i in 0..<table.count {
                var slot = UInt32(base + i)
                let rc: Int32
                switch table {
                case .v4(var b): rc = bpf_map_update_elem(slotsFD, &slot, &b[i], 0)
                case .v6(var b): rc = bpf_map_update_elem(slots6FD, &slot, &b[i], 0)
                }
                if rc != 0 {
                    release(value, v4: key.isV4)
                    throw .errno("write backend slot \(slot)", rc)
                }
            }
        }
        let rc = key.withRaw { bpf_map_update_elem(key.isV4 ? servicesFD : services6FD, $0, &value, 0) }
        if rc != 0 {
            release(value, v4: key.isV4)
            throw .errno("write the services map for \(entry.address)", rc)
        }
        if let old = installed[key] { retired.append((old.value, key.isV4)) }
        installed[key] = Installed(value: value, entry: entry)
    }

    /// A service's backends as one of the two slot arrays stores them.
    enum SlotTable {
        case v4([sl_backend])
        case v6([sl_backend6])
        var count: Int {
            switch self {
            case .v4(let b): b.count
            case .v6(let b): b.count
            }
        }
    }

    static func range(of v: sl_service) -> Range<Int> { Int(v.slot_base)..<(Int(v.slot_base) + Int(v.slots)) }

    /// The slots of one service: weights apportioned over `32 x backends` slots (largest remainder) for random
    /// choice, or a weighted Maglev table for consistent hashing. Backends of the other address family than the
    /// service address are left out (the kernel cannot rewrite across families).
    static func slotTable(_ entry: NodeSnapshot.BPFService) -> SlotTable {
        let v4 = entry.address.ip.isIPv4
        guard case .balance(let lb, let all) = entry.action else { return v4 ? .v4([]) : .v6([]) }
        let backends = all.filter { $0.address.ip.isIPv4 == v4 }
        let order = slotOrder(lb: lb, backends: backends)
        if v4 {
            let kernel: [sl_backend] = backends.map { b in
                var k = sl_backend()
                if case .v4(let a) = b.address.ip { k.addr = a }
                k.port = b.address.port.bigEndian
                return k
            }
            return .v4(order.map { kernel[$0] })
        }
        let kernel: [sl_backend6] = backends.map { b in
            var k = sl_backend6()
            if case .v6(let hi, let lo) = b.address.ip {
                withUnsafeMutableBytes(of: &k.addr) { raw in
                    raw.storeBytes(of: hi, toByteOffset: 0, as: UInt64.self)
                    raw.storeBytes(of: lo, toByteOffset: 8, as: UInt64.self)
                }
            }
            k.port = b.address.port.bigEndian
            return k
        }
        return .v6(order.map { kernel[$0] })
    }

    /// Backend index per slot.
    static func slotOrder(lb: NodeSnapshot.BPFService.LoadBalancing, backends: [NodeSnapshot.BPFService.Backend]) -> [Int] {
        guard !backends.isEmpty else { return [] }
        let weights = backends.map { max($0.weight, 1) }
        if lb == .maglev {
            let size = min(MaglevTable.tableSize(backends: backends.count, requested: 1), Int(SL_MAX_SLOTS_PER_SERVICE))
            return MaglevTable(keys: backends.map(\.address.description), weights: weights, size: size).table.map { Int($0) }
        }
        let total = min(backends.count * randomSlotsPerBackend, Int(SL_MAX_SLOTS_PER_SERVICE))
        let sum = weights.reduce(0) { $0 + Int($1) }
        var counts = weights.map { Int($0) * total / sum }
        let remainders = weights.indices.sorted { (Int(weights[$0]) * total % sum, -$0) > (Int(weights[$1]) * total % sum, -$1) }
        for i in remainders.prefix(total - counts.reduce(0, +)) { counts[i] += 1 }
        var out: [Int] = []
        out.reserveCapacity(total)
        for (i, n) in counts.enumerated() { out += repeatElement(i, count: n) }
        return out
    }

    /// Reads the services a previous agent left pinned, so their slots are not handed out twice.
    func adoptInstalledServices() {
        adopt(servicesFD, as: sl_service_key.self) { k in
            ServiceKey(address: EndpointAddress(ip: .v4(k.addr), port: UInt16(bigEndian: k.port)), proto: k.proto)
        }
        adopt(services6FD, as: sl_service_key6.self) { k in
            let (hi, lo) = withUnsafeBytes(of: k.addr) { ($0.load(fromByteOffset: 0, as: UInt64.self),
                                                        $0.load(fromByteOffset: 8, as: UInt64.self)) }
            return ServiceKey(address: EndpointAddress(ip: .v6(hi, lo), port: UInt16(bigEndian: k.port)), proto: k.proto)
        }
    }

    private func adopt<K>(_ fd: Int32, as: K.Type, _ makeKey: (K) -> ServiceKey) {
        let size = MemoryLayout<K>.size
        let key = UnsafeMutableRawPointer.allocate(byteCount: size, alignment: 8)
        let next = UnsafeMutableRawPointer.allocate(byteCount: size, alignment: 8)
        defer {
            key.deallocate()
            next.deallocate()
        }
        var first = true
        while bpf_map_get_next_key(fd, first ? nil : key, next) == 0 {
            first = false
            key.copyMemory(from: next, byteCount: size)
            var value = sl_service()
            guard bpf_map_lookup_elem(fd, key, &value) == 0 else { continue }
            let k = makeKey(key.load(as: K.self))
            if k.isV4 { allocator.reserve(Self.range(of: value)) } else { allocator6.reserve(Self.range(of: value)) }
            installed[k] = Installed(value: value, entry: nil)
        }
    }
}
