import Crypto
import Foundation
import _CryptoExtras

/// Why a JWT was refused (Envoy's jwt_authn wording where it has one).
public enum JWTError: Error, Equatable, CustomStringConvertible, Sendable {
    case malformed
    case unsupportedAlgorithm(String)
    case unknownIssuer
    case audienceNotAllowed
    case expired
    case notYetValid
    case badSignature
    case noKey

    public var description: String {
        switch self {
        case .malformed: return "Jwt is not in the form of Header.Payload.Signature"
        case .unsupportedAlgorithm(let a): return "Jwt algorithm \(a) is not supported"
        case .unknownIssuer: return "Jwt issuer is not configured"
        case .audienceNotAllowed: return "Audiences in Jwt are not allowed"
        case .expired: return "Jwt is expired"
        case .notYetValid: return "Jwt not yet valid"
        case .badSignature: return "Jwt verification fails"
        case .noKey: return "Jwks doesn't have key to match kid or alg from Jwt"
        }
    }
}

/// A verified token: `iss/sub` (Istio's request principal) and its claims as strings (arrays flattened).
public struct VerifiedJWT: Sendable, Equatable {
    public var principal: String
    public var claims: [String: [String]]
    public var expires: Date?
}

/// A JSON Web Key Set: the public keys tokens are verified with (RS256/384/512 and ES256/384).
public struct JWKS: Sendable {
    // The keys are immutable values (swift-crypto does not mark them Sendable on Linux).
    enum Key: @unchecked Sendable {
        case rsa(_RSA.Signing.PublicKey)
        case p256(P256.Signing.PublicKey)
        case p384(P384.Signing.PublicKey)
    }
    let keys: [(kid: String?, key: Key)]

    /// Parses `{"keys": [...]}`; keys of other types are skipped. Throws when no usable key is left.
    public init(json: String) throws {
        guard let object = try? JSONSerialization.jsonObject(with: Data(json.utf8)) as? [String: Any],
            let list = object["keys"] as? [[String: Any]]
        else { throw CAFileError("a JWKS is a JSON object with \"keys\"") }
        var keys: [(String?, Key)] = []
        for k in list {
            let kid = k["kid"] as? String
            switch (k["kty"] as? String, k["crv"] as? String) {
            case ("RSA", _):
                guard let n = (k["n"] as? String).flatMap(Self.base64URL), let e = (k["e"] as? String).flatMap(Self.base64URL),
                    let key = try? _RSA.Signing.PublicKey(n: n, e: e)
                else { continue }
                keys.append((kid, .rsa(key)))
            case ("EC", "P-256"?):
                guard let x = (k["x"] as? String).flatMap(Self.base64URL), let y = (k["y"] as? String).flatMap(Self.base64URL),
                    let key = try? P256.Signing.PublicKey(rawRepresentation: x + y)
                else { continue }
                keys.append((kid, .p256(key)))
            case ("EC", "P-384"?):
                guard let x = (k["x"] as? String).flatMap(Self.base64URL), let y = (k["y"] as? String).flatMap(Self.base64URL),
                    let key = try? P384.Signing.PublicKey(rawRepresentation: x + y)
                else { continue }
                keys.append((kid, .p384(key)))
            default:
                continue
            }
        }
        guard !keys.isEmpty else { throw CAFileError("the JWKS holds no RSA or P-256/P-384 key") }
        self.keys = keys
    }

    static func base64URL(_ s: String) -> [UInt8]? {
        var t = s.replacingOccurrences(of: "-", with: "+").replacingOccurrences(of: "_", with: "/")
        while t.count % 4 != 0 { t += "=" }
        return Data(base64Encoded: t).map(Array.init)
    }
}

/// Verifies JWTs for a RequestAuthentication's rules: signature by a key of the issuer's JWKS, `iss`, `aud`
/// (when the rule lists audiences), `exp` and `nbf` (60 s of clock skew, as Envoy). `alg: none` is refused.
public struct JWTVerifier: Sendable {
    public struct Issuer: Sendable {
        public var issuer: String
        public var audiences: [String]
        public var jwks: JWKS
        public init(issuer: String, audiences: [String], jwks: JWKS) {
            self.issuer = issuer
            self.audiences = audiences
            self.jwks = jwks
        }
    }

