import Foundation
import SluiceTLS

/// The agent's side of the CA API, on the certificate manager's own thread.
typealias CAClient = HTTPSClient

extension HTTPSClient {
    /// POSTs `body` (JSON) to `path`, presenting `clientCertificate` (chain file, key file) if given; returns the
    /// status and the decoded JSON answer.
    func post(_ path: String, _ body: [String: Any], clientCertificate: (String, String)? = nil) throws -> (Int, [String: Any]) {
        let payload = try JSONSerialization.data(withJSONObject: body)
        let r = try request("POST", path, headers: [("content-type", "application/json")], body: Array(payload),
                            clientCertificate: clientCertificate)
        let json = (try? JSONSerialization.jsonObject(with: Data(r.body))) as? [String: Any] ?? [:]
        return (r.status, json)
    }
}

/// RequestAuthentication's remote key sets: an https GET trusting the system's CAs (and `extraTrust`).
public enum JWKSFetcher {
    public static func fetch(_ url: String, extraTrust: String? = nil) throws -> String {
        let (status, body) = try CAClient.get(url, extraTrust: extraTrust)
        guard status == 200 else { throw CAClient.Failure(description: "\(url) answered \(status)") }
        return body
    }
}
