import Foundation
import Logging
import SluiceIdentity
import SluiceModel

/// `sluice control` as it stands: the mesh CA served on 15012. Reads the mesh configuration to know which
/// workload identities each node hosts; keeps its root (or uses a plug-in CA) and its serving certificate in
/// the state directory.
public final class ControlPlane: Sendable {
    public struct Options: Sendable {
        public var trustDomain = "cluster.local"
        public var listen = "0.0.0.0:15012"
        public var stateDirectory = "/var/lib/sluice-control"
        /// Mesh configuration (Istio YAML), for node -> workload identities.
        public var config: String?
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
        var hosted: [String: Set<String>] = [:]
        if let config = o.config {
            let loaded = ConfigLoader.load(path: config)
            guard loaded.errors.isEmpty else {
                throw StartError(description: loaded.errors.map(\.description).joined(separator: "\n"))
            }
            hosted = CAService.hostedIdentities(try MeshCompiler(loaded.resources))
        }
        service = CAService(ca: ca, joinTokens: tokens, hostedIdentities: hosted, defaultLifetime: o.maxCertificateLifetime)

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
        logger.info("control plane ready", metadata: ["listen": "\(o.listen)", "port": "\(port)",
                                                      "trust_domain": "\(o.trustDomain)", "nodes": "\(hosted.count)"])
    }

    public func stop() { server.shutdown() }
}
