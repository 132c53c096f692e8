import SluiceModel
import SluiceProxy
import XCTest

/// Routing as Istio's request-routing and traffic-shifting tasks use it.
final class HTTPRouterTests: XCTestCase {
    static func router(_ yaml: String) -> HTTPRouter {
        let (resources, diagnostics) = ResourceDecoder.decode(yaml, file: "vs.yaml")
        precondition(!diagnostics.contains { $0.severity == .error }, "\(diagnostics)")
        let vss = resources.compactMap { r -> Named<VirtualService>? in
            guard case .virtualService(let vs) = r.spec else { return nil }
            return Named(namespace: r.metadata.namespace, name: r.metadata.name, spec: vs)
        }
        return HTTPRouter(virtualServices: vss)
    }

    static let reviews = router("""
        apiVersion: networking.istio.io/v1
        kind: VirtualService
        metadata: {name: reviews, namespace: bookinfo}
        spec:
          hosts: [reviews, reviews.bookinfo.svc.cluster.local]
          http:
          - name: jason
            match: [{headers: {end-user: {exact: jason}}}]
            route: [{destination: {host: reviews, subset: v2}}]
          - name: api
            match:
            - {uri: {prefix: /api/v2}, method: {exact: POST}}
            - {uri: {regex: "/reviews/[0-9]+"}, queryParams: {debug: {exact: "1"}}}
            route: [{destination: {host: reviews, subset: v3}}]
          - name: not-canary
            match: [{withoutHeaders: {x-canary: {exact: "yes"}}, port: 9080, uri: {prefix: /internal}}]
            route: [{destination: {host: reviews, subset: v1}}]
          - name: split
            route:
            - {destination: {host: reviews, subset: v1}, weight: 90}
            - {destination: {host: reviews, subset: v3}, weight: 10}
        ---
        apiVersion: networking.istio.io/v1
        kind: VirtualService
        metadata: {name: wild, namespace: edge}
        spec:
          hosts: ["*.example.com"]
          http:
          - match: [{sourceLabels: {app: productpage}}]
            route: [{destination: {host: pages.example.com}}]
        """)

    func name(_ facts: HTTPRequestFacts) -> String? { Self.reviews.route(facts)?.route.name }

    func testRequestRoutingByHeader() {
        XCTAssertEqual(name(.init(method: "GET", path: "/", authority: "reviews:9080", headers: ["end-user": "jason"],
                                  port: 9080)), "jason")
        XCTAssertEqual(name(.init(method: "GET", path: "/", authority: "reviews.bookinfo.svc.cluster.local",
                                  headers: ["end-user": "json"], port: 9080)), "split", "exact match only")
    }

    func testURIMethodQueryAndNegativeHeaderMatches() {
        XCTAssertEqual(name(.init(method: "POST", path: "/api/v2/x", authority: "reviews", port: 9080)), "api")
        XCTAssertEqual(name(.init(method: "GET", path: "/api/v2/x", authority: "reviews", port: 9080)), "split",
                       "every field of one match must hold")
        let (path, query) = HTTPRequestFacts.split(target: "/reviews/42?debug=1&x=2")
        XCTAssertEqual(name(.init(method: "GET", path: path, query: query, authority: "reviews", port: 9080)), "api",
                       "regex matches the whole path; the second match entry is an alternative")
        XCTAssertEqual(name(.init(method: "GET", path: "/reviews/42x", query: ["debug": "1"], authority: "reviews",
                                  port: 9080)), "split")
        XCTAssertEqual(name(.init(method: "GET", path: "/internal/a", authority: "reviews", port: 9080)), "not-canary")
        XCTAssertEqual(name(.init(method: "GET", path: "/internal/a", authority: "reviews", headers: ["x-canary": "yes"],
                                  port: 9080)), "split")
        XCTAssertEqual(name(.init(method: "GET", path: "/internal/a", authority: "reviews", port: 9081)), "split")
    }

    func testHostsExactThenWildcardAndSourceLabels() {
        let pages = HTTPRequestFacts(method: "GET", path: "/", authority: "shop.example.com", port: 80,
                                     sourceLabels: ["app": "productpage"])
        XCTAssertEqual(Self.reviews.route(pages)?.virtualService, "edge/wild")
        var other = pages
        other.sourceLabels = ["app": "ratings"]
        XCTAssertNil(Self.reviews.route(other), "no route: Istio answers 404")
        XCTAssertNil(Self.reviews.route(.init(method: "GET", path: "/", authority: "unknown", port: 80)))
    }

    /// The 90/10 split of the traffic-shifting task, over every value of the random draw.
    func testWeightedDestinationsSplitExactly() throws {
        let split = try XCTUnwrap(Self.reviews.route(.init(method: "GET", path: "/", authority: "reviews", port: 9080)))
        var counts: [String: Int] = [:]
        for r in 0..<100 { counts[HTTPRouter.destination(of: split.route, random: r)?.destination.subset ?? "-", default: 0] += 1 }
        XCTAssertEqual(counts, ["v1": 90, "v3": 10])
    }
}
