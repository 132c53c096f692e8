import Foundation
import GRPCCore
import GRPCNIOTransportHTTP2
import Logging
import SluiceProtocol
import Synchronization
import SluiceIdentity
import SluiceModel

/// `sluice control`: the mesh CA on 15012 and the config API on 15017, over one store of the mesh (SQLite by
/// default). The CA grants each node the identities of the workloads the stored mesh places on it; the API's writes
/// change that live. Keeps its root (or uses a plug-in CA), its serving certificate, the admin token and
/// `admin.kubeconfig` in the state directory.
public final class ControlPlane: Sendable {
    public struct Options: Sendable {
        public var trustDomain = "cluster.local"
        public var listen = "0.0.0.0:15012"
        public var stateDirectory = "/var/lib/sluice-control"
        /// Istio YAML applied to the store at start (created, or replaced where it differs).
        public var config: String?
        /// `sqlite:PATH[?sync=full]`; default `sqlite:STATE_DIR/mesh.db`.
        public var store: String?
        /// Where agents hold their streams (gRPC, mutual TLS with node certificates).
        public var stream = "0.0.0.0:\(agentStreamPort)"
        /// How long changes settle before a delta is pushed, and the most a change waits under a stream of them.
        public var pushDebounce: Duration = .milliseconds(100)
        public var pushMaxDelay: Duration = .seconds(1)
        /// Items one agent may have pending before it is dropped to a full resync.
        public var pushMaxPending = 20_000
        /// How long a node may be offline before the workloads it registered are removed.
        public var cleanupGrace: Duration = .seconds(10)
        /// Where the config API listens (HTTPS); nil: not served.
        public var api: String? = "0.0.0.0:15017"
        /// `TOKEN,NAME,ROLE` lines (see ``APIAuthenticator``).
        public var tokens: String?
        /// Lines `TOKEN NODE`: each token admits that node once.
        public var joinTokens: String?
        /// Istio's `cacerts` layout: `ca-cert.pem`, `ca-key.pem`, `root-cert.pem`, optional `cert-chain.pem`.
        public var caDirectory: String?
        public var maxCertificateLifetime: Duration = .seconds(86_400)
        /// DNS names in the control plane's serving certificate (what agents dial).
        public var serverNames = ["sluice-control", "localhost"]
        public init() {}
    }

    public struct StartError: Error, CustomStringConvertible {
        public let description: String
    }

    let server: ControlServer
    public let service: CAService
    public let port: Int
    public let mesh: MeshState
    let apiServer: APIServer?
    /// The agents' streams.
    public let hub: AgentHub
    let streamServer: GRPCServer<HTTP2ServerTransport.Posix>
    public let streamPort: Int
    /// The config API's bound port (0 when it is not served).
    public let apiPort: Int

