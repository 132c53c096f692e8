import Foundation
import Glibc
import SluiceProxy
import XCTest

/// HTTP/2 and gRPC through a gateway listener: Python grpcio clients and servers, h2load for many streams over
/// few connections. The clients speak h2c with prior knowledge; the service port is declared GRPC.
final class H2ProxyTests: XCTestCase {
    var cleanups: [() -> Void] = []

    override func setUp() { Harness.raiseFileLimit() }

    override func tearDown() {
        for c in cleanups.reversed() { c() }
        cleanups = []
    }

    func grpcBackends(_ names: [String]) throws -> [UInt16] {
        let (p, ports) = try Harness.backends(["serve"] + names, script: "grpc_backend.py")
        cleanups.append { p.terminate(); p.waitUntilExit() }
        return ports
    }

    func proxy(_ yaml: String) throws -> Harness.Proxy {
        let p = try Harness.proxy(yaml, workers: 2)
        cleanups.append { p.stop() }
        return p
    }

    static func mesh(_ ports: [UInt16], routes: String) -> String {
        HTTPProxyTests.mesh(ports.enumerated().map { ("g\($0.offset + 1)", $0.element) }, routes: routes)
            .replacingOccurrences(of: "name: http, protocol: HTTP}]", with: "name: grpc, protocol: GRPC}]")
            .replacingOccurrences(of: "ports: {http: ", with: "ports: {grpc: ")
    }

    /// One gRPC call through the proxy with Python's grpcio client.
    func call(_ port: UInt16, _ method: String, _ payload: String, metadata: [String] = []) throws -> String {
        try grpcClient(["call", "127.0.0.1:\(port)", method, payload] + metadata)
    }

    /// Runs the grpcio fixture as a client; returns what it printed.
    func grpcClient(_ arguments: [String]) throws -> String {
        let fixture = Harness.root.appendingPathComponent("Tests/Fixtures/grpc_backend.py").path
        return try Harness.run("/usr/bin/env", ["python3", fixture] + arguments).output
            .trimmingCharacters(in: .whitespacesAndNewlines)
    }

    /// curl speaking HTTP/2 with prior knowledge; returns what it printed.
    func h2curl(_ args: [String]) throws -> String {
        try Harness.run("/usr/bin/curl", ["-s", "--http2-prior-knowledge", "--max-time", "10"] + args).output
    }

    func testGRPCUnaryStreamingStatusAndHeaderRoutingCrossTheProxy() throws {
        let ports = try grpcBackends(["g1", "g2"])
        let p = try proxy(Self.mesh(ports, routes: """
            - match: [{headers: {x-canary: {exact: "yes"}}}]
              route: [{destination: {host: app.test.svc.cluster.local, subset: g2}}]
            - route: [{destination: {host: app.test.svc.cluster.local, subset: g1}}]
            """))
        XCTAssertEqual(try call(p.port, "/test.Echo/Unary", "hi"), "OK g1:hi")
        XCTAssertEqual(try call(p.port, "/test.Echo/Unary", "hi", metadata: ["x-canary=yes"]), "OK g2:hi")
        // The status travels in trailers (a trailers-only response here).
        XCTAssertEqual(try call(p.port, "/test.Echo/Fail", "x"), "ERR NOT_FOUND missing")
        let stream = try call(p.port, "/test.Echo/Stream", "2000")
        XCTAssertTrue(stream.hasPrefix("OK g1:0,g1:1,"), String(stream.prefix(80)))
        XCTAssertEqual(stream.split(separator: ",").count, 2000)
        XCTAssertTrue(stream.hasSuffix("g1:1999"))
        XCTAssertEqual(p.metric("istio_requests_total"), 4)
    }

    /// gRPC's health protocol: an endpoint whose server answers NOT_SERVING (its port still accepts calls) is
    /// taken out; a check for a service the servers do not know takes every endpoint out.
    func testGRPCHealthCheckTakesANotServingEndpointOut() throws {
        let ports = try grpcBackends(["g1", "sick2"])
        func mesh(_ service: String) -> String {
            Self.mesh(ports, routes: """
                - route: [{destination: {host: app.test.svc.cluster.local}}]
                """) + HTTPProxyTests.healthCheck("grpc: {serviceName: \(service)}")
        }
        let p = try proxy(mesh("test.Echo"))
        XCTAssertTrue(p.eventually(5) {
            (0..<6).allSatisfy { _ in (try? self.call(p.port, "/test.Echo/Unary", "hi")) == "OK g1:hi" }
        })
        let unknown = try proxy(mesh("no.such.Service"))
        XCTAssertTrue(unknown.eventually(5) {
            (try? self.call(unknown.port, "/test.Echo/Unary", "hi"))?.hasPrefix("ERR UNAVAILABLE") ?? false
        })
    }