    let issuers: [String: Issuer]
    static let skew: TimeInterval = 60

    public init(_ issuers: [Issuer]) {
        self.issuers = Dictionary(issuers.map { ($0.issuer, $0) }, uniquingKeysWith: { a, _ in a })
    }

    public func verify(_ token: String, now: Date = Date()) -> Result<VerifiedJWT, JWTError> {
        let parts = token.split(separator: ".", omittingEmptySubsequences: false)
        guard parts.count == 3, let headerBytes = JWKS.base64URL(String(parts[0])),
            let payloadBytes = JWKS.base64URL(String(parts[1])), let signature = JWKS.base64URL(String(parts[2])),
            let header = try? JSONSerialization.jsonObject(with: Data(headerBytes)) as? [String: Any],
            let payload = try? JSONSerialization.jsonObject(with: Data(payloadBytes)) as? [String: Any],
            let alg = header["alg"] as? String
        else { return .failure(.malformed) }
        guard ["RS256", "RS384", "RS512", "ES256", "ES384"].contains(alg) else { return .failure(.unsupportedAlgorithm(alg)) }
        guard let iss = payload["iss"] as? String, let rule = issuers[iss] else { return .failure(.unknownIssuer) }
        let signed = Array((parts[0] + "." + parts[1]).utf8)
        let kid = header["kid"] as? String
        let candidates = rule.jwks.keys.filter { kid == nil || $0.kid == nil || $0.kid == kid }
        guard !candidates.isEmpty else { return .failure(.noKey) }
        guard candidates.contains(where: { Self.check(alg, $0.key, signature, signed) }) else { return .failure(.badSignature) }
        let nowSeconds = now.timeIntervalSince1970
        let exp = (payload["exp"] as? NSNumber)?.doubleValue
        if let exp, nowSeconds > exp + Self.skew { return .failure(.expired) }
        if let nbf = (payload["nbf"] as? NSNumber)?.doubleValue, nowSeconds + Self.skew < nbf { return .failure(.notYetValid) }
        if !rule.audiences.isEmpty {
            let aud = (payload["aud"] as? [String]) ?? ((payload["aud"] as? String).map { [$0] } ?? [])
            guard aud.contains(where: rule.audiences.contains) else { return .failure(.audienceNotAllowed) }
        }
        var claims: [String: [String]] = [:]
        for (k, v) in payload {
            if let s = v as? String { claims[k] = [s] } else if let a = v as? [String] { claims[k] = a }
            else if let n = v as? NSNumber { claims[k] = [n.stringValue] }
        }
        let sub = payload["sub"] as? String ?? ""
        return .success(VerifiedJWT(principal: "\(iss)/\(sub)", claims: claims,
                                    expires: exp.map { Date(timeIntervalSince1970: $0) }))
    }

    static func check(_ alg: String, _ key: JWKS.Key, _ signature: [UInt8], _ signed: [UInt8]) -> Bool {
        switch (alg, key) {
        case ("RS256", .rsa(let k)):
            return k.isValidSignature(_RSA.Signing.RSASignature(rawRepresentation: signature), for: SHA256.hash(data: signed),
                                      padding: .insecurePKCS1v1_5)
        case ("RS384", .rsa(let k)):
            return k.isValidSignature(_RSA.Signing.RSASignature(rawRepresentation: signature), for: SHA384.hash(data: signed),
                                      padding: .insecurePKCS1v1_5)
        case ("RS512", .rsa(let k)):
            return k.isValidSignature(_RSA.Signing.RSASignature(rawRepresentation: signature), for: SHA512.hash(data: signed),
                                      padding: .insecurePKCS1v1_5)
        case ("ES256", .p256(let k)):
            guard let s = try? P256.Signing.ECDSASignature(rawRepresentation: signature) else { return false }
            return k.isValidSignature(s, for: SHA256.hash(data: signed))
        case ("ES384", .p384(let k)):
            guard let s = try? P384.Signing.ECDSASignature(rawRepresentation: signature) else { return false }
            return k.isValidSignature(s, for: SHA384.hash(data: signed))
        default:
            return false
        }
    }
}
