import Foundation
import Logging
import SluiceIdentity
import SluiceProtocol
import SluiceRing
import SluiceTelemetry
import Synchronization

/// Istio's node agent, in the Sluice agent: joins the mesh once with a token (for a node certificate), then
/// keeps a certificate for every workload identity on this node — keys made here and never sent, files mode
/// 0600 under its directory, renewal at half the lifetime (with jitter), back-off while the control plane is
/// unreachable (the valid certificate stays in use), an alarm (log + metric) once less than a tenth is left.
///
/// Runs on a thread of its own (`sluice-certs`); the data plane reads the files.
public final class CertificateManager: @unchecked Sendable {
    public struct Options: Sendable {
        /// `sluice control`'s HOST:PORT and the name in its certificate.
        public var control: String
        public var serverName = "sluice-control"
        /// The mesh root (PEM file) the control plane's certificate must chain to.
        public var rootCA: String
        /// A file holding this node's one-time join token (needed until the node has a certificate).
        public var joinToken: String?
        public var node: String
        public var trustDomain: String
        /// Where certificates and keys are written (created 0700).
        public var directory: String

        public init(control: String, rootCA: String, joinToken: String?, node: String, trustDomain: String, directory: String) {
            self.control = control
            self.rootCA = rootCA
            self.joinToken = joinToken
            self.node = node
            self.trustDomain = trustDomain
            self.directory = directory
        }
    }

    struct Held {
        var schedule: RotationSchedule
        var alarmed = false
    }

    let options: Options
    let logger: Logger
    let client: CAClient
    private let wanted = Mutex<Set<String>>([])
    private let stopped = Atomic<Bool>(false)
    private var thread: pthread_t?
    private var held: [String: Held] = [:]
    /// Identities with no certificate yet: consecutive failures and when to try again.
    private var retry: [String: (failures: Int, at: Date)] = [:]
    private var rng = SystemRandomNumberGenerator()
    private let shard: MetricShard
    private let registry: MetricsRegistry
    private var expirySlots: [String: (slot: Int, value: Int64)] = [:]
    private let renewed: Int
    private let failed: Int

    /// Called on the certificate thread whenever the certificates on disk change (found at start, issued,
    /// renewed, removed): each workload identity's files, and the trust bundle peers must chain to.
    public var onChange: (@Sendable (_ files: [String: (chain: String, key: String)], _ trustBundle: String) -> Void)?
    private var changed = false

    public var nodeIdentity: String { "spiffe://\(options.trustDomain)/ns/sluice-nodes/sa/\(options.node)" }

    public init(options: Options, registry: MetricsRegistry, logger: Logger) throws {
        self.options = options
        self.logger = logger
        self.registry = registry
        client = CAClient(address: options.control, serverName: options.serverName, rootCA: options.rootCA)
        shard = registry.makeShard()
        renewed = registry.counter("sluice_certificate_renewals_total", help: "Certificates obtained from the CA",
                                   labels: [("result", "ok")])
        failed = registry.counter("sluice_certificate_renewals_total", help: "Certificates obtained from the CA",
                                  labels: [("result", "failed")])
        try FileManager.default.createDirectory(atPath: options.directory, withIntermediateDirectories: true,
                                                attributes: [.posixPermissions: 0o700])
    }

    /// The workload identities this node hosts now (from the snapshot); certificates follow.
    public func update(identities: [String]) { wanted.withLock { $0 = Set(identities) } }

    public func start() {
        thread = startThread(name: "sluice-certs") { [self] in
            while !stopped.load(ordering: .relaxed) {
                step(now: Date())
                usleep(200_000)
            }
        }
    }

    public func stop() {
        stopped.store(true, ordering: .relaxed)
        if let t = thread { pthread_join(t, nil) }
        thread = nil
    }

