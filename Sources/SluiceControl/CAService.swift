import Foundation
import SluiceIdentity
import SluiceModel
import Synchronization

/// The certificate API of `sluice control` (15012, TLS; callers other than joining nodes present their node
/// certificate). Pure request handling: the server moves bytes and tells who the peer proved to be.
///
/// - `POST /v1/join` `{"token", "node", "csr"}`: a node exchanges its one-time join token for a node
///   certificate (identity `spiffe://TD/ns/sluice-nodes/sa/NODE`). No client certificate needed.
/// - `POST /v1/certificates` `{"identity", "csr", "ttlSeconds"?}`: a node renews its own certificate or gets one
///   for a workload identity that, per the mesh configuration, runs on that node.
///
/// Answers `{"certificateChain": [leaf, CA, ...], "trustBundle": [...], "notAfter": epoch seconds}`, or an error
/// status with `{"error", "reason"}`.
public final class CAService: Sendable {
    public static let nodeNamespace = "sluice-nodes"

    let ca: CertificateAuthority
    /// Token -> the node it admits. A token works once.
    private let tokens: Mutex<[String: String]>
    /// Node -> workload identities it hosts, from the mesh configuration.
    private let hosted: Mutex<[String: Set<String>]>
    private let counters = Mutex<[String: Int]>([:])
    public let defaultLifetime: Duration
    /// Nodes an operator deleted: their certificates renew nothing until they join again.
    let deleted: DeletedNodes

    public init(ca: CertificateAuthority, joinTokens: [String: String], hostedIdentities: [String: Set<String>],
                defaultLifetime: Duration = .seconds(86_400), deletedNodes: DeletedNodes? = nil) {
        self.ca = ca
        deleted = deletedNodes ?? DeletedNodes()
        tokens = Mutex(joinTokens)
        hosted = Mutex(hostedIdentities)
        self.defaultLifetime = defaultLifetime
    }

    /// Replaces which identities each node hosts (after a configuration change).
    public func updateHosted(_ identities: [String: Set<String>]) { hosted.withLock { $0 = identities } }

    /// Replaces what the given nodes host (the others keep theirs).
    public func updateHosted(nodes: [String: Set<String>]) {
        hosted.withLock { h in for (node, ids) in nodes { h[node] = ids.isEmpty ? nil : ids } }
    }

    /// Node -> the SPIFFE identities of its workloads, from the mesh configuration (no node snapshots built).
    public static func hostedIdentities(_ compiler: MeshCompiler) -> [String: Set<String>] {
        Dictionary(uniqueKeysWithValues: compiler.nodes.map { ($0, compiler.workloadIdentities(on: $0)) })
    }

    /// Signing outcomes by reason (`granted`, `malformed`, `not_authorized`...), for metrics.
    public var counts: [String: Int] { counters.withLock { $0 } }

    /// The counts in Prometheus' text format.
    public func renderMetrics() -> String {
        var out = "# HELP sluice_ca_requests_total Certificate requests by outcome\n# TYPE sluice_ca_requests_total counter\n"
        for (reason, n) in counts.sorted(by: { $0.key < $1.key }) {
            out += "sluice_ca_requests_total{result=\"\(reason)\"} \(n)\n"
        }
        return out
    }

    public struct Response: Sendable, Equatable {
        public var status: Int
        public var body: String
    }

    /// Handles one request. `peer` is the URI SAN of the verified client certificate, if one was presented.
    public func handle(method: String, path: String, body: Data, peer: String?) -> Response {
        guard method == "POST" else { return error(405, "method_not_allowed", "use POST") }
        guard let json = try? JSONSerialization.jsonObject(with: body) as? [String: Any], let csr = json["csr"] as? String
        else { return error(400, "malformed", "the body must be a JSON object with a \"csr\" (PEM)") }
        let lifetime = (json["ttlSeconds"] as? Int).map { Duration.seconds($0) } ?? defaultLifetime
        switch path {
        case "/v1/join":
            // Parsing the URI form checks the node name (plain lower-case characters only).
            guard let token = json["token"] as? String, let node = json["node"] as? String,
                let id = SPIFFEID("spiffe://\(ca.trustDomain)/ns/\(Self.nodeNamespace)/sa/\(node)")
            else { return error(400, "malformed", "join needs \"token\" and a \"node\" name of lower-case letters, digits, '-', '.'") }
            // The token is spent whatever the outcome of the signature, so a leaked token cannot be retried.
            let admitted = tokens.withLock { t -> Bool in
                guard t[token] == node else { return false }
                t[token] = nil
                return true
            }
            guard admitted else {
                count("bad_token")
                return error(403, "bad_token", "the join token is unknown, already used, or for another node")
            }
            let signed = sign(csr, id, lifetime, requester: "join:\(node)", authorized: true)
            // A deleted node that joined again with a new token is a member once more, but only once it holds a new
            // certificate: a join that failed must not bring the old one back.
            guard signed.status == 200 else { return signed }
            do { try deleted.remove(node) } catch {
                return self.error(500, "internal", "cannot record that node \(node) joined again: \(error)")
            }
            return signed
        case "/v1/certificates":
            guard let peer, let caller = SPIFFEID(peer), caller.namespace == Self.nodeNamespace,
                caller.trustDomain == ca.trustDomain
            else {
                count("unauthenticated")
                return error(401, "unauthenticated", "present this node's certificate (join first)")
            }
            guard let text = json["identity"] as? String, let id = SPIFFEID(text) else {
                return error(400, "malformed", "\"identity\" must be spiffe://TRUST-DOMAIN/ns/NAMESPACE/sa/ACCOUNT")
            }
            let node = caller.serviceAccount
            guard !deleted.contains(node) else {
                count("node_deleted")
                return error(403, "node_deleted", "node \(node) was deleted: join it again with a new join token")
            }
            let allowed = id == caller || hosted.withLock { $0[node]?.contains(id.description) ?? false }
            return sign(csr, id, lifetime, requester: "node:\(node)", authorized: allowed)
        default:
            return error(404, "not_found", "no such endpoint")
        }
    }

    private func sign(_ csr: String, _ id: SPIFFEID, _ lifetime: Duration, requester: String, authorized: Bool) -> Response {
        do {
            let issued = try ca.sign(requestPEM: csr, for: id, lifetime: lifetime, requester: requester, authorized: authorized)
            count("granted")
            let out: [String: Any] = ["certificateChain": [issued.certificate] + issued.chain, "trustBundle": issued.trustBundle,
                                      "notAfter": Int(issued.notAfter.timeIntervalSince1970)]
            let data = (try? JSONSerialization.data(withJSONObject: out, options: [.sortedKeys])) ?? Data()
            return Response(status: 200, body: String(decoding: data, as: UTF8.self))
        } catch {
            count(error.reason)
            return self.error(error.reason == "not_authorized" ? 403 : 400, error.reason, error.description)
        }
    }

    private func count(_ reason: String) { counters.withLock { $0[reason, default: 0] += 1 } }

    private func error(_ status: Int, _ reason: String, _ message: String) -> Response {
        let data = (try? JSONSerialization.data(withJSONObject: ["error": message, "reason": reason], options: [.sortedKeys])) ?? Data()
        return Response(status: status, body: String(decoding: data, as: UTF8.self))
    }
}
