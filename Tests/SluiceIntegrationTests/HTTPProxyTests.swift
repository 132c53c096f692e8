import Foundation
import Glibc
import SluiceAgent
import SluiceModel
import SluiceProxy
import SluiceRing
import SluiceTestSupport
import XCTest

/// The HTTP/1.1 pipeline end to end on loopback: a gateway HTTP listener on the real io_uring workers, Python
/// HTTP/1.1 backends (`Tests/Fixtures/http_backend.py`) and curl as the client. Each test would fail if the
/// feature it names were missing.
final class HTTPProxyTests: XCTestCase {
    var cleanups: [() -> Void] = []

    override func setUp() { Harness.raiseFileLimit() }

    override func tearDown() {
        for c in cleanups.reversed() { c() }
        cleanups = []
    }

    /// Starts HTTP backends named v1, v2, ... (names starting with "fail" answer 503 to everything).
    func backends(_ names: [String]) throws -> [UInt16] {
        let (p, ports) = try Harness.backends(names.map { "\($0):0" }, script: "http_backend.py")
        cleanups.append { p.terminate(); p.waitUntilExit() }
        return ports
    }

    func proxy(_ yaml: String, workers: Int = 2, headerTimeout: Duration = .seconds(10), jwks: JWKSCache? = nil) throws -> Harness.Proxy {
        let p = try Harness.proxy(yaml, workers: workers, headerTimeout: headerTimeout, jwks: jwks)
        cleanups.append { p.stop() }
        return p
    }

    /// A gateway on an HTTP port, one VirtualService with `routes`, a service with one endpoint per port (labels
    /// `version: NAME`), subsets for each, and `policy` as the DestinationRule's trafficPolicy.
    /// `servers` replaces the gateway's one HTTP server.
    static func mesh(_ endpoints: [(name: String, port: UInt16)], routes: String, policy: String = "",
                     extra: String = "", servers: String? = nil) -> String {
        let eps = endpoints.map { "  - {address: 127.0.0.1, ports: {http: \($0.port)}, labels: {version: \($0.name)}}" }
            .joined(separator: "\n")
        let subsets = endpoints.map { "  - {name: \($0.name), labels: {version: \($0.name)}}" }.joined(separator: "\n")
        let indent = { (s: String, n: Int) in
            s.split(separator: "\n", omittingEmptySubsequences: false).map { String(repeating: " ", count: n) + $0 }
                .joined(separator: "\n")
        }
        return """
            apiVersion: networking.istio.io/v1
            kind: Gateway
            metadata: {name: web, namespace: test}
            spec:
              servers:
            \(indent(servers ?? """
                - port: {number: 1080, name: http, protocol: HTTP}
                  bind: 127.0.0.1
                  hosts: ["*"]
                """, 2))
            ---
            apiVersion: networking.istio.io/v1
            kind: VirtualService
            metadata: {name: app, namespace: test}
            spec:
              hosts: ["*"]
              gateways: [web]
              http:
            \(indent(routes, 2))
            ---
            apiVersion: networking.istio.io/v1
            kind: ServiceEntry
            metadata: {name: app, namespace: test}
            spec:
              hosts: [app.test.svc.cluster.local]
              resolution: STATIC
              ports: [{number: 80, name: http, protocol: HTTP}]
              endpoints:
            \(eps)
            ---
            apiVersion: networking.istio.io/v1
            kind: DestinationRule
            metadata: {name: app, namespace: test}
            spec:
              host: app.test.svc.cluster.local
            \(policy.isEmpty ? "" : "  trafficPolicy:\n" + indent(policy, 4))
              subsets:
            \(subsets)
            """ + extra
    }

    /// A `HealthCheck` for app.test's service (appended to ``mesh``'s output); `check` is the probe's line.
    static func healthCheck(_ check: String) -> String {
        """

        ---
        apiVersion: sluice.dev/v1
        kind: HealthCheck
        metadata: {name: app, namespace: test}
        spec:
          host: app.test.svc.cluster.local
          interval: 100ms
          timeout: 500ms
          unhealthyThreshold: 1
          \(check)
        """
    }

    struct CurlResult {
        var lines: [String]
        var status: Int32
    }

    /// Runs curl; `-w` output lines come back in `lines`.
    @discardableResult
    func curl(_ args: [String]) throws -> CurlResult {
        let (output, status) = try Harness.run("/usr/bin/curl", ["-s", "--max-time", "20"] + args)
        return CurlResult(lines: output.split(separator: "\n").map(String.init), status: status)
    }

    /// `count` requests to `path` over curl's reused connections; each line is "CODE BACKEND".
    func requests(_ port: UInt16, _ path: String, count: Int, extra: [String] = []) throws -> [String] {
        let cfg = FileManager.default.temporaryDirectory.appendingPathComponent("curl-\(UUID().uuidString).cfg")
        var text = ""
        for _ in 0..<count { text += "url = \"http://127.0.0.1:\(port)\(path)\"\noutput = \"/dev/null\"\n" }
        try text.write(to: cfg, atomically: true, encoding: .utf8)
        defer { try? FileManager.default.removeItem(at: cfg) }
        return try curl(extra + ["-K", cfg.path, "-w", "%{http_code} %header{x-backend}\n"]).lines
    }

    // MARK: - routing and traffic management

