import Foundation
import SluiceModel
import SluiceTLS

/// Where the `sluice` CLI finds the config API, with kubectl's habits: `--server` and `--token` win, then
/// `--kubeconfig`, then `$KUBECONFIG`, then the control plane's own `admin.kubeconfig` on this host, then
/// `~/.kube/config`.
public struct APIEndpoint: Sendable {
    public var server: String
    public var token: String?
    /// PEM file of the roots the server's certificate must chain to.
    public var certificateAuthority: String?
    /// The name the server's certificate must carry (the kubeconfig's `tls-server-name`, else the URL's host).
    public var serverName: String?
    public var clientCertificate: (chain: String, key: String)?
    /// The context's namespace (`default` when none).
    public var namespace = "default"

    public struct Failure: Error, CustomStringConvertible {
        public let description: String
    }

    public static let defaultKubeconfigs = ["/var/lib/sluice-control/admin.kubeconfig",
                                            (ProcessInfo.processInfo.environment["HOME"] ?? "/root") + "/.kube/config"]

    /// Resolves the flags as kubectl does. Data embedded in a kubeconfig (`certificate-authority-data`, ...) is
    /// written to files under `scratch` (TLS reads files).
    public static func resolve(kubeconfig: String?, server: String?, token: String?, certificateAuthority: String?,
                               scratch: String) throws(Failure) -> APIEndpoint {
        let env = ProcessInfo.processInfo.environment["KUBECONFIG"].flatMap { $0.split(separator: ":").first.map(String.init) }
        let path = kubeconfig ?? env ?? defaultKubeconfigs.first { FileManager.default.isReadableFile(atPath: $0) }
        var endpoint: APIEndpoint
        if let path, server == nil || token == nil {
            endpoint = try load(path, scratch: scratch)
        } else if let server {
            endpoint = APIEndpoint(server: server)
        } else {
            throw Failure(description: "no config API to talk to: pass --kubeconfig FILE (sluice control writes "
                          + "STATE_DIR/admin.kubeconfig) or --server URL --token TOKEN")
        }
        if let server { endpoint.server = server }
        if let token { endpoint.token = token }
        if let certificateAuthority { endpoint.certificateAuthority = certificateAuthority }
        return endpoint
    }

    /// Reads the current context of a kubeconfig.
    static func load(_ path: String, scratch: String) throws(Failure) -> APIEndpoint {
        let doc: JSONValue
        do {
            let text = try String(contentsOfFile: path, encoding: .utf8)
            guard let first = try JSONValue.documents(yaml: text).first else { throw Failure(description: "\(path) is empty") }
            doc = first
        } catch let e as Failure {
            throw e
        } catch {
            throw Failure(description: "cannot read the kubeconfig \(path): \(error)")
        }
        func named(_ list: String, _ name: String?) -> JSONValue? {
            doc[list]?.arrayValue?.first { $0["name"]?.stringValue == name }
        }
        let contextName = doc["current-context"]?.stringValue
        guard let context = named("contexts", contextName)?["context"] ?? doc["contexts"]?.arrayValue?.first?["context"]
        else { throw Failure(description: "\(path) has no context") }
        guard let cluster = named("clusters", context["cluster"]?.stringValue)?["cluster"],
            let server = cluster["server"]?.stringValue
        else { throw Failure(description: "\(path): the context's cluster has no server") }
        let user = named("users", context["user"]?.stringValue)?["user"]
        var e = APIEndpoint(server: server)
        e.token = user?["token"]?.stringValue
        if e.token == nil, let file = user?["tokenFile"]?.stringValue {
            e.token = (try? String(contentsOfFile: file, encoding: .utf8))?.trimmingCharacters(in: .whitespacesAndNewlines)
        }
        e.serverName = cluster["tls-server-name"]?.stringValue
        e.namespace = context["namespace"]?.stringValue ?? "default"
        func file(_ key: String, _ from: JSONValue?, _ name: String) throws(Failure) -> String? {
            if let f = from?[key]?.stringValue { return f }
            guard let data = from?[key + "-data"]?.stringValue else { return nil }
            guard let bytes = Data(base64Encoded: data) else { throw Failure(description: "\(path): \(key)-data is not base64") }
            let out = "\(scratch)/\(name)"
            guard FileManager.default.createFile(atPath: out, contents: bytes, attributes: [.posixPermissions: 0o600]) else {
                throw Failure(description: "cannot write \(out)")
            }
            return out
        }
        e.certificateAuthority = try file("certificate-authority", cluster, "ca.pem")
        if let chain = try file("client-certificate", user, "client.crt"), let key = try file("client-key", user, "client.key") {
            e.clientCertificate = (chain, key)
        }
        return e
    }
}

/// One call to the config API: JSON in and out, Kubernetes `Status` errors turned into readable failures.
public struct APIClient: Sendable {
    public let endpoint: APIEndpoint
    let http: HTTPSClient

    public init(_ endpoint: APIEndpoint) throws(APIEndpoint.Failure) {
        self.endpoint = endpoint
        guard endpoint.server.hasPrefix("https://") else {
            throw APIEndpoint.Failure(description: "--server '\(endpoint.server)' must be an https:// URL")
        }
        let authority = String(endpoint.server.dropFirst("https://".count).prefix { $0 != "/" })
        let host = String(authority.prefix { $0 != ":" })
        let address = authority.contains(":") ? authority : authority + ":443"
        var http = HTTPSClient(address: address, serverName: endpoint.serverName ?? host,
                               rootCA: endpoint.certificateAuthority ?? "/etc/ssl/certs/ca-certificates.crt")
        http.timeout = 30
        http.maxResponseBytes = 256 << 20
        self.http = http
    }

    public struct Reply: Sendable {
        public var status: Int
        public var json: JSONValue?
        public var warnings: [String]
        public var body: Data
        /// The Status message of an error reply (or the body).
        public var message: String {
            json?["message"]?.stringValue ?? json.map(\.text) ?? ""
        }
        public var reason: String { json?["reason"]?.stringValue ?? "Unknown" }
    }

    public func call(_ method: String, _ path: String, body: JSONValue? = nil,
                     contentType: String = "application/json", accept: String = "application/json") throws -> Reply {
        var headers = [("accept", accept), ("user-agent", "sluice-cli")]
        if let t = endpoint.token { headers.append(("authorization", "Bearer \(t)")) }
        if body != nil { headers.append(("content-type", contentType)) }
        let r: HTTPSClient.Response
        do {
            r = try http.request(method, path, headers: headers, body: body.map { Array($0.data) } ?? [],
                                 clientCertificate: endpoint.clientCertificate.map { ($0.chain, $0.key) })
        } catch {
            throw APIEndpoint.Failure(description: "cannot reach the config API at \(endpoint.server): \(error)")
        }
        let json = try? JSONValue(parsing: Data(r.body))
        // `Warning: 299 - "text"` headers, as the API server sends them.
        let warnings = r.header("warning").map { w -> String in
            guard let q = w.firstIndex(of: "\""), w.last == "\"" else { return w }
            return String(w[w.index(after: q)..<w.index(before: w.endIndex)])
        }
        return Reply(status: r.status, json: json, warnings: warnings, body: Data(r.body))
    }
}
