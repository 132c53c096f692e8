import CSluiceLinux
import Glibc
import SluiceModel

/// The agent's BPF programs and maps: loaded with libbpf, pinned under one bpffs directory, attached to the
/// workloads' cgroup with pinned links, so they outlive an agent restart.
///
/// Lifecycle: ``init(objectDirectory:pinDirectory:)`` loads (reusing pinned maps when present),
/// ``attach(cgroup:)`` attaches or adopts pinned links, ``uninstall()`` detaches and unpins everything.
/// Dropping the object without `uninstall` leaves the programs running: that is what keeps kernel-balanced
/// connects working while the agent restarts.
///
/// - Important: ``apply(_:)``, ``attach(cgroup:)`` and ``uninstall()`` belong to one thread (the config
///   path); ``originalDestination(clientIPv4:port:)`` and ``counters()`` are single map lookups and may be
///   called from any thread, the data-plane workers included.
public final class Datapath: @unchecked Sendable {
    /// One program: the object file it is in, its function name and where it attaches.
    struct Program {
        var object: String
        var name: String
        var attachType: bpf_attach_type
    }

    static let programs: [Program] = [
        Program(object: "connect4.bpf.o", name: "sl_connect4", attachType: BPF_CGROUP_INET4_CONNECT),
        Program(object: "sockops.bpf.o", name: "sl_sockops", attachType: BPF_CGROUP_SOCK_OPS),
        Program(object: "getpeername4.bpf.o", name: "sl_getpeername4", attachType: BPF_CGROUP_INET4_GETPEERNAME),
        Program(object: "sendmsg4.bpf.o", name: "sl_sendmsg4", attachType: BPF_CGROUP_UDP4_SENDMSG),
        Program(object: "recvmsg4.bpf.o", name: "sl_recvmsg4", attachType: BPF_CGROUP_UDP4_RECVMSG),
        Program(object: "connect6.bpf.o", name: "sl_connect6", attachType: BPF_CGROUP_INET6_CONNECT),
        Program(object: "sendmsg6.bpf.o", name: "sl_sendmsg6", attachType: BPF_CGROUP_UDP6_SENDMSG),
        Program(object: "recvmsg6.bpf.o", name: "sl_recvmsg6", attachType: BPF_CGROUP_UDP6_RECVMSG),
        Program(object: "getpeername6.bpf.o", name: "sl_getpeername6", attachType: BPF_CGROUP_INET6_GETPEERNAME),
        Program(object: "ingress.bpf.o", name: "sl_ingress", attachType: BPF_CGROUP_INET_INGRESS),
    ]

    public let pinDirectory: String
    /// Programs attached to a captured cgroup.
    public static var programCount: Int { programs.count }
    /// Service addresses the services map holds.
    public static let maxServices = Int(SL_MAX_SERVICES)
    private var objects: [String: OpaquePointer] = [:]
    private var links: [OpaquePointer] = []
    let servicesFD: Int32
    let slotsFD: Int32
    let configFD: Int32
    let countersFD: Int32
    let peersFD: Int32
    let peers6FD: Int32
    let services6FD: Int32
    let slots6FD: Int32
    let excludedCIDRsFD: Int32
    let excludedPortsFD: Int32
    let inboundFD: Int32
    let guardedFD: Int32
    let authzFD: Int32
    /// What ``setPeerAuthentication(_:)`` and ``setLocalAuthorization(guarded:decisions:)`` last wrote.
    private var inbound: [InboundKey: UInt8] = [:]
    private var guarded: [UInt32: UInt8] = [:]
    private var decisions: [AuthzKey: UInt8] = [:]
    private var exclusions: (cidrs: [sl_cidr_key], ports: [UInt16]) = ([], [])
    /// What ``apply(_:)`` last wrote, to write only differences next time.
    var installed: [ServiceKey: Installed] = [:]
    var allocator = SlotAllocator(capacity: Int(SL_MAX_SLOTS))
    var allocator6 = SlotAllocator(capacity: Int(SL_MAX_SLOTS6))
    /// Slot ranges replaced during the current ``apply(_:)``, freed when it ends.
    var retired: [(sl_service, Bool)] = []