    func testWeightedSplitSendsTheConfiguredShareToEachSubset() throws {
        let ports = try backends(["v1", "v2"])
        let p = try proxy(Self.mesh([("v1", ports[0]), ("v2", ports[1])], routes: """
            - route:
              - destination: {host: app.test.svc.cluster.local, subset: v1}
                weight: 90
              - destination: {host: app.test.svc.cluster.local, subset: v2}
                weight: 10
            """))
        let lines = try requests(p.port, "/item", count: 2000)
        XCTAssertEqual(lines.count, 2000)
        XCTAssertEqual(lines.filter { $0.hasPrefix("200 ") }.count, 2000)
        let v2 = lines.filter { $0 == "200 v2" }.count
        // 10% of 2,000 = 200; a binomial's 4.5 sigma is ~60.
        XCTAssertTrue((140...260).contains(v2), "v2 got \(v2) of 2000, configured 10%")
        XCTAssertEqual(p.metric("istio_requests_total"), 2000)
    }

    func testRoutesMatchByPathHeaderAndMethodFirstMatchWins() throws {
        let ports = try backends(["v1", "v2"])
        let p = try proxy(Self.mesh([("v1", ports[0]), ("v2", ports[1])], routes: """
            - match: [{headers: {x-canary: {exact: "yes"}}}]
              route: [{destination: {host: app.test.svc.cluster.local, subset: v2}}]
            - match: [{uri: {prefix: /v2}}, {method: {exact: DELETE}}]
              route: [{destination: {host: app.test.svc.cluster.local, subset: v2}}]
            - match: [{uri: {regex: "/static/[0-9]+"}}]
              directResponse: {status: 204}
            - match: [{uri: {exact: /old}}]
              redirect: {uri: /new, redirectCode: 301}
            - match: [{uri: {prefix: /nowhere}}]
              route: [{destination: {host: missing.test.svc.cluster.local}}]
            - match: [{uri: {prefix: /}}]
              route: [{destination: {host: app.test.svc.cluster.local, subset: v1}}]
            """))
        let base = "http://127.0.0.1:\(p.port)"
        let fmt = ["-o", "/dev/null", "-w", "%{http_code} %header{x-backend}"]
        XCTAssertEqual(try curl(fmt + ["\(base)/x"]).lines, ["200 v1"])
        XCTAssertEqual(try curl(fmt + ["-H", "x-canary: yes", "\(base)/x"]).lines, ["200 v2"])
        XCTAssertEqual(try curl(fmt + ["\(base)/v2/a"]).lines, ["200 v2"])
        XCTAssertEqual(try curl(fmt + ["-X", "DELETE", "\(base)/x"]).lines, ["200 v2"])
        XCTAssertEqual(try curl(fmt + ["\(base)/static/42"]).lines, ["204 "])
        XCTAssertEqual(try curl(["-o", "/dev/null", "-w", "%{http_code} %header{location}", "\(base)/old"]).lines,
                       ["301 http://127.0.0.1:\(p.port)/new"])
        XCTAssertEqual(try curl(fmt + ["\(base)/nowhere"]).lines.first?.prefix(3), "503")
    }

    func testRewriteAndHeaderOperationsReachTheBackendAndTheClient() throws {
        let ports = try backends(["v1"])
        let p = try proxy(Self.mesh([("v1", ports[0])], routes: """
            - match: [{uri: {prefix: /api}}]
              rewrite: {uri: /headers}
              headers:
                request:
                  set: {x-route: api}
                  remove: [x-secret]
                response:
                  add: {x-served-by: sluice}
              route: [{destination: {host: app.test.svc.cluster.local}}]
            """))
        let r = try curl(["-i", "-H", "x-secret: s3", "-H", "x-forwarded-for: 10.0.0.9", "http://127.0.0.1:\(p.port)/api"])
        let text = r.lines.joined(separator: "\n")
        XCTAssertTrue(text.contains("x-served-by: sluice"), text)
        XCTAssertTrue(text.contains("x-route: api"), text)
        XCTAssertFalse(text.contains("x-secret"), text)
        XCTAssertTrue(text.contains("x-forwarded-for: 10.0.0.9, 127.0.0.1"), text)
        XCTAssertTrue(text.contains("x-request-id: "), text)
    }

    func testRetriesHideABackendThatFailsTwiceThenSucceeds() throws {
        let ports = try backends(["v1"])
        let p = try proxy(Self.mesh([("v1", ports[0])], routes: """
            - match: [{uri: {prefix: /flaky/retried}}]
              retries: {attempts: 3, retryOn: 5xx}
              route: [{destination: {host: app.test.svc.cluster.local}}]
            - route: [{destination: {host: app.test.svc.cluster.local}}]
              retries: {attempts: 0}
            """))
        let base = "http://127.0.0.1:\(p.port)"
        XCTAssertEqual(try curl(["\(base)/flaky/retried/2"]).lines, ["v1 attempt 3"])
        // The same backend without retries: the client sees the first failure.
        XCTAssertEqual(try curl(["-o", "/dev/null", "-w", "%{http_code}", "\(base)/flaky/plain/2"]).lines, ["503"])
        XCTAssertEqual(p.metric("sluice_http_retries_total"), 2)
        // A POST body is sent again in full on each retry.
        XCTAssertEqual(try curl(["--data-binary", "payload-123", "\(base)/flaky/retried-post/1"]).lines,
                       ["v1 attempt 2"])
    }

    func testRequestTimeoutAnswers504AtTheDeadline() throws {
        let ports = try backends(["v1"])
        let p = try proxy(Self.mesh([("v1", ports[0])], routes: """
            - timeout: 300ms
              route: [{destination: {host: app.test.svc.cluster.local}}]
            """))
        let start = Date()
        let r = try curl(["-o", "/dev/null", "-w", "%{http_code}", "http://127.0.0.1:\(p.port)/delay/3000"])
        let elapsed = Date().timeIntervalSince(start)
        XCTAssertEqual(r.lines, ["504"])
        XCTAssertGreaterThanOrEqual(elapsed, 0.3)
        XCTAssertLessThan(elapsed, 1.5)
        XCTAssertEqual(try curl(["http://127.0.0.1:\(p.port)/delay/10"]).lines, ["v1"])
    }

