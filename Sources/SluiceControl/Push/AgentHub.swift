import Foundation
import GRPCCore
import GRPCNIOTransportHTTP2
import Logging
import SluiceModel
import SluiceProtocol
import Synchronization
import X509

/// The agent stream's server side (Pilot's push): one session per connected node, fed by the mesh's per-node deltas.
///
/// - A session starts from what the agent says it holds (a digest per item, as Delta xDS's
///   `initial_resource_versions`): only items that differ are sent, so a reconnect after a control-plane restart
///   resumes rather than resyncs.
/// - Changes are merged per item while a delta is being applied by the agent (one delta in flight per session). A
///   change after a quiet spell leaves at once; changes that follow within `debounce` of the last delta leave together
///   `debounce` after it: one delta per `debounce` at most under a stream of changes, none held back otherwise.
/// - Each session sends from its own task: a slow or stalled agent holds only its own. What it has not received is
///   bounded (`maxPending` items); beyond that it is dropped and the agent gets a full resync when it catches up.
public final class AgentHub: Sluice_V1_AgentStream.SimpleServiceProtocol, Sendable {
    public struct Options: Sendable {
        public var debounce: Duration = .milliseconds(100)
        public var maxDelay: Duration = .seconds(1)
        public var maxPending = 20_000
        /// The trust domain node certificates must carry.
        public var trustDomain = "cluster.local"
        /// How long a node may be offline before the workloads it registered are removed (Istio's
        /// `cleanupGracePeriod`).
        public var cleanupGrace: Duration = .seconds(10)
        public init() {}
    }

    let mesh: MeshState
    let options: Options
    let logger: Logger
    let sessions = Mutex<[String: Session]>([:])
    let nextSession = Atomic<Int>(0)
    let registrar: Registrar
    /// Nodes an operator deleted: their streams are refused until they join again.
    let deleted: DeletedNodes

    public init(mesh: MeshState, options: Options = Options(), deletedNodes: DeletedNodes = DeletedNodes(), logger: Logger) {
        self.mesh = mesh
        self.options = options
        self.logger = logger
        deleted = deletedNodes
        registrar = Registrar(mesh: mesh, grace: options.cleanupGrace, deleted: deletedNodes, logger: logger)
        // Runs while writes are held, in revision order: only merges into the sessions' pending sets.
        mesh.observe { [weak self] revision, delta, _ in
            guard let self else { return }
            self.sessions.withLock { all in
                for d in delta.nodes { all[d.node]?.merge(revision, d, limit: self.options.maxPending) }
            }
        }
        // Nodes that registered workloads before a restart have their grace from now to come back.
        for node in registrar.owners { registrar.disconnected(node) }
    }

    // MARK: - status

    /// What `sluice status` shows of one node.
    public struct NodeStatus: Sendable, Codable {
        public enum Sync: String, Sendable, Codable { case synced = "SYNCED", stale = "STALE", nacked = "NACKED" }
        public var node: String
        public var agentVersion: String
        public var connectedSince: Date
        /// The mesh revision of the last delta sent, and of the last one the agent accepted.
        public var sent: Int64
        public var acked: Int64
        public var sync: Sync
        public var error: String?
        public var warnings: [String]
        public var workloads: Int
        public var nearestCertificateExpiry: Date?
    }

    public var status: [NodeStatus] {
        sessions.withLock { Array($0.values) }.map(\.status).sorted { $0.node < $1.node }
    }

    public var connectedNodes: [String] { sessions.withLock { $0.keys.sorted() } }

    public enum ConfigDumpResult: Sendable {
        /// The agent's answer: an `AgentConfigDump` as JSON.
        case dump(Data)
        case notConnected
        case timedOut
    }

    /// What `node`'s agent serves now, asked over its stream (`sluice proxy-config`).
    public func configDump(node: String, timeout: Duration = .seconds(5)) async -> ConfigDumpResult {
        guard let session = sessions.withLock({ $0[node] }) else { return .notConnected }
        guard let d = await session.configDump(timeout: timeout) else {
            return sessions.withLock({ $0[node] }) == nil ? .notConnected : .timedOut
        }
        return .dump(d.snapshot)
    }

