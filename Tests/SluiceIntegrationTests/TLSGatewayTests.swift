import Foundation
import Glibc
import SluiceModel
import SluiceProxy
import XCTest

/// HTTPS gateway servers end to end: TLS terminated on the io_uring workers (certificates from files, chosen by
/// SNI), ALPN h2 or HTTP/1.1, then the same request pipeline as plaintext. curl and h2load are the clients, with
/// certificates from a throwaway CA (`Tests/Fixtures/make_certs.sh`).
final class TLSGatewayTests: XCTestCase {
    var cleanups: [() -> Void] = []
    static let pki: String = {
        let dir = NSTemporaryDirectory() + "sluice-gw-pki-\(getpid())"
        let (_, status) = try! Harness.run("/bin/sh", [Harness.root.appendingPathComponent("Tests/Fixtures/make_certs.sh").path,
                                                        dir, "a.example.test", "*.b.example.test", "client.example.test",
                                                        "spiffe://cluster.local/ns/shop/sa/frontend"])
        precondition(status == 0, "make_certs.sh failed")
        return dir
    }()

    override func setUp() { Harness.raiseFileLimit() }

    override func tearDown() {
        for c in cleanups.reversed() { c() }
        cleanups = []
    }

    override class func tearDown() { try? FileManager.default.removeItem(atPath: pki) }

    func backends(_ names: [String]) throws -> [UInt16] {
        let (p, ports) = try Harness.backends(names.map { "\($0):0" }, script: "http_backend.py")
        cleanups.append { p.terminate(); p.waitUntilExit() }
        return ports
    }

    func proxy(_ yaml: String, headerTimeout: Duration = .seconds(10)) throws -> Harness.Proxy {
        let p = try Harness.proxy(yaml, workers: 2, headerTimeout: headerTimeout)
        cleanups.append { p.stop() }
        return p
    }

    /// Two HTTPS servers sharing port 443 (a.example.test -> v1, *.b.example.test -> v2), `mode` on the first.
    func gateway(_ v1: UInt16, _ v2: UInt16, mode: String = "SIMPLE", extraServers: String = "", extra: String = "") -> String {
        let pki = Self.pki
        return HTTPProxyTests.mesh([("v1", v1), ("v2", v2)], routes: """
            - match: [{authority: {prefix: a.example.test}}]  # curl sends the port too
              route: [{destination: {host: app.test.svc.cluster.local, subset: v1}}]
            - route: [{destination: {host: app.test.svc.cluster.local, subset: v2}}]
            """, servers: """
            - port: {number: 443, name: https-a, protocol: HTTPS}
              bind: 127.0.0.1
              hosts: [a.example.test]
              tls: {mode: \(mode), serverCertificate: \(pki)/a.example.test.crt, privateKey: \(pki)/a.example.test.key,
                    caCertificates: \(pki)/ca.crt}
            - port: {number: 443, name: https-b, protocol: HTTPS}
              bind: 127.0.0.1
              hosts: ["*.b.example.test"]
              tls: {mode: SIMPLE, serverCertificate: \(pki)/wildcard.b.example.test.crt,
                    privateKey: \(pki)/wildcard.b.example.test.key}
            \(extraServers)
            """) + extra
    }

    /// curl against `host` at the proxy's port (resolved to loopback), trusting the test CA.
    func curl(_ host: String, _ port: UInt16, _ path: String = "/", _ extra: [String] = []) throws -> (String, Int32) {
        try Harness.run("/usr/bin/curl", ["-s", "--max-time", "20", "--cacert", "\(Self.pki)/ca.crt",
                                          "--resolve", "\(host):\(port):127.0.0.1"] + extra + ["https://\(host):\(port)\(path)"])
    }