    func testFaultInjectionDelaysAndAborts() throws {
        let ports = try backends(["v1"])
        let p = try proxy(Self.mesh([("v1", ports[0])], routes: """
            - match: [{uri: {prefix: /slow}}]
              fault: {delay: {fixedDelay: 400ms, percentage: {value: 100}}}
              route: [{destination: {host: app.test.svc.cluster.local}}]
            - match: [{uri: {prefix: /teapot}}]
              fault: {abort: {httpStatus: 418, percentage: {value: 100}}}
              route: [{destination: {host: app.test.svc.cluster.local}}]
            - match: [{uri: {prefix: /half}}]
              fault: {abort: {httpStatus: 500, percentage: {value: 50}}}
              route: [{destination: {host: app.test.svc.cluster.local}}]
            """))
        let start = Date()
        XCTAssertEqual(try curl(["http://127.0.0.1:\(p.port)/slow"]).lines, ["v1"])
        XCTAssertGreaterThanOrEqual(Date().timeIntervalSince(start), 0.4)
        XCTAssertEqual(try curl(["-o", "/dev/null", "-w", "%{http_code}", "http://127.0.0.1:\(p.port)/teapot"]).lines,
                       ["418"])
        let lines = try requests(p.port, "/half", count: 600)
        let aborted = lines.filter { $0.hasPrefix("500") }.count
        XCTAssertTrue((225...375).contains(aborted), "aborted \(aborted) of 600 at 50%")
    }

    /// Each start draws its own seed: two proxies with the same mesh abort different requests of a 50% fault (with
    /// a seed from the worker's index, both repeated one sequence, as every agent on every node did after each start).
    func testEachStartMakesItsOwnRandomChoices() throws {
        let ports = try backends(["v1"])
        let mesh = Self.mesh([("v1", ports[0])], routes: """
            - fault: {abort: {httpStatus: 500, percentage: {value: 50}}}
              route: [{destination: {host: app.test.svc.cluster.local}}]
            """)
        let first = try proxy(mesh, workers: 1), second = try proxy(mesh, workers: 1)
        let a = try requests(first.port, "/x", count: 64).map { $0.hasPrefix("500") }
        let b = try requests(second.port, "/x", count: 64).map { $0.hasPrefix("500") }
        XCTAssertEqual(a.count, 64)
        XCTAssertEqual(b.count, 64)
        // Equal by chance once in 2^64.
        XCTAssertNotEqual(a, b, "two starts aborted the same requests of 64: the choices are not seeded per start")
    }

    func testOutlierDetectionEjectsTheFailingHostAndLetsItBack() throws {
        let ports = try backends(["v1", "fail1"])
        let p = try proxy(Self.mesh([("v1", ports[0]), ("fail1", ports[1])], routes: """
            - route: [{destination: {host: app.test.svc.cluster.local}}]
              retries: {attempts: 0}
            """, policy: """
            loadBalancer: {simple: ROUND_ROBIN}
            outlierDetection: {consecutive5xxErrors: 3, interval: 1s, baseEjectionTime: 2s, maxEjectionPercent: 100}
            """), workers: 1)
        let first = try requests(p.port, "/x", count: 40)
        // Round robin alternates until the failing host has failed 3 times in a row; then only v1 answers.
        XCTAssertEqual(first.filter { $0.hasPrefix("503") }.count, 3, "\(first)")
        XCTAssertTrue(first.suffix(30).allSatisfy { $0 == "200 v1" })
        XCTAssertEqual(p.metric("sluice_outlier_ejections_total"), 1)
        Thread.sleep(forTimeInterval: 2.2)
        // Back after the ejection time: it gets traffic (and fails) again.
        let later = try requests(p.port, "/x", count: 10)
        XCTAssertGreaterThan(later.filter { $0.hasPrefix("503") }.count, 0, "\(later)")
    }

    func testActiveHTTPHealthCheckTakesAnEndpointThatAnswers503OutOfRotation() throws {
        let ports = try backends(["v1", "fail1"])
        let p = try proxy(Self.mesh([("v1", ports[0]), ("fail1", ports[1])], routes: """
            - route: [{destination: {host: app.test.svc.cluster.local}}]
              retries: {attempts: 0}
            """, policy: "loadBalancer: {simple: ROUND_ROBIN}",
            extra: Self.healthCheck("http: {path: /healthz, expectedStatuses: [{start: 200, end: 300}]}")))
        // The TCP handshake to fail1 succeeds; only the HTTP status tells it is unhealthy.
        XCTAssertTrue(p.eventually(5) { (try? self.requests(p.port, "/x", count: 10))?.allSatisfy { $0 == "200 v1" } ?? false })
    }

    func testMirrorSendsACopyOfEachRequestAndDropsItsAnswer() throws {
        let main = try backends(["v1"])
        let shadow = try backends(["v2"])  // a process of its own: its request counter counts only the copies
        let p = try proxy(Self.mesh([("v1", main[0]), ("v2", shadow[0])], routes: """
            - route: [{destination: {host: app.test.svc.cluster.local, subset: v1}}]
              mirror: {host: app.test.svc.cluster.local, subset: v2}
              mirrorPercentage: {value: 100}
            """))
        let lines = try requests(p.port, "/flaky/m/1000", count: 10)
        // The client only ever sees the main backend's answers (503 here: the copy's answers are dropped).
        XCTAssertEqual(lines, Array(repeating: "503 v1", count: 10))
        XCTAssertTrue(p.eventually { p.metric("sluice_http_mirrored_requests_total") == 10 })
        // The shadow backend got the 10 copies: its 11th request (sent directly) is attempt 11.
        XCTAssertTrue(p.eventually {
            (try? self.curl(["http://127.0.0.1:\(shadow[0])/flaky/probe-m/0"]).lines) == ["v2 attempt 1"]
        })
        let direct = try curl(["http://127.0.0.1:\(shadow[0])/flaky/m/1000"]).lines
        XCTAssertEqual(direct, ["v2 attempt 11"])
        XCTAssertEqual(p.metric("istio_requests_total"), 10, "copies are not client requests")
    }

