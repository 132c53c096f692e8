import Foundation
import GRPCCore
import GRPCNIOTransportHTTP2
import Logging
import SluiceIdentity
@testable import SluiceModel
import SluiceProtocol
import SluiceTestSupport
import Synchronization
import XCTest
@testable import SluiceControl

/// The agent stream against a real control plane on loopback, with real gRPC clients holding node certificates of
/// its CA: what they end up holding after any sequence of writes is what a fresh compile gives their node; a resumed
/// stream sends only what changed; a stalled or refusing agent holds back no other.
final class AgentStreamTests: XCTestCase {
    var dir = ""
    var control: ControlPlane!
    var ca: CertificateAuthority!
    var agents: [TestAgent] = []

    override func setUpWithError() throws {
        dir = NSTemporaryDirectory() + "sluice-stream-\(UUID().uuidString)"
        try FileManager.default.createDirectory(atPath: "\(dir)/ca", withIntermediateDirectories: true)
        let root = try CertificateAuthority.newRoot(trustDomain: "cluster.local")
        try root.certificatePEM.write(toFile: "\(dir)/ca/ca-cert.pem", atomically: true, encoding: .utf8)
        try root.certificatePEM.write(toFile: "\(dir)/ca/root-cert.pem", atomically: true, encoding: .utf8)
        try root.keyPEM.write(toFile: "\(dir)/ca/ca-key.pem", atomically: true, encoding: .utf8)
        ca = try CertificateAuthority(trustDomain: "cluster.local", certificatePEM: root.certificatePEM, keyPEM: root.keyPEM,
                                      rootPEM: [root.certificatePEM])
        try startControl()
    }

    override func tearDown() {
        for a in agents { a.stop() }
        control?.stop()
        try? FileManager.default.removeItem(atPath: dir)
    }

    func startControl(maxPending: Int = 20_000) throws {
        var o = ControlPlane.Options()
        o.stateDirectory = "\(dir)/state"
        o.caDirectory = "\(dir)/ca"
        o.listen = "127.0.0.1:0"
        o.api = nil
        o.stream = "127.0.0.1:\(control?.streamPort ?? 0)"
        o.pushMaxPending = maxPending
        var logger = Logger(label: "test")
        logger.logLevel = .warning
        control = try ControlPlane(options: o, logger: logger)
    }

    /// A node certificate (or any identity's) from the mesh CA, written to files.
    func certificate(_ id: SPIFFEID, name: String) throws -> (chain: String, key: String) {
        let key = WorkloadKey()
        let issued = try ca.sign(requestPEM: try key.signingRequest(for: id), for: id, lifetime: .seconds(3600),
                                 requester: "test")
        let files = ("\(dir)/\(name).crt", "\(dir)/\(name).key")
        try ([issued.certificate] + issued.chain).joined().write(toFile: files.0, atomically: true, encoding: .utf8)
        try key.privateKeyPEM.write(toFile: files.1, atomically: true, encoding: .utf8)
        return files
    }

    func agent(_ node: String, as identity: SPIFFEID? = nil, hello: String? = nil,
               holding: (NodeSnapshot, Int64)? = nil) throws -> TestAgent {
        let id = identity ?? SPIFFEID(trustDomain: "cluster.local", namespace: "sluice-nodes", serviceAccount: node)
        let files = try certificate(id, name: "\(node)-\(agents.count)")
        let a = TestAgent(node: hello ?? node, port: control.streamPort, chain: files.chain, key: files.key,
                          root: "\(dir)/ca/root-cert.pem", holding: holding)
        agents.append(a)
        a.start()
        return a
    }

    // MARK: - writes

    func write(_ yaml: String) throws {
        for o in try JSONValue.documents(yaml: yaml) {
            guard let (resource, version) = APIObjects.resource(of: o) else { return XCTFail("no resource for \(o.text)") }
            let key = StoreKey(group: resource.group, resource: resource.plural,
                               namespace: o["metadata"]?["namespace"]?.stringValue ?? "default",
                               name: o["metadata"]?["name"]?.stringValue ?? "")
            _ = try control.mesh.write(key, resource, version: version) { _ in o }
        }
    }

