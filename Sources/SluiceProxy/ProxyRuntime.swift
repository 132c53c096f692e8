import CSluiceLinux
import Glibc
import SluiceModel
import SluiceRing
import SluiceTLS
import SluiceTelemetry

/// A counter shared by all workers (connection limits). Touched once per connection open/close, not per byte.
public final class SharedCounter: @unchecked Sendable {
    private let value = UnsafeMutablePointer<Int64>.allocate(capacity: 1)
    public init() { value.initialize(to: 0) }
    deinit { value.deallocate() }
    /// Adds `delta` and returns the value before.
    @inline(__always) @discardableResult
    public func add(_ delta: Int64) -> Int64 { sl_fetch_add_i64(value, delta) }
    public var current: Int64 { sl_load_i64(value) }
}

/// Per-endpoint health from active checks, written by the health-check thread, read by workers.
public final class HealthTable: @unchecked Sendable {
    private let flags: UnsafeMutablePointer<UInt8>
    public let count: Int
    public init(count: Int) {
        self.count = count
        flags = .allocate(capacity: max(1, count))
        flags.initialize(repeating: 1, count: max(1, count))
    }
    deinit { flags.deallocate() }
    @inline(__always) public func isHealthy(_ i: Int) -> Bool { sl_load_relaxed_u8(flags + i) != 0 }
    public func set(_ i: Int, healthy: Bool) { sl_store_relaxed_u8(flags + i, healthy ? 1 : 0) }
}

/// One cluster as the data plane serves it: immutable, shared by all workers for the life of a snapshot.
public final class ClusterRuntime: @unchecked Sendable {
    public let config: NodeSnapshot.Cluster
    public let addresses: UnsafeMutablePointer<Socket.Address>
    public let weights: [UInt32]
    public let maglev: MaglevTable?
    public let health: HealthTable
    public let connectTimeout: UnsafeMutablePointer<__kernel_timespec>
    public let idleTimeoutNanos: UInt64
    public let active = SharedCounter()
    /// Requests in flight and retries outstanding, over all workers (`connectionPool.http` circuit breakers).
    public let activeRequests = SharedCounter()
    public let activeRetries = SharedCounter()
    /// Requests queued for a connection, over all workers (`http1MaxPendingRequests`).
    public let pendingRequests = SharedCounter()
    let metrics: ClusterMetrics
    /// Per endpoint: set when it is a mesh workload on another node, reached through an HBONE tunnel to that
    /// node's agent.
    let tunnelTargets: [TunnelTarget?]

    init(config: NodeSnapshot.Cluster, registry: MetricsRegistry, tunnels: TunnelSettings? = nil, node: String = "") {
        self.config = config
        let n = config.endpoints.count
        tunnelTargets = config.endpoints.map { e in
            guard let tunnels, let peer = e.node, peer != node, let identity = e.identity, e.plaintext != true,
                let agent = Socket.Address(ip: e.address.ip.description, port: tunnels.port)
            else { return nil }
            return TunnelTarget(node: peer, identity: identity, agent: agent, authority: e.address.description,
                                serverName: MeshCredentials.serverName(for: identity))
        }
        addresses = .allocate(capacity: max(1, n))
        for (i, e) in config.endpoints.enumerated() {
            (addresses + i).initialize(to: Socket.Address(ip: e.address.ip.description, port: e.address.port)!)
        }
        weights = config.endpoints.map(\.weight)
        if case .consistentHash(_, let size) = config.loadBalancer {
            maglev = MaglevTable(keys: config.endpoints.map { $0.address.description }, weights: weights,
                                 size: MaglevTable.tableSize(backends: n, requested: size))
        } else {
            maglev = nil
        }
        health = HealthTable(count: n)
        connectTimeout = .allocate(capacity: 1)
        let (s, atto) = config.connectTimeout.components
        connectTimeout.initialize(to: __kernel_timespec(tv_sec: s, tv_nsec: atto / 1_000_000_000))
        idleTimeoutNanos = config.idleTimeout.clampedNanoseconds
        metrics = ClusterMetrics(registry: registry, cluster: config)
    }

    deinit {
        addresses.deinitialize(count: config.endpoints.count)
        addresses.deallocate()
        connectTimeout.deallocate()
    }
}

/// Metric slots of one cluster: Istio's TCP series plus Sluice's own.
struct ClusterMetrics: Sendable {
    let opened: Int
    let closed: Int
    let closedUpstreamFailure: Int
    let closedOverflow: Int
    let sentBytes: Int
    let receivedBytes: Int
    let connectFailures: Int
    let ejections: Int
    let connectDuration: Histogram
    let retries: Int
    let mirrored: Int
    let mirrorSkipped: Int