    func testConsistentHashByHeaderKeepsAUserOnOneEndpoint() throws {
        let ports = try backends(["v1", "v2", "v3"])
        let p = try proxy(Self.mesh([("v1", ports[0]), ("v2", ports[1]), ("v3", ports[2])], routes: """
            - route: [{destination: {host: app.test.svc.cluster.local}}]
            """, policy: "loadBalancer: {consistentHash: {httpHeaderName: x-user}}"))
        var seen: [String: Set<String>] = [:]
        for user in (0..<12).map({ "user-\($0)" }) {
            let lines = try requests(p.port, "/x", count: 10, extra: ["-H", "x-user: \(user)"])
            seen[user] = Set(lines.map { String($0.split(separator: " ").last ?? "") })
        }
        // Each user always lands on one endpoint; the users spread over more than one.
        XCTAssertTrue(seen.values.allSatisfy { $0.count == 1 }, "\(seen)")
        XCTAssertGreaterThan(Set(seen.values.flatMap { $0 }).count, 1, "\(seen)")
    }

    func testRateLimitKeyedByHeaderGivesEachValueItsOwnBucket() throws {
        let ports = try backends(["v1"])
        let p = try proxy(Self.mesh([("v1", ports[0])], routes: """
            - route: [{destination: {host: app.test.svc.cluster.local}}]
            """, extra: """

            ---
            apiVersion: sluice.dev/v1
            kind: RateLimitPolicy
            metadata: {name: app, namespace: test}
            spec:
              host: app.test.svc.cluster.local
              local:
              - tokenBucket: {maxTokens: 5, tokensPerFill: 5, fillInterval: 60s}
                key: {header: x-user}
            """), workers: 1)
        let a = try requests(p.port, "/x", count: 12, extra: ["-H", "x-user: alice"])
        let b = try requests(p.port, "/x", count: 12, extra: ["-H", "x-user: bob"])
        XCTAssertEqual(a.filter { $0.hasPrefix("200") }.count, 5, "\(a)")
        XCTAssertEqual(b.filter { $0.hasPrefix("200") }.count, 5, "bob's bucket is his own: \(b)")
        XCTAssertEqual(a.filter { $0.hasPrefix("429") }.count, 7)
    }

    func testCircuitBreakerOverflowAnswers503WithOverloadedHeader() throws {
        let ports = try backends(["v1"])
        let p = try proxy(Self.mesh([("v1", ports[0])], routes: """
            - route: [{destination: {host: app.test.svc.cluster.local}}]
            """, policy: "connectionPool: {http: {http2MaxRequests: 1}}"))
        let base = "http://127.0.0.1:\(p.port)"
        let slow = Process()
        slow.executableURL = URL(fileURLWithPath: "/usr/bin/curl")
        slow.arguments = ["-s", "-o", "/dev/null", "\(base)/delay/1500"]
        try slow.run()
        defer { slow.waitUntilExit() }
        Thread.sleep(forTimeInterval: 0.4)
        let r = try curl(["-o", "/dev/null", "-w", "%{http_code} %header{x-envoy-overloaded}", "\(base)/x"])
        XCTAssertEqual(r.lines, ["503 true"])
        Thread.sleep(forTimeInterval: 1.5)
        XCTAssertEqual(try curl(["\(base)/x"]).lines, ["v1"])
    }

    /// At `maxConnections` requests wait for a connection, up to `http1MaxPendingRequests`; beyond that, 503.
    func testRequestsQueueForAConnectionUpToThePendingLimit() throws {
        let ports = try backends(["v1"])
        func parallel(_ p: Harness.Proxy, _ n: Int) throws -> [String] {
            let cfg = FileManager.default.temporaryDirectory.appendingPathComponent("pend-\(UUID().uuidString).cfg")
            var text = ""
            for _ in 0..<n { text += "url = \"http://127.0.0.1:\(p.port)/delay/300\"\noutput = \"/dev/null\"\n" }
            try text.write(to: cfg, atomically: true, encoding: .utf8)
            defer { try? FileManager.default.removeItem(at: cfg) }
            return try curl(["--parallel", "--parallel-immediate", "--parallel-max", "\(n)", "-K", cfg.path, "-w",
                             "%{http_code}\n"]).lines.sorted()
        }
        let limited = try proxy(Self.mesh([("v1", ports[0])], routes: """
            - route: [{destination: {host: app.test.svc.cluster.local}}]
            """, policy: "connectionPool: {tcp: {maxConnections: 1}, http: {http1MaxPendingRequests: 2}}"), workers: 1)
        let start = Date()
        XCTAssertEqual(try parallel(limited, 5), ["200", "200", "200", "503", "503"])
        // The three that got through shared the one connection, one after another.
        XCTAssertGreaterThan(Date().timeIntervalSince(start), 0.85)
        // Without a pending limit (Istio's default) every request waits its turn.
        let unlimited = try proxy(Self.mesh([("v1", ports[0])], routes: """
            - route: [{destination: {host: app.test.svc.cluster.local}}]
            """, policy: "connectionPool: {tcp: {maxConnections: 1}}"), workers: 2)
        XCTAssertEqual(try parallel(unlimited, 4), ["200", "200", "200", "200"])
    }

