import SluiceModel
import XCTest

/// HTTP routes, written from Istio's traffic-management tasks (request routing, traffic shifting, fault
/// injection, request timeouts, retries) and the VirtualService reference.
final class HTTPRouteTests: XCTestCase {
    let reviewsRule = """
        apiVersion: networking.istio.io/v1
        kind: DestinationRule
        metadata: {name: reviews}
        spec:
          host: reviews
          subsets:
          - {name: v1, labels: {version: v1}}
          - {name: v2, labels: {version: v2}}
          - {name: v3, labels: {version: v3}}
        ---

        """

    func decode(_ yaml: String) -> (VirtualService?, [Diagnostic]) {
        let (resources, diagnostics) = ResourceDecoder.decode(reviewsRule + yaml, file: "vs.yaml")
        for r in resources { if case .virtualService(let vs) = r.spec { return (vs, diagnostics) } }
        return (nil, diagnostics)
    }

    func compileErrors(_ yaml: String) -> [Diagnostic] {
        let (resources, _) = ResourceDecoder.decode(reviewsRule + yaml, file: "vs.yaml")
        do {
            _ = try SnapshotCompiler().compile(resources)
            return []
        } catch { return error.diagnostics.filter { $0.severity == .error } }
    }

    func testRequestRoutingByHeader() throws {
        let (vs, diagnostics) = decode("""
            apiVersion: networking.istio.io/v1
            kind: VirtualService
            metadata: {name: reviews}
            spec:
              hosts: [reviews]
              http:
              - match:
                - headers:
                    end-user: {exact: jason}
                route:
                - destination: {host: reviews, subset: v2}
              - route:
                - destination: {host: reviews, subset: v1}
            """)
        XCTAssertEqual(diagnostics, [])
        let http = try XCTUnwrap(vs?.http)
        XCTAssertEqual(http.count, 2)
        XCTAssertEqual(http[0].match[0].headers, ["end-user": .exact("jason")])
        XCTAssertEqual(http[0].route[0].destination.subset, "v2")
        XCTAssertEqual(http[1].match, [])
        XCTAssertEqual(http[1].route[0].destination.host, "reviews")
        XCTAssertEqual(http[1].route[0].destination.subset, "v1")
    }

    func testWeightBasedTrafficShifting() throws {
        let yaml = """
            apiVersion: networking.istio.io/v1
            kind: VirtualService
            metadata: {name: reviews}
            spec:
              hosts: [reviews]
              http:
              - route:
                - destination: {host: reviews, subset: v1}
                  weight: 50
                - destination: {host: reviews, subset: v3}
                  weight: 50
            """
        let (vs, diagnostics) = decode(yaml)
        XCTAssertEqual(diagnostics, [])
        XCTAssertEqual(vs?.http[0].route.map(\.weight), [50, 50])
        let (_, bad) = decode(yaml.replacingOccurrences(of: "weight: 50\n    - destination: {host: reviews, subset: v3}\n      weight: 50",
                                                        with: "weight: 50\n    - destination: {host: reviews, subset: v3}\n      weight: 60"))
        XCTAssertTrue(bad.contains { $0.path == "spec.http[0].route" && $0.message.contains("110") }, "\(bad)")
    }

    func testFaultInjectionDelayAndAbort() throws {
        let (vs, diagnostics) = decode("""
            apiVersion: networking.istio.io/v1
            kind: VirtualService
            metadata: {name: ratings}
            spec:
              hosts: [ratings]
              http:
              - match:
                - headers:
                    end-user: {exact: jason}
                fault:
                  delay:
                    percentage: {value: 100.0}
                    fixedDelay: 7s
                  abort:
                    percentage: {value: 12.5}
                    httpStatus: 500
                route:
                - destination: {host: ratings}
            """)
        XCTAssertEqual(diagnostics, [])
        let fault = try XCTUnwrap(vs?.http[0].fault)
        XCTAssertEqual(fault.delay?.fixedDelay, .seconds(7))
        XCTAssertEqual(fault.delay?.percentage, 100)
        XCTAssertEqual(fault.abort?.kind, .httpStatus(500))
        XCTAssertEqual(fault.abort?.percentage, 12.5)
    }

