import SluiceModel
import SluiceTelemetry

/// One VirtualService http route as the data plane runs it: destinations resolved to clusters, retry policy and
/// timeouts compiled. Built once per snapshot; read-only on the workers.
public final class RouteRuntime: @unchecked Sendable {
    public let route: HTTPRoute
    public let virtualService: String
    /// Parallel to `route.route`; nil where the destination names no cluster of the snapshot (503, `NR`).
    let clusters: [ClusterRuntime?]
    let weights: [Int]
    let totalWeight: Int
    let retry: RetryPolicy
    /// Whole-request timeout in nanoseconds (0: none, Istio's default).
    let timeoutNanos: UInt64
    let perTryTimeoutNanos: UInt64
    let mirror: ClusterRuntime?
    /// Mirrored share in units of 1/10,000.
    let mirrorShare: Int
    /// Local rate limits of the route's destination hosts that may apply (their `match` is checked per request).
    let rateLimits: [RateLimitRuntime]

    init(route: HTTPRoute, virtualService: String, resolve: (VirtualService.Destination) -> ClusterRuntime?,
         rateLimits: [String: [RateLimitRuntime]], defaultTimeout: Duration?) {
        self.route = route
        self.virtualService = virtualService
        clusters = route.route.map { resolve($0.destination) }
        // Istio: one destination without weight takes everything; weights of several add up to 100.
        weights = route.route.count == 1 ? [100] : route.route.map { $0.weight ?? 0 }
        totalWeight = max(1, weights.reduce(0, +))
        retry = route.retries.map(RetryPolicy.init) ?? .istioDefault
        timeoutNanos = (route.timeout ?? defaultTimeout)?.clampedNanoseconds ?? 0
        perTryTimeoutNanos = retry.perTryTimeout?.clampedNanoseconds ?? 0
        mirror = route.mirror.flatMap(resolve)
        mirrorShare = route.mirror == nil ? 0 : Int(((route.mirrorPercentage ?? 100) * 100).rounded())
        var limits: [RateLimitRuntime] = []
        for d in Set(route.route.map(\.destination.host)).sorted() { limits += rateLimits[d] ?? [] }
        self.rateLimits = limits
    }

    /// The uri prefix the matching condition (an index into `route.match`) matched, which `rewrite.uri` replaces.
    func matchedPrefix(_ condition: Int?) -> String? {
        guard let c = condition, case .prefix(let p)? = route.match[c].uri else { return nil }
        return p
    }

    /// The destination index for a draw `x` in `0..<totalWeight`.
    @inline(__always)
    func pick(_ x: Int) -> Int {
        var x = x
        for (i, w) in weights.enumerated() {
            if x < w { return i }
            x -= w
        }
        return weights.count - 1
    }
}

/// One `local` entry of a RateLimitPolicy. Each worker keeps its own share of the bucket (see
/// ``TokenBucket/share(of:worker:workers:)``), keyed by ``id`` and the request's key value.
public final class RateLimitRuntime: @unchecked Sendable {
    let id: Int
    let policy: String
    let local: RateLimitPolicy.Local
    let conditions: [HTTPRouter.Condition]

    init(id: Int, policy: String, local: RateLimitPolicy.Local) {
        self.id = id
        self.policy = policy
        self.local = local
        conditions = local.match.map(HTTPRouter.Condition.init)
    }

    func applies(_ r: HTTPRequestFacts) -> Bool { conditions.isEmpty || conditions.contains { $0.matches(r) } }
}

/// How one HTTP listener routes: a gateway's bound VirtualServices, or, on the capture listener, the mesh-bound
/// ones with each captured service's own cluster as the fallback (Istio's default route for a service).
public final class HTTPRouteTable: @unchecked Sendable {
    let router: HTTPRouter
    let routes: [RouteRuntime]
    /// `namespace/name` of the gateway, nil for mesh traffic.
    let gateway: String?
    /// Some route or rate limit looks at request headers: decode them per request.
    let needsHeaders: Bool
    /// The AuthorizationPolicies that apply to this listener's workload (gateways); nil when none do.
    let authorization: AuthorizationEngine?
    /// RequestAuthentication of this listener's workload: tokens are verified when present; nil when none applies.
    let authentication: RequestAuthenticator?