    // MARK: - deleting a node

    public struct NodeDeletion: Sendable {
        public var wasConnected: Bool
        /// The WorkloadEntries the node had registered, removed with it.
        public var removedWorkloads: Int
    }

    /// `sluice delete node NAME` (as `kubectl delete node`): the workloads the node registered go at once, its stream
    /// ends, and its certificate opens no stream and renews nothing until it joins again with a new join token. What
    /// the stored mesh itself places on the node stays (an operator wrote it). Nil when the node is unknown: no agent
    /// connected, nothing registered or placed on it, or deleted already.
    public func delete(node: String, requester: String) throws -> NodeDeletion? {
        let known = sessions.withLock { $0[node] != nil } || registrar.hasRegistered(node) || mesh.compiler.knows(node: node)
        // Marked first: a stream opening from now on is refused (`open` checks with the sessions held). Of two
        // deletions at once, the one that marks it does the rest.
        guard known, try deleted.insert(node) else { return nil }
        let session = sessions.withLock { $0.removeValue(forKey: node) }
        session?.end()
        let removed = registrar.remove(node: node, requester: requester)
        mesh.withCompiler { compiler, _ in compiler.unregister(node: node) }
        return NodeDeletion(wasConnected: session != nil, removedWorkloads: removed)
    }

    static func deletedError(_ node: String) -> RPCError {
        RPCError(code: .permissionDenied, message: "node \(node) was deleted: join it again with a new join token")
    }

    // MARK: - the stream

    public func stream(request: RPCAsyncSequence<Sluice_V1_AgentMessage, any Error>,
                       response: RPCWriter<Sluice_V1_ControlMessage>, context: ServerContext) async throws
    {
        let node = try authenticatedNode(context)
        var messages = request.makeAsyncIterator()
        guard let first = try await messages.next(), case .hello(let hello)? = first.message else {
            throw RPCError(code: .invalidArgument, message: "the first message of the stream must be a Hello")
        }
        guard hello.node == node else {
            throw RPCError(code: .permissionDenied,
                           message: "the certificate is node \(node)'s; it cannot speak for '\(hello.node)'")
        }
        guard let session = open(node: node, hello: hello) else { throw Self.deletedError(node) }
        logger.info("agent connected", metadata: ["node": "\(node)", "agent_version": "\(hello.agentVersion)",
                                                  "holds": "\(hello.version)", "peer": "\(context.remotePeer)"])
        defer {
            close(session)
            logger.info("agent disconnected", metadata: ["node": "\(node)"])
        }
        let reader = Handover(messages)
        try await withThrowingTaskGroup(of: Void.self) { group in
            group.addTask { try await self.send(session, to: response) }
            group.addTask {
                while let m = try await reader.iterator.next() {
                    if case .registration(let r)? = m.message {
                        self.registrationArrived(r.workloadEntries, on: session)
                    } else {
                        try session.received(m)
                    }
                }
            }
            // Whichever ends first (the agent hung up, a send failed, a bad message) ends the stream.
            try await group.next()
            group.cancelAll()
        }
        // Ended by a deletion: the agent is told why (and keeps serving what it has, as a deleted kubelet's pods run).
        if deleted.contains(node) { throw Self.deletedError(node) }
    }

    /// Each registration writes to the store, so a stream's are stored one at a time and at most one per
    /// `registrationInterval`; a newer one replaces one still waiting (the set the host runs now is all that counts).
    /// A node that floods its stream with registrations costs the store one set per interval and holds up no other.
    static let registrationInterval: Duration = .seconds(1)

    func registrationArrived(_ entries: [Data], on session: Session) {
        guard session.queueRegistration(entries) else { return }
        Task {
            while let next = session.nextRegistration() {
                // A node may not hold more than `Registrar.maxEntries` workloads, and the same set again (an agent that
                // repeats itself) costs nothing.
                if next.count > Registrar.maxEntries {
                    session.post(Self.result(["\(next.count) workloads registered at once; a node may register at most "
                                              + "\(Registrar.maxEntries)"]))
                } else if session.isNewRegistration(next) {
                    session.post(Self.result(registrar.register(node: session.node, entries: next)))
                } else {
                    continue
                }
                try? await Task.sleep(for: Self.registrationInterval)
            }
        }
    }