    func testTimeoutsRetriesRewriteAndHeaders() throws {
        let (vs, diagnostics) = decode("""
            apiVersion: networking.istio.io/v1
            kind: VirtualService
            metadata: {name: reviews}
            spec:
              hosts: [reviews]
              http:
              - match: [{uri: {prefix: /api/}, method: {exact: GET}, queryParams: {debug: {exact: "1"}}}]
                rewrite: {uri: /v2/}
                timeout: 0.5s
                retries: {attempts: 3, perTryTimeout: 2s, retryOn: "gateway-error,connect-failure,refused-stream,503"}
                headers:
                  request: {set: {x-env: prod}, remove: [x-debug]}
                  response: {add: {x-served-by: sluice}}
                mirror: {host: reviews, subset: v3}
                mirrorPercentage: {value: 10}
                route:
                - destination: {host: reviews, subset: v2}
            """)
        XCTAssertEqual(diagnostics, [])
        let r = try XCTUnwrap(vs?.http[0])
        XCTAssertEqual(r.match[0].uri, .prefix("/api/"))
        XCTAssertEqual(r.match[0].method, .exact("GET"))
        XCTAssertEqual(r.match[0].queryParams, ["debug": .exact("1")])
        XCTAssertEqual(r.rewrite?.uri, "/v2/")
        XCTAssertEqual(r.timeout, .milliseconds(500))
        XCTAssertEqual(r.retries?.attempts, 3)
        XCTAssertEqual(r.retries?.perTryTimeout, .seconds(2))
        XCTAssertEqual(r.retries?.retryOn, ["gateway-error", "connect-failure", "refused-stream", "503"])
        XCTAssertEqual(r.headers?.request?.set, ["x-env": "prod"])
        XCTAssertEqual(r.headers?.request?.remove, ["x-debug"])
        XCTAssertEqual(r.headers?.response?.add, ["x-served-by": "sluice"])
        XCTAssertEqual(r.mirror?.subset, "v3")
        XCTAssertEqual(r.mirrorPercentage, 10)
    }

    func testRedirectAndDirectResponse() throws {
        let (vs, diagnostics) = decode("""
            apiVersion: networking.istio.io/v1
            kind: VirtualService
            metadata: {name: web}
            spec:
              hosts: [web.example.com]
              http:
              - match: [{uri: {regex: "^/old/.*"}}]
                redirect: {uri: /new, authority: new.example.com, redirectCode: 308}
              - directResponse: {status: 503, body: {string: "down for maintenance"}}
            """)
        XCTAssertEqual(diagnostics, [])
        XCTAssertEqual(vs?.http[0].redirect?.uri, "/new")
        XCTAssertEqual(vs?.http[0].redirect?.authority, "new.example.com")
        XCTAssertEqual(vs?.http[0].redirect?.redirectCode, 308)
        XCTAssertEqual(vs?.http[1].directResponse?.status, 503)
        XCTAssertEqual(vs?.http[1].directResponse?.body, "down for maintenance")
    }

    func testInvalidRoutesAreErrorsWithTheirPath() {
        let cases: [(String, String, String)] = [
            ("route: [{destination: {host: reviews}}]\n    redirect: {uri: /x}", "spec.http[0]", "mutually exclusive"),
            ("match: [{uri: {regex: \"([a-z\"}}]\n    route: [{destination: {host: reviews}}]", "spec.http[0].match[0].uri.regex",
             "not a valid regular expression"),
            ("match: [{uri: {exact: /a, prefix: /b}}]\n    route: [{destination: {host: reviews}}]", "spec.http[0].match[0].uri",
             "mutually exclusive"),
            ("fault: {abort: {httpStatus: 700}}\n    route: [{destination: {host: reviews}}]", "spec.http[0].fault.abort.httpStatus",
             "out of range"),
            ("fault: {delay: {fixedDelay: 1s, percentage: {value: 101}}}\n    route: [{destination: {host: reviews}}]",
             "spec.http[0].fault.delay.percentage.value", "out of range"),
            ("retries: {attempts: 2, retryOn: \"5xx,sometimes\"}\n    route: [{destination: {host: reviews}}]",
             "spec.http[0].retries.retryOn", "'sometimes' is not a retry condition"),
            ("redirect: {uri: /x, redirectCode: 304}", "spec.http[0].redirect.redirectCode", "not a redirect status"),
            ("timeout: soon\n    route: [{destination: {host: reviews}}]", "spec.http[0].timeout", "not a duration"),
            ("name: empty", "spec.http[0]", "needs one of route, redirect or directResponse"),
        ]
        for (route, path, message) in cases {
            let (_, diagnostics) = decode("""
                apiVersion: networking.istio.io/v1
                kind: VirtualService
                metadata: {name: bad}
                spec:
                  hosts: [reviews]
                  http:
                  - \(route)
                """)
            XCTAssertTrue(diagnostics.contains { $0.severity == .error && $0.path == path && $0.message.contains(message) },
                          "\(route): \(diagnostics)")
        }
    }

    func testUndefinedSubsetInHTTPRouteIsACompileError() {
        let errors = compileErrors("""
            apiVersion: networking.istio.io/v1
            kind: VirtualService
            metadata: {name: reviews}
            spec:
              hosts: [reviews]
              http:
              - route: [{destination: {host: reviews, subset: v9}}]
                mirror: {host: reviews, subset: v8}
            """)
        XCTAssertEqual(errors.map(\.path), ["spec.http[0].route[0].destination.subset", "spec.http[0].mirror.subset"])
    }
}