    func delete(_ plural: String, group: String = "networking.istio.io", _ ns: String, _ name: String) throws {
        let r = APIResource.find(group: group, plural: plural)!
        _ = try control.mesh.write(StoreKey(group: group, resource: plural, namespace: ns, name: name), r, version: "v1") { _ in
            nil
        }
    }

    static func workload(_ name: String, node: String, app: String, version: String, ip: Int) -> String {
        """
        apiVersion: networking.istio.io/v1
        kind: WorkloadEntry
        metadata: {name: \(name), namespace: shop, annotations: {sluice.dev/node: \(node)}}
        spec: {address: 10.1.0.\(ip), labels: {app: \(app), version: \(version)}, serviceAccount: \(app), ports: {http: 8080}}
        """
    }

    static func service(_ app: String, vip: Int) -> String {
        """
        apiVersion: networking.istio.io/v1
        kind: ServiceEntry
        metadata: {name: \(app), namespace: shop}
        spec:
          hosts: [\(app).shop.svc.cluster.local]
          addresses: [10.96.0.\(vip)]
          ports: [{number: 9080, name: http, targetPort: 8080, protocol: HTTP}]
          resolution: STATIC
          workloadSelector: {labels: {app: \(app)}}
        """
    }

    static func rule(_ app: String, lb: String, subsets: [String]) -> String {
        """
        apiVersion: networking.istio.io/v1
        kind: DestinationRule
        metadata: {name: \(app), namespace: shop}
        spec:
          host: \(app).shop.svc.cluster.local
          trafficPolicy: {loadBalancer: {simple: \(lb)}}
          subsets: [\(subsets.map { "{name: \($0), labels: {version: \($0)}}" }.joined(separator: ", "))]
        """
    }

    func expected(_ node: String) -> NodeSnapshot { control.mesh.compiler.snapshot(for: node) }

    func assertEventuallyHolds(_ a: TestAgent, _ node: String, timeout: Double = 10, file: StaticString = #filePath,
                               line: UInt = #line) {
        let deadline = Date().addingTimeInterval(timeout)
        while Date() < deadline {
            if a.snapshot == expected(node) && control.hub.status.first(where: { $0.node == node })?.sync == .synced { return }
            Thread.sleep(forTimeInterval: 0.02)
        }
        let got = String(decoding: a.snapshot.canonicalJSON(pretty: true), as: UTF8.self)
        let want = String(decoding: expected(node).canonicalJSON(pretty: true), as: UTF8.self)
        XCTFail("agent \(node) holds\n\(got)\nbut a fresh compile gives\n\(want)\nstatus \(control.hub.status)", file: file,
                line: line)
    }

    // MARK: - tests

