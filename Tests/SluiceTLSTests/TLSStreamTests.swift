import Foundation
import XCTest

@testable import SluiceTLS
import SluiceTestSupport

/// Server and client sessions back to back in memory, with certificates from a throwaway CA
/// (`Tests/Fixtures/make_certs.sh`).
final class TLSStreamTests: XCTestCase {
    static let pki: String = {
        let dir = NSTemporaryDirectory() + "sluice-tls-\(getpid())"
        let script = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
            .appendingPathComponent("Fixtures/make_certs.sh").path
        let p = Process()
        p.executableURL = URL(fileURLWithPath: "/bin/sh")
        p.arguments = [script, dir, "a.example.test", "*.b.example.test", "client.example.test",
                       "spiffe://cluster.local/ns/shop/sa/client"]
        try! p.run()
        p.waitUntilExit()
        precondition(p.terminationStatus == 0, "make_certs.sh failed")
        return dir
    }()

    override class func tearDown() {
        try? FileManager.default.removeItem(atPath: pki)
    }

    func server(_ name: String, clientCA: String? = nil, alpn: [String] = ["h2", "http/1.1"]) throws -> TLSContext {
        let file = name.replacingOccurrences(of: "*", with: "wildcard")
        return try TLSContext(certificateChain: "\(Self.pki)/\(file).crt", privateKey: "\(Self.pki)/\(file).key",
                              clientCA: clientCA, alpn: alpn)
    }

    @discardableResult
    func shake(_ s: TLSStream, _ c: TLSStream) -> (TLSStream.Progress, TLSStream.Progress) {
        InMemoryTLS.handshake(s, c)
    }

    func pump(_ from: TLSStream, _ to: TLSStream) { InMemoryTLS.move(from, to) }

    /// A client context remembers the session of a mutual TLS connection (TLS 1.3 ticket) and the next connection
    /// with the same key resumes it: no certificate exchange, and the server still knows who the client is.
    func testSessionsAreResumedPerKeyWithTheClientsIdentityKept() throws {
        let names = TLSServerNames([.init(hosts: ["*"], context: try TLSContext(
            certificateChain: "\(Self.pki)/a.example.test.crt", privateKey: "\(Self.pki)/a.example.test.key",
            clientCA: "\(Self.pki)/ca.crt", minVersion: .v1_3))])
        let client = try TLSContext(clientTrusting: "\(Self.pki)/ca.crt", certificateChain: "\(Self.pki)/spiffe-client.crt",
                                    privateKey: "\(Self.pki)/spiffe-client.key", minVersion: .v1_3)
        func connect(key: String) throws -> (TLSStream, TLSStream) {
            let s = try TLSStream(serving: names), c = try TLSStream(client: client, serverName: "a.example.test", sessionKey: key)
            let (sp, cp) = shake(s, c)
            XCTAssertEqual(sp, .done)
            XCTAssertEqual(cp, .done)
            // The server's tickets come after the handshake; the client takes them in with its first read.
            _ = "ping".utf8.withContiguousStorageIfAvailable { s.write(UnsafeRawBufferPointer($0)) }
            pump(s, c)
            var buf = [UInt8](repeating: 0, count: 64)
            XCTAssertEqual(buf.withUnsafeMutableBytes { c.read(into: $0) }, .bytes(4))
            return (s, c)
        }
        let (s1, c1) = try connect(key: "node-2")
        XCTAssertFalse(c1.resumed)
        XCTAssertEqual(s1.peerURIs, ["spiffe://cluster.local/ns/shop/sa/client"])
        XCTAssertTrue(c1.rememberSession())
        let (s2, c2) = try connect(key: "node-2")
        XCTAssertTrue(c2.resumed)
        XCTAssertTrue(s2.resumed)
        XCTAssertEqual(s2.peerURIs, s1.peerURIs)
        // Another key has nothing to resume.
        let (_, c3) = try connect(key: "node-3")
        XCTAssertFalse(c3.resumed)
    }

    func testHandshakeAndBytesBothWays() throws {
        let names = TLSServerNames([.init(hosts: ["a.example.test"], context: try server("a.example.test"))])
        let client = try TLSContext(clientTrusting: "\(Self.pki)/ca.crt", alpn: ["h2"])
        let s = try TLSStream(serving: names)
        let c = try TLSStream(client: client, serverName: "a.example.test")
        let (sp, cp) = shake(s, c)
        XCTAssertEqual(sp, .done)
        XCTAssertEqual(cp, .done)
        XCTAssertEqual(s.version, "TLSv1.3")
        XCTAssertEqual(s.alpn, "h2")
        XCTAssertEqual(s.serverName, "a.example.test")

        // 200 KB each way, in records that must be reassembled across small receive chunks.
        let payload = (0..<200_000).map { UInt8(truncatingIfNeeded: $0 &* 31) }
        for (from, to) in [(c, s), (s, c)] {
            XCTAssertTrue(payload.withUnsafeBytes { from.write($0) })
            var got: [UInt8] = []
            var wire = [UInt8](repeating: 0, count: 1000)
            var plain = [UInt8](repeating: 0, count: 64 << 10)
            while from.pendingOutput > 0 {
                let n = wire.withUnsafeMutableBytes { from.takeOutput(into: $0) }
                wire.withUnsafeBytes { to.receive(UnsafeRawBufferPointer(rebasing: $0[0..<n])) }
                while case .bytes(let k) = plain.withUnsafeMutableBytes({ to.read(into: $0) }) {
                    got.append(contentsOf: plain[0..<k])
                }
            }
            XCTAssertEqual(got, payload)
            XCTAssertFalse(to.hasBufferedInput)
        }

        c.close()
        pump(c, s)
        var plain = [UInt8](repeating: 0, count: 1024)
        XCTAssertEqual(plain.withUnsafeMutableBytes { s.read(into: $0) }, .closed)
    }