    public init(options o: Options, logger: Logger) throws {
        let fm = FileManager.default
        try fm.createDirectory(atPath: o.stateDirectory, withIntermediateDirectories: true,
                               attributes: [.posixPermissions: 0o700])
        func read(_ path: String) throws -> String {
            do { return try String(contentsOfFile: path, encoding: .utf8) } catch {
                throw StartError(description: "cannot read \(path): \(error.localizedDescription)")
            }
        }
        func write(_ text: String, _ path: String, mode: Int) throws {
            guard fm.createFile(atPath: path, contents: Data(text.utf8), attributes: [.posixPermissions: mode]) else {
                throw StartError(description: "cannot write \(path)")
            }
        }
        let auditLogger = logger
        let audit: @Sendable (AuditRecord) -> Void = { r in
            auditLogger.info("audit", metadata: ["requester": "\(r.requester)", "identity": "\(r.identity)",
                                                 "granted": "\(r.granted)", "detail": "\(r.detail)"])
        }
        let ca: CertificateAuthority
        let rootFile: String
        if let dir = o.caDirectory {
            let chainPath = "\(dir)/cert-chain.pem"
            let chain = fm.fileExists(atPath: chainPath) ? [try read(chainPath)] : []
            ca = try CertificateAuthority(trustDomain: o.trustDomain, certificatePEM: try read("\(dir)/ca-cert.pem"),
                                          keyPEM: try read("\(dir)/ca-key.pem"), chainPEM: chain,
                                          rootPEM: [try read("\(dir)/root-cert.pem")],
                                          maxLifetime: o.maxCertificateLifetime, audit: audit)
            rootFile = "\(dir)/root-cert.pem"
        } else {
            // The embedded CA: a root made once and kept, so restarts do not change what the mesh trusts.
            let cert = "\(o.stateDirectory)/root-cert.pem", key = "\(o.stateDirectory)/root-key.pem"
            if !fm.fileExists(atPath: cert) {
                let root = try CertificateAuthority.newRoot(trustDomain: o.trustDomain)
                try write(root.keyPEM, key, mode: 0o600)
                try write(root.certificatePEM, cert, mode: 0o644)
                logger.info("generated a root CA", metadata: ["certificate": "\(cert)"])
            }
            ca = try CertificateAuthority(trustDomain: o.trustDomain, certificatePEM: try read(cert),
                                          keyPEM: try read(key), rootPEM: [try read(cert)],
                                          maxLifetime: o.maxCertificateLifetime, audit: audit)
            rootFile = cert
        }
        var tokens: [String: String] = [:]
        if let path = o.joinTokens {
            for (n, line) in try read(path).split(separator: "\n").enumerated() {
                let parts = line.split(separator: " ", omittingEmptySubsequences: true)
                if parts.isEmpty || parts[0].hasPrefix("#") { continue }
                guard parts.count == 2 else {
                    throw StartError(description: "\(path):\(n + 1): expected 'TOKEN NODE'")
                }
                tokens[String(parts[0])] = String(parts[1])
            }
        }
        let store: any ConfigStore
        do {
            store = try SQLiteStore(url: o.store ?? "sqlite:\(o.stateDirectory)/mesh.db")
            mesh = try MeshState(store: store)
        } catch {
            throw StartError(description: "\(error)")
        }
        if let config = o.config { try Self.seed(mesh, from: config, logger: logger) }
        let hosted = CAService.hostedIdentities(mesh.compiler)
        let deleted: DeletedNodes
        do { deleted = try DeletedNodes(path: "\(o.stateDirectory)/deleted-nodes") } catch {
            throw StartError(description: "cannot read \(o.stateDirectory)/deleted-nodes: \(error)")
        }
        service = CAService(ca: ca, joinTokens: tokens, hostedIdentities: hosted, defaultLifetime: o.maxCertificateLifetime,
                            deletedNodes: deleted)
        // Grants follow the stored mesh: a write that moves a workload re-reads which node hosts which identity.
        mesh.observe { [service] _, delta, compiler in
            // Only the nodes whose workloads the write changed (recomputing every node's would make each write cost
            // as much as the mesh is large).
            var moved: [String: Set<String>] = [:]
            for d in delta.nodes where d.upserted.contains(where: { if case .workload = $0 { true } else { false } })
                || d.removed.contains(where: { $0.kind == .workload })
            {
                moved[d.node] = compiler.workloadIdentities(on: d.node)
            }
            if !moved.isEmpty { service.updateHosted(nodes: moved) }
        }

        // The control plane's own serving certificate, from its own CA.
        let key = WorkloadKey()
        let id = SPIFFEID(trustDomain: o.trustDomain, namespace: "sluice-system", serviceAccount: "control")
        // It lives a year (as istiod's own), whatever the workloads' cap: agents must reach the CA to renew.
        let serving = Duration.seconds(365 * 86_400)
        let issued = try ca.sign(requestPEM: try key.signingRequest(for: id), for: id, lifetime: serving,
                                 requester: "control", dnsNames: o.serverNames, cap: serving)
        let chainFile = "\(o.stateDirectory)/control.crt", keyFile = "\(o.stateDirectory)/control.key"
        try write(try key.privateKeyPEM, keyFile, mode: 0o600)
        try write(([issued.certificate] + issued.chain).joined(), chainFile, mode: 0o644)
        server = try ControlServer(service: service, certificateChain: chainFile, privateKey: keyFile, clientCA: rootFile)
        guard let colon = o.listen.lastIndex(of: ":"), let p = Int(o.listen[o.listen.index(after: colon)...]) else {
            throw StartError(description: "--listen '\(o.listen)' is not HOST:PORT")
        }
        port = try server.start(host: String(o.listen[..<colon]), port: p)

        var hubOptions = AgentHub.Options()
        hubOptions.trustDomain = o.trustDomain
        hubOptions.debounce = o.pushDebounce
        hubOptions.maxDelay = o.pushMaxDelay
        hubOptions.maxPending = o.pushMaxPending
        hubOptions.cleanupGrace = o.cleanupGrace
        hub = AgentHub(mesh: mesh, options: hubOptions, deletedNodes: deleted, logger: logger)
        (streamServer, streamPort) = try Self.serveStream(hub, at: o.stream, chain: chainFile, key: keyFile, root: rootFile,
                                                          logger: logger)

        if let address = o.api {
            var auth = try o.tokens.map(APIAuthenticator.init(file:)) ?? APIAuthenticator()
            let tokenFile = "\(o.stateDirectory)/admin-token"
            if !fm.fileExists(atPath: tokenFile) { try write(APIAuthenticator.newToken() + "\n", tokenFile, mode: 0o600) }
            let adminToken = try read(tokenFile).trimmingCharacters(in: .whitespacesAndNewlines)
            auth.add(adminToken, .init(name: "admin", role: .admin))
            let api = ConfigAPI(mesh: mesh, auth: auth, logger: logger, nodeStatus: { [hub] in hub.status },
                                configDump: { [hub] node in await hub.configDump(node: node) },
                                deleteNode: { [hub] node, requester in try hub.delete(node: node, requester: requester) })
            let apiServer = try APIServer(api: api, certificateChain: chainFile, privateKey: keyFile, clientCA: rootFile)
            guard let c = address.lastIndex(of: ":"), let ap = Int(address[address.index(after: c)...]) else {
                throw StartError(description: "--api '\(address)' is not HOST:PORT")
            }
            let host = String(address[..<c])
            do { apiPort = try apiServer.start(host: host, port: ap) } catch {
                throw StartError(description: "cannot serve the config API on \(address): \(error)")
            }
            self.apiServer = apiServer
            let reach = host == "0.0.0.0" || host == "::" || host.isEmpty ? "127.0.0.1" : host
            try write(Self.kubeconfig(server: "https://\(reach):\(apiPort)", rootPEM: try read(rootFile), token: adminToken),
                      "\(o.stateDirectory)/admin.kubeconfig", mode: 0o600)
        } else {
            apiServer = nil
            apiPort = 0
        }
        logger.info("control plane ready", metadata: ["listen": "\(o.listen)", "port": "\(port)", "api_port": "\(apiPort)",
                                                      "stream_port": "\(streamPort)",
                                                      "store": "\(store.location)", "revision": "\(mesh.revision)",
                                                      "objects": "\(mesh.count)",
                                                      "trust_domain": "\(o.trustDomain)", "nodes": "\(hosted.count)"])
    }