    /// A gateway-bound VirtualService's `sourceLabels` match the gateway workload's labels (its selector).
    func testSourceLabelsOnAGatewayMatchTheGatewaysLabels() throws {
        let ports = try backends(["v1", "v2"])
        let yaml = Self.mesh([("v1", ports[0]), ("v2", ports[1])], routes: """
            - match: [{sourceLabels: {istio: ingressgateway}}]
              route: [{destination: {host: app.test.svc.cluster.local, subset: v2}}]
            - route: [{destination: {host: app.test.svc.cluster.local, subset: v1}}]
            """).replacingOccurrences(of: "metadata: {name: web, namespace: test}\nspec:\n",
                                      with: "metadata: {name: web, namespace: test}\nspec:\n  selector: {istio: ingressgateway}\n")
        XCTAssertTrue(yaml.contains("selector: {istio: ingressgateway}"))
        // The gateway runs where a workload its selector matches runs: this node's gateway deployment.
        let p = try proxy(yaml + """

            ---
            apiVersion: networking.istio.io/v1
            kind: WorkloadEntry
            metadata: {name: ingress, namespace: test, annotations: {sluice.dev/node: local}}
            spec: {address: 127.0.0.9, labels: {istio: ingressgateway}}
            """)
        guard !p.ports.isEmpty else { return XCTFail("the gateway opened no listener on this node") }
        XCTAssertEqual(try requests(p.port, "/x", count: 3), ["200 v2", "200 v2", "200 v2"])
    }

    /// AuthorizationPolicies that select the gateway: DENY first, then an ALLOW must match; policies that select
    /// other workloads, or live in other namespaces, do not apply.
    func testAuthorizationPoliciesGuardTheGateway() throws {
        let ports = try backends(["v1"])
        let policies = """

            ---
            apiVersion: security.istio.io/v1
            kind: AuthorizationPolicy
            metadata: {name: no-admin, namespace: test}
            spec:
              action: DENY
              rules: [{to: [{operation: {paths: ["/admin*"]}}]}]
            ---
            apiVersion: security.istio.io/v1
            kind: AuthorizationPolicy
            metadata: {name: reads-from-loopback, namespace: test}
            spec:
              action: ALLOW
              rules:
              - from: [{source: {ipBlocks: ["127.0.0.0/8"]}}]
                to: [{operation: {methods: ["GET", "HEAD"]}}]
              - when: [{key: "request.headers[x-token]", values: ["let-me-write"]}]
            ---
            apiVersion: security.istio.io/v1
            kind: AuthorizationPolicy
            metadata: {name: someone-else, namespace: test}
            spec:
              selector: {matchLabels: {app: other}}
              action: DENY
              rules: [{}]
            ---
            apiVersion: security.istio.io/v1
            kind: AuthorizationPolicy
            metadata: {name: other-namespace, namespace: elsewhere}
            spec:
              action: DENY
              rules: [{}]
            """
        let p = try proxy(Self.mesh([("v1", ports[0])], routes: "- route: [{destination: {host: app.test.svc.cluster.local}}]",
                                    extra: policies))
        let base = "http://127.0.0.1:\(p.port)"
        func code(_ args: [String]) throws -> String { try curl(["-o", "/dev/null", "-w", "%{http_code}"] + args).lines.first ?? "" }
        XCTAssertEqual(try code(["\(base)/items"]), "200")
        XCTAssertEqual(try code(["-X", "POST", "\(base)/items"]), "403", "no ALLOW rule matches a POST")
        XCTAssertEqual(try code(["-X", "POST", "-H", "x-token: let-me-write", "\(base)/items"]), "200", "the when rule does")
        XCTAssertEqual(try code(["\(base)/admin/users"]), "403", "DENY wins")
        XCTAssertEqual(try curl(["\(base)/admin"]).lines, ["RBAC: access denied"])
        XCTAssertEqual(p.metric("sluice_authorization_denied_total"), 3)
    }