    func testCertificateChosenByServerName() throws {
        let names = TLSServerNames([
            .init(hosts: ["a.example.test"], context: try server("a.example.test")),
            .init(hosts: ["*.b.example.test"], context: try server("*.b.example.test")),
        ])
        let client = try TLSContext(clientTrusting: "\(Self.pki)/ca.crt")
        // The client checks the certificate's name: a wrong pick fails verification.
        for name in ["a.example.test", "x.b.example.test"] {
            let s = try TLSStream(serving: names)
            let c = try TLSStream(client: client, serverName: name)
            let (sp, cp) = shake(s, c)
            XCTAssertEqual(cp, .done, name)
            XCTAssertEqual(sp, .done, name)
        }
        // A name no certificate serves is refused; no name at all gets the first certificate.
        let s = try TLSStream(serving: names)
        let c = try TLSStream(client: client, serverName: "c.example.test")
        guard case .failed(let why) = shake(s, c).0 else { return XCTFail("unknown name accepted") }
        XCTAssertTrue(why.contains("handshake"), why)
        XCTAssertEqual(names.entry(for: nil), 0)
        XCTAssertEqual(names.entry(for: "b.example.test"), nil, "a wildcard needs a label before its suffix")
        XCTAssertEqual(names.entry(for: "A.EXAMPLE.TEST"), 0)
        XCTAssertEqual(names.entry(for: "deep.y.b.example.test"), 1, "a wildcard covers any depth, as Envoy's server_names")
    }

    func testALPNFallsBackToHTTP1() throws {
        let names = TLSServerNames([.init(hosts: ["*"], context: try server("a.example.test"))])
        for (offer, expected) in [(["http/1.1"], "http/1.1"), (["h2", "http/1.1"], "h2"), ([], nil)] as [([String], String?)] {
            let s = try TLSStream(serving: names)
            let c = try TLSStream(client: try TLSContext(clientTrusting: nil, alpn: offer), serverName: "a.example.test")
            XCTAssertEqual(shake(s, c).0, .done)
            XCTAssertEqual(s.alpn, expected, "\(offer)")
        }
    }

    func testUntrustedServerIsRefusedWithReason() throws {
        let names = TLSServerNames([.init(hosts: ["*"], context: try server("a.example.test"))])
        let client = try TLSContext(clientTrusting: "\(Self.pki)/other-ca.crt")
        let s = try TLSStream(serving: names)
        let c = try TLSStream(client: client, serverName: "a.example.test")
        guard case .failed(let why) = shake(s, c).1 else { return XCTFail("untrusted certificate accepted") }
        XCTAssertTrue(why.contains("certificate"), why)
    }

    func testMutualTLSNeedsAClientCertificate() throws {
        let names = TLSServerNames([.init(hosts: ["*"], context: try server("a.example.test", clientCA: "\(Self.pki)/ca.crt"))])
        let anonymous = try TLSContext(clientTrusting: "\(Self.pki)/ca.crt")
        var s = try TLSStream(serving: names)
        var c = try TLSStream(client: anonymous, serverName: "a.example.test")
        guard case .failed = shake(s, c).0 else { return XCTFail("client without a certificate accepted") }

        let withCert = try TLSContext(clientTrusting: "\(Self.pki)/ca.crt",
                                      certificateChain: "\(Self.pki)/client.example.test.crt",
                                      privateKey: "\(Self.pki)/client.example.test.key")
        s = try TLSStream(serving: names)
        c = try TLSStream(client: withCert, serverName: "a.example.test")
        let (sp, cp) = shake(s, c)
        XCTAssertEqual(sp, .done)
        XCTAssertEqual(cp, .done)
    }

    func testBadFilesSayWhich() {
        XCTAssertThrowsError(try TLSContext(certificateChain: "/nonexistent.crt", privateKey: "/nonexistent.key")) {
            XCTAssertTrue("\($0)".contains("/nonexistent.crt"), "\($0)")
        }
        // A key that is not the certificate's.
        XCTAssertThrowsError(try TLSContext(certificateChain: "\(Self.pki)/a.example.test.crt",
                                            privateKey: "\(Self.pki)/client.example.test.key")) {
            XCTAssertTrue("\($0)".contains("client.example.test.key") && "\($0)".contains("mismatch"), "\($0)")
        }
    }

    func testGarbageFromThePeerFailsTheHandshake() throws {
        let names = TLSServerNames([.init(hosts: ["*"], context: try server("a.example.test"))])
        let s = try TLSStream(serving: names)
        let junk = Array("GET / HTTP/1.1\r\nHost: x\r\n\r\n".utf8)
        junk.withUnsafeBytes { s.receive($0) }
        guard case .failed = s.handshake() else { return XCTFail("plaintext HTTP accepted as a ClientHello") }
    }
}
