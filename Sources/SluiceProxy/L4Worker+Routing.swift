import Foundation
import SluiceIdentity
import SluiceModel

/// What the route stages decided for one request, whichever protocol it came in on.
enum RoutingDecision {
    /// The proxy answers itself (no route, redirect, direct response, fault abort, rate limit, overflow...).
    case answer(route: RouteRuntime?, status: Int, flag: ResponseFlag, headers: [(String, String)], body: String)
    /// Send it upstream.
    case forward(Forwarding)
}

struct JWTCacheKey: Hashable {
    let authenticator: ObjectIdentifier
    let token: String
}

struct Forwarding {
    var route: RouteRuntime?
    /// The index of the route's match condition that matched (for `rewrite.uri`).
    var condition: Int?
    var cluster: WorkerCluster
    var destination: VirtualService.RouteDestination?
    /// Fault injection's delay, nanoseconds (0: none).
    var delay: UInt64
    /// Counted in the cluster's requests in flight (circuit breaker): the exchange gives it back.
    var counted: Bool
    /// Consistent-hash key, for clusters that balance by one.
    var hash: UInt64
}

extension L4Worker {
    /// The request stages shared by HTTP/1.1 exchanges and HTTP/2 streams, in Istio's order: route (first
    /// match; captured traffic without one goes to its service), redirect, direct response, fault abort and
    /// delay, local rate limit, weighted destination, circuit breaker.
    func route(_ facts: HTTPRequestFacts, table: HTTPRouteTable, captured: ClusterRuntime?, client: String) -> RoutingDecision {
        // Request authentication, then authorization, as Envoy's jwt_authn and RBAC filters run: a request with
        // a bad token or that is not allowed is not routed. A request without a token passes authentication.
        var jwt: VerifiedJWT?
        if let authn = table.authentication, let token = authn.token(headers: facts.headers, path: facts.path) {
            switch verifiedToken(token, authn) {
            case .success(let v): jwt = v
            case .failure(let e):
                shard.add(stats.authenticationFailed)
                return .answer(route: nil, status: 401, flag: .none, headers: [("www-authenticate", "Bearer realm=\"\(facts.authority)\"")],
                               body: e.description)
            }
        }
        if let authz = table.authorization {
            var r = AuthorizationRequest(sourceIP: IPAddress(client), principal: facts.principal, port: facts.port)
            r.method = facts.method
            r.path = facts.path
            r.host = facts.authority
            r.headers = facts.headers
            r.requestPrincipal = jwt?.principal
            r.claims = jwt?.claims ?? [:]
            let decision = authz.evaluate(r)
            if case .allow(true) = decision { shard.add(stats.authorizationAudited) }
            if case .deny(_, let audited) = decision {
                shard.add(stats.authorizationDenied)
                if audited { shard.add(stats.authorizationAudited) }
                return .answer(route: nil, status: 403, flag: .none, headers: [], body: "RBAC: access denied")
            }
        }
        var route: RouteRuntime?
        var condition: Int?
        var matched = table.router.match(facts)
        // Captured traffic whose Host no VirtualService names goes by the dialled service.
        let byDestination = matched == nil && captured != nil && !table.router.hasHost(facts.authority)
        if byDestination, let c = captured {
            // Istio lists a service's addresses among its virtual host's domains: a captured request whose Host is
            // the address (or anything no VirtualService names) follows the dialled service's VirtualService.
            var byService = facts
            byService.authority = c.config.serviceHost
            matched = table.router.match(byService)
        }
        if let m = matched {
            route = table.routes[m.ordinal]
            condition = m.condition
        }
        var cluster: ClusterRuntime?
        var destination: VirtualService.RouteDestination?
        var delay: UInt64 = 0
        if let route {
            if let r = route.route.redirect {
                let location = HTTPResponses.redirectLocation(r, scheme: facts.scheme, authority: facts.authority,
                                                              path: facts.path)
                return .answer(route: route, status: r.redirectCode, flag: .none, headers: [("location", location)], body: "")
            }
            if let d = route.route.directResponse {
                return .answer(route: route, status: d.status, flag: .none, headers: [], body: d.body ?? "")
            }
            let fault = FaultInjection.decide(route.route.fault) { Double(self.rng.next() >> 11) / Double(1 << 53) }
            switch fault.abort {
            case .httpStatus(let s)?:
                return .answer(route: route, status: s, flag: .faultInjected, headers: [], body: "fault filter abort")
            case .grpcStatus(let g)?:
                return .answer(route: route, status: 200, flag: .faultInjected,
                               headers: [("content-type", "application/grpc"), ("grpc-status", Self.grpcCode(g))], body: "")
            case nil:
                break
            }
            delay = fault.delay?.clampedNanoseconds ?? 0
            for limit in route.rateLimits where limit.applies(facts) {
                if let retryAfter = takeToken(limit, facts: facts, client: client) {
                    return .answer(route: route, status: limit.local.status, flag: .rateLimited,
                                   headers: [("retry-after", String(retryAfter)),
                                             ("x-ratelimit-limit", String(limit.local.tokenBucket.maxTokens)),
                                             ("x-ratelimit-remaining", "0"), ("x-ratelimit-reset", String(retryAfter))],
                                   body: "local_rate_limited")
                }
            }
            let pick = route.clusters.count == 1 ? 0 : route.pick(rng.next(below: route.totalWeight))
            cluster = route.clusters[pick]
            destination = route.route.route[pick]
        } else if byDestination, let c = captured {
            cluster = c
        } else {
            return .answer(route: nil, status: 404, flag: .noRoute, headers: [], body: "")
        }
        guard let cluster, let wc = clusters[ObjectIdentifier(cluster)] else {
            return .answer(route: route, status: 503, flag: .noHealthyUpstream, headers: [], body: "no healthy upstream")
        }
        // Circuit breaker: requests in flight to the cluster, over all workers.
        var counted = false
        if let max = cluster.config.httpPool?.http2MaxRequests {
            if cluster.activeRequests.add(1) >= Int64(max) {
                cluster.activeRequests.add(-1)
                return overflowAnswer(wc, route: route)
            }
            counted = true
        }
        var hash: UInt64 = 0
        if case .consistentHash(let key, _) = cluster.config.loadBalancer {
            hash = Self.hashKey(key, facts: facts, client: client)
        }
        return .forward(Forwarding(route: route, condition: condition, cluster: wc, destination: destination, delay: delay,
                                   counted: counted, hash: hash))
    }

