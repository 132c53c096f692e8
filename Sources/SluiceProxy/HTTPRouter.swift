import SluiceModel

/// What routing looks at in a request: decoded once per request by the L7 pipeline.
public struct HTTPRequestFacts: Sendable {
    public var method: String
    /// The path without the query string.
    public var path: String
    public var query: [String: String]
    public var authority: String
    public var scheme: String
    /// Lower-case names.
    public var headers: [String: String]
    public var port: UInt16
    /// Labels of the calling workload (from its cgroup -> workload), empty when it is outside the mesh.
    public var sourceLabels: [String: String]
    /// `namespace/name` of the gateway the request came through, nil for mesh (sidecar-less capture) traffic.
    public var gateway: String?
    /// The client's verified identity (URI SAN of its certificate on a MUTUAL gateway server), for authorization.
    public var principal: String?

    public init(method: String, path: String, query: [String: String] = [:], authority: String, scheme: String = "http",
                headers: [String: String] = [:], port: UInt16, sourceLabels: [String: String] = [:],
                gateway: String? = nil, principal: String? = nil) {
        self.principal = principal
        self.method = method
        self.path = path
        self.query = query
        self.authority = authority
        self.scheme = scheme
        self.headers = headers
        self.port = port
        self.sourceLabels = sourceLabels
        self.gateway = gateway
    }

    /// Splits a request target into path and query parameters (first value wins, as Envoy matches them).
    public static func split(target: String) -> (path: String, query: [String: String]) {
        guard let q = target.firstIndex(of: "?") else { return (target, [:]) }
        var query: [String: String] = [:]
        for pair in target[target.index(after: q)...].split(separator: "&") {
            let kv = pair.split(separator: "=", maxSplits: 1)
            let key = String(kv[0])
            if query[key] == nil { query[key] = kv.count == 2 ? String(kv[1]) : "" }
        }
        return (String(target[..<q]), query)
    }
}

/// A string matcher with its regex compiled once (Istio's regexes are RE2, matched against the whole value).
final class CompiledMatch: @unchecked Sendable {
    let match: StringMatch
    /// Swift's `Regex` is not `Sendable`; this one is built once and only read.
    let regex: Regex<AnyRegexOutput>?
    /// The exact or prefix text, lower-cased once for `ignoreUriCase`.
    let lowered: String

    init(_ m: StringMatch) {
        match = m
        switch m {
        case .regex(let pattern):
            regex = try? Regex(pattern)
            lowered = ""
        case .exact(let s), .prefix(let s):
            regex = nil
            lowered = s.lowercased()
        }
    }

    /// Istio compares bytes (Envoy's string matchers are not Unicode-aware): comparing UTF-8 views is both what
    /// Envoy does and far cheaper than `String`'s Unicode comparison on the request path.
    func matches(_ value: String, ignoreCase: Bool = false) -> Bool {
        switch match {
        case .exact(let s): return ignoreCase ? value.lowercased().utf8.elementsEqual(lowered.utf8) : value.utf8.elementsEqual(s.utf8)
        case .prefix(let s): return ignoreCase ? value.lowercased().utf8.starts(with: lowered.utf8) : value.utf8.starts(with: s.utf8)
        case .regex: return regex.map { (try? $0.wholeMatch(in: value)) != nil } ?? false
        }
    }
}

/// Routes HTTP requests with a node's VirtualServices, Istio's way: the VirtualServices whose `hosts` cover the
/// request's authority (exact before wildcard), then their `http` routes in order; the first route whose match
/// list is empty or has a matching entry wins. Built once per snapshot off the data plane; read-only after.
public final class HTTPRouter: @unchecked Sendable {
    // Routes and conditions are classes: matching walks them by reference (as values, every candidate and every
    // condition was copied field by field per request: 5% of a request's CPU in the HTTP benchmark).
    final class Route {
        let virtualService: String
        /// Position in the routes the router was built with (VirtualServices in order, then their http routes).
        let ordinal: Int
        let index: Int
        let route: HTTPRoute
        let matches: [Condition]

        init(virtualService: String, ordinal: Int, index: Int, route: HTTPRoute, matches: [Condition]) {
            self.virtualService = virtualService
            self.ordinal = ordinal
            self.index = index
            self.route = route
            self.matches = matches
        }

        /// Whether the route takes `request`, and by which match entry (nil: the route has no match list).
        @inline(__always)
        func accepts(_ request: HTTPRequestFacts) -> (Bool, Int?) {
            if matches.isEmpty { return (true, nil) }
            for k in matches.indices where matches[k].matches(request) { return (true, k) }
            return (false, nil)
        }
    }

    /// One `HTTPMatchRequest`: every set field must match.
    final class Condition {
        let source: HTTPMatch
        let uri: CompiledMatch?
        let scheme: CompiledMatch?
        let method: CompiledMatch?
        let authority: CompiledMatch?
        let headers: [(String, CompiledMatch)]
        let withoutHeaders: [(String, CompiledMatch)]
        let query: [(String, CompiledMatch)]

