// `make bench-control`: the control plane at mesh scale, against its targets (issue 13).
//
// - `sluice control` (release binary, its own process) seeded with 10,000 ServiceEntries and 100,000 WorkloadEntries
//   on 500 nodes: 500 namespaces of 20 services each, every service private to its namespace (`exportTo: ["."]`,
//   as Istio users scope with Sidecars), 10 endpoints per service on two nodes (namespace k runs on nodes k and
//   k+1). Each node therefore sees 40 services and 400 endpoints.
// - 500 simulated agents in this process: real gRPC stream clients (node certificates from the mesh CA, mutual TLS)
//   that apply every delta to the snapshot they hold and ACK it, as the agent does.
// - Measured: seeding time and control-plane RSS; a reconnect storm of all agents, from nothing and resumed; one
//   endpoint change (HTTPS PUT to the config API) until every affected agent has applied and ACKed it (p50/p99
//   over 100 changes); API reads and writes per second with wrk; a real `sluice agent`'s RSS with 10 local
//   workloads in a mesh of 1,000 endpoints and in this one of 100,000.
// Prints a JSON object on stdout; progress on stderr.
import Foundation
import GRPCCore
import GRPCNIOTransportHTTP2
import SluiceIdentity
import SluiceModel
import SluiceProtocol
import SluiceTLS
import Synchronization

func log(_ s: String) { FileHandle.standardError.write(Data((s + "\n").utf8)) }

struct Shape {
    var namespaces = 500
    var servicesPerNamespace = 20
    var endpointsPerService = 10
    var nodes: Int { namespaces }
    var services: Int { namespaces * servicesPerNamespace }
    var endpoints: Int { services * endpointsPerService }
}

func arg(_ name: String) -> String? {
    let args = CommandLine.arguments
    return args.firstIndex(of: name).flatMap { $0 + 1 < args.count ? args[$0 + 1] : nil }
}

enum Bench {
    static let sluice = arg("--sluice") ?? ".build/release/sluice"
    static let work = NSTemporaryDirectory() + "sluice-bench-control-\(getpid())"
    static let shape: Shape = {
        var s = Shape()
        if let n = arg("--namespaces").flatMap(Int.init) { s.namespaces = n }
        return s
    }()
}

/// The mesh as YAML files (5,000 objects each), plus `bench`: 10 workloads on node `bench-agent` and their service.
func writeMesh(_ s: Shape, to dir: String) throws {
    try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
    var docs: [String] = [], file = 0
    func flush(_ force: Bool = false) throws {
        if docs.count >= 5000 || (force && !docs.isEmpty) {
            try docs.joined(separator: "\n---\n").write(toFile: "\(dir)/mesh-\(file).yaml", atomically: true, encoding: .utf8)
            file += 1
            docs = []
        }
    }
    for k in 0..<s.namespaces {
        for j in 0..<s.servicesPerNamespace {
            let svc = k * s.servicesPerNamespace + j
            docs.append("""
                apiVersion: networking.istio.io/v1
                kind: ServiceEntry
                metadata: {name: svc-\(j), namespace: ns-\(k)}
                spec:
                  hosts: [svc-\(j).ns-\(k).svc.cluster.local]
                  addresses: [240.\(svc / 250 % 250).\(svc % 250).1]
                  ports: [{number: 80, name: http, protocol: HTTP, targetPort: 8080}]
                  resolution: STATIC
                  exportTo: ["."]
                  workloadSelector: {labels: {app: svc-\(j)}}
                """)
            for e in 0..<s.endpointsPerService {
                let i = svc * s.endpointsPerService + e
                docs.append("""
                    apiVersion: networking.istio.io/v1
                    kind: WorkloadEntry
                    metadata: {name: svc-\(j)-\(e), namespace: ns-\(k), annotations: {sluice.dev/node: node-\((k + e % 2) % s.nodes)}}
                    spec: {address: 10.\(i >> 16 & 255).\(i >> 8 & 255).\(i & 255), labels: {app: svc-\(j)}, serviceAccount: svc-\(j), ports: {http: 8080}}
                    """)
            }
            try flush()
        }
    }
    docs.append("""
        apiVersion: networking.istio.io/v1
        kind: ServiceEntry
        metadata: {name: local, namespace: bench}
        spec:
          hosts: [local.bench.svc.cluster.local]
          addresses: [240.255.0.1]
          ports: [{number: 80, name: http, protocol: HTTP, targetPort: 8080}]
          resolution: STATIC
          exportTo: ["."]
          workloadSelector: {labels: {app: local}}
        """)
    for w in 0..<10 {
        docs.append("""
            apiVersion: networking.istio.io/v1
            kind: WorkloadEntry
            metadata: {name: local-\(w), namespace: bench, annotations: {sluice.dev/node: bench-agent}}
            spec: {address: 127.0.1.\(w + 1), labels: {app: local}, serviceAccount: local, ports: {http: 8080}}
            """)
    }
    try flush(true)
}

