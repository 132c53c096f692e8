import Crypto
import Foundation
import XCTest
import _CryptoExtras

@testable import SluiceIdentity
import SluiceTestSupport

/// Tokens signed here with swift-crypto keys, verified against the JWKS of those keys.
final class JWTVerifierTests: XCTestCase {
    static func b64(_ bytes: some DataProtocol) -> String { TestJWT.base64URL(bytes) }

    static func token(_ header: [String: Any], _ claims: [String: Any], sign: ([UInt8]) -> [UInt8]) -> String {
        TestJWT.token(header, claims, sign: sign)
    }

    let issuerKey = TestJWT()
    let now = Date(timeIntervalSince1970: 2_000_000_000)

    func es256(_ claims: [String: Any], kid: String = "k1", key: P256.Signing.PrivateKey? = nil) -> String {
        issuerKey.token(claims, header: ["alg": "ES256", "kid": kid], signer: key)
    }

    func verifier(audiences: [String] = []) throws -> JWTVerifier {
        JWTVerifier([.init(issuer: "https://issuer.example", audiences: audiences, jwks: try JWKS(json: issuerKey.jwks))])
    }

    func testAValidTokenGivesItsPrincipalAndClaims() throws {
        let t = es256(["iss": "https://issuer.example", "sub": "alice", "exp": 2_000_000_100, "groups": ["dev", "ops"],
                       "aud": "shop"])
        let v = try verifier(audiences: ["shop"]).verify(t, now: now)
        guard case .success(let jwt) = v else { return XCTFail("\(v)") }
        XCTAssertEqual(jwt.principal, "https://issuer.example/alice")
        XCTAssertEqual(jwt.claims["groups"], ["dev", "ops"])
    }

    func testEachBadTokenIsRefusedForItsReason() throws {
        let v = try verifier(audiences: ["shop"])
        let base: [String: Any] = ["iss": "https://issuer.example", "sub": "a", "aud": ["shop"], "exp": 2_000_000_100]
        func refusal(_ token: String) -> JWTError? { if case .failure(let e) = v.verify(token, now: now) { return e }; return nil }
        var expired = base
        expired["exp"] = 2_000_000_000 - 61
        XCTAssertEqual(refusal(es256(expired)), .expired)
        var skewed = base
        skewed["exp"] = 2_000_000_000 - 30
        XCTAssertNil(refusal(es256(skewed)), "60 s of clock skew")
        var early = base
        early["nbf"] = 2_000_000_100
        XCTAssertEqual(refusal(es256(early)), .notYetValid)
        var stranger = base
        stranger["iss"] = "https://other.example"
        XCTAssertEqual(refusal(es256(stranger)), .unknownIssuer)
        var wrongAudience = base
        wrongAudience["aud"] = "billing"
        XCTAssertEqual(refusal(es256(wrongAudience)), .audienceNotAllowed)
        XCTAssertEqual(refusal(es256(base, key: P256.Signing.PrivateKey())), .badSignature)
        XCTAssertEqual(refusal(es256(base, kid: "k9")), .noKey)
        XCTAssertEqual(refusal(Self.token(["alg": "none"], base) { _ in [] }), .unsupportedAlgorithm("none"))
        XCTAssertEqual(refusal(Self.token(["alg": "HS256"], base) { _ in [1, 2, 3] }), .unsupportedAlgorithm("HS256"))
        XCTAssertEqual(refusal("not.a-token"), .malformed)
        XCTAssertEqual(refusal("a.b.c"), .malformed)
        // A payload changed after signing.
        let good = es256(base)
        let parts = good.split(separator: ".")
        var forged = base
        forged["sub"] = "admin"
        let payload = Self.b64(try JSONSerialization.data(withJSONObject: forged))
        XCTAssertEqual(refusal("\(parts[0]).\(payload).\(parts[2])"), .badSignature)
    }

    func testRS256TokensVerifyWithTheirRSAKey() throws {
        let rsa = try _RSA.Signing.PrivateKey(keySize: .bits2048)
        let pub = rsa.publicKey.pkcs1DERRepresentation
        // n and e from the PKCS#1 DER: SEQUENCE { INTEGER n, INTEGER e }.
        let (n, e) = Self.pkcs1Integers(Array(pub))
        let jwks = "{\"keys\":[{\"kty\":\"RSA\",\"n\":\"\(Self.b64(n))\",\"e\":\"\(Self.b64(e))\"}]}"
        let v = JWTVerifier([.init(issuer: "iss", audiences: [], jwks: try JWKS(json: jwks))])
        let t = Self.token(["alg": "RS256"], ["iss": "iss", "sub": "svc"]) {
            Array(try! rsa.signature(for: SHA256.hash(data: $0), padding: .insecurePKCS1v1_5).rawRepresentation)
        }
        guard case .success(let jwt) = v.verify(t, now: now) else { return XCTFail() }
        XCTAssertEqual(jwt.principal, "iss/svc")
    }

    /// The two INTEGERs of a DER SEQUENCE (short or long form lengths), leading zero bytes dropped.
    static func pkcs1Integers(_ der: [UInt8]) -> ([UInt8], [UInt8]) {
        var i = 1
        func length() -> Int {
            var n = Int(der[i]); i += 1
            if n & 0x80 != 0 {
                let count = n & 0x7F
                n = 0
                for _ in 0..<count { n = n << 8 | Int(der[i]); i += 1 }
            }
            return n
        }
        _ = length()
        var out: [[UInt8]] = []
        for _ in 0..<2 {
            i += 1  // INTEGER tag
            let n = length()
            out.append(Array(der[i..<(i + n)].drop { $0 == 0 }))
            i += n
        }
        return (out[0], out[1])
    }
}
