import Foundation
import GRPCCore
import GRPCNIOTransportHTTP2
import Logging
import SluiceModel
import SluiceProtocol
import Synchronization

/// The agent's side of the agent stream: holds one gRPC stream to `sluice control`, applies each pushed delta with
/// `apply` (the same path as a local reload), ACKs or NACKs it, and keeps the last accepted snapshot on disk so that
/// the next start serves it while the control plane is unreachable. Reconnects with backoff, naming what it holds so
/// that only what changed is sent again.
final class ControlStream: Sendable {
    struct Options: Sendable {
        var host: String
        var port: Int
        var serverName: String
        var rootCA: String
        /// The node certificate and key (written by the CertificateManager after the join).
        var chain: String
        var key: String
        var node: String
        /// `STATE_DIR/snapshot.json`.
        var snapshotFile: String
        var agentVersion: String
        /// WorkloadEntry YAML of this host's workloads (`--workloads`): registered over the stream.
        var workloadsDirectory: String?
    }

    /// What an accepted snapshot left: the warnings to report. A refusal throws its reason.
    typealias Apply = @Sendable (NodeSnapshot) -> Result<[String], ApplyError>
    struct ApplyError: Error { let message: String }

    struct Held: Sendable {
        var snapshot: NodeSnapshot
        var version: Int64
    }

    let options: Options
    let logger: Logger
    let apply: Apply
    /// What the agent reports for `sluice status`: its nearest certificate expiry.
    let nearestExpiry: @Sendable () -> Date?
    /// What the agent serves now (an `AgentConfigDump` as JSON), for `sluice proxy-config`.
    let dump: @Sendable (_ version: Int64) -> Data
    let held: Mutex<Held>
    let stopped = Atomic<Bool>(false)
    /// Deltas applied and refused since start, and whether the stream is up (for metrics and tests).
    let accepted = Atomic<Int>(0)
    let refused = Atomic<Int>(0)
    let connected = Atomic<Bool>(false)
    private let task = Mutex<Task<Void, Never>?>(nil)

    init(options: Options, holding snapshot: NodeSnapshot, version: Int64, logger: Logger,
         nearestExpiry: @escaping @Sendable () -> Date?, dump: @escaping @Sendable (_ version: Int64) -> Data,
         apply: @escaping Apply) {
        self.options = options
        self.logger = logger
        self.apply = apply
        self.nearestExpiry = nearestExpiry
        self.dump = dump
        held = Mutex(Held(snapshot: snapshot, version: version))
    }

    /// The snapshot persisted by a previous run, if any (and its version).
    static func loadPersisted(_ path: String) -> (NodeSnapshot, Int64)? {
        guard let data = FileManager.default.contents(atPath: path) else { return nil }
        struct File: Decodable { var version: Int64; var snapshot: NodeSnapshot }
        guard let f = try? JSONDecoder().decode(File.self, from: data) else { return nil }
        return (f.snapshot, f.version)
    }