func freePort() -> Int {
    let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
    var a = sockaddr_in()
    a.sin_family = sa_family_t(AF_INET)
    a.sin_addr.s_addr = inet_addr("127.0.0.1")
    _ = withUnsafePointer(to: &a) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, 16) } }
    var len = socklen_t(16)
    _ = withUnsafeMutablePointer(to: &a) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(fd, $0, &len) } }
    close(fd)
    return Int(UInt16(bigEndian: a.sin_port))
}

/// CPU time (user + system) a process has used, in seconds.
func cpuSeconds(_ pid: Int32) -> Double {
    let stat = (try? String(contentsOfFile: "/proc/\(pid)/stat", encoding: .utf8)) ?? ""
    // Fields after the command name (which may hold spaces): state is field 3, utime 14, stime 15.
    guard let close = stat.lastIndex(of: ")") else { return 0 }
    let fields = stat[stat.index(after: close)...].split(separator: " ")
    guard fields.count > 13, let user = Double(fields[11]), let system = Double(fields[12]) else { return 0 }
    return (user + system) / Double(sysconf(Int32(_SC_CLK_TCK)))
}

func rssMB(_ pid: Int32) -> Double {
    let status = (try? String(contentsOfFile: "/proc/\(pid)/status", encoding: .utf8)) ?? ""
    let line = status.split(separator: "\n").first { $0.hasPrefix("VmRSS:") } ?? ""
    return (Double(line.split(separator: " ").dropFirst().first ?? "0") ?? 0) / 1024
}

struct Control {
    var process: Process
    var dir: String
    var caPort: Int, apiPort: Int, streamPort: Int
    var seedSeconds: Double

    static func start(mesh: String, dir: String) throws -> Control {
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        try "tok-bench bench-agent\n".write(toFile: "\(dir)/join-tokens", atomically: true, encoding: .utf8)
        let (ca, apiPort, stream) = (freePort(), freePort(), freePort())
        let p = Process()
        p.executableURL = URL(fileURLWithPath: Bench.sluice)
        p.arguments = ["control", "--state-dir", "\(dir)/state", "--config", mesh, "--join-tokens", "\(dir)/join-tokens",
                       "--listen", "127.0.0.1:\(ca)", "--api", "127.0.0.1:\(apiPort)", "--stream", "127.0.0.1:\(stream)",
                       "--metrics", "127.0.0.1:0", "--log-level", "warning"]
        let logFile = "\(dir)/control.log"
        FileManager.default.createFile(atPath: logFile, contents: nil)
        p.standardError = try FileHandle(forWritingTo: URL(fileURLWithPath: logFile))
        let start = Date()
        try p.run()
        // Ready when the API answers (the log is at warning level).
        let client = try api(dir: dir, port: apiPort)
        while (try? client.request("GET", "/healthz"))?.status != 200 {
            guard p.isRunning else { throw CLIFailure("sluice control exited: \((try? String(contentsOfFile: logFile, encoding: .utf8)) ?? "")") }
            Thread.sleep(forTimeInterval: 0.1)
        }
        return Control(process: p, dir: dir, caPort: ca, apiPort: apiPort, streamPort: stream,
                       seedSeconds: Date().timeIntervalSince(start))
    }

    static func api(dir: String, port: Int) throws -> HTTPSClient {
        var c = HTTPSClient(address: "127.0.0.1:\(port)", serverName: "sluice-control", rootCA: "\(dir)/state/root-cert.pem")
        c.timeout = 30
        return c
    }