    /// The certificates this node holds and wants, read from disk (they are what its listeners and tunnels load),
    /// then the roots peers must chain to: what `sluice proxy-config NODE secrets` lists. No key leaves the node.
    public func secrets(now: Date = Date()) -> [AgentConfigDump.Secret] {
        var ids = wanted.withLock { $0 }
        ids.insert(nodeIdentity)
        var out: [AgentConfigDump.Secret] = ids.sorted().map { id in
            guard let pem = try? String(contentsOfFile: files(for: id).chain, encoding: .utf8),
                let info = try? CertificateInfo(pem: pem), info.uris.contains(id)
            else {
                return .init(name: id, type: "Cert Chain", status: "MISSING", valid: false, serialNumber: nil,
                             notBefore: nil, notAfter: nil)
            }
            return .init(name: id, type: "Cert Chain", status: "ACTIVE", valid: info.notBefore <= now && now < info.notAfter,
                         serialNumber: info.serialNumber, notBefore: info.notBefore, notAfter: info.notAfter)
        }
        let bundle = (try? String(contentsOfFile: trustBundle, encoding: .utf8)) ?? ""
        for block in bundle.components(separatedBy: "-----END CERTIFICATE-----").dropLast() {
            guard let info = try? CertificateInfo(pem: block + "-----END CERTIFICATE-----") else { continue }
            out.append(.init(name: "ROOTCA", type: "CA", status: "ACTIVE", valid: info.notBefore <= now && now < info.notAfter,
                             serialNumber: info.serialNumber, notBefore: info.notBefore, notAfter: info.notAfter))
        }
        return out
    }

    /// File paths of an identity's certificate chain and key.
    public func files(for identity: String) -> (chain: String, key: String) {
        let name = identity == nodeIdentity ? "node"
            : SPIFFEID(identity).map { "\($0.namespace)_\($0.serviceAccount)" } ?? "unknown"
        return ("\(options.directory)/\(name).crt", "\(options.directory)/\(name).key")
    }

    func step(now: Date) {
        // The node certificate first: every other request is authenticated with it.
        ensure(nodeIdentity, now: now)
        guard held[nodeIdentity].map({ !$0.schedule.isExpired(now) }) == true else { return }
        let want = wanted.withLock { $0 }
        for id in want.sorted() { ensure(id, now: now) }
        for id in held.keys where id != nodeIdentity && !want.contains(id) {
            held[id] = nil
            changed = true
            let f = files(for: id)
            try? FileManager.default.removeItem(atPath: f.chain)
            try? FileManager.default.removeItem(atPath: f.key)
        }
        updateMetrics(now: now)
        if changed, let onChange {
            changed = false
            var current: [String: (chain: String, key: String)] = [:]
            for id in held.keys where id != nodeIdentity { current[id] = files(for: id) }
            onChange(current, trustBundle)
        }
    }

    /// The roots the CA last sent (they may be several while the root rotates), else the configured root.
    public var trustBundle: String {
        let received = "\(options.directory)/root-cert.pem"
        return FileManager.default.fileExists(atPath: received) ? received : options.rootCA
    }

    private func ensure(_ id: String, now: Date) {
        if held[id] == nil {
            // Waiting out a back-off: neither the disk nor the CA is asked again before it is over.
            if let r = retry[id], now < r.at { return }
            if let loaded = load(id, now: now) {
                held[id] = loaded
                changed = true
            }
        }
        if let h = held[id] {
            if h.schedule.isNearExpiry(now) && !h.alarmed {
                held[id]!.alarmed = true
                logger.warning("certificate close to expiry and not yet renewed",
                               metadata: ["identity": "\(id)", "not_after": "\(h.schedule.notAfter)"])
            }
            guard h.schedule.isDue(now) else { return }
        }
        do {
            let (chain, key, info) = try obtain(id)
            try write(chain: chain, key: key, for: id)
            held[id] = Held(schedule: RotationSchedule(notBefore: now, notAfter: info.notAfter, random: .random(in: 0..<1, using: &rng)))
            retry[id] = nil
            changed = true
            shard.add(renewed)
            logger.info("certificate issued", metadata: ["identity": "\(id)", "not_after": "\(info.notAfter)"])
        } catch {
            shard.add(failed)
            if held[id] != nil {
                held[id]!.schedule.failed(at: now)
                logger.warning("renewal failed; the current certificate stays in use",
                               metadata: ["identity": "\(id)", "error": "\(error)", "retry_at": "\(held[id]!.schedule.nextAttempt)"])
            } else {
                let failures = (retry[id]?.failures ?? 0) + 1
                retry[id] = (failures, now.addingTimeInterval(RotationSchedule.backOff(failures: failures)))
                logger.warning("no certificate yet", metadata: ["identity": "\(id)", "error": "\(error)"])
            }
        }
    }