    /// The node named by the client certificate (the transport has verified it chains to the mesh root).
    func authenticatedNode(_ context: ServerContext) throws -> String {
        guard let posix = context.transportSpecific as? HTTP2ServerTransport.Posix.Context,
            let certificate = posix.peerCertificate
        else { throw RPCError(code: .unauthenticated, message: "a node certificate is required") }
        let uris = (try? certificate.extensions.subjectAlternativeNames)?.compactMap { name -> String? in
            if case .uniformResourceIdentifier(let u) = name { u } else { nil }
        } ?? []
        for uri in uris {
            if let (domain, node) = Wire.node(fromIdentity: uri), domain == options.trustDomain { return node }
        }
        throw RPCError(code: .permissionDenied, message: "the certificate (\(uris)) is not a node certificate of this mesh")
    }

    /// Registers the session and takes the node's snapshot in one step with the mesh held, so that every later
    /// change reaches the session's pending set and none before it does twice; the snapshot is compared with what
    /// the agent holds and encoded after the mesh is released (a reconnect storm must not hold writes, nor run on one
    /// core). Nil when the node was deleted.
    func open(node: String, hello: Sluice_V1_Hello) -> Session? {
        let session = Session(node: node, id: nextSession.add(1, ordering: .relaxed).newValue, hello: hello)
        let snapshot = mesh.withCompiler { compiler, revision -> NodeSnapshot? in
            guard !deleted.contains(node) else { return nil }
            compiler.register(node: node)
            let snapshot = compiler.snapshot(for: node)
            session.begin(at: revision)
            let (admitted, previous) = sessions.withLock { all -> (Bool, Session?) in
                // Checked again with the sessions held: a deletion marks the node before it takes them.
                guard !deleted.contains(node) else { return (false, nil) }
                defer { all[node] = session }
                return (true, all[node])
            }
            guard admitted else { return nil }
            previous?.end()
            return snapshot
        }
        guard let snapshot else { return nil }
        session.start(from: snapshot, agentHolds: hello)
        return session
    }

    func close(_ session: Session) {
        session.end()
        let wasCurrent = sessions.withLock { all in
            guard all[session.node] === session else { return false }
            all[session.node] = nil
            return true
        }
        if wasCurrent && registrar.hasRegistered(session.node) { registrar.disconnected(session.node) }
    }

    static func result(_ errors: [String]) -> Sluice_V1_ControlMessage {
        var r = Sluice_V1_RegistrationResult()
        r.errors = errors
        var m = Sluice_V1_ControlMessage()
        m.registrationResult = r
        return m
    }

    /// The session's sending loop: waits for changes, lets them settle, sends one delta, waits for its ACK.
    func send(_ session: Session, to response: RPCWriter<Sluice_V1_ControlMessage>) async throws {
        for await _ in session.wakes {
            drain: while true {
                switch session.next(debounce: options.debounce, maxDelay: options.maxDelay, now: .now) {
                case .closed: return
                case .idle: break drain
                case .wait(let d): try await Task.sleep(for: d)
                case .resync:
                    // The session fell too far behind: its whole snapshot, as of now (encoded with the mesh released;
                    // changes from here on are pending on top of it).
                    let (snapshot, revision) = mesh.withCompiler { compiler, revision in
                        session.beginResync(at: revision)
                        return (compiler.snapshot(for: session.node), revision)
                    }
                    try await response.write(session.resync(snapshot, revision: revision))
                case .send(let message), .post(let message):
                    try await response.write(message)
                }
            }
        }
    }
}

/// Moves the request iterator from the handler (which reads the Hello) to the task that reads the rest: one task
/// uses it at a time, which the compiler cannot see through the task group.
final class Handover<Iterator>: @unchecked Sendable {
    var iterator: Iterator
    init(_ iterator: Iterator) { self.iterator = iterator }
}

/// One connected agent: what it still has to receive, and what it last said.
final class Session: Sendable {
    let node: String
    let id: Int
    let agentVersion: String
    let connectedSince = Date()