    init(registry r: MetricsRegistry, cluster c: NodeSnapshot.Cluster) {
        let host = c.serviceHost
        let parts = host.split(separator: ".")
        let base: [(String, String)] = [
            ("reporter", "source"), ("source_workload", "unknown"), ("source_workload_namespace", "unknown"),
            ("destination_service", host), ("destination_service_name", parts.first.map(String.init) ?? host),
            ("destination_service_namespace", parts.count > 1 ? String(parts[1]) : "default"),
            ("request_protocol", "tcp"), ("connection_security_policy", "none"),
        ]
        func flags(_ f: String) -> [(String, String)] { base + [("response_flags", f)] }
        opened = r.counter("istio_tcp_connections_opened_total", help: "TCP connections opened", labels: flags("-"))
        closed = r.counter("istio_tcp_connections_closed_total", help: "TCP connections closed", labels: flags("-"))
        closedUpstreamFailure = r.counter("istio_tcp_connections_closed_total", help: "TCP connections closed",
                                          labels: flags("UF"))
        closedOverflow = r.counter("istio_tcp_connections_closed_total", help: "TCP connections closed",
                                   labels: flags("UO"))
        sentBytes = r.counter("istio_tcp_sent_bytes_total", help: "Bytes sent to the client (response direction)",
                              labels: flags("-"))
        receivedBytes = r.counter("istio_tcp_received_bytes_total",
                                  help: "Bytes received from the client (request direction)", labels: flags("-"))
        let cl = [("cluster", c.name)]
        connectFailures = r.counter("sluice_upstream_connect_failures_total", help: "Failed upstream connects",
                                    labels: cl)
        ejections = r.counter("sluice_outlier_ejections_total", help: "Endpoints ejected by outlier detection",
                              labels: cl)
        retries = r.counter("sluice_http_retries_total", help: "Requests sent again by a route's retry policy", labels: cl)
        mirrored = r.counter("sluice_http_mirrored_requests_total", help: "Requests copied to a route's mirror", labels: cl)
        mirrorSkipped = r.counter("sluice_http_mirror_skipped_total",
                                  help: "Requests not mirrored because their body was too large to keep", labels: cl)
        connectDuration = r.histogram("sluice_upstream_connect_duration_milliseconds",
                                      help: "Time to establish upstream connections",
                                      buckets: [0.5, 1, 5, 10, 25, 50, 100, 250, 500, 1000, 5000], labels: cl)
    }
}

/// A service address the BPF programs send to the agent: its default cluster, and how its port's connections are
/// served.
struct CapturedService {
    enum Pipeline {
        /// Requests go through the L7 pipeline (HTTP, HTTP2, GRPC ports).
        case http
        /// Bytes are relayed.
        case tcp
        /// No declared protocol: the client's first bytes decide.
        case detect
    }
    let cluster: ClusterRuntime
    let pipeline: Pipeline
}

/// Where one endpoint's connections go when it runs on another node: that node's agent (the endpoint's address,
/// HBONE port), which must present `identity`; the CONNECT names the endpoint.
struct TunnelTarget {
    let node: String
    let identity: String
    let agent: Socket.Address
    let authority: String
    /// The SNI that asks the agent for `identity`'s certificate.
    let serverName: String
}

/// HBONE: mutual TLS between agents with the workloads' certificates, HTTP/2 CONNECT streams inside.
public struct TunnelSettings: Sendable {
    public var credentials: MeshCredentials
    /// Where agents accept tunnels (every node the same, as Istio's 15008).
    public var port: UInt16
    /// The inbound listener's address (the node's addresses, port ``port``).
    public var listen: EndpointAddress
    /// Where connection denials are logged (a few lines per second per worker at most).
    public var logDenial: (@Sendable (String) -> Void)?
    public init(credentials: MeshCredentials, port: UInt16 = 15008, listen: EndpointAddress? = nil,
                logDenial: (@Sendable (String) -> Void)? = nil) {
        self.credentials = credentials
        self.port = port
        self.listen = listen ?? EndpointAddress(ip: .v4(0), port: port)
        self.logDenial = logDenial
    }
}

/// A workload of this node as its inbound tunnel streams see it: who it is and what may call it.
struct InboundWorkload {
    let workload: NodeSnapshot.Workload
    let authorization: AuthorizationEngine
    /// The SNI a caller sends for this workload's certificate (compared once per stream, so built once here).
    let serverName: String
    /// Ports that speak HTTP (HTTP, HTTP2, GRPC) when a policy of the workload needs the request (AuthorizationPolicy
    /// rules on request attributes, RequestAuthentication): a stream to such a port goes through the L7 pipeline
    /// here, checked request by request, on to the workload alone.
    var http: [UInt16: InboundHTTP] = [:]
}

