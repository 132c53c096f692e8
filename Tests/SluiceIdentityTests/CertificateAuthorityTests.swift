import Foundation
import XCTest

@testable import SluiceIdentity

/// The CA signs what a workload key asks for, and refuses each kind of bad request with its own error; what it
/// signs verifies with OpenSSL's own `openssl verify` (interoperability, not our parser reading our writer).
final class CertificateAuthorityTests: XCTestCase {
    final class AuditLog: @unchecked Sendable {
        private let lock = NSLock()
        private var stored: [AuditRecord] = []
        func add(_ r: AuditRecord) { lock.withLock { stored.append(r) } }
        var records: [AuditRecord] { lock.withLock { stored } }
    }

    let reviews = SPIFFEID(trustDomain: "cluster.local", namespace: "shop", serviceAccount: "reviews")

    func openssl(_ args: [String], input: String? = nil) throws -> (String, Int32) {
        let p = Process()
        p.executableURL = URL(fileURLWithPath: "/usr/bin/openssl")
        p.arguments = args
        let out = Pipe()
        p.standardOutput = out
        p.standardError = out
        try p.run()
        let data = out.fileHandleForReading.readDataToEndOfFile()
        p.waitUntilExit()
        return (String(decoding: data, as: UTF8.self), p.terminationStatus)
    }

    func testSignedCertificatesVerifyWithOpenSSLAndCarryTheIdentity() throws {
        let log = AuditLog()
        let ca = try CertificateAuthority(generatingRootFor: "cluster.local", maxLifetime: .seconds(3600)) { log.add($0) }
        let key = WorkloadKey()
        let issued = try ca.sign(requestPEM: try key.signingRequest(for: reviews), for: reviews,
                                 lifetime: .seconds(7 * 86_400), requester: "node-1")
        // The lifetime is capped at the CA's maximum.
        XCTAssertLessThanOrEqual(issued.notAfter.timeIntervalSinceNow, 3600)
        XCTAssertGreaterThan(issued.notAfter.timeIntervalSinceNow, 3500)

        let dir = NSTemporaryDirectory() + "sluice-ca-\(UUID().uuidString)"
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        try issued.trustBundle.joined().write(toFile: "\(dir)/root.pem", atomically: true, encoding: .utf8)
        try issued.certificate.write(toFile: "\(dir)/leaf.pem", atomically: true, encoding: .utf8)
        try key.privateKeyPEM.write(toFile: "\(dir)/leaf.key", atomically: true, encoding: .utf8)
        let (verified, status) = try openssl(["verify", "-purpose", "sslclient", "-CAfile", "\(dir)/root.pem", "\(dir)/leaf.pem"])
        XCTAssertEqual(status, 0, verified)
        let (text, _) = try openssl(["x509", "-in", "\(dir)/leaf.pem", "-noout", "-ext", "subjectAltName,basicConstraints"])
        XCTAssertTrue(text.contains("URI:spiffe://cluster.local/ns/shop/sa/reviews"), text)
        XCTAssertTrue(text.contains("CA:FALSE"), text)
        // The key the agent kept is the certificate's.
        let (match, _) = try openssl(["x509", "-in", "\(dir)/leaf.pem", "-noout", "-pubkey"])
        let (fromKey, _) = try openssl(["pkey", "-in", "\(dir)/leaf.key", "-pubout"])
        XCTAssertEqual(match, fromKey)
        XCTAssertEqual(log.records.map(\.granted), [true])
        XCTAssertEqual(log.records.first?.requester, "node-1")
    }

    func testEachBadRequestIsRefusedWithItsOwnReason() throws {
        let ca = try CertificateAuthority(generatingRootFor: "cluster.local")
        let key = WorkloadKey()
        func refusal(_ pem: String, for id: SPIFFEID? = nil, authorized: Bool = true) -> SigningError? {
            do {
                _ = try ca.sign(requestPEM: pem, for: id ?? reviews, lifetime: .seconds(600), requester: "n",
                                authorized: authorized)
                return nil
            } catch {
                return error
            }
        }
        XCTAssertEqual(refusal("not a request")?.reason, "malformed")
        XCTAssertEqual(refusal("-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n")?.reason,
                       "malformed")
        let good = try key.signingRequest(for: reviews)
        // Truncated.
        XCTAssertEqual(refusal(String(good.prefix(good.count / 2)))?.reason, "malformed")
        // A request for another identity than the one being issued.
        let other = SPIFFEID(trustDomain: "cluster.local", namespace: "shop", serviceAccount: "ratings")
        XCTAssertEqual(refusal(try key.signingRequest(for: other)),
                       .identityMismatch(requested: other.description, issuing: reviews.description))
        // Another trust domain.
        let foreign = SPIFFEID(trustDomain: "evil.example", namespace: "shop", serviceAccount: "reviews")
        XCTAssertEqual(refusal(try key.signingRequest(for: foreign), for: foreign), .wrongTrustDomain("evil.example"))
        // A node that does not host the identity.
        XCTAssertEqual(refusal(good, authorized: false), .notAuthorized(node: "n", identity: reviews.description))
        // A signature that does not match: one byte of the signed body flipped.
        var der = Array(Data(base64Encoded: good.split(separator: "\n").dropFirst().dropLast().joined())!)
        der[40] ^= 0x01
        let tampered = "-----BEGIN CERTIFICATE REQUEST-----\n" + Data(der).base64EncodedString(options: .lineLength64Characters)
            + "\n-----END CERTIFICATE REQUEST-----\n"
        let reason = refusal(tampered)?.reason
        XCTAssertTrue(reason == "bad_signature" || reason == "malformed", "\(String(describing: reason))")
        // A weak RSA key (1024 bits) made by OpenSSL.
        let dir = NSTemporaryDirectory() + "sluice-weak-\(UUID().uuidString)"
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        _ = try openssl(["req", "-new", "-newkey", "rsa:1024", "-nodes", "-keyout", "\(dir)/k", "-subj", "/CN=x",
                         "-out", "\(dir)/r.pem"])
        let weak = refusal(try String(contentsOfFile: "\(dir)/r.pem", encoding: .utf8))
        XCTAssertEqual(weak?.reason, "weak_key", "\(String(describing: weak))")
    }