    var token: String {
        ((try? String(contentsOfFile: "\(dir)/state/admin-token", encoding: .utf8)) ?? "").trimmingCharacters(in: .whitespacesAndNewlines)
    }

    func stop() {
        process.terminate()
        process.waitUntilExit()
    }
}

struct CLIFailure: Error, CustomStringConvertible {
    let description: String
    init(_ d: String) { description = d }
}

/// A simulated agent: one real stream, the snapshot it holds, and when it applied what.
final class SimAgent: Sendable {
    let node: String
    let chain: String, key: String, root: String, port: Int
    let held = Mutex<(NodeSnapshot, Int64)>((NodeSnapshot(node: ""), 0))
    let acks = Atomic<Int>(0)
    /// Marker address -> when this agent ACKed the delta that carried it.
    let seen = Mutex<[String: ContinuousClock.Instant]>([:])
    let watching = Mutex<String?>(nil)
    let task = Mutex<Task<Void, Never>?>(nil)
    let stopSignal: Mutex<AsyncStream<Sluice_V1_AgentMessage>.Continuation?> = Mutex(nil)

    init(node: String, chain: String, key: String, root: String, port: Int) {
        self.node = node
        self.chain = chain
        self.key = key
        self.root = root
        self.port = port
        held.withLock { $0 = (NodeSnapshot(node: node), 0) }
    }

    func start(resume: Bool) {
        let (outbound, send) = AsyncStream.makeStream(of: Sluice_V1_AgentMessage.self)
        stopSignal.withLock { $0 = send }
        if !resume { held.withLock { $0 = (NodeSnapshot(node: node), 0) } }
        send.yield(hello(resume: resume))
        task.withLock {
            $0 = Task {
                // As the agent does: a stream that fails is opened again after a jittered pause, resuming.
                var outbound = outbound, send = send
                while !Task.isCancelled {
                    do {
                        try await self.session(outbound, send)
                    } catch {
                        if Task.isCancelled { return }
                        self.failures.add(1, ordering: .relaxed)
                    }
                    try? await Task.sleep(for: .milliseconds(Int.random(in: 250...1000)))
                    (outbound, send) = AsyncStream.makeStream(of: Sluice_V1_AgentMessage.self)
                    self.stopSignal.withLock { $0 = send }
                    send.yield(self.hello(resume: true))
                }
            }
        }
    }

    let failures = Atomic<Int>(0)

    func hello(resume: Bool) -> Sluice_V1_AgentMessage {
        var hello = Sluice_V1_Hello()
        hello.node = node
        hello.agentVersion = "bench"
        let (snapshot, version) = held.withLock { $0 }
        if resume && version > 0 {
            hello.version = UInt64(version)
            let d = Wire.digests(snapshot)
            hello.items = d.items
            hello.meshDigest = d.mesh
        }
        var m = Sluice_V1_AgentMessage()
        m.hello = hello
        return m
    }

    func session(_ outbound: AsyncStream<Sluice_V1_AgentMessage>,
                 _ send: AsyncStream<Sluice_V1_AgentMessage>.Continuation) async throws {
        var config = HTTP2ClientTransport.Posix.Config.defaults
        config.http2.authority = "sluice-control"
        let transport = try HTTP2ClientTransport.Posix(
            target: .ipv4(address: "127.0.0.1", port: port),
            transportSecurity: .mTLS(certificateChain: [.file(path: chain, format: .pem)],
                                     privateKey: .file(path: key, format: .pem)) { tls in
                tls.trustRoots = .certificates([.file(path: root, format: .pem)])
            },
            config: config)
        try await withGRPCClient(transport: transport) { client in
            let stub = Sluice_V1_AgentStream.Client(wrapping: client)
            try await stub.stream(requestProducer: { writer in
                for await m in outbound { try await writer.write(m) }
            }, onResponse: { response in
                for try await message in response.messages {
                    guard case .delta(let delta)? = message.message else { continue }
                    send.yield(self.apply(delta))
                }
            })
        }
    }