    /// RequestAuthentication on the gateway: a bad token is refused (401) whatever the route, a missing one is
    /// let through to authorization, which here wants a verified request principal for /private.
    func testJWTsAreVerifiedAtTheGatewayAndFeedAuthorization() throws {
        let ports = try backends(["v1"])
        let issuer = TestJWT()
        let jwks = issuer.jwks.replacingOccurrences(of: "\"", with: "\\\"")
        let p = try proxy(Self.mesh([("v1", ports[0])], routes: "- route: [{destination: {host: app.test.svc.cluster.local}}]",
                                    extra: """

            ---
            apiVersion: security.istio.io/v1
            kind: RequestAuthentication
            metadata: {name: jwt, namespace: test}
            spec:
              jwtRules:
              - issuer: https://issuer.example
                audiences: [shop]
                jwks: "\(jwks)"
            ---
            apiVersion: security.istio.io/v1
            kind: AuthorizationPolicy
            metadata: {name: private-needs-a-user, namespace: test}
            spec:
              action: DENY
              rules:
              - from: [{source: {notRequestPrincipals: ["*"]}}]
                to: [{operation: {paths: ["/private*"]}}]
              - when: [{key: "request.auth.claims[group]", values: ["banned"]}]
            """))
        let base = "http://127.0.0.1:\(p.port)"
        let exp = Int(Date().timeIntervalSince1970) + 600
        let alice = issuer.token(["iss": "https://issuer.example", "sub": "alice", "aud": "shop", "exp": exp, "group": "dev"])
        let banned = issuer.token(["iss": "https://issuer.example", "sub": "mallory", "aud": "shop", "exp": exp, "group": "banned"])
        let expired = issuer.token(["iss": "https://issuer.example", "sub": "alice", "aud": "shop", "exp": exp - 3600])
        let forged = issuer.token(["iss": "https://issuer.example", "sub": "alice", "aud": "shop", "exp": exp],
                                  signer: TestJWT().key)
        func code(_ path: String, _ token: String? = nil) throws -> String {
            try curl(["-o", "/dev/null", "-w", "%{http_code}"] + (token.map { ["-H", "Authorization: Bearer \($0)"] } ?? [])
                     + ["\(base)\(path)"]).lines.first ?? ""
        }
        XCTAssertEqual(try code("/public"), "200", "no token: authentication passes")
        XCTAssertEqual(try code("/private"), "403", "but /private needs a request principal")
        XCTAssertEqual(try code("/private", alice), "200")
        XCTAssertEqual(try code("/public", banned), "403", "claims reach the when conditions")
        XCTAssertEqual(try code("/public", expired), "401")
        XCTAssertEqual(try code("/public", forged), "401")
        XCTAssertEqual(try code("/public", "garbage"), "401")
        XCTAssertEqual(try curl(["-H", "Authorization: Bearer \(expired)", "\(base)/public"]).lines, ["Jwt is expired"])
        XCTAssertEqual(p.metric("sluice_request_authentication_failed_total"), 4)
    }

    /// `jwksUri` over https (a real TLS server with its own CA): the keys are fetched when the runtime is built, a
    /// token they signed passes, another key's fails; when the issuer rotates its keys a refresh sees the change
    /// (the agent then rebuilds its runtime), and an unreachable set leaves its issuer's tokens refused.
    func testJWKSIsFetchedOverHTTPSAndRefreshed() throws {
        let dir = NSTemporaryDirectory() + "sluice-jwks-\(UUID().uuidString)"
        cleanups.append { try? FileManager.default.removeItem(atPath: dir) }
        XCTAssertEqual(try Harness.run("/bin/sh", [Harness.root.appendingPathComponent("Tests/Fixtures/make_certs.sh").path,
                                                   dir, "localhost"]).status, 0)
        let issuer = TestJWT()
        try issuer.jwks.write(toFile: "\(dir)/jwks.json", atomically: true, encoding: .utf8)
        let server = Process()
        server.executableURL = URL(fileURLWithPath: "/usr/bin/env")
        server.arguments = ["python3", "-c", """
            import http.server, ssl, os
            os.chdir('\(dir)')
            httpd = http.server.HTTPServer(('127.0.0.1', 0), http.server.SimpleHTTPRequestHandler)
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER); ctx.load_cert_chain('localhost.crt', 'localhost.key')
            httpd.socket = ctx.wrap_socket(httpd.socket, server_side=True)
            print(httpd.server_address[1], flush=True)
            httpd.serve_forever()
            """]
        let out = Pipe()
        server.standardOutput = out
        server.standardError = FileHandle.nullDevice
        try server.run()
        cleanups.append { server.terminate(); server.waitUntilExit() }
        let line = String(decoding: out.fileHandleForReading.availableData, as: UTF8.self)
        let port = try XCTUnwrap(UInt16(line.trimmingCharacters(in: .whitespacesAndNewlines)))
        let cache = JWKSCache { try JWKSFetcher.fetch($0, extraTrust: "\(dir)/ca.crt") }
        let ports = try backends(["v1"])
        func rule(_ iss: String, _ uri: String) -> String {
            "  - {issuer: \(iss), audiences: [shop], jwksUri: \"\(uri)\"}"
        }
        let p = try proxy(Self.mesh([("v1", ports[0])], routes: "- route: [{destination: {host: app.test.svc.cluster.local}}]",
                                    extra: """

            ---
            apiVersion: security.istio.io/v1
            kind: RequestAuthentication
            metadata: {name: jwt, namespace: test}
            spec:
              jwtRules:
            \(rule("https://issuer.example", "https://localhost:\(port)/jwks.json"))
            \(rule("https://gone.example", "https://localhost:\(Harness.deadPort())/jwks.json"))
            """), jwks: cache)
        let exp = Int(Date().timeIntervalSince1970) + 600
        func code(_ token: String) throws -> String {
            try curl(["-o", "/dev/null", "-w", "%{http_code}", "-H", "Authorization: Bearer \(token)",
                      "http://127.0.0.1:\(p.port)/"]).lines.first ?? ""
        }
        XCTAssertEqual(try code(issuer.token(["iss": "https://issuer.example", "sub": "a", "aud": "shop", "exp": exp])), "200")
        XCTAssertEqual(try code(issuer.token(["iss": "https://issuer.example", "sub": "a", "aud": "shop", "exp": exp],
                                             signer: TestJWT().key)), "401", "not the issuer's key")
        XCTAssertEqual(try code(issuer.token(["iss": "https://gone.example", "sub": "a", "aud": "shop", "exp": exp])), "401",
                       "keys that could not be fetched verify nothing")
        // The issuer rotates its keys.
        XCTAssertFalse(cache.refresh(), "nothing changed yet")
        let next = TestJWT()
        try next.jwks.write(toFile: "\(dir)/jwks.json", atomically: true, encoding: .utf8)
        XCTAssertTrue(cache.refresh())
        XCTAssertEqual(cache.text(for: "https://localhost:\(port)/jwks.json"), next.jwks)
    }