    /// Loads every program object from `objectDirectory`. Maps are pinned in `pinDirectory` by name; maps
    /// already pinned there (a previous agent's) are reused with their contents.
    public init(objectDirectory: String, pinDirectory: String = "/sys/fs/bpf/sluice") throws(BPFError) {
        self.pinDirectory = pinDirectory
        // Name a missing program type plainly, before libbpf's load fails with a bare EINVAL.
        for (type, name) in [(BPF_PROG_TYPE_CGROUP_SOCK_ADDR, "cgroup_sock_addr (cgroup/connect4, getpeername4)"),
                             (BPF_PROG_TYPE_SOCK_OPS, "sock_ops")]
            where libbpf_probe_bpf_prog_type(type, nil) == 0 {
            throw BPFError("this kernel does not support BPF program type \(name): it needs CONFIG_BPF_SYSCALL and "
                           + "CONFIG_CGROUP_BPF")
        }
        try Mounts.ensureBPFFS()
        let fresh = access(pinDirectory, F_OK) != 0
        try Mounts.makeDirectories(pinDirectory)
        var loaded: [String: OpaquePointer] = [:]
        do throws(BPFError) {
            for file in Set(Self.programs.map(\.object)).sorted() {
                loaded[file] = try Self.load("\(objectDirectory)/\(file)", pinRoot: pinDirectory)
            }
        } catch {
            for o in loaded.values { bpf_object__close(o) }
            // Maps pinned by the objects that did load go too, unless a previous agent's state was there.
            if fresh { try? Self.uninstall(pinDirectory: pinDirectory) }
            throw error
        }
        objects = loaded
        // Programs are pinned too (`prog_NAME`), replacing a previous agent's, so bpftool and operators find them.
        for p in Self.programs {
            guard let object = loaded[p.object], let program = bpf_object__find_program_by_name(object, p.name) else {
                continue
            }
            let pin = "\(pinDirectory)/prog_\(p.name)"
            unlink(pin)
            let rc = bpf_program__pin(program, pin)
            if rc != 0 {
                for o in loaded.values { bpf_object__close(o) }
                if fresh { try? Self.uninstall(pinDirectory: pinDirectory) }
                throw .errno("pin program \(p.name) at \(pin)", rc)
            }
        }
        let first = loaded[Self.programs[0].object]!
        func fd(_ name: String) -> Int32 { bpf_object__find_map_by_name(first, name).map { bpf_map__fd($0) } ?? -1 }
        servicesFD = fd("sl_services")
        slotsFD = fd("sl_slots")
        configFD = fd("sl_config")
        countersFD = fd("sl_counters")
        peersFD = fd("sl_dst_by_peer")
        peers6FD = fd("sl_dst6_by_peer")
        services6FD = fd("sl_services6")
        slots6FD = fd("sl_slots6")
        excludedCIDRsFD = fd("sl_exclude_cidrs")
        excludedPortsFD = fd("sl_exclude_ports")
        inboundFD = fd("sl_inbound")
        guardedFD = fd("sl_guarded")
        authzFD = fd("sl_l4_authz")
        if [servicesFD, slotsFD, configFD, countersFD, peersFD, excludedCIDRsFD, excludedPortsFD, services6FD, slots6FD, peers6FD,
            inboundFD, guardedFD, authzFD]
            .contains(where: { $0 < 0 }) {
            // Every stored property is set here, so deinit runs and closes the objects.
            throw BPFError("\(objectDirectory)/\(Self.programs[0].object) lacks one of Sluice's maps; rebuild it (make bpf)")
        }
        adoptInstalledServices()
    }

    deinit {
        for l in links { bpf_link__destroy(l) }  // pinned links stay attached
        for o in objects.values { bpf_object__close(o) }
    }

    private static func load(_ path: String, pinRoot: String) throws(BPFError) -> OpaquePointer {
        guard access(path, R_OK) == 0 else {
            throw .errno("BPF object \(path)", errno, hint: "build it with `make bpf`, or point --bpf-dir at it")
        }
        var opts = bpf_object_open_opts()
        opts.sz = MemoryLayout<bpf_object_open_opts>.size
        let object: OpaquePointer? = pinRoot.withCString { root in
            opts.pin_root_path = root
            return bpf_object__open_file(path, &opts)
        }
        guard let object else { throw .errno("open BPF object \(path)", errno, hint: "the file is not a BPF object") }
        let rc = bpf_object__load(object)
        if rc != 0 {
            bpf_object__close(object)
            throw .errno("load BPF object \(path)", rc,
                         hint: rc == -EPERM || rc == -EACCES ? "run as root (CAP_BPF, CAP_NET_ADMIN, CAP_SYS_ADMIN)"
                            : "the kernel rejected a program or map of it; see the kernel's BPF support")
        }
        return object
    }