    func apply(_ delta: Sluice_V1_Delta) -> Sluice_V1_AgentMessage {
        var ack = Sluice_V1_Ack()
        ack.nonce = delta.nonce
        ack.version = delta.version
        do {
            let next = try held.withLock { $0.0 }.applying(delta)
            held.withLock { $0 = (next, Int64(delta.version)) }
            if let marker = watching.withLock({ $0 }) {
                let needle = Data(marker.utf8)
                if delta.upserts.contains(where: { $0.payload.range(of: needle) != nil }) {
                    seen.withLock { $0[marker] = .now }
                }
            }
        } catch {
            ack.error = "\(error)"
        }
        acks.add(1, ordering: .relaxed)
        var m = Sluice_V1_AgentMessage()
        m.ack = ack
        return m
    }

    func stop() {
        stopSignal.withLock { $0?.finish() }
        task.withLock { $0?.cancel() }
        task.withLock { $0 = nil }
    }
}

/// nginx serving one file over HTTPS, the peer of the API's reads.
struct NginxPeer {
    static let binary = "/usr/sbin/nginx"
    let process: Process
    let port: Int

    static func start(body: Data, certificate: String, key: String, dir: String) throws -> NginxPeer {
        try FileManager.default.createDirectory(atPath: "\(dir)/www", withIntermediateDirectories: true)
        try body.write(to: URL(fileURLWithPath: "\(dir)/www/object.json"))
        let port = freePort()
        try """
            worker_processes auto;
            daemon off;
            pid \(dir)/nginx.pid;
            error_log \(dir)/error.log;
            events { worker_connections 1024; }
            http {
              access_log off;
              default_type application/json;
              client_body_temp_path \(dir)/tmp;
              server {
                listen 127.0.0.1:\(port) ssl;
                ssl_certificate \(certificate);
                ssl_certificate_key \(key);
                ssl_protocols TLSv1.3;
                root \(dir)/www;
              }
            }
            """.write(toFile: "\(dir)/nginx.conf", atomically: true, encoding: .utf8)
        let p = Process()
        p.executableURL = URL(fileURLWithPath: binary)
        p.arguments = ["-c", "\(dir)/nginx.conf", "-p", dir]
        p.standardError = FileHandle.nullDevice
        try p.run()
        let deadline = Date().addingTimeInterval(5)
        while Date() < deadline {
            let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
            var a = sockaddr_in()
            a.sin_family = sa_family_t(AF_INET)
            a.sin_port = UInt16(port).bigEndian
            a.sin_addr.s_addr = inet_addr("127.0.0.1")
            let ok = withUnsafePointer(to: &a) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, 16) } } == 0
            close(fd)
            if ok { return NginxPeer(process: p, port: port) }
            usleep(50_000)
        }
        p.terminate()
        throw CLIFailure("nginx did not listen on \(port)")
    }

    func stop() {
        process.terminate()
        process.waitUntilExit()
    }
}

func percentile(_ xs: [Double], _ p: Double) -> Double {
    let s = xs.sorted()
    return s.isEmpty ? 0 : s[min(s.count - 1, Int((Double(s.count) * p).rounded(.up)) - 1)]
}