/// The L7 pipeline in front of one workload port: a one-endpoint cluster and a route table carrying the
/// workload's policies.
struct InboundHTTP {
    let cluster: ClusterRuntime
    let table: HTTPRouteTable
}

/// One listener's routing: weighted clusters of its TCP route, per-request routes of an HTTP listener, or, for the
/// capture listener, the service of each captured address.
public final class ListenerRuntime: @unchecked Sendable {
    public let config: NodeSnapshot.Listener
    public let clusters: [ClusterRuntime]
    public let weights: [Int]
    public let totalWeight: Int
    /// HTTP listeners (and the capture listener, for captured HTTP services): the routes.
    let http: HTTPRouteTable?
    /// Set on the capture listener: the service for each original destination.
    let captured: [EndpointAddress: CapturedService]?
    let capture: OutboundCapture?
    /// HTTPS listeners: the certificates, chosen by SNI.
    let tls: TLSServerNames?
    /// Set on the HBONE listener: the node's workloads by address.
    let inbound: [String: InboundWorkload]?
    /// A gateway listener's workload identity (the node's workload its Gateway selects): what its upstream tunnels
    /// present.
    let identity: String?

    init(config: NodeSnapshot.Listener, clusters: [String: ClusterRuntime], http: HTTPRouteTable?,
         tls: TLSServerNames?, identity: String? = nil) {
        self.config = config
        self.identity = identity
        self.tls = tls
        // The compiler guarantees every route names a cluster of the snapshot.
        self.clusters = config.routes.map { clusters[$0.cluster]! }
        weights = config.routes.map(\.weight)
        totalWeight = weights.reduce(0, +)
        self.http = config.isHTTP ? http : nil
        captured = nil
        capture = nil
        inbound = nil
    }

    init(tunnelsAt address: EndpointAddress, workloads: [String: InboundWorkload]) {
        config = NodeSnapshot.Listener(name: "inbound-hbone", address: address, protocol: .tcp, routes: [])
        clusters = []
        weights = []
        totalWeight = 0
        captured = nil
        http = nil
        capture = nil
        tls = nil
        inbound = workloads
        identity = nil
    }

    init(capture: OutboundCapture, address: EndpointAddress, services: [EndpointAddress: CapturedService],
         http: HTTPRouteTable) {
        config = NodeSnapshot.Listener(name: "outbound-capture-\(address.ip.isIPv4 ? "v4" : "v6")", address: address,
                                       protocol: .tcp, routes: [])
        clusters = []
        weights = []
        totalWeight = 0
        captured = services
        self.http = http
        self.capture = capture
        tls = nil
        inbound = nil
        identity = nil
    }

    /// The service of a connection accepted on the capture listener, from the client's address; the address the
    /// client dialled, and the client's cgroup.
    func capturedService(peer: Socket.Address) -> (CapturedService, EndpointAddress, cgroup: UInt64)? {
        guard let capture, let captured else { return nil }
        let client: (IPAddress, UInt16)? = withUnsafeBytes(of: peer.storage) { raw in
            let port = UInt16(bigEndian: raw.loadUnaligned(fromByteOffset: 2, as: UInt16.self))
            switch peer.family {
            case AF_INET: return (.v4(raw.loadUnaligned(fromByteOffset: 4, as: UInt32.self)), port)
            case AF_INET6: return (.v6(raw.loadUnaligned(fromByteOffset: 8, as: UInt64.self),
                                       raw.loadUnaligned(fromByteOffset: 16, as: UInt64.self)), port)
            default: return nil
            }
        }
        guard let (ip, port) = client, let (original, cgroup) = capture.originalDestination(ip, port) else { return nil }
        return captured[original].map { ($0, original, cgroup) }
    }
}

/// Where the BPF programs send connections to services the agent must see, and how the agent finds where each
/// was going. The lookup runs on the worker that accepted (one map lookup).
public struct OutboundCapture: Sendable {
    /// The listeners (IPv4 and IPv6 loopback, the same port).
    public var addresses: [EndpointAddress]
    /// Client address and port -> the address the client dialled, and the client's cgroup id (0: unknown).
    public var originalDestination: @Sendable (IPAddress, UInt16) -> (EndpointAddress, UInt64)?
    /// A workload's `sluice.dev/cgroup` path -> that cgroup's id (what the programs record), nil if it does not
    /// exist.
    public var cgroupID: @Sendable (String) -> UInt64?