    struct State {
        var upserts: [SnapshotItem.Key: SnapshotItem] = [:]
        /// Items of the first snapshot, encoded already (a later change of the same key replaces its entry here by
        /// one in `upserts` or `removals`).
        var encoded: [SnapshotItem.Key: Sluice_V1_Item] = [:]
        /// The first snapshot is being compared with what the agent holds: nothing is sent until it is.
        var starting = false
        var removals: Set<SnapshotItem.Key> = []
        var mesh: MeshConfig?
        /// The mesh revision the pending changes bring the node to.
        var version: Int64 = 0
        var firstChange: ContinuousClock.Instant?
        /// When the last delta left.
        var lastSent: ContinuousClock.Instant?
        /// Send without waiting for changes to settle (the first delta of a stream).
        var immediate = false
        var needsResync = false
        /// The agent refused a delta: it lacks what that delta carried, so the next push is a full snapshot (sent
        /// with the next change, not at once: the same snapshot would be refused again).
        var diverged = false
        var inFlight: (nonce: String, version: Int64)?
        var nonces = 0
        var sent: Int64 = 0
        var acked: Int64 = 0
        var error: String?
        var warnings: [String] = []
        var workloads = 0
        var nearestExpiry: Date?
        var ended = false
        /// Answers to send besides deltas (registration results, config dump requests).
        var outbox: [Sluice_V1_ControlMessage] = []
        /// Config dumps asked of the agent and not answered yet, by request number.
        var dumps: [UInt64: CheckedContinuation<Sluice_V1_ConfigDump?, Never>] = [:]
        var nextDump: UInt64 = 0
    }

    let state = Mutex(State())
    /// The last set of WorkloadEntries the agent registered on this stream.
    private let registration = Mutex<[Data]?>(nil)

    /// The registration waiting to be stored, and whether a task is storing this stream's registrations.
    private let queued = Mutex<(latest: [Data]?, draining: Bool)>((nil, false))

    /// Keeps `entries` as the one to store next (replacing one still waiting); true when the caller must start the
    /// task that stores them.
    func queueRegistration(_ entries: [Data]) -> Bool {
        queued.withLock { q in
            q.latest = entries
            defer { q.draining = true }
            return !q.draining
        }
    }

    /// The registration to store next; nil (and the storing task ends) when none waits.
    func nextRegistration() -> [Data]? {
        queued.withLock { q in
            guard let next = q.latest else {
                q.draining = false
                return nil
            }
            q.latest = nil
            return next
        }
    }

    /// Records `entries` as the agent's latest registration; false when it is the one it sent before.
    func isNewRegistration(_ entries: [Data]) -> Bool {
        registration.withLock { last in
            defer { last = entries }
            return last != entries
        }
    }
    let wakes: AsyncStream<Void>
    let wake: AsyncStream<Void>.Continuation

    init(node: String, id: Int, hello: Sluice_V1_Hello) {
        self.node = node
        self.id = id
        agentVersion = hello.agentVersion
        (wakes, wake) = AsyncStream.makeStream(of: Void.self, bufferingPolicy: .bufferingNewest(1))
    }

    /// The session's first snapshot is taken as of `revision` (called with the mesh held): changes after it are
    /// merged as they come, and nothing is sent until `start` has compared the snapshot with what the agent holds.
    func begin(at revision: Int64) {
        state.withLock { s in
            s.version = revision
            s.starting = true
        }
    }

    /// The first delta: every item of `snapshot` the agent does not hold as it is, and the removal of every item it
    /// holds that `snapshot` lacks — except where a change merged since `begin` says newer. Each item is encoded once
    /// here, for its digest and for the wire.
    func start(from snapshot: NodeSnapshot, agentHolds hello: Sluice_V1_Hello) {
        var differing: [SnapshotItem.Key: Sluice_V1_Item] = [:]
        var names = Set(hello.items.keys)
        for item in snapshot.items {
            let name = Wire.name(item.key)
            names.remove(name)
            let wire = Sluice_V1_Item(item)
            if hello.items[name] != wire.digest { differing[item.key] = wire }
        }
        let meshChanged = Wire.digest(Wire.meshJSON(snapshot.mesh)) != hello.meshDigest
        state.withLock { s in
            s.starting = false
            s.immediate = true
            s.workloads = snapshot.workloads.count
            // A resync pending already carries everything.
            guard !s.needsResync else { return }
            for (key, wire) in differing where s.upserts[key] == nil && !s.removals.contains(key) { s.encoded[key] = wire }
            for name in names {
                if let key = Wire.key(name), s.upserts[key] == nil { s.removals.insert(key) }
            }
            if meshChanged && s.mesh == nil { s.mesh = snapshot.mesh }
        }
        wake.yield()
    }