    func testHTTPSServersShareAPortAndTheClientsNamePicksTheCertificate() throws {
        let ports = try backends(["v1", "v2"])
        let p = try proxy(gateway(ports[0], ports[1]))
        // curl verifies the certificate against the name: a wrong pick would fail the handshake.
        var (out, status) = try curl("a.example.test", p.port, "/", ["-w", " %{http_code} %{ssl_verify_result}"])
        XCTAssertEqual(status, 0)
        XCTAssertEqual(out, "v1 200 0")
        (out, status) = try curl("x.b.example.test", p.port, "/", ["-w", " %{http_code}"])
        XCTAssertEqual(out, "v2 200")
        // The backend sees the request as https.
        (out, _) = try curl("x.b.example.test", p.port, "/headers")
        XCTAssertTrue(out.contains("x-forwarded-proto: https"), out)
        // A name no server declares is refused in the handshake (curl: SSL connect error).
        (_, status) = try curl("c.example.test", p.port)
        XCTAssertEqual(status, 35)
        XCTAssertGreaterThanOrEqual(p.metric("sluice_tls_handshakes_total"), 3)
        XCTAssertGreaterThanOrEqual(p.metric("sluice_tls_handshake_failures_total"), 1)
    }

    func testALPNPicksHTTP2OrHTTP1AndBodiesCrossIntactBothWays() throws {
        let ports = try backends(["v1", "v2"])
        let p = try proxy(gateway(ports[0], ports[1]))
        let body = FileManager.default.temporaryDirectory.appendingPathComponent("tls-body-\(UUID().uuidString)")
        let bytes = Data((0..<3_000_000).map { UInt8(truncatingIfNeeded: $0 &* 7 &+ $0 >> 11) })
        try bytes.write(to: body)
        defer { try? FileManager.default.removeItem(at: body) }
        for (flag, version) in [("--http2", "2"), ("--http1.1", "1.1")] {
            var (out, status) = try curl("a.example.test", p.port, "/", [flag, "-o", "/dev/null", "-w", "%{http_version}"])
            XCTAssertEqual(status, 0)
            XCTAssertEqual(out, version)
            // 3 MB up and echoed back: many TLS records each way, through the decrypt reserve and record batches.
            let echoed = FileManager.default.temporaryDirectory.appendingPathComponent("tls-echo-\(UUID().uuidString)")
            defer { try? FileManager.default.removeItem(at: echoed) }
            (out, status) = try curl("a.example.test", p.port, "/echo", [flag, "--data-binary", "@\(body.path)",
                                                                          "-H", "content-type: application/octet-stream",
                                                                          "-o", echoed.path, "-w", "%{http_code}"])
            XCTAssertEqual(out, "200", flag)
            XCTAssertEqual(try Data(contentsOf: echoed), bytes, flag)
        }
    }

    func testManyStreamsOverTLSWithH2load() throws {
        let ports = try backends(["v1", "v2"])
        let p = try proxy(gateway(ports[0], ports[1]))
        let (out, _) = try Harness.run("/usr/bin/h2load", ["-n", "2000", "-c", "4", "-m", "20",
                                                           "https://127.0.0.1:\(p.port)/"])
        // h2load sends no SNI to an IP address: the first certificate serves.
        XCTAssertTrue(out.contains("2000 succeeded"), out)
        XCTAssertTrue(out.contains("status codes: 2000 2xx"), out)
        XCTAssertTrue(out.contains("TLSv1.3"), out)
    }