    /// Attaches every program to the cgroup2 directory `cgroup`, or adopts the links a previous agent pinned
    /// (replacing their programs with the ones just loaded, atomically). On failure nothing new stays attached.
    public func attach(cgroup: String) throws(BPFError) {
        let cg = open(cgroup, O_RDONLY | O_DIRECTORY)
        guard cg >= 0 else { throw .errno("open cgroup \(cgroup)", errno, hint: "it must be a cgroup2 directory") }
        defer { close(cg) }
        var st = stat()
        fstat(cg, &st)
        let cgroupID = UInt64(st.st_ino)  // a cgroup2 directory's inode number is its cgroup id
        var made: [(OpaquePointer, String)] = []
        for p in Self.programs {
            guard let object = objects[p.object], let program = bpf_object__find_program_by_name(object, p.name) else {
                rollBack(made)
                throw BPFError("program \(p.name) is missing from \(p.object); rebuild it (make bpf)")
            }
            let pin = "\(pinDirectory)/link_\(p.name)"
            var pinned = access(pin, F_OK) == 0 ? bpf_link__open(pin) : nil
            if let old = pinned, !Self.link(old, isOn: cgroupID) {
                // Pinned by an agent that captured another cgroup: that one is let go, this one attached below.
                unlink(pin)
                bpf_link__destroy(old)
                pinned = nil
            }
            if let old = pinned {
                // A previous agent's link: swap in this agent's program without a moment detached.
                let rc = bpf_link__update_program(old, program)
                if rc != 0 {
                    bpf_link__destroy(old)
                    rollBack(made)
                    throw .errno("update pinned link \(pin)", rc)
                }
                links.append(old)
                continue
            }
            guard let link = bpf_program__attach_cgroup(program, cg) else {
                let e = errno
                rollBack(made)
                throw .errno("attach \(p.name) to \(cgroup)", e)
            }
            let rc = bpf_link__pin(link, pin)
            if rc != 0 {
                bpf_link__destroy(link)
                rollBack(made)
                throw .errno("pin link at \(pin)", rc)
            }
            made.append((link, pin))
            links.append(link)
        }
    }

    /// Whether a cgroup link is attached to the cgroup with id `cgroupID`.
    static func link(_ link: OpaquePointer, isOn cgroupID: UInt64) -> Bool {
        var info = bpf_link_info()
        var length = UInt32(MemoryLayout<bpf_link_info>.size)
        guard bpf_obj_get_info_by_fd(bpf_link__fd(link), &info, &length) == 0 else { return true }
        return info.cgroup.cgroup_id == cgroupID
    }

    private func rollBack(_ made: [(OpaquePointer, String)]) {
        for (link, pin) in made {
            unlink(pin)
            bpf_link__destroy(link)
            links.removeAll { $0 == link }
        }
    }

    /// Sets where captured connections go (the agent's outbound listener) and, when `dnsPort` is set, where
    /// DNS queries (UDP to port 53) go.
    /// - Parameter registryOnly: Istio's `outboundTrafficPolicy: REGISTRY_ONLY`: connects to anything but a
    ///   service, an excluded destination or loopback are refused in the kernel.
    public func setAgent(address: String, port: UInt16, dnsPort: UInt16? = nil, registryOnly: Bool = false)
        throws(BPFError)
    {
        var cfg = sl_config()
        guard inet_pton(AF_INET, address, &cfg.agent_addr) == 1 else { throw BPFError("'\(address)' is not an IPv4 address") }
        cfg.agent_port = port.bigEndian
        cfg.dns_port = (dnsPort ?? 0).bigEndian
        cfg.flags = registryOnly ? UInt32(SL_CONFIG_REGISTRY_ONLY.rawValue) : 0
        var zero: UInt32 = 0
        let rc = bpf_map_update_elem(configFD, &zero, &cfg, 0)
        if rc != 0 { throw .errno("write sl_config", rc) }
    }