    /// Folds one write's change for this node into what is pending (called with the mesh held).
    func merge(_ revision: Int64, _ delta: NodeDelta, limit: Int) {
        state.withLock { s in
            guard !s.ended else { return }
            s.version = revision
            let now = ContinuousClock.now
            if s.firstChange == nil { s.firstChange = now }
            if s.diverged {
                s.diverged = false
                s.needsResync = true
            }
            if s.needsResync { return }
            for k in delta.removed {
                s.upserts[k] = nil
                s.encoded[k] = nil
                s.removals.insert(k)
            }
            for item in delta.upserted {
                s.removals.remove(item.key)
                s.encoded[item.key] = nil
                s.upserts[item.key] = item
            }
            if let m = delta.mesh { s.mesh = m }
            if s.upserts.count + s.encoded.count + s.removals.count > limit {
                s.needsResync = true
                s.upserts = [:]
                s.encoded = [:]
                s.removals = []
                s.mesh = nil
            }
        }
        wake.yield()
    }

    enum Next {
        case closed, idle, wait(Duration), resync, send(Sluice_V1_ControlMessage), post(Sluice_V1_ControlMessage)
    }

    /// Queues a message that is not a delta (it does not wait for ACKs).
    func post(_ m: Sluice_V1_ControlMessage) {
        state.withLock { $0.outbox.append(m) }
        wake.yield()
    }

    /// What the sending loop does now.
    func next(debounce: Duration, maxDelay: Duration, now: ContinuousClock.Instant) -> Next {
        state.withLock { s in
            if s.ended { return .closed }
            if !s.outbox.isEmpty { return .post(s.outbox.removeFirst()) }
            if s.inFlight != nil || s.starting { return .idle }
            let pending = !s.upserts.isEmpty || !s.encoded.isEmpty || !s.removals.isEmpty || s.mesh != nil || s.needsResync
                || s.immediate
            guard pending else { return .idle }
            // The first change after a quiet spell goes at once; changes that follow within `debounce` of the last
            // delta are merged and leave together `debounce` after it (never more than `maxDelay` after the first).
            if !s.immediate, let first = s.firstChange, let sent = s.lastSent {
                let due = min(sent + debounce, first + maxDelay)
                if now < due { return .wait(due - now) }
            }
            if s.needsResync { return .resync }
            var delta = Sluice_V1_Delta()
            delta.version = UInt64(s.version)
            delta.upserts = Set(s.upserts.keys).union(s.encoded.keys).sorted().map { k in
                s.upserts[k].map(Sluice_V1_Item.init) ?? s.encoded[k]!
            }
            delta.removals = s.removals.sorted().map { k in
                var w = Sluice_V1_ItemKey()
                w.kind = k.kind.wireName
                w.name = k.name
                return w
            }
            if let m = s.mesh { delta.mesh = Wire.meshJSON(m) }
            s.upserts = [:]
            s.encoded = [:]
            s.removals = []
            s.mesh = nil
            s.immediate = false
            s.firstChange = nil
            return .send(Self.message(&s, delta))
        }
    }

    /// A resync's snapshot is taken as of `revision` (called with the mesh held): what was pending is in it, and
    /// changes after it are pending on top of it.
    func beginResync(at revision: Int64) {
        state.withLock { s in
            s.needsResync = false
            s.diverged = false
            s.upserts = [:]
            s.encoded = [:]
            s.removals = []
            s.mesh = nil
            s.version = revision
            s.firstChange = nil
        }
    }