    init(virtualServices: [Named<VirtualService>], gateway: String?, snapshot: NodeSnapshot,
         clusters: [String: ClusterRuntime], rateLimits: [String: [RateLimitRuntime]],
         authorization: AuthorizationEngine? = nil, authentication: RequestAuthenticator? = nil) {
        self.authorization = authorization.flatMap { $0.isEmpty ? nil : $0 }
        self.authentication = authentication
        let vss = virtualServices.filter { vs in
            let refs = Set(vs.spec.gateways.filter { $0 != "mesh" }.map { $0.contains("/") ? $0 : "\(vs.namespace)/\($0)" })
            if let gateway { return refs.contains(gateway) }
            return vs.spec.gateways.isEmpty || vs.spec.gateways.contains("mesh")
        }
        router = HTTPRouter(virtualServices: vss)
        self.gateway = gateway
        var ports: [String: [ServicePort]] = [:]
        for s in snapshot.services { ports[s.host] = s.ports }
        let resolve = { (d: VirtualService.Destination) -> ClusterRuntime? in
            let declared = ports[d.host] ?? []
            // Istio requires a port when the service has several; with one, that one.
            guard let port = d.port ?? (declared.first { !$0.protocol.isL4 } ?? declared.first)?.number else { return nil }
            return clusters[NodeSnapshot.Cluster.name(port: port, subset: d.subset, host: d.host)]
        }
        routes = vss.flatMap { vs in
            vs.spec.http.map {
                RouteRuntime(route: $0, virtualService: vs.qualifiedName, resolve: resolve, rateLimits: rateLimits,
                             defaultTimeout: snapshot.mesh.requestTimeout)
            }
        }
        needsHeaders = router.needsHeaders || self.authorization != nil || authentication != nil || routes.contains { r in
            r.rateLimits.contains { l in
                if case .header = l.local.key { return true }
                return l.local.match.contains { !$0.headers.isEmpty || !$0.withoutHeaders.isEmpty }
            }
        } || snapshot.clusters.contains { c in
            if case .consistentHash(key: .header, _) = c.loadBalancer { return true }
            if case .consistentHash(key: .cookie, _) = c.loadBalancer { return true }
            return false
        }
    }
}

/// A worker's token bucket for one rate-limit entry and key value.
struct RateLimitKey: Hashable {
    var id: Int
    var value: String
}

/// Istio's request metrics for one cluster and response code, created the first time a worker sees the pair.
struct RequestMetricSlots {
    let total: Int
    let duration: Histogram
}

/// A worker's cache of request metric series: the registry is asked (under its lock) only for a new cluster,
/// code and flag combination; after that, counting a request is two slot additions.
struct RequestMetrics {
    struct Key: Hashable {
        var cluster: ObjectIdentifier?
        var code: Int
        var flag: ResponseFlag
    }
    var cache: [Key: RequestMetricSlots] = [:]
    /// The last series used: consecutive requests mostly share one.
    var last: RequestMetricSlots?
    var lastKey: Key?
    static let buckets: [Double] = [0.5, 1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000, 60000,
                                    300000, 600000, 1800000, 3600000]

    mutating func slots(_ registry: MetricsRegistry, cluster: ClusterRuntime?, code: Int, flag: ResponseFlag,
                        gateway: String?) -> RequestMetricSlots {
        let key = Key(cluster: cluster.map(ObjectIdentifier.init), code: code, flag: flag)
        if let last, lastKey == key { return last }
        defer { lastKey = key; last = cache[key] }
        if let s = cache[key] { return s }
        let host = cluster?.config.serviceHost ?? "unknown"
        let parts = host.split(separator: ".")
        let labels: [(String, String)] = [
            ("reporter", "source"), ("source_workload", gateway ?? "unknown"),
            ("source_workload_namespace", gateway.map { String($0.split(separator: "/")[0]) } ?? "unknown"),
            ("destination_service", host),
            ("destination_service_name", host == "unknown" ? "unknown" : parts.first.map(String.init) ?? host),
            ("destination_service_namespace", parts.count > 1 ? String(parts[1]) : "unknown"),
            ("destination_version", cluster?.config.subset ?? "unknown"),
            ("request_protocol", "http"), ("response_code", String(code)), ("response_flags", flag.rawValue),
            ("connection_security_policy", "none"),
        ]
        let s = RequestMetricSlots(
            total: registry.counter("istio_requests_total", help: "Requests served, by response code", labels: labels),
            duration: registry.histogram("istio_request_duration_milliseconds",
                                         help: "Time from the request's first byte to the response's last",
                                         buckets: Self.buckets, labels: labels))
        cache[key] = s
        return s
    }
}
