import Crypto
import Foundation

/// JWTs for tests: an ES256 key, its JWKS, and tokens signed with it.
public struct TestJWT {
    public let key: P256.Signing.PrivateKey
    public let kid: String

    public init(kid: String = "k1") {
        key = P256.Signing.PrivateKey()
        self.kid = kid
    }

    public static func base64URL(_ bytes: some DataProtocol) -> String {
        Data(bytes).base64EncodedString().replacingOccurrences(of: "+", with: "-").replacingOccurrences(of: "/", with: "_")
            .replacingOccurrences(of: "=", with: "")
    }

    /// `{"keys": [...]}` with the public key.
    public var jwks: String {
        let raw = key.publicKey.rawRepresentation
        return "{\"keys\":[{\"kty\":\"EC\",\"crv\":\"P-256\",\"kid\":\"\(kid)\",\"x\":\"\(Self.base64URL(raw.prefix(32)))\","
            + "\"y\":\"\(Self.base64URL(raw.suffix(32)))\"}]}"
    }

    /// A token with `header` (alg ES256 and the kid unless given) and `claims`, signed by `signer` (this key).
    public func token(_ claims: [String: Any], header: [String: Any]? = nil, signer: P256.Signing.PrivateKey? = nil) -> String {
        Self.token(header ?? ["alg": "ES256", "kid": kid], claims) {
            Array(try! (signer ?? key).signature(for: $0).rawRepresentation)
        }
    }

    /// A token with any header, signed by `sign` over `header.payload`.
    public static func token(_ header: [String: Any], _ claims: [String: Any], sign: ([UInt8]) -> [UInt8]) -> String {
        let h = base64URL(try! JSONSerialization.data(withJSONObject: header))
        let p = base64URL(try! JSONSerialization.data(withJSONObject: claims))
        return "\(h).\(p).\(base64URL(sign(Array("\(h).\(p)".utf8))))"
    }
}
