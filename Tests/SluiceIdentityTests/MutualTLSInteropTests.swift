import Foundation
import SluiceTLS
import SluiceTestSupport
import XCTest

@testable import SluiceIdentity

/// Certificates the CA issues work in the data path's TLS layer (OpenSSL): both ends of a mutual handshake are
/// verified against the mesh root and see each other's SPIFFE identity; an expired certificate is refused.
final class MutualTLSInteropTests: XCTestCase {
    let reviews = SPIFFEID(trustDomain: "cluster.local", namespace: "shop", serviceAccount: "reviews")
    let productpage = SPIFFEID(trustDomain: "cluster.local", namespace: "shop", serviceAccount: "productpage")
    var dir = ""

    override func setUp() {
        dir = NSTemporaryDirectory() + "sluice-mtls-\(UUID().uuidString)"
        try? FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
    }

    override func tearDown() { try? FileManager.default.removeItem(atPath: dir) }

    /// Issues a certificate for `id` and writes `NAME.crt` (leaf + chain), `NAME.key` and `root.pem`.
    func issue(_ ca: CertificateAuthority, _ id: SPIFFEID, name: String, now: Date = Date()) throws {
        let key = WorkloadKey()
        let issued = try ca.sign(requestPEM: try key.signingRequest(for: id), for: id, lifetime: .seconds(3600),
                                 requester: "test", now: now)
        try (issued.certificate + issued.chain.joined()).write(toFile: "\(dir)/\(name).crt", atomically: true, encoding: .utf8)
        try key.privateKeyPEM.write(toFile: "\(dir)/\(name).key", atomically: true, encoding: .utf8)
        try issued.trustBundle.joined().write(toFile: "\(dir)/root.pem", atomically: true, encoding: .utf8)
    }

    func handshake(_ server: TLSStream, _ client: TLSStream) -> (TLSStream.Progress, TLSStream.Progress) {
        InMemoryTLS.handshake(server, client)
    }

    func testBothEndsAreVerifiedAndSeeEachOthersIdentity() throws {
        let ca = try CertificateAuthority(generatingRootFor: "cluster.local")
        try issue(ca, reviews, name: "reviews")
        try issue(ca, productpage, name: "productpage")
        let serverContext = try TLSContext(certificateChain: "\(dir)/reviews.crt", privateKey: "\(dir)/reviews.key",
                                           clientCA: "\(dir)/root.pem", minVersion: .v1_3)
        let clientContext = try TLSContext(clientTrusting: "\(dir)/root.pem", certificateChain: "\(dir)/productpage.crt",
                                           privateKey: "\(dir)/productpage.key", minVersion: .v1_3)
        let server = try TLSStream(serving: TLSServerNames([.init(hosts: ["*"], context: serverContext)]))
        let client = try TLSStream(client: clientContext, serverName: nil)
        let (sp, cp) = handshake(server, client)
        XCTAssertEqual(sp, .done)
        XCTAssertEqual(cp, .done)
        XCTAssertEqual(server.peerURIs, [productpage.description])
        XCTAssertEqual(client.peerURIs, [reviews.description])
    }

    func testAnExpiredCertificateIsRefused() throws {
        let ca = try CertificateAuthority(generatingRootFor: "cluster.local")
        try issue(ca, reviews, name: "reviews", now: Date().addingTimeInterval(-2 * 86_400))
        let serverContext = try TLSContext(certificateChain: "\(dir)/reviews.crt", privateKey: "\(dir)/reviews.key")
        let clientContext = try TLSContext(clientTrusting: "\(dir)/root.pem")
        let server = try TLSStream(serving: TLSServerNames([.init(hosts: ["*"], context: serverContext)]))
        let client = try TLSStream(client: clientContext, serverName: nil)
        guard case .failed(let why) = handshake(server, client).1 else { return XCTFail("an expired certificate passed") }
        XCTAssertTrue(why.contains("expired"), why)
    }

    func testACertificateFromAnotherMeshIsRefused() throws {
        let ours = try CertificateAuthority(generatingRootFor: "cluster.local")
        let theirs = try CertificateAuthority(generatingRootFor: "cluster.local")
        try issue(theirs, reviews, name: "reviews")
        try ours.trustBundle.joined().write(toFile: "\(dir)/ours.pem", atomically: true, encoding: .utf8)
        let server = try TLSStream(serving: TLSServerNames([.init(hosts: ["*"], context: try TLSContext(
            certificateChain: "\(dir)/reviews.crt", privateKey: "\(dir)/reviews.key"))]))
        let client = try TLSStream(client: try TLSContext(clientTrusting: "\(dir)/ours.pem"), serverName: nil)
        guard case .failed(let why) = handshake(server, client).1 else { return XCTFail("a foreign mesh's certificate passed") }
        XCTAssertTrue(why.contains("certificate"), why)
    }
}