    func testLocalRateLimitAnswers429BeyondTheBucketOverAllWorkers() throws {
        let ports = try backends(["v1"])
        let p = try proxy(Self.mesh([("v1", ports[0])], routes: """
            - route: [{destination: {host: app.test.svc.cluster.local}}]
            """, extra: """

            ---
            apiVersion: sluice.dev/v1
            kind: RateLimitPolicy
            metadata: {name: app, namespace: test}
            spec:
              host: app.test.svc.cluster.local
              local:
              - tokenBucket: {maxTokens: 20, tokensPerFill: 20, fillInterval: 60s}
            """), workers: 2)
        // Many connections so both workers take requests.
        let cfg = FileManager.default.temporaryDirectory.appendingPathComponent("rl-\(UUID().uuidString).cfg")
        var text = ""
        for i in 0..<100 { text += "url = \"http://127.0.0.1:\(p.port)/r\(i)\"\noutput = \"/dev/null\"\n" }
        try text.write(to: cfg, atomically: true, encoding: .utf8)
        defer { try? FileManager.default.removeItem(at: cfg) }
        let lines = try curl(["--parallel", "--parallel-max", "16", "-K", cfg.path, "-w",
                              "%{http_code} %header{retry-after}\n"]).lines
        let ok = lines.filter { $0.hasPrefix("200") }.count
        let limited = lines.filter { $0.hasPrefix("429") }
        XCTAssertEqual(ok + limited.count, 100)
        // The workers' shares add up to the bucket: never more than 20 in the fill interval.
        XCTAssertLessThanOrEqual(ok, 20)
        XCTAssertGreaterThanOrEqual(ok, 10, "at least one worker's share is admitted")
        XCTAssertTrue(limited.allSatisfy { Int($0.split(separator: " ").last ?? "") ?? 0 >= 1 }, "\(limited.prefix(3))")
    }

    // MARK: - HTTP/1.1 behaviour

    func testKeepAlivePipeliningAndChunkedBodiesInBothDirections() throws {
        let ports = try backends(["v1"])
        let p = try proxy(Self.mesh([("v1", ports[0])], routes: "- route: [{destination: {host: app.test.svc.cluster.local}}]"))
        let c = try Client(port: p.port)
        defer { c.close() }
        // Three requests in one write: answered in order on the one connection.
        XCTAssertTrue(c.send("GET /a HTTP/1.1\r\nHost: t\r\n\r\nPOST /echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
                             + "5\r\nhello\r\n6\r\n-world\r\n0\r\n\r\nGET /chunked HTTP/1.1\r\nHost: t\r\n\r\n"))
        var got = ""
        let end = Date().addingTimeInterval(5)
        while !got.contains("0\r\n\r\n") && Date() < end {
            guard let d = c.receive(), !d.isEmpty else { break }
            got += String(decoding: d, as: UTF8.self)
        }
        let first = got.range(of: "\r\n\r\nv1")!, second = got.range(of: "hello-world")!, third = got.range(of: "one-")!
        XCTAssertLessThan(first.lowerBound, second.lowerBound)
        XCTAssertLessThan(second.lowerBound, third.lowerBound)
        XCTAssertTrue(got.contains("4\r\none-\r\n4\r\ntwo-\r\n5\r\nthree\r\n0\r\n\r\n"), got)
        XCTAssertEqual(got.components(separatedBy: "HTTP/1.1 200").count - 1, 3)
    }

    func testLargeBodiesStreamThroughWithBoundedBuffers() throws {
        let ports = try backends(["v1"])
        let p = try proxy(Self.mesh([("v1", ports[0])], routes: "- route: [{destination: {host: app.test.svc.cluster.local}}]"))
        let dir = FileManager.default.temporaryDirectory
        let input = dir.appendingPathComponent("body-\(UUID().uuidString)"), output = dir.appendingPathComponent("out-\(UUID().uuidString)")
        defer { try? FileManager.default.removeItem(at: input); try? FileManager.default.removeItem(at: output) }
        var bytes = [UInt8](repeating: 0, count: 8 << 20)
        for i in bytes.indices { bytes[i] = UInt8(truncatingIfNeeded: i &* 2_654_435_761 >> 13) }
        try Data(bytes).write(to: input)
        let r = try curl(["--data-binary", "@\(input.path)", "-o", output.path, "http://127.0.0.1:\(p.port)/echo"])
        XCTAssertEqual(r.status, 0)
        XCTAssertEqual(try Data(contentsOf: output), Data(bytes))
        // One buffer per direction at most while streaming; none once done.
        XCTAssertTrue(p.eventually { p.metric("sluice_worker_buffers_in_use") == 0 })
    }

    func testAnEarlyAnswerToALargeUploadDoesNotStallTheConnection() throws {
        // The only endpoint refuses connections: the proxy answers 503 while the client is still uploading.
        let p = try proxy(Self.mesh([("v1", Harness.deadPort())], routes: """
            - route: [{destination: {host: app.test.svc.cluster.local}}]
              retries: {attempts: 0}
            """))
        let file = FileManager.default.temporaryDirectory.appendingPathComponent("upload-\(UUID().uuidString)")
        try Data(repeating: 0x61, count: 4 << 20).write(to: file)
        defer { try? FileManager.default.removeItem(at: file) }
        let start = Date()
        // No `Expect: 100-continue`: the body follows the head at once, as most clients send it.
        let r = try curl(["-o", "/dev/null", "-w", "%{http_code}", "-H", "Expect:", "--data-binary", "@\(file.path)",
                          "http://127.0.0.1:\(p.port)/upload"])
        XCTAssertEqual(r.lines, ["503"])
        XCTAssertLessThan(Date().timeIntervalSince(start), 5, "the rest of the body was read and dropped")
        XCTAssertTrue(p.eventually { p.metric("sluice_worker_buffers_in_use") == 0 && p.metric("sluice_worker_active_connections") == 0 })
    }