    /// 503 with Envoy's `x-envoy-overloaded` for a cluster at its circuit-breaker limit.
    func overflowAnswer(_ wc: WorkerCluster, route: RouteRuntime?) -> RoutingDecision {
        shard.add(wc.runtime.metrics.closedOverflow)
        return .answer(route: route, status: 503, flag: .upstreamOverflow, headers: [("x-envoy-overloaded", "true")],
                       body: "upstream connect error or disconnect/reset before headers. reset reason: overflow")
    }

    /// A token's verification, remembered per worker until it expires (a signature check costs tens of
    /// microseconds; clients send the same token many times).
    /// Keyed by the authenticator too: a token valid for one listener's issuers and audiences says nothing about
    /// another's.
    func verifiedToken(_ token: String, _ authn: RequestAuthenticator) -> Result<VerifiedJWT, JWTError> {
        let now = Date()
        let key = JWTCacheKey(authenticator: ObjectIdentifier(authn), token: token)
        if let hit = jwtCache[key], hit.expires.map({ $0.timeIntervalSince(now) > 0 }) ?? true { return .success(hit) }
        let result = authn.verifier.verify(token, now: now)
        if case .success(let v) = result {
            if jwtCache.count >= 4096 { jwtCache.removeAll(keepingCapacity: true) }
            jwtCache[key] = v
        }
        return result
    }
}
