import Foundation
import SluiceIdentity
import SluiceModel

/// A listener's RequestAuthentication: where tokens are looked for and the verifier of their issuers. Built off
/// the data plane (JWKS inline, `jwksUri` as a `file://` path read here, or an http(s) URL from the
/// ``JWKSCache``); a token from an issuer whose keys could not be loaded fails verification.
final class RequestAuthenticator: Sendable {
    let verifier: JWTVerifier
    /// Header names (lower-case) with the prefix before the token; default `authorization: Bearer `.
    let headers: [(name: String, prefix: String)]
    let params: [String]
    /// Issuers whose keys could not be loaded, for the log.
    let unavailable: [String]

    /// - Parameter policies: the RequestAuthentications that select the listener's workload; nil when none do.
    init?(_ policies: [Named<RequestAuthentication>], jwks cache: JWKSCache? = nil) {
        guard !policies.isEmpty else { return nil }
        var issuers: [JWTVerifier.Issuer] = []
        var headers: [(String, String)] = []
        var params: [String] = []
        var unavailable: [String] = []
        for rule in policies.flatMap(\.spec.jwtRules) {
            let text: String?
            if let inline = rule.jwks {
                text = inline
            } else if let uri = rule.jwksUri, uri.hasPrefix("file://") {
                text = try? String(contentsOfFile: String(uri.dropFirst("file://".count)), encoding: .utf8)
            } else if let uri = rule.jwksUri, let cache {
                text = cache.text(for: uri)
            } else {
                text = nil
            }
            if let text, let jwks = try? JWKS(json: text) {
                issuers.append(.init(issuer: rule.issuer, audiences: rule.audiences, jwks: jwks))
            } else {
                unavailable.append(rule.issuer)
            }
            for h in rule.fromHeaders { headers.append((h.name.lowercased(), h.prefix ?? "")) }
            params += rule.fromParams
        }
        if headers.isEmpty && params.isEmpty { headers = [("authorization", "Bearer ")] }
        verifier = JWTVerifier(issuers)
        self.headers = headers
        self.params = params
        self.unavailable = unavailable
    }

    /// The token of a request, if it carries one where the rules look.
    func token(headers h: [String: String], path: String) -> String? {
        for (name, prefix) in headers {
            if let v = h[name], v.hasPrefix(prefix), v.count > prefix.count { return String(v.dropFirst(prefix.count)) }
        }
        guard !params.isEmpty, let q = path.firstIndex(of: "?") else { return nil }
        for pair in path[path.index(after: q)...].split(separator: "&") {
            let kv = pair.split(separator: "=", maxSplits: 1)
            if kv.count == 2, params.contains(String(kv[0])) { return String(kv[1]) }
        }
        return nil
    }
}