    func testAPlugInCAIssuesUnderItsRoot() throws {
        // A root and an intermediate made by OpenSSL, as an operator would bring them (Istio's cacerts).
        let dir = NSTemporaryDirectory() + "sluice-plugin-\(UUID().uuidString)"
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        var (out, status) = try openssl(["req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                                         "-days", "2", "-subj", "/O=cluster.local/CN=Root", "-keyout", "\(dir)/root.key",
                                         "-out", "\(dir)/root.pem", "-addext", "basicConstraints=critical,CA:TRUE",
                                         "-addext", "keyUsage=critical,keyCertSign,cRLSign"])
        XCTAssertEqual(status, 0, out)
        (out, status) = try openssl(["req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                                     "-subj", "/O=cluster.local/CN=Intermediate", "-keyout", "\(dir)/ca.key",
                                     "-out", "\(dir)/ca.csr"])
        XCTAssertEqual(status, 0, out)
        try "basicConstraints=critical,CA:TRUE\nkeyUsage=critical,keyCertSign,cRLSign\nsubjectKeyIdentifier=hash\n"
            .write(toFile: "\(dir)/ext", atomically: true, encoding: .utf8)
        (out, status) = try openssl(["x509", "-req", "-in", "\(dir)/ca.csr", "-CA", "\(dir)/root.pem", "-CAkey",
                                     "\(dir)/root.key", "-CAcreateserial", "-days", "1", "-extfile", "\(dir)/ext",
                                     "-out", "\(dir)/ca.pem"])
        XCTAssertEqual(status, 0, out)
        let read = { (f: String) in try String(contentsOfFile: "\(dir)/\(f)", encoding: .utf8) }
        let ca = try CertificateAuthority(trustDomain: "cluster.local", certificatePEM: read("ca.pem"), keyPEM: read("ca.key"),
                                          rootPEM: [read("root.pem")])
        let issued = try ca.sign(requestPEM: try WorkloadKey().signingRequest(for: reviews), for: reviews,
                                 lifetime: .seconds(600), requester: "n")
        try (issued.certificate + issued.chain.joined()).write(toFile: "\(dir)/leaf.pem", atomically: true, encoding: .utf8)
        try issued.chain.joined().write(toFile: "\(dir)/chain.pem", atomically: true, encoding: .utf8)
        (out, status) = try openssl(["verify", "-CAfile", "\(dir)/root.pem", "-untrusted", "\(dir)/chain.pem", "\(dir)/leaf.pem"])
        XCTAssertEqual(status, 0, out)
        // A key that is not the CA certificate's, and a certificate that is not a CA, are refused.
        XCTAssertThrowsError(try CertificateAuthority(trustDomain: "cluster.local", certificatePEM: read("ca.pem"),
                                                      keyPEM: read("root.key"), rootPEM: [read("root.pem")]))
        XCTAssertThrowsError(try CertificateAuthority(trustDomain: "cluster.local", certificatePEM: issued.certificate,
                                                      keyPEM: read("ca.key"), rootPEM: [read("root.pem")]))
    }

    func testSPIFFEIDsParseOnlyInIstiosShape() {
        XCTAssertEqual(SPIFFEID("spiffe://cluster.local/ns/shop/sa/reviews"), reviews)
        XCTAssertNil(SPIFFEID("spiffe://cluster.local/ns/shop/sa/"))
        XCTAssertNil(SPIFFEID("spiffe://cluster.local/ns/shop/sa/reviews/extra"))
        XCTAssertNil(SPIFFEID("https://cluster.local/ns/shop/sa/reviews"))
        XCTAssertNil(SPIFFEID("spiffe://Cluster.Local/ns/shop/sa/reviews"))
        XCTAssertNil(SPIFFEID("spiffe://cluster.local/namespace/shop/sa/reviews"))
    }
}