    private func persist(_ h: Held) {
        struct File: Encodable { var version: Int64; var snapshot: NodeSnapshot }
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.sortedKeys, .withoutEscapingSlashes]
        guard let data = try? encoder.encode(File(version: h.version, snapshot: h.snapshot)) else { return }
        // Written aside and renamed: a crash leaves the old file or the new one, never half of one.
        let tmp = options.snapshotFile + ".tmp"
        if FileManager.default.createFile(atPath: tmp, contents: data, attributes: [.posixPermissions: 0o600]),
            rename(tmp, options.snapshotFile) == 0
        {
            return
        }
        logger.warning("cannot persist the snapshot", metadata: ["file": "\(options.snapshotFile)"])
    }

    func start() {
        task.withLock { $0 = Task { await self.run() } }
    }

    func stop() {
        stopped.store(true, ordering: .relaxed)
        task.withLock { $0?.cancel() }
    }

    private func run() async {
        var failures = 0
        while !stopped.load(ordering: .relaxed) && !Task.isCancelled {
            // The node certificate comes from the join, on the certificate thread.
            guard FileManager.default.fileExists(atPath: options.chain), FileManager.default.fileExists(atPath: options.key)
            else {
                try? await Task.sleep(for: .milliseconds(200))
                continue
            }
            let started = ContinuousClock.now
            do {
                try await session()
            } catch {
                if stopped.load(ordering: .relaxed) || Task.isCancelled { break }
                logger.warning("agent stream to the control plane ended; still serving the last snapshot",
                               metadata: ["control": "\(options.host):\(options.port)", "error": "\(error)"])
            }
            connected.store(false, ordering: .relaxed)
            failures = ContinuousClock.now - started > .seconds(30) ? 1 : failures + 1
            // Exponential backoff with jitter, capped at 15 s: a restarted control plane is not hit by every agent at once.
            let cap = min(15_000, 250 << min(failures, 6))
            try? await Task.sleep(for: .milliseconds(Int.random(in: cap / 2...cap)))
        }
    }

    private func session() async throws {
        var config = HTTP2ClientTransport.Posix.Config.defaults
        config.http2.authority = options.serverName
        config.connection.keepalive = .init(time: .seconds(30), timeout: .seconds(10), allowWithoutCalls: true)
        let transport = try HTTP2ClientTransport.Posix(
            target: .ipv4(address: options.host, port: options.port),
            transportSecurity: .mTLS(certificateChain: [.file(path: options.chain, format: .pem)],
                                     privateKey: .file(path: options.key, format: .pem)) { tls in
                tls.trustRoots = .certificates([.file(path: options.rootCA, format: .pem)])
                tls.serverCertificateVerification = .fullVerification
            },
            config: config)
        try await withGRPCClient(transport: transport) { client in
            let stub = Sluice_V1_AgentStream.Client(wrapping: client)
            let (outbound, send) = AsyncStream.makeStream(of: Sluice_V1_AgentMessage.self)
            send.yield(hello())
            // The host's workloads, now and whenever the directory changes.
            let registering = options.workloadsDirectory.map { dir in
                Task {
                    var last: [String]?
                    while !Task.isCancelled {
                        let now = ConfigLoader.fingerprint(dir)
                        if now != last {
                            last = now
                            send.yield(self.registration(dir))
                        }
                        try? await Task.sleep(for: .seconds(1))
                    }
                }
            }
            // The status report, now and then (and after every delta).
            let reporting = Task {
                while !Task.isCancelled {
                    try? await Task.sleep(for: .seconds(30))
                    send.yield(self.report())
                }
            }
            defer {
                registering?.cancel()
                reporting.cancel()
            }
            // A full snapshot of a node that reaches much of a large mesh is far past gRPC's 4 MiB default; the
            // transport applies `maxRequestMessageBytes` to what it receives.
            var call = CallOptions.defaults
            call.maxRequestMessageBytes = Wire.maxDeltaBytes
            call.maxResponseMessageBytes = Wire.maxDeltaBytes
            try await stub.stream(options: call, requestProducer: { writer in
                for await m in outbound { try await writer.write(m) }
            }, onResponse: { response in
                defer { send.finish() }
                for try await message in response.messages {
                    self.connected.store(true, ordering: .relaxed)
                    switch message.message {
                    case .delta(let delta):
                        send.yield(self.handle(delta))
                        send.yield(self.report())
                    case .configDumpRequest(let r):
                        var d = Sluice_V1_ConfigDump()
                        d.request = r.request
                        let version = self.held.withLock { $0.version }
                        d.version = UInt64(max(0, version))
                        d.snapshot = self.dump(version)
                        if d.snapshot.count > Wire.maxAgentMessageBytes - 1024 {
                            d.snapshot = Data(#"{"error":"the configuration is larger than the stream carries; read it from the agent's admin /config_dump"}"#.utf8)
                        }
                        var m = Sluice_V1_AgentMessage()
                        m.configDump = d
                        send.yield(m)
                    case .registrationResult(let r):
                        for e in r.errors { self.logger.error("workload registration refused: \(e)") }
                        if r.errors.isEmpty { self.logger.info("workloads registered") }
                    default: break
                    }
                }
            })
        }
    }

    /// Every WorkloadEntry under `dir`, as JSON; entries that do not validate are logged and left out.
    private func registration(_ dir: String) -> Sluice_V1_AgentMessage {
        var entries: [Data] = []
        for file in ConfigLoader.files(at: dir) ?? [] {
            guard let text = try? String(contentsOfFile: file, encoding: .utf8) else { continue }
            let (_, diagnostics) = ResourceDecoder.decode(text, file: file)
            let errors = diagnostics.filter { $0.severity == .error }
            if !errors.isEmpty {
                for e in errors { logger.error("\(e)") }
                logger.error("workload file not registered: it does not validate", metadata: ["file": "\(file)"])
                continue
            }
            for doc in (try? JSONValue.documents(yaml: text)) ?? [] where doc["kind"]?.stringValue == "WorkloadEntry" {
                entries.append(doc.data)
            }
        }
        var r = Sluice_V1_Registration()
        r.workloadEntries = entries
        var m = Sluice_V1_AgentMessage()
        m.registration = r
        return m
    }

    private func report() -> Sluice_V1_AgentMessage {
        var r = Sluice_V1_Report()
        r.workloads = UInt32(held.withLock { $0.snapshot.workloads.count })
        r.nearestCertificateExpiry = nearestExpiry().map { Int64($0.timeIntervalSince1970) } ?? 0
        var m = Sluice_V1_AgentMessage()
        m.report = r
        return m
    }

    private func hello() -> Sluice_V1_AgentMessage {
        let h = held.withLock { $0 }
        var hello = Sluice_V1_Hello()
        hello.node = options.node
        hello.agentVersion = options.agentVersion
        hello.version = UInt64(max(0, h.version))
        if h.version > 0 {
            let d = Wire.digests(h.snapshot)
            hello.items = d.items
            hello.meshDigest = d.mesh
        }
        var m = Sluice_V1_AgentMessage()
        m.hello = hello
        return m
    }

    /// Applies one delta and answers it: ACK when the agent serves it, NACK (with why) when it still serves the last
    /// good snapshot.
    private func handle(_ delta: Sluice_V1_Delta) -> Sluice_V1_AgentMessage {
        var ack = Sluice_V1_Ack()
        ack.nonce = delta.nonce
        ack.version = delta.version
        let current = held.withLock { $0.snapshot }
        do {
            let next = try current.applying(delta)
            switch apply(next) {
            case .success(let warnings):
                let h = Held(snapshot: next, version: Int64(delta.version))
                held.withLock { $0 = h }
                persist(h)
                ack.warnings = warnings
                accepted.add(1, ordering: .relaxed)
            case .failure(let e):
                ack.error = e.message
            }
        } catch {
            ack.error = error.description
        }
        if !ack.error.isEmpty {
            refused.add(1, ordering: .relaxed)
            logger.error("pushed configuration refused; still serving the last good one",
                         metadata: ["version": "\(delta.version)", "error": "\(ack.error)"])
        }
        var m = Sluice_V1_AgentMessage()
        m.ack = ack
        return m
    }

    var version: Int64 { held.withLock { $0.version } }
}