    public init(addresses: [EndpointAddress],
                originalDestination: @escaping @Sendable (IPAddress, UInt16) -> (EndpointAddress, UInt64)?,
                cgroupID: @escaping @Sendable (String) -> UInt64? = { _ in nil }) {
        self.addresses = addresses
        self.originalDestination = originalDestination
        self.cgroupID = cgroupID
    }
}

/// Everything the workers serve, built once per snapshot off the data plane and then published.
public final class ProxyRuntime: @unchecked Sendable {
    public let snapshot: NodeSnapshot
    public private(set) var clusters: [ClusterRuntime]
    public let listeners: [ListenerRuntime]
    /// Identities of the node's workloads by cgroup id where a cgroup holds workloads of one identity only; the
    /// identity when the node's workloads all have one (see ``sourceIdentity(cgroup:address:)``).
    let identitiesByCgroup: [UInt64: String]
    let soleIdentity: String?
    /// The node's workloads by address (the first listed, when several share one) with the AuthorizationPolicies
    /// that select them: who a captured client is, and what may call a workload; `localPolicies` when any has one
    /// (a captured connection to such a workload is checked before it is connected).
    let localWorkloads: [String: InboundWorkload]
    let localPolicies: Bool
    let tunnels: TunnelSettings?

    /// - Parameter previous: the runtime being replaced; clusters whose configuration did not change are carried
    ///   over as the same objects, so their health, ejections and balancer state survive the update.
    /// - Parameter capture: when the BPF programs capture workloads, the listener they send connections to;
    ///   each service address the snapshot sends to the agent is served from its default cluster.
    /// - Parameter credentials: the directory of gateway certificates named by `credentialName`.
    /// - Throws: ``RuntimeError`` when a listener's certificate or key cannot be loaded.
    /// - Parameter tunnels: when set, endpoints on other nodes are reached through HBONE tunnels, and the node's
    ///   workloads accept tunnels on ``TunnelSettings/listen``.
    /// - Parameter jwks: where RequestAuthentication's http(s) `jwksUri` sets come from.
    public init(snapshot: NodeSnapshot, registry: MetricsRegistry, previous: ProxyRuntime? = nil,
                capture: OutboundCapture? = nil, credentials: String = ProxyRuntime.defaultCredentials,
                tunnels: TunnelSettings? = nil, jwks: JWKSCache? = nil) throws(RuntimeError) {
        self.snapshot = snapshot
        self.tunnels = tunnels
        var byCgroup: [UInt64: Set<String>] = [:]
        if let capture {
            for w in snapshot.workloads {
                if let path = w.cgroup, let id = capture.cgroupID(path) { byCgroup[id, default: []].insert(w.identity) }
            }
        }
        identitiesByCgroup = byCgroup.compactMapValues { $0.count == 1 ? $0.first : nil }
        let identities = Set(snapshot.workloads.map(\.identity))
        soleIdentity = identities.count == 1 ? identities.first : nil
        var reusable: [NodeSnapshot.Cluster: ClusterRuntime] = [:]
        for c in previous?.clusters ?? [] { reusable[c.config] = c }
        // Only clusters traffic can reach get sockets, health state and metrics: those of TCP routes, and every
        // cluster once an HTTP listener or the capture listener may route requests.
        let routesRequests = capture != nil || snapshot.listeners.contains(where: \.isHTTP)
        let used = Set(snapshot.listeners.flatMap { $0.routes.map(\.cluster) })
        clusters = snapshot.clusters.filter { routesRequests || used.contains($0.name) }
            .map { reusable[$0] ?? ClusterRuntime(config: $0, registry: registry, tunnels: tunnels, node: snapshot.node) }
        let byName = Dictionary(uniqueKeysWithValues: clusters.map { ($0.config.name, $0) })
        var limits: [String: [RateLimitRuntime]] = [:]
        var nextLimit = 0
        for p in snapshot.rateLimits {
            for l in p.spec.local {
                limits[p.spec.host, default: []].append(RateLimitRuntime(id: nextLimit, policy: p.qualifiedName, local: l))
                nextLimit += 1
            }
        }
        rateLimitCount = nextLimit
        func table(_ gateway: String?, listener: NodeSnapshot.Listener? = nil) -> HTTPRouteTable {
            let authz = Set(listener?.authorizationPolicies ?? []), authn = Set(listener?.requestAuthentications ?? [])
            return HTTPRouteTable(
                virtualServices: snapshot.virtualServices, gateway: gateway, snapshot: snapshot, clusters: byName,
                rateLimits: limits,
                authorization: AuthorizationEngine(snapshot.authorizationPolicies.filter { authz.contains($0.qualifiedName) }),
                authentication: RequestAuthenticator(snapshot.requestAuthentications.filter { authn.contains($0.qualifiedName) },
                                                     jwks: jwks))
        }
        var listeners: [ListenerRuntime] = []
        for l in snapshot.listeners {
            let tls = try Self.certificates(l, directory: credentials)
            // The gateway runs as a workload of this node: the first one its selector matches.
            let gatewayIdentity = l.workloadLabels.isEmpty ? nil : snapshot.workloads.first { w in
                l.workloadLabels.allSatisfy { w.labels[$0.key] == $0.value }
            }?.identity
            listeners.append(ListenerRuntime(config: l, clusters: byName,
                                             http: l.isHTTP ? table(l.gateway, listener: l) : nil, tls: tls,
                                             identity: gatewayIdentity))
        }
        if let capture {
            var services: [EndpointAddress: CapturedService] = [:]
            var portProtocols: [String: [UInt16: PortProtocol]] = [:]
            for s in snapshot.services {
                for p in s.ports { portProtocols[s.host, default: [:]][p.number] = p.protocol }
            }
            for b in snapshot.bpfServices where !b.isL4Only {
                let name = NodeSnapshot.Cluster.name(port: b.address.port, subset: nil, host: b.host)
                // The service port's declared protocol picks the pipeline (the BPF entry only knows TCP/UDP).
                let pipeline: CapturedService.Pipeline
                switch portProtocols[b.host]?[b.address.port] {
                case .http?, .http2?, .grpc?: pipeline = .http
                case .unspecified?: pipeline = .detect
                default: pipeline = .tcp
                }
                if let c = byName[name] { services[b.address] = CapturedService(cluster: c, pipeline: pipeline) }
            }
            let mesh = table(nil)
            for a in capture.addresses {
                listeners.append(ListenerRuntime(capture: capture, address: a, services: services, http: mesh))
            }
        }
        var inbound: [String: InboundWorkload] = [:]
        var inboundClusters: [ClusterRuntime] = []
        for w in snapshot.workloads where inbound[w.address] == nil {
            let names = Set(w.authorizationPolicies), authn = Set(w.requestAuthentications)
            let policies = snapshot.authorizationPolicies.filter { names.contains($0.qualifiedName) }
            var entry = InboundWorkload(workload: w, authorization: AuthorizationEngine(policies),
                                        serverName: MeshCredentials.serverName(for: w.identity))
            if policies.contains(where: \.spec.needsRequest) || !authn.isEmpty {
                let authenticator = RequestAuthenticator(snapshot.requestAuthentications.filter { authn.contains($0.qualifiedName) },
                                                         jwks: jwks)
                for c in snapshot.clusters where c.subset == nil && [.http, .http2, .grpc].contains(c.protocol) {
                    for e in c.endpoints where e.address.ip.description == w.address && entry.http[e.address.port] == nil {
                        var config = c
                        config.name = "inbound|\(e.address.port)||\(c.serviceHost)"
                        config.endpoints = [e]
                        config.healthCheck = nil
                        config.outlierDetection = nil
                        let cr = reusable[config] ?? ClusterRuntime(config: config, registry: registry)
                        inboundClusters.append(cr)
                        entry.http[e.address.port] = InboundHTTP(cluster: cr, table: HTTPRouteTable(
                            virtualServices: [], gateway: nil, snapshot: snapshot, clusters: [config.name: cr], rateLimits: [:],
                            authorization: entry.authorization, authentication: authenticator))
                    }
                }
            }
            inbound[w.address] = entry
        }
        clusters += inboundClusters
        localWorkloads = inbound
        localPolicies = inbound.values.contains { !$0.authorization.isEmpty }
        if let tunnels {
            listeners.append(ListenerRuntime(tunnelsAt: tunnels.listen, workloads: inbound))
        }
        self.listeners = listeners
    }

    /// Local rate-limit entries over all policies (each worker keeps its share of each).
    let rateLimitCount: Int

    /// The workload identity of a captured client: by its cgroup (`sluice.dev/cgroup`, when that cgroup holds one
    /// identity), else by its source address (a client that bound its workload's address), else the node's only
    /// identity. Nil: the client cannot be told apart, and nothing is sent on its behalf to another node.
    func sourceIdentity(cgroup: UInt64, address: String) -> String? {
        if cgroup != 0, let id = identitiesByCgroup[cgroup] { return id }
        return localWorkloads[address]?.workload.identity ?? soleIdentity
    }
}
