import SluiceIdentity
import SluiceTLS
import Synchronization

/// The node's workload certificates and the mesh's trust bundle as TLS contexts for HBONE: a client context per
/// identity (presented when this node's workload calls out) and a server context per identity (presented when
/// another node calls one of this node's workloads, picked by the SNI the caller sends).
///
/// Written by the certificate thread on every issue or renewal, read by workers when they open a tunnel or accept
/// one. Each load is a new immutable ``Generation``: a tunnel remembers the generation it was opened with and is
/// not given new streams once a newer one exists, so a rotated certificate stops being used for new streams at
/// once while streams in flight finish on the old one.
public final class MeshCredentials: Sendable {
    public final class Identity: Sendable {
        /// `spiffe://TD/ns/NS/sa/SA`
        public let uri: String
        let client: TLSContext
        let server: TLSContext
        init(uri: String, client: TLSContext, server: TLSContext) {
            self.uri = uri
            self.client = client
            self.server = server
        }
    }

    public final class Generation: Sendable {
        public let number: UInt64
        public let trustBundle: String
        let identities: [String: Identity]
        /// The server contexts by SNI (nil before the node has any certificate).
        let serverNames: TLSServerNames?
        init(number: UInt64, trustBundle: String, identities: [String: Identity]) {
            self.number = number
            self.trustBundle = trustBundle
            self.identities = identities
            let entries = identities.values.sorted { $0.uri < $1.uri }
                .map { TLSServerNames.Entry(hosts: [MeshCredentials.serverName(for: $0.uri)], context: $0.server) }
            serverNames = entries.isEmpty ? nil : TLSServerNames(entries)
        }
        public var identityURIs: [String] { identities.keys.sorted() }
    }

    private let state = Mutex<Generation>(Generation(number: 0, trustBundle: "", identities: [:]))

    public init() {}

    public var current: Generation { state.withLock { $0 } }

    /// The SNI a caller sends to ask for `uri`'s certificate: `SA.NS.hbone.sluice` (a namespace has no dots, so
    /// the name is unambiguous even when a service account has some).
    public static func serverName(for uri: String) -> String {
        guard let id = SPIFFEID(uri) else { return "unknown.hbone.sluice" }
        return "\(id.serviceAccount).\(id.namespace).hbone.sluice".lowercased()
    }

    /// Loads every identity's certificate chain and key with `trustBundle` (PEM file of the roots peers must chain
    /// to) into a new generation. All or nothing: when a file does not load, the previous generation stays and the
    /// error names the file.
    public func load(_ files: [String: (chain: String, key: String)], trustBundle: String) throws(TLSError) {
        var identities: [String: Identity] = [:]
        for (uri, f) in files {
            // TLS 1.3 only, HTTP/2 by ALPN: mesh peers are all Sluice agents (or ztunnels), never legacy clients.
            let client = try TLSContext(clientTrusting: trustBundle, certificateChain: f.chain, privateKey: f.key,
                                        minVersion: .v1_3, alpn: ["h2"])
            let server = try TLSContext(certificateChain: f.chain, privateKey: f.key, clientCA: trustBundle,
                                        minVersion: .v1_3, alpn: ["h2"])
            identities[uri] = Identity(uri: uri, client: client, server: server)
        }
        state.withLock { g in
            g = Generation(number: g.number + 1, trustBundle: trustBundle, identities: identities)
        }
    }
}