    /// Destinations the programs never touch, whatever the services map says: CIDRs (`10.0.0.0/8`, or one
    /// address) and destination ports. Replaces the previous lists.
    public func setExclusions(cidrs: [String], ports: [UInt16]) throws(BPFError) {
        var keys: [sl_cidr_key] = []
        for text in cidrs {
            let parts = text.split(separator: "/", maxSplits: 1)
            var key = sl_cidr_key()
            guard inet_pton(AF_INET, String(parts[0]), &key.addr) == 1 else {
                throw BPFError("exclusion '\(text)' is not an IPv4 address or CIDR")
            }
            let bits = parts.count == 2 ? UInt32(parts[1]) : 32
            guard let bits, bits <= 32 else { throw BPFError("exclusion '\(text)' has a bad prefix length") }
            key.prefixlen = bits
            keys.append(key)
        }
        guard keys.count <= Int(SL_MAX_EXCLUSIONS), ports.count <= Int(SL_MAX_EXCLUSIONS) else {
            throw BPFError("more than \(SL_MAX_EXCLUSIONS) exclusions")
        }
        var one: UInt8 = 1
        // New entries first, then the stale ones go: a destination excluded before and after never flickers.
        for var k in keys {
            let rc = bpf_map_update_elem(excludedCIDRsFD, &k, &one, 0)
            if rc != 0 { throw .errno("write sl_exclude_cidrs", rc) }
        }
        for p in ports {
            var k = p.bigEndian
            let rc = bpf_map_update_elem(excludedPortsFD, &k, &one, 0)
            if rc != 0 { throw .errno("write sl_exclude_ports", rc) }
        }
        for var k in exclusions.cidrs where !keys.contains(where: { $0.addr == k.addr && $0.prefixlen == k.prefixlen }) {
            bpf_map_delete_elem(excludedCIDRsFD, &k)
        }
        for p in exclusions.ports where !ports.contains(p) {
            var k = p.bigEndian
            bpf_map_delete_elem(excludedPortsFD, &k)
        }
        exclusions = (keys, ports)
    }

    /// One workload port's PeerAuthentication mode in the kernel: `port` 0 is the workload's own mode.
    public struct PeerAuthenticationEntry: Sendable, Hashable {
        public var address: IPAddress
        public var port: UInt16
        public var strict: Bool
        public init(address: IPAddress, port: UInt16, strict: Bool) {
            self.address = address
            self.port = port
            self.strict = strict
        }
    }

    struct InboundKey: Hashable {
        let addr: UInt32
        let port: UInt16
    }

    /// Replaces the PeerAuthentication entries the ingress program checks (IPv4 workloads; IPv6 ones are not
    /// enforced in the kernel yet). New and changed entries are written before stale ones go.
    public func setPeerAuthentication(_ entries: [PeerAuthenticationEntry]) throws(BPFError) {
        var next: [InboundKey: UInt8] = [:]
        for e in entries {
            guard case .v4(let a) = e.address else { continue }
            next[InboundKey(addr: a, port: e.port.bigEndian)] = UInt8(e.strict ? SL_PEER_STRICT.rawValue : SL_PEER_PERMISSIVE.rawValue)
        }
        guard next.count <= Int(SL_MAX_INBOUND) else { throw BPFError("more than \(SL_MAX_INBOUND) PeerAuthentication entries") }
        let raw = { (k: InboundKey) in sl_inbound_key(addr: k.addr, port: k.port, pad: 0) }
        try Self.write(inboundFD, "sl_inbound", next, over: inbound, raw)
        Self.delete(inboundFD, inbound, missingFrom: next, raw)
        inbound = next
    }

    /// Writes the entries of `next` that `current` (what the map holds) lacks or holds with another value.
    private static func write<Key: Hashable, Raw>(_ fd: Int32, _ name: String, _ next: [Key: UInt8], over current: [Key: UInt8],
                                                  _ raw: (Key) -> Raw) throws(BPFError) {
        for (k, v) in next where current[k] != v {
            var key = raw(k)
            var value = v
            let rc = bpf_map_update_elem(fd, &key, &value, 0)
            if rc != 0 { throw .errno("write \(name)", rc) }
        }
    }