    func testSmugglingShapesAre400AndClosed() throws {
        let ports = try backends(["v1"])
        let p = try proxy(Self.mesh([("v1", ports[0])], routes: "- route: [{destination: {host: app.test.svc.cluster.local}}]"))
        let attacks = [
            "POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 4\r\nContent-Length: 5\r\n\r\nabcd",
            "GET / HTTP/1.1\r\nHost: t\r\nX-A: a\r\n b\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: t\rX: y\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        ]
        for a in attacks {
            let c = try Client(port: p.port)
            XCTAssertTrue(c.send(a))
            let reply = String(decoding: c.receiveAll() ?? [], as: UTF8.self)
            XCTAssertTrue(reply.hasPrefix("HTTP/1.1 400"), "\(a.debugDescription) -> \(reply)")
            XCTAssertTrue(reply.contains("connection: close"))
            c.close()
        }
        let long = try Client(port: p.port)
        XCTAssertTrue(long.send("GET /" + String(repeating: "a", count: 9000) + " HTTP/1.1\r\nHost: t\r\n\r\n"))
        XCTAssertTrue(String(decoding: long.receiveAll() ?? [], as: UTF8.self).hasPrefix("HTTP/1.1 414"))
        long.close()
    }

    func testSlowlorisIsCutOffByTheHeaderTimeout() throws {
        let ports = try backends(["v1"])
        let p = try proxy(Self.mesh([("v1", ports[0])], routes: "- route: [{destination: {host: app.test.svc.cluster.local}}]"),
                          headerTimeout: .seconds(1))
        let c = try Client(port: p.port, timeout: 6)
        defer { c.close() }
        let start = Date()
        var cut = false
        for byte in "GET / HTTP/1.1\r\nHost: t\r\nX-Slow: ".utf8 + Array(repeating: UInt8(ascii: "a"), count: 200) {
            if !c.send([byte]) { cut = true; break }
            Thread.sleep(forTimeInterval: 0.05)
            if Date().timeIntervalSince(start) > 4 { break }
        }
        let reply = String(decoding: c.receiveAll() ?? [], as: UTF8.self)
        XCTAssertTrue(cut || reply.hasPrefix("HTTP/1.1 408"), reply)
        XCTAssertLessThan(Date().timeIntervalSince(start), 4)
    }

    func testUpstreamDyingMidResponseNeverLooksComplete() throws {
        let ports = try backends(["v1"])
        let p = try proxy(Self.mesh([("v1", ports[0])], routes: "- route: [{destination: {host: app.test.svc.cluster.local}}]"))
        let r = try curl(["-o", "/dev/null", "http://127.0.0.1:\(p.port)/half"])
        XCTAssertNotEqual(r.status, 0, "a response cut short must fail at the client")
        // Closed before any response: a clean 503, not a hang.
        XCTAssertEqual(try curl(["-o", "/dev/null", "-w", "%{http_code}", "http://127.0.0.1:\(p.port)/drop"]).lines,
                       ["503"])
        XCTAssertEqual(try curl(["http://127.0.0.1:\(p.port)/ok"]).lines, ["v1"])
    }

    func testUpgradeIsRelayedAsATunnel() throws {
        let ports = try backends(["v1"])
        let p = try proxy(Self.mesh([("v1", ports[0])], routes: "- route: [{destination: {host: app.test.svc.cluster.local}}]"))
        let c = try Client(port: p.port)
        defer { c.close() }
        XCTAssertTrue(c.send("GET /upgrade HTTP/1.1\r\nHost: t\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\n"))
        var got = ""
        while !got.contains("\r\n\r\n"), let d = c.receive(), !d.isEmpty { got += String(decoding: d, as: UTF8.self) }
        XCTAssertTrue(got.hasPrefix("HTTP/1.1 101"), got)
        XCTAssertTrue(c.send("ping-through-the-tunnel"))
        XCTAssertEqual(c.receive(exactly: 23).map { String(decoding: $0, as: UTF8.self) }, "ping-through-the-tunnel")
    }

    func testRequestMetricsCarryIstioLabels() throws {
        let ports = try backends(["v1"])
        let p = try proxy(Self.mesh([("v1", ports[0])], routes: """
            - match: [{uri: {prefix: /ok}}]
              route: [{destination: {host: app.test.svc.cluster.local, subset: v1}}]
            """))
        _ = try requests(p.port, "/ok", count: 5)
        _ = try requests(p.port, "/none", count: 2)
        let text = p.registry.render()
        let ok = text.split(separator: "\n").first { $0.hasPrefix("istio_requests_total{") && $0.contains("response_code=\"200\"") }
        XCTAssertNotNil(ok)
        XCTAssertTrue(ok?.contains("destination_service=\"app.test.svc.cluster.local\"") ?? false, String(ok ?? ""))
        XCTAssertTrue(ok?.contains("destination_version=\"v1\"") ?? false)
        XCTAssertTrue(ok?.hasSuffix(" 5") ?? false, String(ok ?? ""))
        let nr = text.split(separator: "\n").first { $0.hasPrefix("istio_requests_total{") && $0.contains("response_code=\"404\"") }
        XCTAssertTrue(nr?.contains("response_flags=\"NR\"") ?? false, String(nr ?? ""))
        XCTAssertTrue(nr?.hasSuffix(" 2") ?? false)
        XCTAssertTrue(text.contains("istio_request_duration_milliseconds_bucket{"))
    }
}