    func testMutualTLSRequiresAClientCertificateFromTheCA() throws {
        let ports = try backends(["v1", "v2"])
        // /private is only for the frontend workload's identity (the URI SAN of its client certificate).
        let p = try proxy(gateway(ports[0], ports[1], mode: "MUTUAL", extra: """

            ---
            apiVersion: security.istio.io/v1
            kind: AuthorizationPolicy
            metadata: {name: private, namespace: test}
            spec:
              action: DENY
              rules: [{from: [{source: {notPrincipals: ["spiffe://cluster.local/ns/shop/sa/frontend"]}}],
                       to: [{operation: {paths: ["/private"]}}]}]
            """))
        var (_, status) = try curl("a.example.test", p.port)
        XCTAssertNotEqual(status, 0, "a client without a certificate got through")
        let (out, ok) = try curl("a.example.test", p.port, "/", ["--cert", "\(Self.pki)/client.example.test.crt",
                                                                 "--key", "\(Self.pki)/client.example.test.key"])
        XCTAssertEqual(ok, 0)
        XCTAssertEqual(out, "v1")
        let frontend = ["--cert", "\(Self.pki)/spiffe-frontend.crt", "--key", "\(Self.pki)/spiffe-frontend.key",
                        "-o", "/dev/null", "-w", "%{http_code}"]
        XCTAssertEqual(try curl("a.example.test", p.port, "/private", frontend).0, "200")
        XCTAssertEqual(try curl("a.example.test", p.port, "/private", ["--cert", "\(Self.pki)/client.example.test.crt", "--key",
                                                                       "\(Self.pki)/client.example.test.key", "-o", "/dev/null",
                                                                       "-w", "%{http_code}"]).0, "403")
        // The other server on the port stays SIMPLE.
        (_, status) = try curl("x.b.example.test", p.port)
        XCTAssertEqual(status, 0)
    }

    func testPlaintextAndSilentClientsAreCutWithoutHarm() throws {
        let ports = try backends(["v1", "v2"])
        let p = try proxy(gateway(ports[0], ports[1]), headerTimeout: .milliseconds(500))
        // Plain HTTP into an HTTPS port: not a ClientHello, the connection closes.
        let c = try Client(port: p.port)
        defer { c.reset() }
        XCTAssertTrue(c.send("GET / HTTP/1.1\r\nhost: a.example.test\r\n\r\n"))
        let reply = c.receiveAll()
        XCTAssertNotNil(reply, "the connection stayed open")
        XCTAssertFalse(String(decoding: reply ?? [], as: UTF8.self).contains("HTTP/1.1 200"))
        // A client that connects and never speaks is cut at the header timeout.
        let silent = try Client(port: p.port, timeout: 5)
        defer { silent.reset() }
        let start = Date()
        XCTAssertEqual(silent.receiveAll(), [])
        XCTAssertLessThan(Date().timeIntervalSince(start), 4)
        let (out, _) = try curl("a.example.test", p.port)
        XCTAssertEqual(out, "v1")
    }

    func testHTTPSRedirectAnswersEveryPlainRequestWith301() throws {
        let ports = try backends(["v1", "v2"])
        let p = try proxy(gateway(ports[0], ports[1], extraServers: """
            - port: {number: 80, name: http, protocol: HTTP}
              bind: 127.0.0.1
              hosts: ["*"]
              tls: {httpsRedirect: true}
            """))
        let plain = p.ports[1]
        let (out, _) = try Harness.run("/usr/bin/curl", ["-s", "-o", "/dev/null", "-w", "%{http_code} %{redirect_url}",
                                                         "-H", "host: a.example.test", "http://127.0.0.1:\(plain)/x?y=1"])
        XCTAssertEqual(out, "301 https://a.example.test/x?y=1")
    }

    func testAMissingCertificateRefusesTheSnapshotAndNamesTheFile() throws {
        let yaml = gateway(1, 2).replacingOccurrences(of: "\(Self.pki)/a.example.test.key", with: "/nonexistent/a.key")
        let (resources, _) = ResourceDecoder.decode(yaml, file: "test.yaml")
        let snapshot = try SnapshotCompiler().compile(resources)
        XCTAssertEqual(snapshot.listeners.count, 1)
        XCTAssertEqual(snapshot.listeners[0].tls.map(\.hosts), [["a.example.test"], ["*.b.example.test"]])
        XCTAssertThrowsError(try ProxyRuntime(snapshot: snapshot, registry: .init())) {
            XCTAssertTrue("\($0)".contains("/nonexistent/a.key"), "\($0)")
            XCTAssertTrue("\($0)".contains("a.example.test"), "\($0)")
        }
    }
}