    /// Deletes the entries of `current` that `next` no longer has.
    private static func delete<Key: Hashable, Raw>(_ fd: Int32, _ current: [Key: UInt8], missingFrom next: [Key: UInt8],
                                                   _ raw: (Key) -> Raw) {
        for k in current.keys where next[k] == nil {
            var key = raw(k)
            bpf_map_delete_elem(fd, &key)
        }
    }

    /// One decision for calls between workloads of one node: may the caller in cgroup `cgroup` (0: a caller that is
    /// no workload) connect to `address`:`port` (0: any port not listed)?
    public struct LocalAuthorization: Sendable, Hashable {
        public var cgroup: UInt64
        public var address: IPAddress
        public var port: UInt16
        public var allow: Bool
        public init(cgroup: UInt64, address: IPAddress, port: UInt16, allow: Bool) {
            self.cgroup = cgroup
            self.address = address
            self.port = port
            self.allow = allow
        }
    }

    struct AuthzKey: Hashable {
        let cgroup: UInt64
        let addr: UInt32
        let port: UInt16
    }

    /// Replaces what connect4 checks for calls to workloads of this node: the `guarded` addresses (IPv4) and the
    /// decisions for their callers. Decisions are written before the addresses that need them, and stale addresses
    /// go before their decisions, so a connect never finds a guarded address without its decisions.
    public func setLocalAuthorization(guarded addresses: [IPAddress], decisions entries: [LocalAuthorization]) throws(BPFError) {
        var nextGuarded: [UInt32: UInt8] = [:]
        for a in addresses { if case .v4(let v) = a { nextGuarded[v] = 1 } }
        var next: [AuthzKey: UInt8] = [:]
        for e in entries {
            guard case .v4(let a) = e.address else { continue }
            next[AuthzKey(cgroup: e.cgroup, addr: a, port: e.port.bigEndian)] =
                UInt8(e.allow ? SL_AUTHZ_ALLOW.rawValue : SL_AUTHZ_DENY.rawValue)
        }
        guard next.count <= Int(SL_MAX_AUTHZ), nextGuarded.count <= Int(SL_MAX_INBOUND) else {
            throw BPFError("more than \(SL_MAX_AUTHZ) authorization decisions")
        }
        let raw = { (k: AuthzKey) in sl_authz_key(cgroup_id: k.cgroup, addr: k.addr, port: k.port, pad: 0) }
        try Self.write(authzFD, "sl_l4_authz", next, over: decisions, raw)
        try Self.write(guardedFD, "sl_guarded", nextGuarded, over: guarded, { $0 })
        Self.delete(guardedFD, guarded, missingFrom: nextGuarded, { $0 })
        Self.delete(authzFD, decisions, missingFrom: next, raw)
        guarded = nextGuarded
        decisions = next
    }

    /// Detaches every program and removes every pin: the host is as before the agent ran.
    public func uninstall() throws(BPFError) {
        // Close this agent's link descriptors; removing the pins then lets the kernel detach the programs.
        for l in links { bpf_link__destroy(l) }
        links = []
        try Self.uninstall(pinDirectory: pinDirectory)
    }

    /// Where a connection the agent accepted was going, and which cgroup dialled it: looked up by the client's
    /// address (what `accept` returns). Nil for connections the programs did not redirect.
    public func originalDestination(clientIPv4 address: UInt32, port: UInt16) -> OriginalDestination? {
        var key = sl_peer_key()
        key.addr = address
        key.port = port.bigEndian
        var dst = sl_original_dst()
        guard bpf_map_lookup_elem(peersFD, &key, &dst) == 0 else { return nil }
        return OriginalDestination(address: EndpointAddress(ip: .v4(dst.addr), port: UInt16(bigEndian: dst.port)),
                                   cgroupID: dst.cgroup_id)
    }

