import Foundation
import Logging
import SluiceBPF
import SluiceHTTP
import SluiceModel
import SluiceProtocol
import SluiceProxy
import SluiceRing
import SluiceTelemetry
import Synchronization

/// The node agent: loads the mesh config, runs the data-plane workers, health checks, metrics and readiness,
/// and drains on SIGTERM.
public final class Agent: @unchecked Sendable {
    public struct Options: Sendable {
        /// The mesh configuration from files; nil: pushed by the control plane (``control``).
        public var localConfig: String?
        /// The control plane's agent stream: where the snapshot comes from when there is no local config.
        public var control: ControlOptions?
        /// Where the agent keeps what must survive a restart (the last accepted snapshot).
        public var stateDirectory = "/var/lib/sluice"
        public var node: String?
        public var workers: Int
        public var metricsAddress: String
        public var readinessAddress: String
        public var adminAddress: String
        public var drainTimeout: Duration
        public var connectionLimit: Int
        public var bufferCount: UInt16
        public var bufferSize: Int
        /// How often the config directory is checked for changes.
        public var reloadInterval: Duration = .milliseconds(500)
        /// The workloads' cgroup2 directory: when set, the BPF programs capture and balance its connections.
        public var cgroup: String?
        /// Where the BPF objects are (`connect4.bpf.o`, ...); nil: next to the executable, then /usr/lib/sluice/bpf.
        public var bpfDirectory: String?
        public var pinDirectory = "/sys/fs/bpf/sluice"
        /// Destinations the programs never touch, besides the agent's own ports.
        public var captureExclusions: [String] = []
        /// The outbound listener captured connections are sent to.
        public var outboundPort: UInt16 = 15001
        /// The DNS listener captured queries are sent to (127.0.0.1, UDP); 0 leaves DNS alone.
        public var dnsPort: UInt16 = 15053
        /// Where names that are not mesh hosts are resolved; nil: the first nameserver of /etc/resolv.conf.
        public var dnsUpstream: EndpointAddress?
        /// Request head limits of HTTP listeners: bytes of a head and fields in it (431 beyond), bytes of a
        /// request target (414 beyond).
        public var maxRequestHeadBytes = 16 << 10
        public var maxRequestHeaders = 100
        public var maxURIBytes = 8 << 10
        /// A request head must be complete this long after its first byte.
        public var headerTimeout: Duration = .seconds(10)
        /// Gateway certificates named by `credentialName`: `<dir>/<name>/tls.crt`, `tls.key`, `ca.crt`.
        public var credentialsDirectory = ProxyRuntime.defaultCredentials
        /// Set when the agent gets certificates from `sluice control` (`--control`). Its node and trust domain
        /// are filled in at start.
        public var certificates: CertificateManager.Options?
        /// Where this agent accepts HBONE tunnels, and where it reaches other nodes' agents (with certificates).
        public var tunnelPort: UInt16 = 15008
        /// RequestAuthentication `jwksUri` over https: extra roots to trust besides the system's, and how often the
        /// sets are fetched again.
        public var jwksTrust: String?
        public var jwksRefresh: Duration = .seconds(300)

        public init(localConfig: String?, node: String? = nil, workers: Int = Agent.defaultWorkers,
                    metricsAddress: String = "0.0.0.0:15020", readinessAddress: String = "0.0.0.0:15021",
                    adminAddress: String = "127.0.0.1:15000", drainTimeout: Duration = .seconds(5),
                    connectionLimit: Int = 1 << 20, bufferCount: UInt16 = 256, bufferSize: Int = 64 << 10) {
            self.localConfig = localConfig
            self.node = node
            self.workers = workers
            self.metricsAddress = metricsAddress
            self.readinessAddress = readinessAddress
            self.adminAddress = adminAddress
            self.drainTimeout = drainTimeout
            self.connectionLimit = connectionLimit
            self.bufferCount = bufferCount
            self.bufferSize = bufferSize
        }
    }

