import Foundation
import XCTest

@testable import SluiceIdentity
import SluiceTestSupport

/// Random damage to tokens, key sets and requests: nothing crashes, and nothing damaged verifies.
final class HostileTokenTests: XCTestCase {
    func testMutatedTokensNeverVerifyUnlessTheyDecodeToTheOriginal() throws {
        let issuer = TestJWT()
        let verifier = JWTVerifier([.init(issuer: "iss", audiences: [], jwks: try JWKS(json: issuer.jwks))])
        let now = Date(timeIntervalSince1970: 2_000_000_000)
        let good = issuer.token(["iss": "iss", "sub": "a", "exp": 2_000_000_100])
        guard case .success = verifier.verify(good, now: now) else { return XCTFail("the unchanged token must verify") }
        let alphabet = Array("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.=+/ ")
        var rng = SystemRandomNumberGenerator()
        let decoded = { (t: String) in t.split(separator: ".", omittingEmptySubsequences: false).map { JWKS.base64URL(String($0)) } }
        let original = decoded(good)
        for _ in 0..<3000 {
            var chars = Array(good)
            switch Int.random(in: 0..<3, using: &rng) {
            case 0: chars[Int.random(in: 0..<chars.count, using: &rng)] = alphabet.randomElement(using: &rng)!
            case 1: chars.removeSubrange(Int.random(in: 0..<chars.count, using: &rng)...)
            default: chars.insert(alphabet.randomElement(using: &rng)!, at: Int.random(in: 0...chars.count, using: &rng))
            }
            let token = String(chars)
            if case .success = verifier.verify(token, now: now) {
                XCTAssertEqual(decoded(token).map { $0 }, original.map { $0 }, "a damaged token verified: \(token)")
            }
        }
        for _ in 0..<500 {
            let junk = String((0..<Int.random(in: 0..<200, using: &rng)).map { _ in alphabet.randomElement(using: &rng)! })
            if case .success = verifier.verify(junk, now: now) { XCTFail("junk verified: \(junk)") }
        }
    }

    func testJunkKeySetsAndRequestsAreRefusedNotCrashed() {
        var rng = SystemRandomNumberGenerator()
        let samples = ["", "{}", "{\"keys\":[]}", "{\"keys\":[{\"kty\":\"EC\",\"crv\":\"P-256\",\"x\":\"AA\",\"y\":\"AA\"}]}",
                       "{\"keys\":[{\"kty\":\"RSA\",\"n\":\"!!\",\"e\":\"AQAB\"}]}", "[1,2,3]", "{\"keys\":\"x\"}"]
        for s in samples { XCTAssertThrowsError(try JWKS(json: s), s) }
        let ca = try! CertificateAuthority(generatingRootFor: "cluster.local")
        let id = SPIFFEID(trustDomain: "cluster.local", namespace: "a", serviceAccount: "b")
        let good = try! WorkloadKey().signingRequest(for: id)
        for _ in 0..<300 {
            var chars = Array(good)
            let k = Int.random(in: 0..<chars.count, using: &rng)
            chars[k] = Character(UnicodeScalar(UInt8.random(in: 0x20...0x7E, using: &rng)))
            // Whatever the damage, the CA answers with a certificate for the right identity or a refusal.
            if let issued = try? ca.sign(requestPEM: String(chars), for: id, lifetime: .seconds(60), requester: "fuzz") {
                XCTAssertEqual(try? CertificateInfo(pem: issued.certificate).uris, [id.description])
            }
        }
    }
}