    /// A full snapshot replacing whatever the agent holds (encoded with the mesh released).
    func resync(_ snapshot: NodeSnapshot, revision: Int64) -> Sluice_V1_ControlMessage {
        var delta = Sluice_V1_Delta()
        delta.version = UInt64(revision)
        delta.replace = true
        delta.upserts = snapshot.items.map(Sluice_V1_Item.init)
        delta.mesh = Wire.meshJSON(snapshot.mesh)
        return state.withLock { s in
            s.workloads = snapshot.workloads.count
            return Self.message(&s, delta)
        }
    }

    private static func message(_ s: inout State, _ delta: Sluice_V1_Delta) -> Sluice_V1_ControlMessage {
        var delta = delta
        s.lastSent = .now
        s.nonces += 1
        delta.nonce = "\(delta.version)-\(s.nonces)"
        s.inFlight = (delta.nonce, Int64(delta.version))
        s.sent = Int64(delta.version)
        var m = Sluice_V1_ControlMessage()
        m.delta = delta
        return m
    }

    /// Handles one message from the agent. Throws on one that breaks the protocol (which ends the stream).
    func received(_ m: Sluice_V1_AgentMessage) throws {
        switch m.message {
        case .ack(let ack):
            state.withLock { s in
                guard let f = s.inFlight, f.nonce == ack.nonce else { return }  // a stale ACK: ignored, as Envoy's
                s.inFlight = nil
                if ack.error.isEmpty {
                    s.acked = f.version
                    s.error = nil
                } else {
                    s.error = ack.error
                    s.diverged = true
                }
                s.warnings = ack.warnings
            }
            wake.yield()
        case .report(let r):
            state.withLock { s in
                s.workloads = Int(r.workloads)
                s.nearestExpiry = r.nearestCertificateExpiry > 0
                    ? Date(timeIntervalSince1970: TimeInterval(r.nearestCertificateExpiry)) : nil
            }
        case .hello:
            throw RPCError(code: .invalidArgument, message: "Hello is the first message of a stream only")
        case .registration:
            break  // handled by the hub, which stores it
        case .configDump(let d):
            answered(d.request, d)
        case nil:
            throw RPCError(code: .invalidArgument, message: "an empty message")
        }
    }

    func end() {
        let waiting = state.withLock { s in
            s.ended = true
            defer { s.dumps = [:] }
            return Array(s.dumps.values)
        }
        for c in waiting { c.resume(returning: nil) }
        wake.finish()
    }

    /// Asks the agent what it serves now; nil when it does not answer within `timeout` or the stream ends.
    func configDump(timeout: Duration) async -> Sluice_V1_ConfigDump? {
        await withCheckedContinuation { (c: CheckedContinuation<Sluice_V1_ConfigDump?, Never>) in
            let id: UInt64? = state.withLock { s in
                guard !s.ended else { return nil }
                s.nextDump += 1
                s.dumps[s.nextDump] = c
                var request = Sluice_V1_ConfigDumpRequest()
                request.request = s.nextDump
                var m = Sluice_V1_ControlMessage()
                m.configDumpRequest = request
                s.outbox.append(m)
                return s.nextDump
            }
            guard let id else { return c.resume(returning: nil) }
            wake.yield()
            Task {
                try? await Task.sleep(for: timeout)
                self.answered(id, nil)
            }
        }
    }

    /// Resumes whoever waits for dump `id` (once: a late or unasked answer is dropped).
    private func answered(_ id: UInt64, _ dump: Sluice_V1_ConfigDump?) {
        state.withLock { $0.dumps.removeValue(forKey: id) }?.resume(returning: dump)
    }

    var status: AgentHub.NodeStatus {
        state.withLock { s in
            let pending = s.inFlight != nil || !s.upserts.isEmpty || !s.removals.isEmpty || s.mesh != nil || s.needsResync
            let sync: AgentHub.NodeStatus.Sync = s.error != nil ? .nacked : pending || s.acked < s.version ? .stale : .synced
            return AgentHub.NodeStatus(node: node, agentVersion: agentVersion, connectedSince: connectedSince, sent: s.sent,
                                       acked: s.acked, sync: sync, error: s.error, warnings: s.warnings,
                                       workloads: s.workloads, nearestCertificateExpiry: s.nearestExpiry)
        }
    }
}