/// Runs wrk against the API; returns requests per second.
func wrk(_ url: String, token: String, script: String?, seconds: Int = 10, connections: Int = 16) throws -> Double {
    let p = Process()
    p.executableURL = URL(fileURLWithPath: "/usr/bin/wrk")
    var a = ["-t2", "-c\(connections)", "-d\(seconds)s", "-H", "Authorization: Bearer \(token)", "--latency"]
    if let script { a += ["-s", script] }
    p.arguments = a + [url]
    let pipe = Pipe()
    p.standardOutput = pipe
    try p.run()
    let out = String(decoding: pipe.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
    p.waitUntilExit()
    let lines = out.split(separator: "\n")
    let rate = Double(lines.first { $0.hasPrefix("Requests/sec:") }?.split(separator: " ").last ?? "0") ?? 0
    // Only answered requests count: "N requests in Ts" and "Non-2xx or 3xx responses: M".
    let total = Double(lines.first { $0.contains(" requests in ") }?.split(separator: " ").first ?? "0") ?? 0
    let failed = Double(lines.first { $0.contains("Non-2xx") }?.split(separator: " ").last ?? "0") ?? 0
    if failed > 0 { log("wrk \(url): \(Int(failed)) of \(Int(total)) answers were not 2xx") }
    return total > 0 ? rate * (total - failed) / total : 0
}

func run() async throws -> [String: Any] {
    let shape = Bench.shape, work = Bench.work
    var result: [String: Any] = ["services": shape.services, "endpoints": shape.endpoints, "agents": shape.nodes]
    try? FileManager.default.removeItem(atPath: work)
    log("writing the mesh: \(shape.services) services, \(shape.endpoints) endpoints, \(shape.nodes) nodes")
    try writeMesh(shape, to: "\(work)/mesh")
    log("starting sluice control (seeding the store)")
    let control = try Control.start(mesh: "\(work)/mesh", dir: "\(work)/big")
    defer { control.stop() }
    result["seed_seconds"] = control.seedSeconds
    result["seed_writes_per_second"] = Double(shape.endpoints + shape.services + 11) / control.seedSeconds
    result["control_rss_mb_seeded"] = rssMB(control.process.processIdentifier)
    log("seeded in \(Int(control.seedSeconds)) s; control plane RSS \(Int(rssMB(control.process.processIdentifier))) MB")

    // Node certificates from the mesh CA (its key is in the state directory: the embedded CA).
    let state = "\(control.dir)/state"
    let rootPEM = try String(contentsOfFile: "\(state)/root-cert.pem", encoding: .utf8)
    let ca = try CertificateAuthority(trustDomain: "cluster.local", certificatePEM: rootPEM,
                                      keyPEM: try String(contentsOfFile: "\(state)/root-key.pem", encoding: .utf8),
                                      rootPEM: [rootPEM])
    try FileManager.default.createDirectory(atPath: "\(work)/certs", withIntermediateDirectories: true)
    var agents: [SimAgent] = []
    for n in 0..<shape.nodes {
        let id = SPIFFEID(trustDomain: "cluster.local", namespace: "sluice-nodes", serviceAccount: "node-\(n)")
        let key = WorkloadKey()
        let issued = try ca.sign(requestPEM: try key.signingRequest(for: id), for: id, lifetime: .seconds(3600), requester: "bench")
        let files = ("\(work)/certs/node-\(n).crt", "\(work)/certs/node-\(n).key")
        try ([issued.certificate] + issued.chain).joined().write(toFile: files.0, atomically: true, encoding: .utf8)
        try key.privateKeyPEM.write(toFile: files.1, atomically: true, encoding: .utf8)
        agents.append(SimAgent(node: "node-\(n)", chain: files.0, key: files.1, root: "\(state)/root-cert.pem",
                               port: control.streamPort))
    }

    // Reconnect storms: every agent at once, from nothing, then again resuming what it holds.
    for resume in [false, true] {
        let before = agents.map { $0.acks.load(ordering: .relaxed) }
        // Where the storm's time goes: the control plane's CPU, and this process's (the 500 simulated agents share
        // the machine's two cores with it, decoding and applying every snapshot as agents would on their own hosts).
        let cpu0 = (cpuSeconds(control.process.processIdentifier), cpuSeconds(getpid()))
        let t0 = ContinuousClock.now
        for a in agents { a.start(resume: resume) }
        while zip(agents, before).contains(where: { $0.acks.load(ordering: .relaxed) == $1 }) {
            try await Task.sleep(for: .milliseconds(5))
            if ContinuousClock.now - t0 > .seconds(300) { throw CLIFailure("the storm did not complete in 300 s") }
        }
        let took = ContinuousClock.now - t0
        let seconds = Double(took.components.seconds) + Double(took.components.attoseconds) / 1e18
        result[resume ? "storm_resume_seconds" : "storm_seconds"] = seconds
        let controlCPU = cpuSeconds(control.process.processIdentifier) - cpu0.0, benchCPU = cpuSeconds(getpid()) - cpu0.1
        result[resume ? "storm_resume_control_cpu_seconds" : "storm_control_cpu_seconds"] = controlCPU
        result[resume ? "storm_resume_agents_cpu_seconds" : "storm_agents_cpu_seconds"] = benchCPU
        log(String(format: "  CPU during the storm: control plane %.2f s, simulated agents %.2f s", controlCPU, benchCPU))
        let failed = agents.map { $0.failures.load(ordering: .relaxed) }.reduce(0, +)
        log("reconnect storm (\(resume ? "resuming" : "from nothing")): all \(agents.count) agents synced in \(String(format: "%.2f", seconds)) s (streams that failed and were retried so far: \(failed))")
        result[resume ? "storm_resume_retries" : "storm_retries"] = failed
        let sizes = agents.map { $0.held.withLock { $0.0.clusters.flatMap(\.endpoints).count } }
        result["endpoints_per_agent"] = sizes.max() ?? 0
        if !resume {
            result["control_rss_mb_with_agents"] = rssMB(control.process.processIdentifier)
            for a in agents { a.stop() }
            try await Task.sleep(for: .seconds(1))
        }
    }

    // One endpoint change at a time: PUT through the API until both affected agents have applied and ACKed it.
    let api = try Control.api(dir: control.dir, port: control.apiPort)
    let token = control.token
    var latencies: [Double] = []
    for i in 0..<100 {
        let k = (i * 37) % shape.namespaces, j = i % shape.servicesPerNamespace
        let marker = "10.255.\(i / 250).\(i % 250 + 1)"
        let affected = [agents[k], agents[(k + 1) % shape.nodes]]
        for a in affected { a.watching.withLock { $0 = marker } }
        let path = "/apis/networking.istio.io/v1/namespaces/ns-\(k)/workloadentries/svc-\(j)-0"
        let get = try api.request("GET", path, headers: [("authorization", "Bearer \(token)")])
        guard get.status == 200, var o = try? JSONValue(parsing: Data(get.body)) else { throw CLIFailure("GET \(path): \(get.status)") }
        var spec = o["spec"]?.objectValue ?? [:]
        spec["address"] = .string(marker)
        o["spec"] = .object(spec)
        let t0 = ContinuousClock.now
        let put = try api.request("PUT", path, headers: [("authorization", "Bearer \(token)"), ("content-type", "application/json")],
                                  body: Array(o.data))
        guard put.status == 200 else { throw CLIFailure("PUT \(path): \(put.status) \(String(decoding: put.body, as: UTF8.self))") }
        let deadline = t0 + .seconds(10)
        while affected.contains(where: { $0.seen.withLock { $0[marker] } == nil }) && ContinuousClock.now < deadline {
            try await Task.sleep(for: .microseconds(200))
        }
        let done = affected.compactMap { $0.seen.withLock { $0[marker] } }.max() ?? deadline
        let d = done - t0
        latencies.append(Double(d.components.seconds) * 1000 + Double(d.components.attoseconds) / 1e15)
        for a in affected { a.watching.withLock { $0 = nil } }
        try await Task.sleep(for: .milliseconds(150))
    }
    result["push_ms_p50"] = percentile(latencies, 0.5)
    result["push_ms_p99"] = percentile(latencies, 0.99)
    result["push_ms_max"] = latencies.max() ?? 0
    log(String(format: "endpoint change -> every affected agent ACKed: p50 %.1f ms, p99 %.1f ms", percentile(latencies, 0.5),
               percentile(latencies, 0.99)))
    result["control_rss_mb"] = rssMB(control.process.processIdentifier)

    // API throughput (wrk over HTTPS): reads of one object, and creates of new ones.
    let base = "https://127.0.0.1:\(control.apiPort)"
    let readPath = "/apis/networking.istio.io/v1/namespaces/ns-1/serviceentries/svc-1"
    result["api_reads_per_second"] = try wrk("\(base)\(readPath)", token: token, script: nil)
    // The peer for reads: nginx (as many workers as cores) serving the same object's bytes as a static file over
    // HTTPS with the control plane's own certificate, under the same wrk load: what TLS and HTTP cost on this
    // machine before any API work.
    if FileManager.default.isExecutableFile(atPath: NginxPeer.binary) {
        let body = Data(try api.request("GET", readPath, headers: [("authorization", "Bearer \(token)")]).body)
        let peer = try NginxPeer.start(body: body, certificate: "\(control.dir)/state/control.crt",
                                       key: "\(control.dir)/state/control.key", dir: "\(work)/nginx")
        result["nginx_static_reads_per_second"] = try wrk("https://127.0.0.1:\(peer.port)/object.json", token: token, script: nil)
        peer.stop()
    } else {
        log("\(NginxPeer.binary) is not installed (make bench-deps installs it): no peer figure for reads")
    }
    let script = "\(work)/create.lua"
    try """
        -- Each wrk thread has its own Lua state: setup() gives each a distinct prefix so names never collide.
        local threads = 0
        setup = function(thread)
          threads = threads + 1
          thread:set("id", tostring(threads) .. "-" .. tostring(os.time()))
        end
        local n = 0
        wrk.headers["Content-Type"] = "application/json"
        request = function()
          n = n + 1
          local body = '{"apiVersion":"networking.istio.io/v1","kind":"WorkloadEntry","metadata":{"name":"w-' .. id .. '-' .. n .. '","namespace":"load"},"spec":{"address":"10.200.0.1","labels":{"app":"load"}}}'
          return wrk.format("POST", "/apis/networking.istio.io/v1/namespaces/load/workloadentries", nil, body)
        end
        """.write(toFile: script, atomically: true, encoding: .utf8)
    result["api_writes_per_second"] = try wrk(base, token: token, script: script)
    log("API: \(Int(result["api_reads_per_second"] as! Double)) reads/s, \(Int(result["api_writes_per_second"] as! Double)) writes/s")
    for a in agents { a.stop() }

    // A real agent's RSS with 10 local workloads, in this mesh and in one of 1,000 endpoints.
    func agentRSS(_ c: Control, _ name: String) throws -> Double {
        let work = Bench.work
        try "tok-bench\n".write(toFile: "\(work)/\(name).token", atomically: true, encoding: .utf8)
        let p = Process()
        p.executableURL = URL(fileURLWithPath: Bench.sluice)
        p.arguments = ["agent", "--control", "127.0.0.1:\(c.caPort)", "--stream-port", "\(c.streamPort)",
                       "--ca-root", "\(c.dir)/state/root-cert.pem", "--join-token", "\(work)/\(name).token",
                       "--node", "bench-agent", "--workers", "1", "--state-dir", "\(work)/\(name)-agent",
                       "--metrics", "127.0.0.1:0", "--readiness", "127.0.0.1:0", "--admin", "127.0.0.1:0", "--dns-port", "0",
                       "--log-level", "warning"]
        p.standardError = FileHandle.nullDevice
        try p.run()
        defer {
            p.terminate()
            p.waitUntilExit()
        }
        let deadline = Date().addingTimeInterval(60)
        while !FileManager.default.fileExists(atPath: "\(work)/\(name)-agent/snapshot.json") && Date() < deadline {
            Thread.sleep(forTimeInterval: 0.1)
        }
        Thread.sleep(forTimeInterval: 2)
        return rssMB(p.processIdentifier)
    }
    result["agent_rss_mb_100k"] = try agentRSS(control, "big")
    var small = shape
    small.namespaces = 5
    try writeMesh(small, to: "\(work)/small-mesh")
    let smallControl = try Control.start(mesh: "\(work)/small-mesh", dir: "\(work)/small")
    defer { smallControl.stop() }
    result["agent_rss_mb_1k"] = try agentRSS(smallControl, "small")
    log("agent RSS with 10 local workloads: \(result["agent_rss_mb_1k"]!) MB at 1,000 endpoints, \(result["agent_rss_mb_100k"]!) MB at 100,000")
    return result
}

let done = DispatchSemaphore(value: 0)
nonisolated(unsafe) var output: [String: Any] = [:]
nonisolated(unsafe) var failure: (any Error)?
// Detached: the main thread waits below, and a task inheriting the main actor would wait for it.
Task.detached {
    do { output = try await run() } catch { failure = error }
    done.signal()
}
done.wait()
try? FileManager.default.removeItem(atPath: Bench.work)
if let failure {
    log("bench-control failed: \(failure)")
    exit(1)
}
print(String(decoding: try JSONSerialization.data(withJSONObject: output, options: [.sortedKeys]), as: UTF8.self))