    /// The agent stream's endpoint (the CA's host; the stream's own port).
    public struct ControlOptions: Sendable {
        public var host: String
        public var port: Int
        public var serverName: String
        public var rootCA: String
        /// The trust domain of the node certificate before any snapshot names one.
        public var trustDomain: String
        /// WorkloadEntry YAML of this host's workloads, registered with the control plane (`--workloads`).
        public var workloadsDirectory: String?
        public init(host: String, port: Int, serverName: String, rootCA: String, trustDomain: String) {
            self.host = host
            self.port = port
            self.serverName = serverName
            self.rootCA = rootCA
            self.trustDomain = trustDomain
        }
    }

    public static let version = "0.13.0-dev"

    /// One worker per core.
    public static var defaultWorkers: Int { max(1, ProcessInfo.processInfo.activeProcessorCount) }
    /// Where gateway certificates named by `credentialName` are read from.
    public static let defaultCredentials = ProxyRuntime.defaultCredentials

    public struct StartError: Error, CustomStringConvertible {
        public let description: String
    }

    public let options: Options
    public let registry = MetricsRegistry()
    let logger: Logger
    private var server: L4Server?
    /// With a control plane: the workloads' certificates (joined, issued and rotated on a thread of their own).
    private var certificates: CertificateManager?
    /// With certificates: the workloads' TLS contexts for HBONE, and the tunnels' settings.
    private lazy var tunnels: TunnelSettings? = options.certificates.map { [logger] _ in
        TunnelSettings(credentials: MeshCredentials(), port: options.tunnelPort, logDenial: { logger.warning("\($0)") })
    }
    private let health = HealthChecker()
    private let http = HTTPEndpoints()
    private let ready = Atomic<Bool>(false)
    private let current = Mutex<ProxyRuntime?>(nil)
    /// Ports the current listeners bound, in config order.
    public var listenerPorts: [UInt16] { server?.boundPorts ?? [] }
    public private(set) var metricsPort = 0
    public private(set) var readinessPort = 0

    public init(options: Options, logger: Logger) {
        self.options = options
        self.logger = logger
        nodeName = options.node ?? Self.hostName()
    }

    /// The node this agent serves: `--node`, else the host name (as the `sluice.dev/node` annotation names it).
    public let nodeName: String