    func testGRPCFaultAbortAnswersWithTheConfiguredStatus() throws {
        let ports = try grpcBackends(["g1"])
        let p = try proxy(Self.mesh(ports, routes: """
            - fault: {abort: {grpcStatus: UNAVAILABLE, percentage: {value: 100}}}
              route: [{destination: {host: app.test.svc.cluster.local}}]
            """))
        XCTAssertTrue(try call(p.port, "/test.Echo/Unary", "hi").hasPrefix("ERR UNAVAILABLE"))
    }

    func testRequestTimeoutAppliesToHTTP2Streams() throws {
        let (backend, ports) = try Harness.backends(["v1:0"], script: "http_backend.py")
        cleanups.append { backend.terminate(); backend.waitUntilExit() }
        let p = try proxy(HTTPProxyTests.mesh([("v1", ports[0])], routes: """
            - timeout: 300ms
              route: [{destination: {host: app.test.svc.cluster.local}}]
            """))
        let start = Date()
        let text = try h2curl(["-o", "/dev/null", "-w", "%{http_code}", "http://127.0.0.1:\(p.port)/delay/3000"])
        XCTAssertEqual(text, "504")
        XCTAssertLessThan(Date().timeIntervalSince(start), 1.5)
    }

    func testPerTryTimeoutRetriesHTTP2StreamsThenGivesUp() throws {
        let (backend, ports) = try Harness.backends(["v1:0"], script: "http_backend.py")
        cleanups.append { backend.terminate(); backend.waitUntilExit() }
        let p = try proxy(HTTPProxyTests.mesh([("v1", ports[0])], routes: """
            - retries: {attempts: 2, perTryTimeout: 200ms, retryOn: 5xx}
              route: [{destination: {host: app.test.svc.cluster.local}}]
            """))
        let start = Date()
        let text = try h2curl(["-o", "/dev/null", "-w", "%{http_code}", "http://127.0.0.1:\(p.port)/delay/3000"])
        let elapsed = Date().timeIntervalSince(start)
        // Three attempts of 200 ms each, then the client hears 504.
        XCTAssertEqual(text, "504")
        XCTAssertGreaterThanOrEqual(elapsed, 0.6)
        XCTAssertLessThan(elapsed, 2.0)
        XCTAssertEqual(p.metric("sluice_http_retries_total"), 2)
    }

    func testRetriesHideAFlakyBackendForHTTP2Clients() throws {
        let (backend, ports) = try Harness.backends(["v1:0"], script: "http_backend.py")
        cleanups.append { backend.terminate(); backend.waitUntilExit() }
        let p = try proxy(HTTPProxyTests.mesh([("v1", ports[0])], routes: """
            - retries: {attempts: 3, retryOn: 5xx}
              route: [{destination: {host: app.test.svc.cluster.local}}]
            """))
        let curl = h2curl
        XCTAssertEqual(try curl(["http://127.0.0.1:\(p.port)/flaky/h2-get/2"]), "v1 attempt 3")
        // The body is kept and sent again in full.
        XCTAssertEqual(try curl(["--data-binary", "payload", "http://127.0.0.1:\(p.port)/flaky/h2-post/1"]), "v1 attempt 2")
        XCTAssertEqual(p.metric("sluice_http_retries_total"), 3)
    }