    public func stop() {
        streamServer.beginGracefulShutdown()
        apiServer?.shutdown()
        server.shutdown()
    }

    /// Starts the agent stream's gRPC server (mutual TLS: a client must present a certificate of the mesh) and waits
    /// until it listens.
    static func serveStream(_ hub: AgentHub, at address: String, chain: String, key: String, root: String,
                            logger: Logger) throws -> (GRPCServer<HTTP2ServerTransport.Posix>, Int)
    {
        guard let c = address.lastIndex(of: ":"), let p = Int(address[address.index(after: c)...]) else {
            throw StartError(description: "--stream '\(address)' is not HOST:PORT")
        }
        let host = String(address[..<c])
        var config = HTTP2ServerTransport.Posix.Config.defaults
        // Broken connections are found by pings, not left to TCP's hours-long timeouts.
        config.connection.keepalive.time = .seconds(30)
        config.connection.keepalive.timeout = .seconds(10)
        config.connection.keepalive.clientBehavior.allowWithoutCalls = true
        config.connection.keepalive.clientBehavior.minPingIntervalWithoutCalls = .seconds(10)
        config.rpc.maxRequestPayloadSize = Wire.maxAgentMessageBytes
        let transport = HTTP2ServerTransport.Posix(
            address: .ipv4(host: host.isEmpty ? "0.0.0.0" : host, port: p),
            transportSecurity: .mTLS(certificateChain: [.file(path: chain, format: .pem)],
                                     privateKey: .file(path: key, format: .pem)) { tls in
                tls.trustRoots = .certificates([.file(path: root, format: .pem)])
                tls.clientCertificateVerification = .noHostnameVerification
            },
            config: config)
        let server = GRPCServer(transport: transport, services: [hub])
        Task {
            do { try await server.serve() } catch { logger.error("the agent stream server stopped: \(error)") }
        }
        let bound = Mutex<Result<Int, any Error>?>(nil)
        let done = DispatchSemaphore(value: 0)
        Task {
            do {
                let a = try await transport.listeningAddress
                bound.withLock { $0 = .success(a.ipv4?.port ?? p) }
            } catch {
                bound.withLock { $0 = .failure(error) }
            }
            done.signal()
        }
        done.wait()
        switch bound.withLock({ $0 })! {
        case .success(let port): return (server, port)
        case .failure(let e): throw StartError(description: "cannot serve the agent stream on \(address): \(e)")
        }
    }