    func testPushedIncrementsEqualAFreshCompileOverRandomEdits() throws {
        let seed = ProcessInfo.processInfo.environment["SEED"].flatMap(UInt64.init) ?? UInt64.random(in: 1...UInt64.max)
        print("AgentStreamTests seed \(seed) (SEED=\(seed) repeats it)")
        var rng = SeededRandom(seed: seed)
        try write(Self.service("reviews", vip: 10))
        let n1 = try agent("n1"), n2 = try agent("n2")
        // n3 reconnects now and then in the middle of the writes: its first snapshot is compared and encoded while
        // writes go on, and what they change must win over what that snapshot said.
        var n3 = try agent("n3"), reconnects = 0
        assertEventuallyHolds(n1, "n1")
        assertEventuallyHolds(n2, "n2")
        let apps = ["reviews", "ratings", "details"]
        let versions = ["v1", "v2", "v3"]
        var writes = 0
        for round in 0..<4 {
            for _ in 0..<25 {
                let app = apps.randomElement(using: &rng)!
                do {
                    switch Int.random(in: 0..<10, using: &rng) {
                    case 0..<4:
                        let i = Int.random(in: 1...12, using: &rng)
                        try write(Self.workload("w\(i)", node: ["n1", "n2", "n3"].randomElement(using: &rng)!, app: app,
                                                version: versions.randomElement(using: &rng)!, ip: i))
                    case 4: try delete("workloadentries", "shop", "w\(Int.random(in: 1...12, using: &rng))")
                    case 5..<7: try write(Self.service(app, vip: 10 + apps.firstIndex(of: app)!))
                    case 7: try delete("serviceentries", "shop", app)
                    case 8:
                        try write(Self.rule(app, lb: ["ROUND_ROBIN", "LEAST_REQUEST", "RANDOM"].randomElement(using: &rng)!,
                                            subsets: Array(versions.shuffled(using: &rng).prefix(Int.random(in: 0...3, using: &rng)))))
                    default: try delete("destinationrules", "shop", app)
                    }
                    writes += 1
                } catch {
                    // Refused writes (a delete of something absent, a rule for a missing host) change nothing.
                }
                // Now and then a pause longer than the debounce: deltas then build on deltas the agent applied.
                if Int.random(in: 0..<6, using: &rng) == 0 { Thread.sleep(forTimeInterval: 0.13) }
                if Int.random(in: 0..<8, using: &rng) == 0 {
                    // Resuming what the last stream left it holding, or from nothing.
                    let held = Bool.random(using: &rng) ? (n3.snapshot, n3.version) : nil
                    n3.stop()
                    n3 = try agent("n3", holding: held)
                    reconnects += 1
                }
            }
            // Mid-sequence and at the end: every node converges on exactly what a fresh compile gives it.
            assertEventuallyHolds(n1, "n1")
            assertEventuallyHolds(n2, "n2")
            assertEventuallyHolds(n3, "n3")
            print("round \(round): \(writes) accepted writes so far; n1 got \(n1.deltas.load(ordering: .relaxed)) deltas; "
                  + "n3 reconnected \(reconnects) times")
        }
        // The writes came faster than the debounce: they were coalesced.
        XCTAssertLessThan(n1.deltas.load(ordering: .relaxed), writes / 2)
        XCTAssertGreaterThan(n1.deltas.load(ordering: .relaxed), 8)
        // The fresh compile is also what the whole mesh compiled from scratch gives.
        let fresh = try MeshCompiler(control.mesh.compiler.resources.values.sorted { $0.key < $1.key })
        XCTAssertEqual(fresh.snapshot(for: "n1"), n1.snapshot)
    }

    /// A session's first snapshot is compared and encoded after the mesh is released: a change merged in between
    /// (newer than the snapshot) wins, for an upsert and for a removal, and nothing leaves before the comparison ends.
    func testChangesMergedWhileTheFirstSnapshotIsComparedWin() throws {
        try write(Self.service("reviews", vip: 10) + "\n---\n" + Self.service("ratings", vip: 11) + "\n---\n"
                  + Self.workload("w1", node: "n1", app: "reviews", version: "v1", ip: 1))
        let snapshot = control.mesh.compiler.snapshot(for: "n1")
        guard let i = snapshot.items.firstIndex(where: { $0.key.kind == .workload }), case .workload(var w) = snapshot.items[i],
              let gone = snapshot.items.first(where: { $0.key.kind == .service })?.key
        else { return XCTFail("the snapshot lacks a workload or a service: \(snapshot.items.map(\.key))") }
        w.labels["version"] = "v2"
        let session = Session(node: "n1", id: 1, hello: Sluice_V1_Hello())
        session.begin(at: 5)
        session.merge(6, NodeDelta(node: "n1", upserted: [.workload(w)], removed: [gone], mesh: nil), limit: 1_000)
        guard case .idle = session.next(debounce: .zero, maxDelay: .zero, now: .now) else {
            return XCTFail("a delta left before the first snapshot was compared")
        }
        session.start(from: snapshot, agentHolds: Sluice_V1_Hello())
        guard case .send(let m) = session.next(debounce: .zero, maxDelay: .zero, now: .now) else { return XCTFail("nothing to send") }
        XCTAssertEqual(m.delta.version, 6)
        let upserts = Dictionary(m.delta.upserts.map { ("\($0.kind)/\($0.name)", $0) }, uniquingKeysWith: { a, _ in a })
        XCTAssertEqual(upserts[Wire.name(snapshot.items[i].key)]?.payload, SnapshotItem.workload(w).payload(), "the merged upsert wins")
        XCTAssertNil(upserts[Wire.name(gone)], "the merged removal wins")
        XCTAssertTrue(m.delta.removals.contains { $0.name == gone.name && $0.kind == gone.kind.wireName })
        XCTAssertEqual(m.delta.upserts.count, snapshot.items.count - 1)
    }