    /// Fault delays hold HTTP/2 streams (gRPC to a GRPC port; a POST body to an HTTP port, held and then sent
    /// whole), and retries of HTTP/2 streams wait the policy's back-off.
    func testFaultDelaysAndRetryBackOffApplyToHTTP2Streams() throws {
        let ports = try grpcBackends(["g1"])
        let p = try proxy(Self.mesh(ports, routes: """
            - fault: {delay: {fixedDelay: 400ms, percentage: {value: 100}}}
              route: [{destination: {host: app.test.svc.cluster.local}}]
            """))
        var start = Date()
        XCTAssertEqual(try call(p.port, "/test.Echo/Unary", "late"), "OK g1:late")
        XCTAssertGreaterThan(Date().timeIntervalSince(start), 0.4)

        let (backend, http) = try Harness.backends(["v1:0"], script: "http_backend.py")
        cleanups.append { backend.terminate(); backend.waitUntilExit() }
        let q = try proxy(HTTPProxyTests.mesh([("v1", http[0])], routes: """
            - match: [{uri: {prefix: /echo}}]
              fault: {delay: {fixedDelay: 300ms, percentage: {value: 100}}}
              route: [{destination: {host: app.test.svc.cluster.local}}]
            - retries: {attempts: 3, retryOn: 5xx}
              route: [{destination: {host: app.test.svc.cluster.local}}]
            """))
        let body = String(repeating: "0123456789", count: 5000)
        start = Date()
        XCTAssertEqual(try h2curl(["--data-binary", body, "http://127.0.0.1:\(q.port)/echo"]), body)
        XCTAssertGreaterThan(Date().timeIntervalSince(start), 0.3)
        // Two failed attempts: Istio's back-off (25 ms base, jittered, doubling) spaces the three tries.
        start = Date()
        XCTAssertEqual(try h2curl(["http://127.0.0.1:\(q.port)/flaky/h2-backoff/2"]), "v1 attempt 3")
        XCTAssertGreaterThan(Date().timeIntervalSince(start), 0.02)
    }

    /// A route's mirror copies HTTP/2 streams too (as HTTP/1.1 with the `-shadow` authority, bodies included).
    func testMirrorCopiesHTTP2Streams() throws {
        let (main, mainPorts) = try Harness.backends(["v1:0"], script: "http_backend.py")
        let (shadow, shadowPorts) = try Harness.backends(["v2:0"], script: "http_backend.py")
        cleanups.append { main.terminate(); main.waitUntilExit(); shadow.terminate(); shadow.waitUntilExit() }
        let p = try proxy(HTTPProxyTests.mesh([("v1", mainPorts[0]), ("v2", shadowPorts[0])], routes: """
            - route: [{destination: {host: app.test.svc.cluster.local, subset: v1}}]
              mirror: {host: app.test.svc.cluster.local, subset: v2}
              mirrorPercentage: {value: 100}
            """))
        // /flaky/KEY/0 always answers 200 and counts the requests per key: each backend's count is what it saw.
        for n in 1...4 { XCTAssertEqual(try h2curl(["http://127.0.0.1:\(p.port)/flaky/h2m/0"]), "v1 attempt \(n)") }
        XCTAssertEqual(try h2curl(["--data-binary", "copied", "http://127.0.0.1:\(p.port)/flaky/h2m/0"]), "v1 attempt 5")
        XCTAssertTrue(p.eventually { p.metric("sluice_http_mirrored_requests_total") == 5 })
        // The shadow backend saw the five copies: once they are in, its own count for the key is at 5.
        var probes = 0
        XCTAssertTrue(p.eventually {
            probes += 1
            let out = (try? Harness.run("/usr/bin/curl", ["-s", "http://127.0.0.1:\(shadowPorts[0])/flaky/h2m/0"]).output)
            return out == "v2 attempt \(5 + probes)"
        })
    }