        init(_ m: HTTPMatch) {
            source = m
            uri = m.uri.map(CompiledMatch.init)
            scheme = m.scheme.map(CompiledMatch.init)
            method = m.method.map(CompiledMatch.init)
            authority = m.authority.map(CompiledMatch.init)
            headers = m.headers.sorted { $0.key < $1.key }.map { ($0.key, CompiledMatch($0.value)) }
            withoutHeaders = m.withoutHeaders.sorted { $0.key < $1.key }.map { ($0.key, CompiledMatch($0.value)) }
            query = m.queryParams.sorted { $0.key < $1.key }.map { ($0.key, CompiledMatch($0.value)) }
        }

        func matches(_ r: HTTPRequestFacts) -> Bool {
            if let uri, !uri.matches(r.path, ignoreCase: source.ignoreUriCase) { return false }
            if let scheme, !scheme.matches(r.scheme) { return false }
            if let method, !method.matches(r.method) { return false }
            if let authority, !authority.matches(r.authority) { return false }
            if let port = source.port, port != r.port { return false }
            for (name, m) in headers {
                guard let v = r.headers[name], m.matches(v) else { return false }
            }
            for (name, m) in withoutHeaders {
                if let v = r.headers[name], m.matches(v) { return false }
            }
            for (name, m) in query {
                guard let v = r.query[name], m.matches(v) else { return false }
            }
            if !source.sourceLabels.allSatisfy({ r.sourceLabels[$0.key] == $0.value }) { return false }
            if !source.gateways.isEmpty {
                guard let g = r.gateway, source.gateways.contains(where: { $0 == g || g.hasSuffix("/" + $0) }) else {
                    return false
                }
            }
            return true
        }
    }

    /// Routes by exact host, then wildcard hosts by longest suffix.
    private let exact: [String: [Route]]
    private let wildcards: [(suffix: String, routes: [Route])]
    /// Some route matches on headers / query parameters: only then does the pipeline decode them per request.
    public let needsHeaders: Bool
    public let needsQuery: Bool

    /// - Parameter virtualServices: in the snapshot's order (sorted by namespace/name), which breaks ties between
    ///   VirtualServices for the same host deterministically.
    public init(virtualServices: [Named<VirtualService>]) {
        var exact: [String: [Route]] = [:]
        var wild: [String: [Route]] = [:]
        var ordinal = 0
        var needsHeaders = false, needsQuery = false
        for vs in virtualServices {
            let routes = vs.spec.http.enumerated().map { i, r in
                defer { ordinal += 1 }
                for m in r.match {
                    needsHeaders = needsHeaders || !m.headers.isEmpty || !m.withoutHeaders.isEmpty
                    needsQuery = needsQuery || !m.queryParams.isEmpty
                }
                return Route(virtualService: vs.qualifiedName, ordinal: ordinal, index: i, route: r,
                             matches: r.match.map(Condition.init))
            }
            for host in vs.spec.hosts {
                let h = host.lowercased()
                if h == "*" {
                    wild["", default: []] += routes
                } else if h.hasPrefix("*.") {
                    wild[String(h.dropFirst()), default: []] += routes
                } else {
                    exact[h, default: []] += routes
                }
            }
        }
        self.exact = exact
        self.needsHeaders = needsHeaders
        self.needsQuery = needsQuery
        wildcards = wild.sorted { $0.key.count > $1.key.count }.map { ($0.key, $0.value) }
    }

    /// The first route that matches `request`, with the VirtualService it came from; nil: no route (404 in Istio).
    public func route(_ request: HTTPRequestFacts) -> (virtualService: String, index: Int, route: HTTPRoute)? {
        first(request).map { ($0.route.virtualService, $0.route.index, $0.route.route) }
    }

    /// The ``Route/ordinal`` of the first route that matches `request`, and the match entry that matched (nil
    /// when the route has no match list).
    public func match(_ request: HTTPRequestFacts) -> (ordinal: Int, condition: Int?)? {
        first(request).map { ($0.route.ordinal, $0.condition) }
    }

    /// Whether some VirtualService names `authority`'s host (exactly or by wildcard).
    public func hasHost(_ authority: String) -> Bool { !candidates(authority).isEmpty }

    private func candidates(_ authority: String) -> [Route] {
        if exact.isEmpty && wildcards.count == 1 && wildcards[0].suffix.isEmpty { return wildcards[0].routes }
        var host = authority.lowercased()
        if let colon = host.utf8.lastIndex(of: UInt8(ascii: ":")), host.utf8.last != UInt8(ascii: "]") {
            host = String(host[..<colon])
        }
        return exact[host] ?? wildcards.first { host.utf8.reversed().starts(with: $0.suffix.utf8.reversed()) }?.routes ?? []
    }

    private func first(_ request: HTTPRequestFacts) -> (route: Route, condition: Int?)? {
        for r in candidates(request.authority) {
            let (taken, condition) = r.accepts(request)
            if taken { return (r, condition) }
        }
        return nil
    }

    /// The destination of `route` for one request: weighted by `weight` (Istio: missing weights mean one
    /// destination taking all), `random` in `0..<100`.
    public static func destination(of route: HTTPRoute, random: Int) -> VirtualService.RouteDestination? {
        guard route.route.count > 1 else { return route.route.first }
        var x = random
        for d in route.route {
            let w = d.weight ?? 0
            if x < w { return d }
            x -= w
        }
        return route.route.last
    }
}