    static func hostName() -> String {
        var buf = [CChar](repeating: 0, count: 256)
        guard gethostname(&buf, buf.count) == 0 else { return "localhost" }
        return String(decoding: buf.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
    }

    /// Loads and compiles the configuration directory. Throws a message that lists every error.
    public static func loadSnapshot(_ path: String, node: String, logger: Logger?) throws -> NodeSnapshot {
        let loaded = ConfigLoader.load(path: path)
        for d in loaded.diagnostics where d.severity == .warning { logger?.warning("\(d)") }
        if !loaded.errors.isEmpty {
            // One line per problem: file:line, resource, field, what is wrong and the fix.
            throw StartError(description: loaded.errors.map(\.description).joined(separator: "\n"))
        }
        do {
            let compiler = try MeshCompiler(loaded.resources)
            for d in compiler.warnings { logger?.warning("\(d)") }
            return compiler.snapshot(for: node)
        } catch {
            for d in error.diagnostics where d.severity == .warning { logger?.warning("\(d)") }
            throw StartError(description: error.diagnostics.filter { $0.severity == .error }.map(\.description)
                .joined(separator: "\n"))
        }
    }

    /// The BPF programs, when `--cgroup` is set.
    public private(set) var datapath: Datapath?
    /// The listener the programs send captured connections to.
    private var capture: OutboundCapture?
    /// The captured cgroup's id (processes placed in it directly, not in a workload's own cgroup).
    private var capturedCgroupID: UInt64 = 0
    /// Answer the captured workloads' DNS queries for mesh hosts (IPv4 and IPv6 loopback).
    private var dns: [DNSServer] = []

    /// Mesh host names and their service addresses, as the DNS listener answers them.
    /// What this agent serves now, for `sluice proxy-config` (asked over the agent stream): the installed snapshot,
    /// the port each of its listeners holds, each cluster's endpoint health and the certificates on this node.
    func configDump(version: Int64) -> AgentConfigDump? {
        guard let runtime = current.withLock({ $0 }) else { return nil }
        let ports = listenerPorts
        let listeners = runtime.snapshot.listeners.enumerated().map { i, l in
            AgentConfigDump.BoundListener(name: l.name, port: i < ports.count ? ports[i] : nil)
        }
        var health: [String: [Bool]] = [:]
        for c in runtime.clusters { health[c.config.name] = (0..<c.health.count).map(c.health.isHealthy) }
        return AgentConfigDump(node: nodeName, agentVersion: Self.version, version: version, snapshot: runtime.snapshot,
                               listeners: listeners, endpointHealth: health, secrets: certificates?.secrets() ?? [])
    }

    static func meshHosts(_ snapshot: NodeSnapshot) -> [String: [IPAddress]] {
        var table: [String: [IPAddress]] = [:]
        for s in snapshot.services {
            let ips = s.addresses.compactMap(IPAddress.init)
            if !ips.isEmpty { table[s.host.lowercased()] = ips }
        }
        return table
    }

    /// Loads the programs (adopting a previous agent's pins), attaches them to the workloads' cgroup and writes
    /// the node's service map. A start that fails here leaves nothing attached it did not find attached.
    private func startDatapath(_ snapshot: NodeSnapshot) throws {
        guard let cgroup = options.cgroup else { return }
        let adopting = access("\(options.pinDirectory)/link_sl_connect4", F_OK) == 0
        do throws(BPFError) {
            let mount = try Mounts.ensureCgroup2()
            let path = cgroup.hasPrefix("/") ? cgroup : mount + "/" + cgroup
            // An agent inside the cgroup it captures would capture its own upstream connections.
            if let own = Mounts.ownCgroup(mount: mount), own == path || own.hasPrefix(path + "/") {
                throw BPFError("the agent runs inside \(path), the cgroup it would capture; run it outside "
                               + "(systemd: its own slice, not the workloads')")
            }
            let dp = try Datapath(objectDirectory: options.bpfDirectory ?? Self.defaultBPFDirectory(),
                                  pinDirectory: options.pinDirectory)
            do throws(BPFError) {
                try dp.attach(cgroup: path)
                try setAgent(dp, snapshot)
                // The agent's own ports are never captured, whatever a service declares.
                try dp.setExclusions(cidrs: options.captureExclusions,
                                     ports: [options.outboundPort, 15000, options.tunnelPort, 15020, 15021, 15053])
                try dp.apply(snapshot.bpfServices)
            } catch {
                if !adopting { try? dp.uninstall() }
                throw error
            }
            datapath = dp
            if options.dnsPort != 0 {
                // Queries arrive on 127.0.0.1 from IPv4 sockets and on [::1] from IPv6 ones.
                let hosts = Self.meshHosts(snapshot)
                let upstream = options.dnsUpstream ?? DNSServer.systemResolver()
                for ip in [IPAddress.v4(UInt32(0x7f00_0001).bigEndian), IPAddress("::1")!] {
                    let server = DNSServer(upstream: upstream)
                    server.update(hosts: hosts)
                    do {
                        try server.start(address: EndpointAddress(ip: ip, port: options.dnsPort))
                    } catch {
                        throw BPFError("\(error)")
                    }
                    dns.append(server)
                }
            }
            var st = stat()
            if stat(path, &st) == 0 { capturedCgroupID = UInt64(st.st_ino) }
            capture = OutboundCapture(
                addresses: [EndpointAddress(ip: .v4(UInt32(0x7f00_0001).bigEndian), port: options.outboundPort),
                            EndpointAddress(ip: IPAddress("::1")!, port: options.outboundPort)],
                originalDestination: { [dp] ip, port in
                    dp.originalDestination(client: ip, port: port).map { ($0.address, $0.cgroupID) }
                },
                cgroupID: { path in
                    // `sluice.dev/cgroup`: absolute, or relative to the cgroup2 mount; its id is its inode number.
                    var st = stat()
                    return stat(path.hasPrefix("/") ? path : mount + "/" + path, &st) == 0 ? UInt64(st.st_ino) : nil
                })
            let kernel = snapshot.bpfServices.filter(\.isL4Only).count
            logger.info("capturing", metadata: ["cgroup": "\(path)", "adopted": "\(adopting)",
                                                "kernel_balanced": "\(kernel)",
                                                "via_agent": "\(snapshot.bpfServices.count - kernel)"])
        } catch {
            throw StartError(description: "BPF: \(error)")
        }
    }

    /// The BPF programs' per-CPU counters, summed, in Prometheus text.
    static func renderKernelCounters(_ dp: Datapath) -> String {
        let c = dp.counters()
        var out = ""
        for (name, help, value) in [
            ("sluice_bpf_connects_total", "Connects the capture programs saw", c.connects),
            ("sluice_bpf_balanced_total", "Connects balanced to a backend in the kernel", c.balanced),
            ("sluice_bpf_redirected_total", "Connects sent to the agent", c.redirected),
            ("sluice_bpf_excluded_total", "Connects to excluded destinations, left alone", c.excluded),
            ("sluice_bpf_misses_total", "Service entries without a usable backend table", c.misses),
            ("sluice_bpf_dns_queries_total", "DNS queries sent to the agent's DNS listener", c.dnsQueries),
            ("sluice_bpf_denied_total", "Connects refused: not a service while the mesh is REGISTRY_ONLY", c.denied),
            ("sluice_bpf_peer_authentication_dropped_total",
             "Packets from outside the node to workload ports whose PeerAuthentication is STRICT, dropped", c.strictDropped),
            ("sluice_bpf_authorization_denied_total",
             "Connects to workloads of this node refused at connect() by their AuthorizationPolicies", c.authorizationDenied),
        ] {
            out += "# HELP \(name) \(help)\n# TYPE \(name) counter\n\(name) \(value)\n"
        }
        return out
    }

    /// Where captured connections and queries go, and whether the mesh admits only its registry.
    private func setAgent(_ dp: Datapath, _ snapshot: NodeSnapshot) throws(BPFError) {
        try dp.setAgent(address: "127.0.0.1", port: options.outboundPort,
                        dnsPort: options.dnsPort == 0 ? nil : options.dnsPort,
                        registryOnly: snapshot.mesh.outboundTrafficPolicy == .registryOnly)
        try dp.setPeerAuthentication(Self.peerAuthentication(snapshot))
    }

    /// Writes the decisions connect() applies to calls between workloads of this node. The callers: each workload
    /// cgroup (`sluice.dev/cgroup`) with its identity (none when it holds several), the captured cgroup itself
    /// (the node's only identity, if it has one), and 0 for anything else.
    private func applyLocalAuthorization(_ dp: Datapath, _ runtime: ProxyRuntime) throws(BPFError) {
        var identities: [UInt64: Set<String>] = [:]
        var addresses: [UInt64: IPAddress] = [:]
        for w in runtime.snapshot.workloads {
            guard let path = w.cgroup, let id = capture?.cgroupID(path) else { continue }
            identities[id, default: []].insert(w.identity)
            addresses[id] = IPAddress(w.address)
        }
        var callers = identities.map { id, set in
            ProxyRuntime.LocalCaller(cgroup: id, identity: set.count == 1 ? set.first : nil, address: set.count == 1 ? addresses[id] : nil)
        }
        let all = Set(runtime.snapshot.workloads.map(\.identity))
        if capturedCgroupID != 0 && identities[capturedCgroupID] == nil {
            callers.append(.init(cgroup: capturedCgroupID, identity: all.count == 1 ? all.first : nil, address: nil))
        }
        callers.append(.init(cgroup: 0, identity: nil, address: nil))
        let (guarded, decisions) = runtime.localAuthorization(callers: callers)
        try dp.setLocalAuthorization(guarded: guarded, decisions: decisions.map {
            Datapath.LocalAuthorization(cgroup: $0.cgroup, address: $0.address, port: $0.port, allow: $0.allow)
        })
    }

    /// The kernel's PeerAuthentication entries for the node's workloads: each workload's mode, and its ports' own.
    static func peerAuthentication(_ snapshot: NodeSnapshot) -> [Datapath.PeerAuthenticationEntry] {
        var out: [Datapath.PeerAuthenticationEntry] = []
        for w in snapshot.workloads {
            guard let ip = IPAddress(w.address) else { continue }
            out.append(.init(address: ip, port: 0, strict: w.peerAuthentication == .strict))
            for (port, mode) in w.peerAuthenticationPorts.sorted(by: { $0.key < $1.key }) {
                out.append(.init(address: ip, port: port, strict: mode == .strict))
            }
        }
        return out
    }

    /// `bpf/` objects: beside the build output (`.build/bpf`), then the installed location.
    static func defaultBPFDirectory() -> String {
        let exe = (try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/self/exe")) ?? ""
        var dir = (exe as NSString).deletingLastPathComponent
        for _ in 0..<3 {
            dir = (dir as NSString).deletingLastPathComponent
            let candidate = dir + "/bpf"
            if FileManager.default.fileExists(atPath: candidate + "/connect4.bpf.o") { return candidate }
        }
        return "/usr/lib/sluice/bpf"
    }

    /// Remote JWKS, fetched by the config thread.
    private lazy var jwks = JWKSCache { [options] url in try JWKSFetcher.fetch(url, extraTrust: options.jwksTrust) }

    /// Services whose connections the agent must see are not left to the kernel: with tunnels, those with workloads
    /// on other nodes (their bytes would cross the network in plaintext); those with workloads of this node that an
    /// AuthorizationPolicy selects.
    private func served(_ snapshot: NodeSnapshot) -> NodeSnapshot {
        snapshot.servedByAgent(tunnels: tunnels != nil)
    }

    /// The snapshot to serve at start: the local config's, else the one the last run accepted from the control plane
    /// (served while the control plane is unreachable), else an empty one until the first push.
    private func initialSnapshot() throws -> (raw: NodeSnapshot, version: Int64, ready: Bool) {
        if let path = options.localConfig {
            return (try Self.loadSnapshot(path, node: nodeName, logger: logger), 0, true)
        }
        if let (snapshot, version) = ControlStream.loadPersisted(snapshotFile), snapshot.node == nodeName {
            logger.info("serving the snapshot persisted by the last run until the control plane answers",
                        metadata: ["file": "\(snapshotFile)", "version": "\(version)"])
            return (snapshot, version, true)
        }
        var empty = NodeSnapshot(node: nodeName)
        if let td = options.control?.trustDomain { empty.mesh.trustDomain = td }
        return (empty, 0, false)
    }

    var snapshotFile: String { options.stateDirectory + "/snapshot.json" }

    public func start() throws {
        let (raw, version, haveConfig) = try initialSnapshot()
        lastRaw.withLock { $0 = raw }
        let snapshot = served(raw)
        try startDatapath(snapshot)
        if snapshot.listeners.isEmpty && options.localConfig != nil {
            logger.warning("the configuration opens no listener", metadata: ["config": "\(options.localConfig ?? "")"])
        }
        let runtime: ProxyRuntime
        do {
            runtime = try ProxyRuntime(snapshot: snapshot, registry: registry, capture: capture,
                                       credentials: options.credentialsDirectory, tunnels: tunnels, jwks: jwks)
        } catch {
            throw StartError(description: error.description)
        }
        if let datapath {
            do {
                try applyLocalAuthorization(datapath, runtime)
            } catch {
                throw StartError(description: "BPF: \(error)")
            }
        }
        current.withLock { $0 = runtime }
        var limits = HTTP1Limits()
        limits.maxHeadBytes = options.maxRequestHeadBytes
        limits.maxHeaderCount = options.maxRequestHeaders
        limits.maxURIBytes = options.maxURIBytes
        let server = L4Server(options: .init(workers: options.workers, connectionLimit: options.connectionLimit,
                                             bufferCount: options.bufferCount, bufferSize: options.bufferSize,
                                             httpLimits: limits, headerTimeout: options.headerTimeout),
                              registry: registry)
        do {
            try server.start(runtime)
        } catch {
            throw StartError(description: error.description)
        }
        self.server = server
        health.update(runtime)
        health.start()
        if var c = options.certificates {
            c.node = nodeName
            c.trustDomain = snapshot.mesh.trustDomain
            do {
                let manager = try CertificateManager(options: c, registry: registry, logger: logger)
                if let credentials = tunnels?.credentials {
                    manager.onChange = { [logger] files, trust in
                        do {
                            try credentials.load(files, trustBundle: trust)
                            logger.info("tunnel credentials loaded", metadata: [
                                "generation": "\(credentials.current.number)", "identities": "\(files.keys.sorted())"])
                        } catch {
                            logger.error("tunnel credentials not loaded; the previous ones stay in use: \(error)")
                        }
                    }
                }
                manager.update(identities: snapshot.workloads.map(\.identity))
                manager.start()
                certificates = manager
            } catch {
                throw StartError(description: "certificates: \(error)")
            }
        }
        do {
            metricsPort = try http.serve(options.metricsAddress) { [registry, datapath] method, path in
                path == "/metrics" || path == "/stats/prometheus"
                    ? (200, "text/plain; version=0.0.4; charset=utf-8",
                       registry.render() + (datapath.map(Self.renderKernelCounters) ?? "")) : nil
            }
            readinessPort = try http.serve(options.readinessAddress) { [weak self] _, path in
                guard path == "/healthz/ready" else { return nil }
                return self?.ready.load(ordering: .relaxed) == true ? (200, "text/plain", "ready\n")
                    : (503, "text/plain", "not ready\n")
            }
            _ = try http.serve(options.adminAddress) { [weak self] _, path in
                guard let self else { return nil }
                switch path {
                case "/config_dump":
                    // Canonical JSON: two dumps of the same configuration are byte-identical.
                    let json = self.current.withLock { $0?.snapshot.canonicalJSON(pretty: true) }
                    return (200, "application/json", json.map { String(decoding: $0, as: UTF8.self) + "\n" } ?? "{}\n")
                case "/ready":
                    return (200, "text/plain", self.ready.load(ordering: .relaxed) ? "LIVE\n" : "DRAINING\n")
                default: return nil
                }
            }
        } catch {
            server.drain(timeout: .zero)
            server.wait()
            health.stop()
            throw StartError(description: "\(error)")
        }
        ready.store(haveConfig, ordering: .relaxed)
        startWatching()
        if let control = options.control, options.localConfig == nil, let c = certificates {
            let node = c.files(for: c.nodeIdentity)
            let stream = ControlStream(
                options: .init(host: control.host, port: control.port, serverName: control.serverName,
                               rootCA: control.rootCA, chain: node.chain, key: node.key, node: nodeName,
                               snapshotFile: snapshotFile, agentVersion: Self.version,
                               workloadsDirectory: control.workloadsDirectory),
                holding: raw, version: version, logger: logger, nearestExpiry: { [weak c] in c?.nearestExpiry },
                dump: { [weak self] version in
                    self?.configDump(version: version)?.encoded() ?? Data(#"{"error":"the agent serves no configuration yet"}"#.utf8)
                }
            ) { [weak self] snapshot in
                guard let self else { return .failure(.init(message: "the agent is stopping")) }
                switch self.install(snapshot) {
                case .success(let warnings):
                    self.ready.store(true, ordering: .relaxed)
                    return .success(warnings)
                case .failure(let e): return .failure(.init(message: e.message))
                }
            }
            stream.start()
            controlStream = stream
        }
        for (l, port) in zip(snapshot.listeners, listenerPorts) {
            logger.info("listening", metadata: ["listener": "\(l.name)", "address": "\(l.address.ip):\(port)",
                                                "routes": "\(l.routes.map(\.cluster))"])
        }
        let ring = server.ringFeatures.map { "\($0)" } ?? "?"
        logger.info("agent ready", metadata: ["node": "\(nodeName)", "workers": "\(options.workers)", "io_uring": "\(ring)",
                                              "workloads": "\(snapshot.workloads.count)",
                                              "services": "\(snapshot.services.count)",
                                              "metrics": "\(options.metricsAddress)",
                                              "readiness": "\(options.readinessAddress)"])
    }

    // MARK: - hot reload

    private let watching = Atomic<Bool>(false)

    /// Polls the config directory on a control-path thread and applies changes (Istio's file mesh-config watch).
    private func startWatching() {
        watching.store(true, ordering: .relaxed)
        let path = options.localConfig
        let interval = options.reloadInterval
        _ = startThread(name: "sluice-config") { [self] in
            var last = path.map(ConfigLoader.fingerprint)
            var jwksFetched = ContinuousClock.now
            while watching.load(ordering: .relaxed) {
                usleep(UInt32(clamping: interval.milliseconds * 1000))
                if let path {
                    let now = ConfigLoader.fingerprint(path)
                    if now != last {
                        last = now
                        reload()
                    }
                }
                // Remote key sets again every so often; a changed one rebuilds the runtime with it.
                if ContinuousClock.now - jwksFetched >= options.jwksRefresh {
                    jwksFetched = .now
                    if jwks.refresh() {
                        logger.info("JWKS changed; rebuilding the runtime with the new keys")
                        reload(force: true)
                    }
                }
            }
        }
    }

    /// Loads, validates and compiles the configuration again and publishes it. On any error the last good
    /// configuration keeps serving and every problem is logged with its file, line and field.
    /// - Parameter force: rebuild the runtime even when the configuration did not change (new remote keys).
    @discardableResult
    public func reload(force: Bool = false) -> Bool {
        let raw: NodeSnapshot
        if let path = options.localConfig {
            do {
                raw = try Self.loadSnapshot(path, node: nodeName, logger: logger)
            } catch {
                for line in "\(error)".split(separator: "\n") { logger.error("\(line)") }
                logger.error("configuration update rejected; still serving the last good configuration")
                return false
            }
        } else {
            guard let held = lastRaw.withLock({ $0 }) else { return false }
            raw = held
        }
        if case .failure(let e) = install(raw, force: force) {
            logger.error("configuration update rejected: \(e.message); still serving the last good configuration")
            return false
        }
        return true
    }

    public struct InstallError: Error, CustomStringConvertible {
        public let message: String
        public var description: String { message }
    }

    /// Serves `raw` (a compiled snapshot, local or pushed): builds its runtime, BPF maps and DNS, and swaps them in.
    /// Everything that can refuse it runs before anything changes: on failure the last good snapshot keeps serving.
    /// Returns the warnings of an accepted snapshot.
    func install(_ raw: NodeSnapshot, force: Bool = false) -> Result<[String], InstallError> {
        installing.withLock { _ in
            let snapshot = served(raw)
            if !force && current.withLock({ $0?.snapshot == snapshot }) {
                lastRaw.withLock { $0 = raw }
                return .success([])
            }
            let runtime: ProxyRuntime
            do {
                runtime = try ProxyRuntime(snapshot: snapshot, registry: registry, previous: current.withLock { $0 },
                                           capture: capture, credentials: options.credentialsDirectory, tunnels: tunnels,
                                           jwks: jwks)
            } catch {
                return .failure(InstallError(message: "\(error)"))
            }
            if let datapath {
                do {
                    // Decisions for calls within the node follow the policies, which any reload may change.
                    try applyLocalAuthorization(datapath, runtime)
                } catch {
                    return .failure(InstallError(message: "BPF: \(error)"))
                }
            }
            if let datapath, current.withLock({ ($0?.snapshot.bpfServices, $0?.snapshot.mesh, $0?.snapshot.workloads) })
                != (snapshot.bpfServices, snapshot.mesh, snapshot.workloads)
            {
                do {
                    try datapath.apply(snapshot.bpfServices)
                    try setAgent(datapath, snapshot)
                } catch {
                    return .failure(InstallError(message: "BPF: \(error)"))
                }
            }
            do {
                try server?.update(runtime)
            } catch {
                return .failure(InstallError(message: "\(error)"))
            }
            health.update(runtime)
            if !dns.isEmpty {
                let hosts = Self.meshHosts(snapshot)
                for d in dns { d.update(hosts: hosts) }
            }
            current.withLock { $0 = runtime }
            lastRaw.withLock { $0 = raw }
            reloads.add(1, ordering: .relaxed)
            certificates?.update(identities: snapshot.workloads.map(\.identity))
            logger.info("configuration applied", metadata: ["listeners": "\(snapshot.listeners.count)",
                                                            "clusters": "\(snapshot.clusters.count)"])
            return .success([])
        }
    }

    /// One install at a time (the config thread's JWKS refresh and the agent stream may both ask).
    private let installing = Mutex<Void>(())
    /// The compiled snapshot being served, before ``served(_:)``.
    private let lastRaw = Mutex<NodeSnapshot?>(nil)
    /// With a control plane: the stream the snapshot comes from.
    private var controlStream: ControlStream?
    /// The agent stream is up and has delivered at least one delta (tests and `sluice check`).
    public var controlConnected: Bool { controlStream?.connected.load(ordering: .relaxed) ?? false }
    /// The version of the last snapshot accepted from the control plane (0: none).
    public var controlVersion: Int64 { controlStream?.version ?? 0 }

    /// Configurations applied since start (not counting the first).
    public let reloads = Atomic<Int>(0)

    /// Stops accepting, waits up to the drain timeout for open connections, then stops everything.
    public func drainAndStop() {
        ready.store(false, ordering: .relaxed)
        watching.store(false, ordering: .relaxed)
        controlStream?.stop()
        logger.info("draining", metadata: ["timeout": "\(options.drainTimeout)"])
        server?.drain(timeout: options.drainTimeout)
        server?.wait()
        health.stop()
        certificates?.stop()
        for d in dns { d.stop() }
        http.shutdown()
        logger.info("stopped")
    }

    /// Blocks the calling thread until SIGTERM or SIGINT, then drains. Signals must already be blocked in every
    /// thread (``blockTerminationSignals()`` before any thread starts).
    public func runUntilSignal() {
        let sig = Self.waitForTerminationSignal()
        logger.info("signal received", metadata: ["signal": sig == SIGTERM ? "SIGTERM" : "SIGINT"])
        drainAndStop()
    }

    /// Blocks the calling thread until SIGTERM or SIGINT arrives (both blocked by ``blockTerminationSignals()``);
    /// returns which.
    public static func waitForTerminationSignal() -> Int32 {
        var set = sigset_t()
        sigemptyset(&set)
        sigaddset(&set, SIGTERM)
        sigaddset(&set, SIGINT)
        var sig: Int32 = 0
        sigwait(&set, &sig)
        return sig
    }

    /// Blocks SIGTERM/SIGINT/SIGPIPE in the calling thread (and the threads it starts later), so that
    /// ``runUntilSignal()`` receives them with sigwait.
    public static func blockTerminationSignals() {
        var set = sigset_t()
        sigemptyset(&set)
        sigaddset(&set, SIGTERM)
        sigaddset(&set, SIGINT)
        pthread_sigmask(SIG_BLOCK, &set, nil)
        signal(SIGPIPE, SIG_IGN)
    }
}