    /// A stream that floods its registrations costs the store one set per interval: forty sent at once are stored as
    /// at most two sets (the one taken first, then the newest), and the node ends up with the newest.
    func testARegistrationFloodIsStoredOncePerInterval() throws {
        let a = try agent("n1")
        assertEventuallyHolds(a, "n1")
        let before = control.mesh.revision
        for i in 0..<40 {
            var r = Sluice_V1_Registration()
            r.workloadEntries = [Data(#"{"apiVersion":"networking.istio.io/v1","kind":"WorkloadEntry","metadata":{"name":"w\#(i)","namespace":"shop"},"spec":{"address":"10.1.0.\#(i + 1)"}}"#.utf8)]
            var m = Sluice_V1_AgentMessage()
            m.registration = r
            a.send.yield(m)
        }
        let resource = APIResource.find(group: "networking.istio.io", plural: "workloadentries")!
        let deadline = Date().addingTimeInterval(10)
        var names: [String] = []
        while Date() < deadline {
            names = control.mesh.list(resource, namespace: "shop").0.map(\.key.name)
            if names == ["w39"] { break }
            Thread.sleep(forTimeInterval: 0.05)
        }
        XCTAssertEqual(names, ["w39"])
        // At most: the first set (one create), then the newest (one create, one delete).
        XCTAssertLessThanOrEqual(control.mesh.revision - before, 3, "registrations were not coalesced")
    }

    func testAResumedStreamSendsOnlyWhatChangedAndAfterARestartToo() throws {
        try write(Self.service("reviews", vip: 10) + "\n---\n" + Self.workload("w1", node: "n1", app: "reviews", version: "v1", ip: 1)
                  + "\n---\n" + Self.workload("w2", node: "n2", app: "reviews", version: "v2", ip: 2))
        let first = try agent("n1")
        assertEventuallyHolds(first, "n1")
        let held = (first.snapshot, first.version)
        XCTAssertGreaterThan(held.0.items.count, 2)
        first.stop()

        // One endpoint changes while the agent is away: the next stream carries that cluster only.
        try write(Self.workload("w2", node: "n2", app: "reviews", version: "v3", ip: 3))
        let again = try agent("n1", holding: held)
        assertEventuallyHolds(again, "n1")
        let firstDelta = try XCTUnwrap(again.received.withLock { $0.first })
        XCTAssertFalse(firstDelta.replace)
        XCTAssertEqual(firstDelta.upserts.map(\.kind), ["cluster"], "\(firstDelta.upserts.map(\.name))")
        XCTAssertTrue(firstDelta.removals.isEmpty)

        // The control plane restarts (same store): the agent resumes with nothing to send but the version.
        let now = (again.snapshot, again.version)
        again.stop()
        control.stop()
        try startControl()
        let resumed = try agent("n1", holding: now)
        assertEventuallyHolds(resumed, "n1")
        let d = try XCTUnwrap(resumed.received.withLock { $0.first })
        XCTAssertTrue(d.upserts.isEmpty && d.removals.isEmpty && d.mesh.isEmpty, "\(d)")
    }

    func testAStalledAgentHoldsBackNoOtherAndCatchesUpWithAResync() throws {
        control.stop()
        try startControl(maxPending: 5)
        try write(Self.service("reviews", vip: 10))
        let stalled = try agent("n2")
        assertEventuallyHolds(stalled, "n2")
        stalled.acking.store(false, ordering: .relaxed)
        let live = try agent("n1")
        for i in 1...12 {
            try write(Self.workload("w\(i)", node: i % 2 == 0 ? "n2" : "n1", app: "reviews", version: "v1", ip: i))
            Thread.sleep(forTimeInterval: 0.15)
        }
        // n1 follows every change while n2 answers nothing.
        assertEventuallyHolds(live, "n1", timeout: 5)
        XCTAssertEqual(control.hub.status.first { $0.node == "n2" }?.sync, .stale)
        // n2 comes back: it gets one full snapshot, not the backlog.
        let before = stalled.received.withLock { $0.count }
        stalled.acking.store(true, ordering: .relaxed)
        stalled.ackPending()
        assertEventuallyHolds(stalled, "n2")
        let after = stalled.received.withLock { Array($0.dropFirst(before)) }
        XCTAssertTrue(after.contains { $0.replace }, "\(after.map { ($0.version, $0.replace, $0.upserts.count) })")
    }

    func testANackShowsInStatusAndTheNextGoodDeltaClearsIt() throws {
        try write(Self.service("reviews", vip: 10))
        let a = try agent("n1")
        assertEventuallyHolds(a, "n1")
        a.refuse.withLock { $0 = "listener 0.0.0.0:80: address already in use" }
        try write(Self.workload("w1", node: "n1", app: "reviews", version: "v1", ip: 1))
        XCTAssertTrue(eventually { self.control.hub.status.first?.sync == .nacked })
        XCTAssertEqual(control.hub.status.first?.error, "listener 0.0.0.0:80: address already in use")
        XCTAssertNotEqual(a.snapshot, expected("n1"))
        a.refuse.withLock { $0 = nil }
        // The next change reaches the agent as a full snapshot: what it refused is not lost.
        let before = a.received.withLock { $0.count }
        try write(Self.workload("w2", node: "n1", app: "reviews", version: "v2", ip: 2))
        assertEventuallyHolds(a, "n1")
        XCTAssertEqual(a.received.withLock { Array($0.dropFirst(before)) }.first?.replace, true)
        XCTAssertNil(control.hub.status.first?.error)
    }

    func testStreamsThatBreakTheProtocolAreRefused() throws {
        // A workload's certificate is not a node's.
        let workload = try agent("n1", as: SPIFFEID(trustDomain: "cluster.local", namespace: "shop", serviceAccount: "reviews"))
        XCTAssertTrue(eventually { workload.failure.withLock { $0 } != nil })
        XCTAssertEqual(workload.failure.withLock { $0 }?.code, .permissionDenied)
        // A node cannot speak for another.
        let impostor = try agent("n1", hello: "n2")
        XCTAssertTrue(eventually { impostor.failure.withLock { $0 } != nil })
        XCTAssertEqual(impostor.failure.withLock { $0 }?.code, .permissionDenied)
        XCTAssertTrue(control.hub.connectedNodes.isEmpty)
        // A good one still works beside them.
        try write(Self.service("reviews", vip: 10))
        let good = try agent("n1")
        assertEventuallyHolds(good, "n1")
    }

    /// `sluice proxy-config` asks the agent over its stream: the answer is what the agent holds; an agent that does
    /// not answer times out without holding back any other; an answer nobody asked for is dropped; an unknown node
    /// is not connected.
    func testAConfigDumpIsAskedOfTheAgentAndOneThatNeverAnswersTimesOut() async throws {
        try write(Self.service("reviews", vip: 10))
        try write(Self.workload("w1", node: "n1", app: "reviews", version: "v1", ip: 1))
        let answering = try agent("n1")
        let silent = try agent("n2")
        silent.dumping.store(false, ordering: .relaxed)
        assertEventuallyHolds(answering, "n1")
        assertEventuallyHolds(silent, "n2")
        guard case .dump(let data) = await control.hub.configDump(node: "n1") else { return XCTFail("n1 did not answer") }
        let dump = try AgentConfigDump.decode(data)
        XCTAssertEqual(dump.node, "n1")
        XCTAssertEqual(dump.snapshot, answering.snapshot)
        XCTAssertEqual(dump.version, answering.version)

        let started = ContinuousClock.now
        guard case .timedOut = await control.hub.configDump(node: "n2", timeout: .milliseconds(300)) else {
            return XCTFail("n2 never answers, yet its dump did not time out")
        }
        XCTAssertLessThan(ContinuousClock.now - started, .seconds(2))
        guard case .notConnected = await control.hub.configDump(node: "n3") else { return XCTFail("n3 has no agent") }
        // An answer to a question never asked changes nothing, and both streams go on.
        var stray = Sluice_V1_ConfigDump()
        stray.request = 999
        stray.snapshot = Data("not json".utf8)
        var m = Sluice_V1_AgentMessage()
        m.configDump = stray
        answering.send.yield(m)
        try write(Self.workload("w2", node: "n1", app: "reviews", version: "v2", ip: 2))
        try write(Self.workload("w3", node: "n2", app: "reviews", version: "v1", ip: 3))
        assertEventuallyHolds(answering, "n1")
        assertEventuallyHolds(silent, "n2")
    }

    /// An agent that sends bytes that are not an AgentMessage loses its own stream only.
    func testAnAgentSendingGarbageLosesOnlyItsOwnStream() async throws {
        try write(Self.service("reviews", vip: 10))
        let good = try agent("n1")
        assertEventuallyHolds(good, "n1")
        let files = try certificate(SPIFFEID(trustDomain: "cluster.local", namespace: "sluice-nodes", serviceAccount: "n2"),
                                    name: "n2-garbage")
        let seed = ProcessInfo.processInfo.environment["SEED"].flatMap(UInt64.init) ?? UInt64.random(in: 1...UInt64.max)
        var rng = SeededRandom(seed: seed)
        print("garbage seed \(seed) (SEED=\(seed) repeats it)")
        for round in 0..<5 {
            // A Hello, then garbage: the server must refuse the stream, not crash or stall.
            var hello = Sluice_V1_AgentMessage()
            hello.hello.node = "n2"
            let junk = (0..<Int.random(in: 1...512, using: &rng)).map { _ in UInt8.random(in: 0...255, using: &rng) }
            let outcome = try await Self.rawStream(port: control.streamPort, chain: files.chain, key: files.key,
                                                   root: "\(dir)/ca/root-cert.pem",
                                                   messages: [try hello.serializedBytes() as [UInt8], [0xFF] + junk])
            XCTAssertEqual(outcome?.code, .invalidArgument, "round \(round): a stream of garbage was not refused as such")
            print("round \(round): \(junk.count + 1) bytes of garbage: \(outcome.map { "\($0.code): \($0.message)" } ?? "accepted")")
            try write(Self.workload("w\(round)", node: "n1", app: "reviews", version: "v1", ip: round + 1))
            assertEventuallyHolds(good, "n1")
        }
    }

    /// Sends `messages` as raw bytes on the agent stream's method; the error the stream ended with (nil: none).
    static func rawStream(port: Int, chain: String, key: String, root: String, messages: [[UInt8]]) async throws -> RPCError? {
        struct Raw: MessageSerializer, MessageDeserializer {
            func serialize<Bytes: GRPCContiguousBytes>(_ message: [UInt8]) throws -> Bytes { Bytes(message) }
            func deserialize<Bytes: GRPCContiguousBytes>(_ serializedMessageBytes: Bytes) throws -> [UInt8] {
                serializedMessageBytes.withUnsafeBytes { Array($0) }
            }
        }
        let transport = try TestAgent.transport(port: port, chain: chain, key: key, root: root)
        return try await withGRPCClient(transport: transport) { client in
            let request = StreamingClientRequest<[UInt8]>(producer: { writer in
                for m in messages { try await writer.write(m) }
                try await Task.sleep(for: .seconds(5))
            })
            do {
                try await client.bidirectionalStreaming(
                    request: request, descriptor: Sluice_V1_AgentStream.Method.Stream.descriptor, serializer: Raw(),
                    deserializer: Raw(), options: .defaults
                ) { response in
                    for try await _ in response.messages {}
                }
                return nil
            } catch let e as RPCError {
                return e
            }
        }
    }

    func eventually(_ timeout: Double = 10, _ condition: () -> Bool) -> Bool {
        let deadline = Date().addingTimeInterval(timeout)
        while Date() < deadline {
            if condition() { return true }
            Thread.sleep(forTimeInterval: 0.02)
        }
        return condition()
    }
}

/// An agent as the stream sees it: holds a snapshot, applies deltas, ACKs them (or NACKs, or stops answering).
final class TestAgent: Sendable {
    let node: String
    let port: Int
    let chain: String, key: String, root: String
    let state: Mutex<(snapshot: NodeSnapshot, version: Int64)>
    let received = Mutex<[Sluice_V1_Delta]>([])
    let deltas = Atomic<Int>(0)
    let acking = Atomic<Bool>(true)
    /// Whether config dump requests are answered.
    let dumping = Atomic<Bool>(true)
    /// Set: every delta is NACKed with this error.
    let refuse = Mutex<String?>(nil)
    let failure = Mutex<RPCError?>(nil)
    let unanswered = Mutex<[Sluice_V1_Delta]>([])
    let outbound: AsyncStream<Sluice_V1_AgentMessage>
    let send: AsyncStream<Sluice_V1_AgentMessage>.Continuation
    let task = Mutex<Task<Void, Never>?>(nil)

    init(node: String, port: Int, chain: String, key: String, root: String, holding: (NodeSnapshot, Int64)?) {
        self.node = node
        self.port = port
        self.chain = chain
        self.key = key
        self.root = root
        state = Mutex(holding.map { ($0.0, $0.1) } ?? (NodeSnapshot(node: node), 0))
        (outbound, send) = AsyncStream.makeStream(of: Sluice_V1_AgentMessage.self)
    }

    var snapshot: NodeSnapshot { state.withLock { $0.snapshot } }
    var version: Int64 { state.withLock { $0.version } }

    func start() {
        var hello = Sluice_V1_Hello()
        hello.node = node
        hello.agentVersion = "test"
        let held = state.withLock { $0 }
        hello.version = UInt64(held.version)
        if held.version > 0 {
            let d = Wire.digests(held.snapshot)
            hello.items = d.items
            hello.meshDigest = d.mesh
        }
        var m = Sluice_V1_AgentMessage()
        m.hello = hello
        send.yield(m)
        task.withLock { $0 = Task { await self.run() } }
    }

    func stop() {
        task.withLock { $0?.cancel() }
        send.finish()
    }

    /// A client transport to the control plane's stream on loopback with a node's certificate.
    static func transport(port: Int, chain: String, key: String, root: String) throws -> HTTP2ClientTransport.Posix {
        var config = HTTP2ClientTransport.Posix.Config.defaults
        config.http2.authority = "sluice-control"
        return try HTTP2ClientTransport.Posix(
            target: .ipv4(address: "127.0.0.1", port: port),
            transportSecurity: .mTLS(certificateChain: [.file(path: chain, format: .pem)],
                                     privateKey: .file(path: key, format: .pem)) { tls in
                tls.trustRoots = .certificates([.file(path: root, format: .pem)])
            },
            config: config)
    }

    private func run() async {
        do {
            let transport = try Self.transport(port: port, chain: chain, key: key, root: root)
            try await withGRPCClient(transport: transport) { client in
                let stub = Sluice_V1_AgentStream.Client(wrapping: client)
                try await stub.stream(requestProducer: { writer in
                    for await m in self.outbound { try await writer.write(m) }
                }, onResponse: { response in
                    for try await message in response.messages {
                        if case .configDumpRequest(let r)? = message.message {
                            if self.dumping.load(ordering: .relaxed) { self.send.yield(self.dump(r.request)) }
                            continue
                        }
                        guard case .delta(let delta)? = message.message else { continue }
                        self.received.withLock { $0.append(delta) }
                        self.deltas.add(1, ordering: .relaxed)
                        if self.acking.load(ordering: .relaxed) {
                            self.answer(delta)
                        } else {
                            self.unanswered.withLock { $0.append(delta) }
                        }
                    }
                })
            }
        } catch let e as RPCError {
            failure.withLock { $0 = e }
        } catch {
            failure.withLock { $0 = RPCError(code: .unknown, message: "\(error)") }
        }
    }

    func answer(_ delta: Sluice_V1_Delta) {
        var ack = Sluice_V1_Ack()
        ack.nonce = delta.nonce
        ack.version = delta.version
        if let error = refuse.withLock({ $0 }) {
            ack.error = error
        } else {
            do {
                let next = try state.withLock { $0.snapshot }.applying(delta)
                state.withLock { $0 = (next, Int64(delta.version)) }
            } catch {
                ack.error = error.description
            }
        }
        var m = Sluice_V1_AgentMessage()
        m.ack = ack
        send.yield(m)
    }

    func dump(_ request: UInt64) -> Sluice_V1_AgentMessage {
        let held = state.withLock { $0 }
        var d = Sluice_V1_ConfigDump()
        d.request = request
        d.version = UInt64(held.version)
        d.snapshot = AgentConfigDump(node: node, agentVersion: "test", version: held.version, snapshot: held.snapshot,
                                     listeners: [], endpointHealth: [:], secrets: []).encoded()
        var m = Sluice_V1_AgentMessage()
        m.configDump = d
        return m
    }

    func ackPending() {
        for d in unanswered.withLock({ u in defer { u = [] }; return u }) { answer(d) }
    }
}