    /// A certificate still valid on disk (from before a restart).
    private func load(_ id: String, now: Date) -> Held? {
        let f = files(for: id)
        guard let pem = try? String(contentsOfFile: f.chain, encoding: .utf8), FileManager.default.fileExists(atPath: f.key),
            let info = try? CertificateInfo(pem: pem), info.uris.contains(id), info.notAfter > now
        else { return nil }
        return Held(schedule: RotationSchedule(notBefore: info.notBefore, notAfter: info.notAfter,
                                               random: .random(in: 0..<1, using: &rng)))
    }

    /// Asks the CA for a certificate for `id` with a fresh key.
    private func obtain(_ id: String) throws -> (chain: String, key: String, info: CertificateInfo) {
        guard let spiffe = SPIFFEID(id) else { throw CAClient.Failure(description: "'\(id)' is not a SPIFFE identity") }
        let key = WorkloadKey()
        let csr = try key.signingRequest(for: spiffe)
        let status: Int, answer: [String: Any]
        var client = self.client
        client.rootCA = trustBundle
        if id == nodeIdentity && held[id] == nil {
            guard let path = options.joinToken,
                let token = try? String(contentsOfFile: path, encoding: .utf8).trimmingCharacters(in: .whitespacesAndNewlines)
            else { throw CAClient.Failure(description: "this node has no certificate and no --join-token to get one") }
            (status, answer) = try client.post("/v1/join", ["token": token, "node": options.node, "csr": csr])
        } else {
            let node = files(for: nodeIdentity)
            (status, answer) = try client.post("/v1/certificates", ["identity": id, "csr": csr], clientCertificate: (node.chain, node.key))
        }
        guard status == 200, let chain = answer["certificateChain"] as? [String], let leaf = chain.first else {
            throw CAClient.Failure(description: "the CA answered \(status): \(answer["error"] ?? "")")
        }
        let info = try CertificateInfo(pem: leaf)
        guard info.uris == [id] else { throw CAClient.Failure(description: "the CA returned a certificate for \(info.uris)") }
        if let bundle = answer["trustBundle"] as? [String] {
            try? write(bundle.joined(), to: "\(options.directory)/root-cert.pem", mode: 0o644)
        }
        return (chain.joined(), try key.privateKeyPEM, info)
    }

    private func write(chain: String, key: String, for id: String) throws {
        let f = files(for: id)
        // Key first, then the certificate: a reader that sees the new certificate finds its key.
        try write(key, to: f.key, mode: 0o600)
        try write(chain, to: f.chain, mode: 0o600)
    }

    /// Writes atomically (temporary file, then rename) with `mode`.
    private func write(_ text: String, to path: String, mode: Int) throws {
        let tmp = path + ".tmp"
        guard FileManager.default.createFile(atPath: tmp, contents: Data(text.utf8), attributes: [.posixPermissions: mode]),
            rename(tmp, path) == 0
        else { throw CAClient.Failure(description: "cannot write \(path)") }
    }

    /// The nearest expiry among the certificates held (for `sluice status`); read from any thread.
    public var nearestExpiry: Date? { nearest.withLock { $0 } }
    private let nearest = Mutex<Date?>(nil)

    private func updateMetrics(now: Date) {
        nearest.withLock { $0 = held.values.map(\.schedule.notAfter).min() }
        for (id, h) in held {
            let seconds = Int64(h.schedule.notAfter.timeIntervalSince(now))
            if expirySlots[id] == nil {
                expirySlots[id] = (registry.gauge("sluice_certificate_expiry_seconds",
                                                  help: "Seconds until the certificate of an identity expires",
                                                  labels: [("identity", id)]), 0)
            }
            let (slot, last) = expirySlots[id]!
            shard.addSigned(slot, seconds - last)
            expirySlots[id]!.value = seconds
        }
    }
}