    func testHTTP1ClientsReachAGRPCUpstreamTranslated() throws {
        let ports = try grpcBackends(["g1"])
        let p = try proxy(Self.mesh(ports, routes: "- route: [{destination: {host: app.test.svc.cluster.local}}]"))
        // One gRPC message ("hi", uncompressed) in HTTP/1.1: the answer comes back chunked, status in trailers.
        let body = FileManager.default.temporaryDirectory.appendingPathComponent("grpc1-\(UUID().uuidString).bin")
        try Data([0, 0, 0, 0, 2] + Array("hi".utf8)).write(to: body)
        defer { try? FileManager.default.removeItem(at: body) }
        let c = Process()
        c.executableURL = URL(fileURLWithPath: "/usr/bin/curl")
        c.arguments = ["-s", "--raw", "-i", "--max-time", "10", "-H", "content-type: application/grpc", "-H", "te: trailers",
                       "--data-binary", "@\(body.path)", "http://127.0.0.1:\(p.port)/test.Echo/Unary"]
        let out = Pipe()
        c.standardOutput = out
        try c.run()
        let text = String(decoding: out.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
        c.waitUntilExit()
        XCTAssertTrue(text.hasPrefix("HTTP/1.1 200 OK\r\n"), text)
        XCTAssertTrue(text.contains("transfer-encoding: chunked"), text)
        XCTAssertTrue(text.contains("g1:hi"), text)
        XCTAssertTrue(text.contains("0\r\ngrpc-status: 0\r\n"), text)
    }

    /// Retries for HTTP/1.1 clients on a GRPC port: the translated call that ends UNAVAILABLE is sent again with
    /// its body on a new stream, after the back-off, and the client sees only the answer that worked.
    func testRetriesHideAFlakyGRPCBackendForHTTP1Clients() throws {
        let ports = try grpcBackends(["g1"])
        let p = try proxy(Self.mesh(ports, routes: """
            - retries: {attempts: 3, retryOn: unavailable}
              route: [{destination: {host: app.test.svc.cluster.local}}]
            """))
        let message = Array("h1:2".utf8)
        let body = FileManager.default.temporaryDirectory.appendingPathComponent("grpc1-\(UUID().uuidString).bin")
        try Data([0, 0, 0, 0, UInt8(message.count)] + message).write(to: body)
        defer { try? FileManager.default.removeItem(at: body) }
        let (text, _) = try Harness.run("/usr/bin/curl", ["-s", "--raw", "-i", "--max-time", "10", "-H",
                                                          "content-type: application/grpc", "-H", "te: trailers",
                                                          "--data-binary", "@\(body.path)",
                                                          "http://127.0.0.1:\(p.port)/test.Echo/Flaky"])
        XCTAssertTrue(text.hasPrefix("HTTP/1.1 200 OK\r\n"), text)
        XCTAssertTrue(text.contains("g1:attempt 3"), text)
        XCTAssertTrue(text.contains("grpc-status: 0"), text)
        XCTAssertEqual(p.metric("sluice_http_retries_total"), 2)
    }

    func testAClientCancelResetsTheStreamAndTheConnectionGoesOn() throws {
        let ports = try grpcBackends(["g1"])
        let p = try proxy(Self.mesh(ports, routes: "- route: [{destination: {host: app.test.svc.cluster.local}}]"))
        let text = try grpcClient(["cancel", "127.0.0.1:\(p.port)"])
        XCTAssertEqual(text.split(separator: "\n").map(String.init), ["CANCELLED 10", "OK g1:after"])
        // The cancelled stream is counted as reset by the client (Envoy's DC).
        XCTAssertTrue(p.eventually {
            p.registry.render().split(separator: "\n").contains {
                $0.hasPrefix("istio_requests_total{") && $0.contains("response_flags=\"DC\"") && $0.hasSuffix(" 1")
            }
        }, p.registry.render().split(separator: "\n").filter { $0.hasPrefix("istio_requests_total{") }.joined(separator: "\n"))
    }

    func testGarbageAfterThePrefaceEndsWithGoaway() throws {
        let ports = try grpcBackends(["g1"])
        let p = try proxy(Self.mesh(ports, routes: "- route: [{destination: {host: app.test.svc.cluster.local}}]"))
        let c = try Client(port: p.port)
        defer { c.close() }
        XCTAssertTrue(c.send(Array("PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".utf8) + [0, 0, 4, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF] + Array(repeating: 0x41, count: 64)))
        let reply = c.receiveAll() ?? []
        // Frames: our SETTINGS, then a GOAWAY (type 7) before the close.
        var offset = 0, types: [UInt8] = []
        while offset + 9 <= reply.count {
            let length = Int(reply[offset]) << 16 | Int(reply[offset + 1]) << 8 | Int(reply[offset + 2])
            types.append(reply[offset + 3])
            offset += 9 + length
        }
        XCTAssertTrue(types.contains(7), "frame types \(types)")
        // The worker is fine: a normal call works.
        XCTAssertEqual(try call(p.port, "/test.Echo/Unary", "ok"), "OK g1:ok")
    }

    func testManyStreamsOverFewConnectionsAllSucceed() throws {
        let ports = try grpcBackends(["g1", "g2"])
        let p = try proxy(Self.mesh(ports, routes: """
            - route:
              - {destination: {host: app.test.svc.cluster.local, subset: g1}, weight: 50}
              - {destination: {host: app.test.svc.cluster.local, subset: g2}, weight: 50}
            """))
        // h2load: 10 connections, 100 concurrent streams each. The servers answer the unknown method with
        // HTTP 200 and grpc-status UNIMPLEMENTED in trailers, which is a complete HTTP/2 exchange.
        // One empty gRPC message (flag 0, length 0) as each request's body.
        let body = FileManager.default.temporaryDirectory.appendingPathComponent("grpc-\(UUID().uuidString).bin")
        try Data([0, 0, 0, 0, 0]).write(to: body)
        defer { try? FileManager.default.removeItem(at: body) }
        let text = try Harness.run("/usr/bin/h2load", ["-n", "5000", "-c", "10", "-m", "100", "-H", "content-type: application/grpc",
                                                       "-H", "te: trailers", "-d", body.path,
                                                       "http://127.0.0.1:\(p.port)/test.Echo/Nothing"]).output
        XCTAssertTrue(text.contains("5000 succeeded, 0 failed, 0 errored"), text)
        XCTAssertTrue(text.contains("status codes: 5000 2xx"), text)
        XCTAssertEqual(p.metric("istio_requests_total"), 5000)
    }

    func testDrainLetsAStreamInFlightFinishAndClosesWithGoaway() throws {
        let ports = try grpcBackends(["g1"])
        let p = try proxy(Self.mesh(ports, routes: "- route: [{destination: {host: app.test.svc.cluster.local}}]"))
        let c = Process()
        c.executableURL = URL(fileURLWithPath: "/usr/bin/env")
        c.arguments = ["python3", Harness.root.appendingPathComponent("Tests/Fixtures/grpc_backend.py").path, "call",
                       "127.0.0.1:\(p.port)", "/test.Echo/Stream", "30000"]
        let out = Pipe()
        c.standardOutput = out
        try c.run()
        Thread.sleep(forTimeInterval: 0.5)
        p.server.drain(timeout: .seconds(20))
        let text = String(decoding: out.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
        c.waitUntilExit()
        XCTAssertTrue(text.hasPrefix("OK g1:0,"), String(text.prefix(100)))
        XCTAssertEqual(text.split(separator: ",").count, 30_000, "the stream in flight finished during the drain")
        XCTAssertTrue(p.server.wait(timeout: .seconds(10)), "the worker closed the drained HTTP/2 connection")
    }

    func testHTTP2ClientsReachAnHTTP1UpstreamTranslated() throws {
        let (backend, ports) = try Harness.backends(["v1:0"], script: "http_backend.py")
        cleanups.append { backend.terminate(); backend.waitUntilExit() }
        let p = try proxy(HTTPProxyTests.mesh([("v1", ports[0])], routes: """
            - route: [{destination: {host: app.test.svc.cluster.local}}]
              headers: {response: {set: {x-via: sluice}}}
            """))
        let curl = h2curl
        let base = "http://127.0.0.1:\(p.port)"
        XCTAssertEqual(try curl(["-w", " %{http_version} %{http_code} %header{x-via}", "\(base)/item"]), "v1 2 200 sluice")
        // Bodies both ways: with a length, and streamed (chunked upstream) from stdin.
        XCTAssertEqual(try curl(["--data-binary", "hello-h2", "\(base)/echo"]), "hello-h2")
        let big = String(repeating: "0123456789", count: 30_000)
        let file = FileManager.default.temporaryDirectory.appendingPathComponent("h2body-\(UUID().uuidString)")
        try big.write(to: file, atomically: true, encoding: .utf8)
        defer { try? FileManager.default.removeItem(at: file) }
        XCTAssertEqual(try curl(["-T", file.path, "-X", "POST", "-H", "content-length:", "\(base)/echo"]).count, big.count)
        XCTAssertEqual(try curl(["\(base)/chunked"]), "one-two-three")
        // Many concurrent streams over few connections, each becoming an HTTP/1.1 request on a pooled connection.
        let text = try Harness.run("/usr/bin/h2load", ["-n", "2000", "-c", "4", "-m", "20", "\(base)/item"]).output
        XCTAssertTrue(text.contains("2000 succeeded, 0 failed, 0 errored"), text)
    }
}