    /// A kubeconfig for the admin: kubectl and `sluice` reach the API with it and no other set-up.
    static func kubeconfig(server: String, rootPEM: String, token: String) -> String {
        """
        apiVersion: v1
        kind: Config
        clusters:
        - name: sluice
          cluster:
            server: \(server)
            certificate-authority-data: \(Data(rootPEM.utf8).base64EncodedString())
            tls-server-name: sluice-control
        users:
        - name: admin
          user:
            token: \(token)
        contexts:
        - name: sluice
          context:
            cluster: sluice
            user: admin
            namespace: default
        current-context: sluice

        """
    }

    /// Applies the YAML under `path` to the store (`--config`): objects missing are created, objects that differ
    /// replaced; the rest of the store is left as it is. The whole directory must validate first.
    static func seed(_ mesh: MeshState, from path: String, logger: Logger) throws {
        let loaded = ConfigLoader.load(path: path)
        guard loaded.errors.isEmpty else {
            throw StartError(description: loaded.errors.map(\.description).joined(separator: "\n"))
        }
        var objects: [JSONValue] = []
        for file in ConfigLoader.files(at: path) ?? [] {
            let text = (try? String(contentsOfFile: file, encoding: .utf8)) ?? ""
            do { objects += try JSONValue.documents(yaml: text) } catch {
                throw StartError(description: "\(file): \(error.message)")
            }
        }
        var changed = 0
        for o in APIObjects.dependencyOrder(objects) {
            guard let (resource, version) = APIObjects.resource(of: o) else { continue }
            let ns = o["metadata"]?["namespace"]?.stringValue ?? "default"
            let name = o["metadata"]?["name"]?.stringValue ?? ""
            let key = StoreKey(group: resource.group, resource: resource.plural, namespace: ns, name: name)
            do {
                let r = try mesh.write(key, resource, version: version) { _ in o }
                if r.changed { changed += 1 }
            } catch {
                throw StartError(description: "\(path): \(resource.kind) \(ns)/\(name): \(error.message)")
            }
        }
        logger.info("seeded the store", metadata: ["config": "\(path)", "objects": "\(objects.count)", "changed": "\(changed)"])
    }
}