    /// Looks up a connection from an IPv4 or IPv6 client (`accept`'s peer address).
    public func originalDestination(client: IPAddress, port: UInt16) -> OriginalDestination? {
        switch client {
        case .v4(let a):
            return originalDestination(clientIPv4: a, port: port)
        case .v6(let hi, let lo):
            var key = sl_peer_key6()
            withUnsafeMutableBytes(of: &key.addr) { raw in
                raw.storeBytes(of: hi, toByteOffset: 0, as: UInt64.self)
                raw.storeBytes(of: lo, toByteOffset: 8, as: UInt64.self)
            }
            key.port = port.bigEndian
            var dst = sl_original_dst6()
            guard bpf_map_lookup_elem(peers6FD, &key, &dst) == 0 else { return nil }
            let (dhi, dlo) = withUnsafeBytes(of: dst.addr) { ($0.load(fromByteOffset: 0, as: UInt64.self),
                                                               $0.load(fromByteOffset: 8, as: UInt64.self)) }
            return OriginalDestination(address: EndpointAddress(ip: .v6(dhi, dlo), port: UInt16(bigEndian: dst.port)),
                                       cgroupID: dst.cgroup_id)
        }
    }

    public struct OriginalDestination: Sendable, Equatable {
        public var address: EndpointAddress
        /// The client's cgroup (its inode number): which workload dialled.
        public var cgroupID: UInt64

        public init(address: EndpointAddress, cgroupID: UInt64) {
            self.address = address
            self.cgroupID = cgroupID
        }
    }

    /// Removes what an agent pinned under `pinDirectory` without loading anything (the object files may be
    /// gone): unpinning the links detaches the programs, unpinning the maps frees them.
    public static func uninstall(pinDirectory: String = "/sys/fs/bpf/sluice") throws(BPFError) {
        guard let dir = opendir(pinDirectory) else {
            if errno == ENOENT { return }
            throw .errno("open \(pinDirectory)", errno)
        }
        var names: [String] = []
        while let e = readdir(dir) {
            let name = withUnsafeBytes(of: e.pointee.d_name) { String(decoding: $0.prefix { $0 != 0 }, as: UTF8.self) }
            if name != "." && name != ".." { names.append(name) }
        }
        closedir(dir)
        for name in names.sorted(by: { a, _ in a.hasPrefix("link_") }) {
            if unlink("\(pinDirectory)/\(name)") != 0 { throw .errno("unpin \(pinDirectory)/\(name)", errno) }
        }
        if rmdir(pinDirectory) != 0 { throw .errno("remove \(pinDirectory)", errno) }
    }

    /// Per-CPU counters summed over CPUs.
    public func counters() -> Counters {
        let cpus = Int(libbpf_num_possible_cpus())
        var values = [UInt64](repeating: 0, count: max(cpus, 1))
        func read(_ which: sl_counter) -> UInt64 {
            var key = which.rawValue
            guard bpf_map_lookup_elem(countersFD, &key, &values) == 0 else { return 0 }
            return values.reduce(0, +)
        }
        return Counters(connects: read(SL_COUNT_CONNECTS), balanced: read(SL_COUNT_BALANCED),
                        redirected: read(SL_COUNT_REDIRECTED), misses: read(SL_COUNT_MISSES),
                        excluded: read(SL_COUNT_EXCLUDED), dnsQueries: read(SL_COUNT_DNS), denied: read(SL_COUNT_DENIED),
                        strictDropped: read(SL_COUNT_STRICT), authorizationDenied: read(SL_COUNT_AUTHZ))
    }

    public struct Counters: Sendable, Equatable {
        public var connects: UInt64
        public var balanced: UInt64
        public var redirected: UInt64
        public var misses: UInt64
        public var excluded: UInt64
        public var dnsQueries: UInt64
        public var denied: UInt64
        /// Packets from outside the node to STRICT workload ports, dropped.
        public var strictDropped: UInt64
        /// Connects to workloads of the node refused by their AuthorizationPolicies.
        public var authorizationDenied: UInt64
    }

    /// Programs attached to `cgroup` (0 after ``uninstall()``), through the kernel's own query.
    /// Counted over every attach type Sluice uses.
    public static func attachedPrograms(cgroup: String) -> Int {
        let cg = open(cgroup, O_RDONLY | O_DIRECTORY)
        guard cg >= 0 else { return 0 }
        defer { close(cg) }
        var total = 0
        for type in Set(programs.map(\.attachType.rawValue)) {
            var count: UInt32 = 0
            var flags: UInt32 = 0
            if bpf_prog_query(cg, bpf_attach_type(rawValue: type), 0, &flags, nil, &count) == 0 { total += Int(count) }
        }
        return total
    }
}
