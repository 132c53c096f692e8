import Foundation
import Glibc
import SluiceBPF
import SluiceModel
import SluiceProxy
import XCTest

/// Root-only: real processes in a test cgroup connect to a service address and the kernel balances them.
/// Service addresses are in 127.0.0.0/8, so a connect the programs fail to rewrite is refused on loopback
/// instead of leaving the machine.
final class BPFCaptureTests: XCTestCase {
    /// Mounts these tests made because the host had none (a fresh CI machine): undone after the last test.
    nonisolated(unsafe) static var mountedCgroup2: String?
    nonisolated(unsafe) static var mountedBPFFS = false

    override class func setUp() {
        super.setUp()
        guard geteuid() == 0 else { return }
        if Mounts.cgroup2() == nil { mountedCgroup2 = try? Mounts.ensureCgroup2() }
        if !Mounts.isBPFFS() { mountedBPFFS = (try? Mounts.ensureBPFFS()) != nil }
    }

    override class func tearDown() {
        if let m = mountedCgroup2 { umount2(m, 0) }
        // Only if nothing else was pinned meanwhile (the kernel's own iterator files aside).
        if mountedBPFFS, let left = try? FileManager.default.contentsOfDirectory(atPath: "/sys/fs/bpf"),
            Set(left).isSubset(of: ["maps.debug", "progs.debug"])
        {
            umount2("/sys/fs/bpf", 0)
        }
        super.tearDown()
    }

    var cgroup = ""
    var pinDirectory = ""
    var datapath: Datapath?
    var processes: [Process] = []
    var scratch: URL!

    override func setUpWithError() throws {
        guard geteuid() == 0 else {
            if ProcessInfo.processInfo.environment["CI"] == "true" {
                XCTFail("BPF tests need root, and CI runs as root: this machine cannot run them")
            }
            throw XCTSkip("BPF tests need root")
        }
        let id = UUID().uuidString.prefix(8)
        cgroup = try Mounts.ensureCgroup2() + "/sluice-test-\(id)"
        XCTAssertEqual(mkdir(cgroup, 0o755), 0, "mkdir \(cgroup): \(String(cString: strerror(errno)))")
        pinDirectory = "/sys/fs/bpf/sluice-test-\(id)"
        scratch = FileManager.default.temporaryDirectory.appendingPathComponent("sluice-bpf-\(id)")
        try FileManager.default.createDirectory(at: scratch, withIntermediateDirectories: true)
    }

    override func tearDown() {
        for p in processes where p.isRunning {
            p.terminate()
            p.waitUntilExit()
        }
        try? datapath?.uninstall()
        datapath = nil
        // Pins of a datapath a test dropped on purpose.
        if let leftovers = try? FileManager.default.contentsOfDirectory(atPath: pinDirectory) {
            for f in leftovers { unlink("\(pinDirectory)/\(f)") }
            rmdir(pinDirectory)
        }
        if !cgroup.isEmpty { rmdir(cgroup) }
        try? FileManager.default.removeItem(at: scratch)
    }

    /// The kernel frees a released link's attachment asynchronously; give it up to two seconds.
    func attachedAfterRelease() -> Int {
        for _ in 0..<200 {
            if Datapath.attachedPrograms(cgroup: cgroup) == 0 { return 0 }
            usleep(10_000)
        }
        return Datapath.attachedPrograms(cgroup: cgroup)
    }

    var objectDirectory: String { Harness.root.appendingPathComponent(".build/bpf").path }

    func backends(_ names: [String]) throws -> [UInt16] {
        let (p, ports) = try Harness.backends(names.map { "tag:0:\($0)" })
        processes.append(p)
        return ports
    }

    static func service(_ address: String, _ backends: [(UInt16, UInt32)],
                        lb: NodeSnapshot.BPFService.LoadBalancing = .random) -> NodeSnapshot.BPFService {
        let list = backends.map { NodeSnapshot.BPFService.Backend(address: EndpointAddress(parsing: "127.0.0.1:\($0.0)")!,
                                                                  weight: $0.1) }
        return NodeSnapshot.BPFService(address: EndpointAddress(parsing: address)!, protocol: .tcp, host: "svc.test",
                                       action: .balance(loadBalancing: lb, backends: list))
    }

    /// Runs the Python `source` from a process placed in the test cgroup (the shell joins the cgroup first, then
    /// becomes the client: every connect comes from the cgroup); returns what it printed.
    func runInCgroup(_ source: String, name: String = "client.py") throws -> String {
        let script = scratch.appendingPathComponent(name)
        try source.write(to: script, atomically: true, encoding: .utf8)
        let p = Process()
        p.executableURL = URL(fileURLWithPath: "/bin/sh")
        p.arguments = ["-c", "echo $$ > \(cgroup)/cgroup.procs && exec python3 \(script.path)"]
        let out = Pipe()
        p.standardOutput = out
        try p.run()
        processes.append(p)
        let data = out.fileHandleForReading.readDataToEndOfFile()
        p.waitUntilExit()
        XCTAssertEqual(p.terminationStatus, 0)
        return String(decoding: data, as: UTF8.self)
    }

    /// Starts the agent binary on `config`, capturing the test cgroup; returns once it says it is ready (or
    /// exited), with its log so far and the pipe the rest of its log comes on.
    func startAgent(config: URL) throws -> (agent: Process, log: String, err: Pipe) {
        let agent = Process()
        agent.executableURL = URL(fileURLWithPath: Harness.root.appendingPathComponent(".build/debug/sluice").path)
        agent.arguments = ["agent", "--local-config", config.path, "--node", "n1", "--cgroup", cgroup,
                           "--pin-dir", pinDirectory, "--bpf-dir", objectDirectory, "--workers", "1",
                           "--outbound-port", String(Harness.deadPort()), "--dns-port", "0",
                           "--metrics", "127.0.0.1:0", "--readiness", "127.0.0.1:0", "--admin", "127.0.0.1:0"]
        let err = Pipe()
        agent.standardError = err
        try agent.run()
        processes.append(agent)
        var log = ""
        let deadline = Date().addingTimeInterval(20)
        while !log.contains("agent ready") && Date() < deadline && agent.isRunning {
            let d = err.fileHandleForReading.availableData
            if d.isEmpty { break }
            log += String(decoding: d, as: UTF8.self)
        }
        return (agent, log, err)
    }

    /// Runs `connects` connects to `address` from a process placed in the test cgroup; returns how many landed on
    /// each backend tag ("refused" when nothing rewrote the destination).
    func connectFromCgroup(_ address: String, connects: Int) throws -> [String: Int] {
        let (host, port) = (address.split(separator: ":")[0], address.split(separator: ":")[1])
        let data = Data(try runInCgroup("""
            import collections, json, socket
            counts = collections.Counter()
            for _ in range(\(connects)):
                s = socket.socket()
                s.settimeout(5)
                try:
                    s.connect(("\(host)", \(port)))
                    counts["peer %s:%d" % s.getpeername()] += 1
                    counts[s.makefile().readline().strip()] += 1
                except OSError as e:
                    counts["refused" if isinstance(e, ConnectionRefusedError) else type(e).__name__] += 1
                s.close()
            print(json.dumps(counts))
            """).utf8)
        var counts = (try JSONSerialization.jsonObject(with: data) as? [String: Int]) ?? [:]
        // Every connect that got through saw the service address as its peer, whatever backend it reached.
        let peers = counts.filter { $0.key.hasPrefix("peer ") }
        let landed = counts.filter { !$0.key.hasPrefix("peer ") && $0.key != "refused" }.values.reduce(0, +)
        if landed > 0 { XCTAssertEqual(peers, ["peer \(address)": landed], "getpeername shows the dialled address") }
        for k in peers.keys { counts[k] = nil }
        return counts
    }

    func testConnectsToAServiceLandOnBackendsInProportionToWeights() throws {
        let ports = try backends(["a", "b", "c"])
        let dp = try Datapath(objectDirectory: objectDirectory, pinDirectory: pinDirectory)
        datapath = dp
        try dp.attach(cgroup: cgroup)
        try dp.apply([Self.service("127.96.7.7:80", [(ports[0], 1), (ports[1], 2), (ports[2], 3)])])
        let n = 1200
        let counts = try connectFromCgroup("127.96.7.7:80", connects: n)
        XCTAssertEqual(counts.values.reduce(0, +), n, "\(counts)")
        // Chi-square against 1:2:3 with 2 degrees of freedom; 13.82 is the 0.1% critical value. A program that
        // does nothing leaves every connect refused, one that ignores weights lands near 1:1:1 (chi2 ~ 200).
        let expected = ["a": Double(n) / 6, "b": Double(n) / 3, "c": Double(n) / 2]
        let chi2 = expected.reduce(0.0) { acc, e in
            let o = Double(counts[e.key] ?? 0)
            return acc + (o - e.value) * (o - e.value) / e.value
        }
        XCTAssertLessThan(chi2, 13.82, "\(counts)")
        let c = dp.counters()
        XCTAssertGreaterThanOrEqual(c.connects, UInt64(n))
        XCTAssertEqual(c.balanced, UInt64(n))
        XCTAssertEqual(c.misses, 0)

        // Connects from outside the cgroup (this test process) are not touched.
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        defer { close(fd) }
        var sa = sockaddr_in()
        sa.sin_family = sa_family_t(AF_INET)
        sa.sin_port = UInt16(80).bigEndian
        sa.sin_addr.s_addr = inet_addr("127.96.7.7")
        let rc = withUnsafePointer(to: &sa) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, 16) } }
        XCTAssertEqual(rc, -1)
        XCTAssertEqual(errno, ECONNREFUSED)
    }

    func testMaglevKeepsOneClientWorkloadOnOneBackend() throws {
        let ports = try backends(["a", "b", "c"])
        let dp = try Datapath(objectDirectory: objectDirectory, pinDirectory: pinDirectory)
        datapath = dp
        try dp.attach(cgroup: cgroup)
        try dp.apply([Self.service("127.96.7.8:80", ports.map { ($0, 1) }, lb: .maglev)])
        let counts = try connectFromCgroup("127.96.7.8:80", connects: 200)
        XCTAssertEqual(counts.count, 1, "one cgroup, one backend: \(counts)")
        XCTAssertEqual(counts.values.first, 200)
        XCTAssertNotNil(["a", "b", "c"].first { counts[$0] != nil })
    }

    func testUpdatesMoveTrafficAndRemovedServicesStopBeingBalanced() throws {
        let ports = try backends(["a", "b"])
        let dp = try Datapath(objectDirectory: objectDirectory, pinDirectory: pinDirectory)
        datapath = dp
        try dp.attach(cgroup: cgroup)
        try dp.apply([Self.service("127.96.7.9:80", [(ports[0], 1)])])
        XCTAssertEqual(try connectFromCgroup("127.96.7.9:80", connects: 20), ["a": 20])
        try dp.apply([Self.service("127.96.7.9:80", [(ports[1], 1)])])
        XCTAssertEqual(try connectFromCgroup("127.96.7.9:80", connects: 20), ["b": 20])
        try dp.apply([])
        XCTAssertEqual(try connectFromCgroup("127.96.7.9:80", connects: 5), ["refused": 5])
    }

    func testARestartedAgentAdoptsPinnedProgramsWithoutAGap() throws {
        let ports = try backends(["a"])
        var first: Datapath? = try Datapath(objectDirectory: objectDirectory, pinDirectory: pinDirectory)
        try first!.attach(cgroup: cgroup)
        try first!.apply([Self.service("127.96.7.10:80", [(ports[0], 1)])])
        first = nil  // the agent exits without uninstalling
        XCTAssertEqual(Datapath.attachedPrograms(cgroup: cgroup), Datapath.programCount)
        XCTAssertEqual(try connectFromCgroup("127.96.7.10:80", connects: 10), ["a": 10], "balanced while no agent runs")

        let second = try Datapath(objectDirectory: objectDirectory, pinDirectory: pinDirectory)
        datapath = second
        try second.attach(cgroup: cgroup)
        XCTAssertEqual(Datapath.attachedPrograms(cgroup: cgroup), Datapath.programCount, "adopted, not attached twice")
        try second.apply([Self.service("127.96.7.10:80", [(ports[0], 1)])])
        XCTAssertEqual(try connectFromCgroup("127.96.7.10:80", connects: 10), ["a": 10])

        try second.uninstall()
        datapath = nil
        XCTAssertEqual(attachedAfterRelease(), 0)
        XCTAssertFalse(FileManager.default.fileExists(atPath: pinDirectory), "no pins left")
        XCTAssertEqual(try connectFromCgroup("127.96.7.10:80", connects: 3), ["refused": 3])
    }

    func testAnUpdateThatDoesNotFitIsRefusedWhole() throws {
        let ports = try backends(["a"])
        let dp = try Datapath(objectDirectory: objectDirectory, pinDirectory: pinDirectory)
        datapath = dp
        try dp.attach(cgroup: cgroup)
        try dp.apply([Self.service("127.96.7.11:80", [(ports[0], 1)])])
        let tooMany = (0..<(Datapath.maxServices + 1)).map { i in
            Self.service("127.97.\(i / 250 % 250).\(i % 250 + 1):\(1000 + i / 62_500)", [(ports[0], 1)])
        }
        XCTAssertThrowsError(try dp.apply(tooMany)) { error in
            XCTAssertTrue("\(error)".contains("exceed the services map's 65536"), "\(error)")
        }
        XCTAssertEqual(try connectFromCgroup("127.96.7.11:80", connects: 5), ["a": 5], "the old state still serves")
    }

    /// A service that needs the agent: the connect lands on the agent's listener, and the agent finds the
    /// original destination and the client's cgroup by the client's address.
    func testCapturedConnectionsReachTheAgentWithTheirOriginalDestination() throws {
        let (listener, agentPort) = Harness.loopbackSocket(backlog: 16)
        defer { close(listener) }
        let dp = try Datapath(objectDirectory: objectDirectory, pinDirectory: pinDirectory)
        datapath = dp
        try dp.attach(cgroup: cgroup)
        try dp.setAgent(address: "127.0.0.1", port: agentPort)
        try dp.apply([NodeSnapshot.BPFService(address: EndpointAddress(parsing: "127.96.8.1:9080")!, protocol: .tcp,
                                              host: "reviews.test", action: .proxy(reason: "HTTP"))])
        let client = Thread { [self] in
            // The accepted socket answers with a tag, like a backend would.
            let fd = accept(listener, nil, nil)
            guard fd >= 0 else { return }
            var peer = sockaddr_in()
            var len = socklen_t(MemoryLayout<sockaddr_in>.size)
            _ = withUnsafeMutablePointer(to: &peer) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getpeername(fd, $0, &len) } }
            let found = dp.originalDestination(clientIPv4: peer.sin_addr.s_addr, port: UInt16(bigEndian: peer.sin_port))
            let reply = found.map { "\($0.address) \($0.cgroupID)\n" } ?? "unknown\n"
            _ = reply.withCString { send(fd, $0, strlen($0), 0) }
            close(fd)
        }
        client.start()
        let counts = try connectFromCgroup("127.96.8.1:9080", connects: 1)
        var st = stat()
        stat(cgroup, &st)
        XCTAssertEqual(counts, ["127.96.8.1:9080 \(st.st_ino)": 1], "original destination and the client's cgroup id")
        XCTAssertEqual(dp.counters().redirected, 1)
    }

    func testExcludedDestinationsAreNeverTouched() throws {
        let ports = try backends(["a"])
        let dp = try Datapath(objectDirectory: objectDirectory, pinDirectory: pinDirectory)
        datapath = dp
        try dp.attach(cgroup: cgroup)
        try dp.apply([Self.service("127.96.9.1:80", [(ports[0], 1)]), Self.service("127.96.10.1:81", [(ports[0], 1)])])
        try dp.setExclusions(cidrs: ["127.96.9.0/24"], ports: [81])
        XCTAssertEqual(try connectFromCgroup("127.96.9.1:80", connects: 3), ["refused": 3], "excluded by CIDR")
        XCTAssertEqual(try connectFromCgroup("127.96.10.1:81", connects: 3), ["refused": 3], "excluded by port")
        XCTAssertEqual(dp.counters().excluded, 6)
        try dp.setExclusions(cidrs: [], ports: [])
        XCTAssertEqual(try connectFromCgroup("127.96.9.1:80", connects: 3), ["a": 3])
        XCTAssertThrowsError(try dp.setExclusions(cidrs: ["10.0.0.0/40"], ports: []))
    }

    func testUninstallWithoutObjectFilesRemovesPinsAndDetaches() throws {
        var dp: Datapath? = try Datapath(objectDirectory: objectDirectory, pinDirectory: pinDirectory)
        try dp!.attach(cgroup: cgroup)
        dp = nil
        XCTAssertEqual(Datapath.attachedPrograms(cgroup: cgroup), Datapath.programCount)
        try Datapath.uninstall(pinDirectory: pinDirectory)
        XCTAssertEqual(attachedAfterRelease(), 0)
        XCTAssertFalse(FileManager.default.fileExists(atPath: pinDirectory))
        try Datapath.uninstall(pinDirectory: pinDirectory)  // nothing there: not an error
    }

    /// Captured connections to an HTTP service port go through the L7 pipeline: the service's VirtualService
    /// routes each request (by header to a subset, by path to a fault), on one captured keep-alive connection.
    /// A client workload and web.shop (127.96.12.2:80, endpoints v1 and v2) with a VirtualService: `x-canary: yes`
    /// goes to v2, `/teapot` gets a 418 fault, the rest goes to v1.
    static func webService(_ ports: [UInt16], port: String, portName: String) -> String {
        """
            apiVersion: networking.istio.io/v1
            kind: WorkloadEntry
            metadata: {name: client, namespace: shop, annotations: {sluice.dev/node: n1}}
            spec: {address: 127.0.0.2, labels: {app: client}}
            ---
            apiVersion: networking.istio.io/v1
            kind: ServiceEntry
            metadata: {name: web, namespace: shop}
            spec:
              hosts: [web.shop.svc.cluster.local]
              addresses: [127.96.12.2]
              location: MESH_INTERNAL
              resolution: STATIC
              ports: [\(port)]
              endpoints:
              - {address: 127.0.0.1, ports: {\(portName): \(ports[0])}, labels: {version: v1}}
              - {address: 127.0.0.1, ports: {\(portName): \(ports[1])}, labels: {version: v2}}
            ---
            apiVersion: networking.istio.io/v1
            kind: DestinationRule
            metadata: {name: web, namespace: shop}
            spec:
              host: web.shop.svc.cluster.local
              subsets: [{name: v1, labels: {version: v1}}, {name: v2, labels: {version: v2}}]
            ---
            apiVersion: networking.istio.io/v1
            kind: VirtualService
            metadata: {name: web, namespace: shop}
            spec:
              hosts: [web.shop.svc.cluster.local]
              http:
              - match: [{headers: {x-canary: {exact: "yes"}}}]
                route: [{destination: {host: web.shop.svc.cluster.local, subset: v2}}]
              - match: [{uri: {prefix: /teapot}}]
                fault: {abort: {httpStatus: 418, percentage: {value: 100}}}
                route: [{destination: {host: web.shop.svc.cluster.local, subset: v1}}]
              - match: [{uri: {prefix: /from-client}, sourceLabels: {app: client}}]
                route: [{destination: {host: web.shop.svc.cluster.local, subset: v2}}]
              - route: [{destination: {host: web.shop.svc.cluster.local, subset: v1}}]
            """
    }

    func testCapturedHTTPRequestsAreRoutedByTheServicesVirtualService() throws {
        let (backend, ports) = try Harness.backends(["v1:0", "v2:0"], script: "http_backend.py")
        processes.append(backend)
        let config = scratch.appendingPathComponent("config")
        try FileManager.default.createDirectory(at: config, withIntermediateDirectories: true)
        try Self.webService(ports, port: "{number: 80, name: http, protocol: HTTP}", portName: "http")
            .write(to: config.appendingPathComponent("mesh.yaml"), atomically: true, encoding: .utf8)
        let (agent, log, _) = try startAgent(config: config)
        XCTAssertTrue(log.contains("via_agent=1"), log)
        let text = try runInCgroup("""
            import http.client
            c = http.client.HTTPConnection("127.96.12.2", 80, timeout=5)
            out = []
            for path, headers in [("/a", {}), ("/b", {"x-canary": "yes"}), ("/teapot", {}), ("/c", {})]:
                headers["Host"] = "web.shop.svc.cluster.local"
                c.request("GET", path, headers=headers)
                r = c.getresponse()
                out.append("%d %s" % (r.status, r.getheader("x-backend") or "-"))
                r.read()
            print(",".join(out))
            """, name: "http_client.py")
        XCTAssertEqual(text.trimmingCharacters(in: .whitespacesAndNewlines), "200 v1,200 v2,418 -,200 v1", log)
        agent.terminate()
        agent.waitUntilExit()
    }

    /// Ports that declare no protocol: HTTP is recognised by its request line and routed by the VirtualService;
    /// other bytes, and a server-first protocol whose client says nothing, are relayed as TCP.
    func testPortsWithoutAProtocolAreDetectedFromTheFirstBytes() throws {
        let (web, ports) = try Harness.backends(["v1:0", "v2:0"], script: "http_backend.py")
        processes.append(web)
        let (chat, chatPorts) = try Harness.backends(["tag:0:banner"])
        processes.append(chat)
        let config = scratch.appendingPathComponent("config")
        try FileManager.default.createDirectory(at: config, withIntermediateDirectories: true)
        try (Self.webService(ports, port: "{number: 80, name: web}", portName: "web") + """

            ---
            apiVersion: networking.istio.io/v1
            kind: ServiceEntry
            metadata: {name: chat, namespace: shop}
            spec:
              hosts: [chat.shop.svc.cluster.local]
              addresses: [127.96.12.3]
              location: MESH_INTERNAL
              resolution: STATIC
              ports: [{number: 7000, name: chat}]
              endpoints: [{address: 127.0.0.1, ports: {chat: \(chatPorts[0])}, labels: {version: v1}}]
            ---
            apiVersion: networking.istio.io/v1
            kind: DestinationRule
            metadata: {name: chat, namespace: shop}
            spec:
              host: chat.shop.svc.cluster.local
              subsets: [{name: v1, labels: {version: v1}}]
            """).write(to: config.appendingPathComponent("mesh.yaml"), atomically: true, encoding: .utf8)
        let (agent, log, _) = try startAgent(config: config)
        XCTAssertTrue(log.contains("via_agent=2"), log)
        let text = try runInCgroup("""
            import http.client, socket, time
            out = []
            c = http.client.HTTPConnection("127.96.12.2", 80, timeout=5)
            for headers in [{}, {"x-canary": "yes"}]:
                c.request("GET", "/", headers=headers)
                r = c.getresponse()
                out.append("%d %s" % (r.status, r.getheader("x-backend")))
                r.read()
            # sourceLabels: only the client workload (127.0.0.2, app=client) is sent to v2.
            for source in ["127.0.0.2", "127.0.0.1"]:
                c = http.client.HTTPConnection("127.96.12.2", 80, timeout=5, source_address=(source, 0))
                c.request("GET", "/from-client")
                r = c.getresponse()
                out.append("%s %s" % (source, r.getheader("x-backend")))
                r.read()
            def line(f):
                return f.readline().decode().strip()
            # Server-first: the client waits for the banner without sending anything.
            s = socket.create_connection(("127.96.12.3", 7000), timeout=5)
            f = s.makefile("rb")
            start = time.monotonic()
            out.append(line(f))
            waited = time.monotonic() - start
            s.sendall(b"hello\\n")
            out.append(line(f))
            s.close()
            # Binary first bytes: relayed as they are.
            s = socket.create_connection(("127.96.12.3", 7000), timeout=5)
            f = s.makefile("rb")
            s.sendall(b"\\x00\\x01raw\\n")
            out.append(line(f))
            out.append(repr(f.readline().strip()))
            s.close()
            print(",".join(out))
            print("waited %.3f" % waited)
            """, name: "detect_client.py")
        let lines = text.split(separator: "\n").map(String.init)
        XCTAssertEqual(lines.first, "200 v1,200 v2,127.0.0.2 v2,127.0.0.1 v1,banner,hello,banner,b'\\x00\\x01raw'", log)
        // The banner came after the detection timeout (100 ms), not at once and not much later.
        let waited = Double(lines.last?.split(separator: " ").last ?? "") ?? -1
        XCTAssertGreaterThan(waited, 0.08)
        XCTAssertLessThan(waited, 1.5)
        agent.terminate()
        agent.waitUntilExit()
    }

    /// The agent binary end to end: it captures a cgroup, balances an L4-only service in the kernel, follows
    /// config changes, keeps the kernel path working after it exits, and `--uninstall-bpf` removes everything.
    func testAgentLifecycleWithCaptureOnACgroup() throws {
        let ports = try backends(["a", "b"])
        let config = scratch.appendingPathComponent("config")
        try FileManager.default.createDirectory(at: config, withIntermediateDirectories: true)
        func write(_ endpoints: [UInt16]) throws {
            let eps = endpoints.map { "{address: 127.0.0.1, ports: {tcp: \($0)}}" }.joined(separator: ", ")
            try """
                apiVersion: networking.istio.io/v1
                kind: WorkloadEntry
                metadata: {name: client, namespace: shop, annotations: {sluice.dev/node: n1}}
                spec: {address: 127.0.0.2, labels: {app: client}}
                ---
                apiVersion: networking.istio.io/v1
                kind: ServiceEntry
                metadata: {name: db, namespace: shop}
                spec:
                  hosts: [db.shop.svc.cluster.local]
                  addresses: [127.96.11.1]
                  location: MESH_INTERNAL
                  resolution: STATIC
                  ports: [{number: 5432, name: tcp, protocol: TCP}]
                  endpoints: [\(eps)]
                ---
                # Outlier detection needs the agent: the kernel sends these connections to it, which forwards them.
                apiVersion: networking.istio.io/v1
                kind: ServiceEntry
                metadata: {name: web, namespace: shop}
                spec:
                  hosts: [web.shop.svc.cluster.local]
                  addresses: [127.96.11.2]
                  location: MESH_INTERNAL
                  resolution: STATIC
                  ports: [{number: 80, name: tcp, protocol: TCP}]
                  endpoints: [{address: 127.0.0.1, ports: {tcp: \(ports[0])}}]
                ---
                apiVersion: networking.istio.io/v1
                kind: DestinationRule
                metadata: {name: web, namespace: shop}
                spec:
                  host: web.shop.svc.cluster.local
                  trafficPolicy: {outlierDetection: {consecutiveGatewayErrors: 5}}
                """.write(to: config.appendingPathComponent("mesh.yaml"), atomically: true, encoding: .utf8)
        }
        try write(ports)
        let binary = Harness.root.appendingPathComponent(".build/debug/sluice").path
        var (agent, log, err) = try startAgent(config: config)
        XCTAssertTrue(log.contains("capturing") && log.contains("kernel_balanced=1") && log.contains("via_agent=1"), log)
        XCTAssertEqual(try connectFromCgroup("127.96.11.2:80", connects: 10), ["a": 10], "captured, then forwarded by the agent")
        let first = try connectFromCgroup("127.96.11.1:5432", connects: 40)
        XCTAssertEqual(first.values.reduce(0, +), 40, "\(first)")
        XCTAssertEqual(Set(first.keys), ["a", "b"], "both endpoints take connects")

        try write([ports[1]])
        var moved: [String: Int] = [:]
        for _ in 0..<50 {
            usleep(100_000)
            // 30 in a row on b: by chance, 1 in 10^9.
            moved = try connectFromCgroup("127.96.11.1:5432", connects: 30)
            if moved == ["b": 30] { break }
        }
        XCTAssertEqual(moved, ["b": 30], "the config change reached the kernel")

        // A connection opened now must outlive the agent.
        let holder = Process()
        holder.executableURL = URL(fileURLWithPath: "/bin/sh")
        holder.arguments = ["-c", "echo $$ > \(cgroup)/cgroup.procs && exec python3 -c '"
            + "import socket,sys; s=socket.create_connection((\"127.96.11.1\",5432)); f=s.makefile(\"rw\"); "
            + "print(f.readline().strip(), flush=True); sys.stdin.readline(); f.write(\"ping\\n\"); f.flush(); "
            + "print(f.readline().strip(), flush=True)'"]
        let toHolder = Pipe(), fromHolder = Pipe()
        holder.standardInput = toHolder
        holder.standardOutput = fromHolder
        try holder.run()
        processes.append(holder)
        let greeting = String(decoding: fromHolder.fileHandleForReading.availableData, as: UTF8.self)
        XCTAssertEqual(greeting.trimmingCharacters(in: .whitespacesAndNewlines), "b")

        agent.terminate()
        agent.waitUntilExit()
        log += String(decoding: err.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
        toHolder.fileHandleForWriting.write(Data("go\n".utf8))
        holder.waitUntilExit()
        let echoed = String(decoding: fromHolder.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
        XCTAssertEqual(echoed.split(separator: "\n").last, "ping", "the open connection outlived the agent: \(echoed)")
        XCTAssertEqual(agent.terminationStatus, 0, log)
        XCTAssertEqual(try connectFromCgroup("127.96.11.1:5432", connects: 10), ["b": 10], "balanced with no agent running: \(log)")

        let uninstall = Process()
        uninstall.executableURL = URL(fileURLWithPath: binary)
        uninstall.arguments = ["agent", "--uninstall-bpf", "--pin-dir", pinDirectory]
        uninstall.standardOutput = FileHandle.nullDevice
        try uninstall.run()
        uninstall.waitUntilExit()
        XCTAssertEqual(uninstall.terminationStatus, 0)
        XCTAssertEqual(attachedAfterRelease(), 0)
        XCTAssertFalse(FileManager.default.fileExists(atPath: pinDirectory))
    }

    /// IPv6 in a network namespace the test creates (only its loopback is up), so that a connect the programs
    /// fail to rewrite cannot leave the machine.
    func testIPv6ServicesAreBalancedAndShowTheirAddress() throws {
        let ns = "sluice-test-\(UUID().uuidString.prefix(8))"
        func ip(_ args: [String]) throws {
            let p = Process()
            p.executableURL = URL(fileURLWithPath: "/usr/bin/env")
            p.arguments = ["ip"] + args
            try p.run()
            p.waitUntilExit()
            XCTAssertEqual(p.terminationStatus, 0, "ip \(args.joined(separator: " "))")
        }
        try ip(["netns", "add", ns])
        defer { try? ip(["netns", "del", ns]) }
        try ip(["netns", "exec", ns, "ip", "link", "set", "lo", "up"])
        let backend = Process()
        backend.executableURL = URL(fileURLWithPath: "/usr/bin/env")
        backend.arguments = ["ip", "netns", "exec", ns, "env", "BACKEND_HOST=::1", "python3",
                             Harness.root.appendingPathComponent("Tests/Fixtures/backend.py").path, "tag:0:six"]
        let out = Pipe()
        backend.standardOutput = out
        try backend.run()
        processes.append(backend)
        var text = ""
        while !text.contains("ready") {
            let d = out.fileHandleForReading.availableData
            if d.isEmpty { break }
            text += String(decoding: d, as: UTF8.self)
        }
        let port = try XCTUnwrap(text.split(separator: "\n").first { $0.hasPrefix("ports") }?.split(separator: " ").last)

        let dp = try Datapath(objectDirectory: objectDirectory, pinDirectory: pinDirectory)
        datapath = dp
        try dp.attach(cgroup: cgroup)
        let backends = [NodeSnapshot.BPFService.Backend(address: EndpointAddress(parsing: "[::1]:\(port)")!, weight: 1)]
        try dp.apply([NodeSnapshot.BPFService(address: EndpointAddress(parsing: "[fd99::7]:80")!, protocol: .tcp,
                                              host: "six.test", action: .balance(loadBalancing: .random, backends: backends))])
        let script = scratch.appendingPathComponent("client6.py")
        try """
            import socket
            s = socket.socket(socket.AF_INET6)
            s.settimeout(5)
            s.connect(("fd99::7", 80))
            print(s.makefile().readline().strip(), s.getpeername()[0], s.getpeername()[1])
            """.write(to: script, atomically: true, encoding: .utf8)
        let client = Process()
        client.executableURL = URL(fileURLWithPath: "/usr/bin/env")
        // Join the cgroup first: `ip netns exec` mounts its own /sys, where the cgroup2 mount is not visible.
        client.arguments = ["/bin/sh", "-c",
                            "echo $$ > \(cgroup)/cgroup.procs && exec ip netns exec \(ns) python3 \(script.path)"]
        let clientOut = Pipe(), clientErr = Pipe()
        client.standardOutput = clientOut
        client.standardError = clientErr
        try client.run()
        processes.append(client)
        let answer = String(decoding: clientOut.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
        client.waitUntilExit()
        let problem = String(decoding: clientErr.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
        XCTAssertEqual(answer, "six fd99::7 80\n", "balanced to [::1] in the kernel; getpeername shows the service. \(problem)")
        backend.terminate()
        backend.waitUntilExit()

        // Capture to the agent over IPv6: a stand-in agent inside the namespace listens on [::1]:15001 (TCP) and
        // [::1]:15053 (DNS, echoing queries as replies); this test looks the original destination up as the
        // agent would.
        try dp.setAgent(address: "127.0.0.1", port: 15001, dnsPort: 15053)
        try dp.apply([NodeSnapshot.BPFService(address: EndpointAddress(parsing: "[fd99::8]:80")!, protocol: .tcp,
                                              host: "web.test", action: .proxy(reason: "HTTP"))])
        let agentScript = scratch.appendingPathComponent("agent6.py")
        try """
            import socket
            t = socket.socket(socket.AF_INET6)
            t.bind(("::1", 15001))
            t.listen()
            u = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
            u.bind(("::1", 15053))
            print("ready", flush=True)
            c, peer = t.accept()
            print("peer", peer[0], peer[1], flush=True)
            c.sendall(b"agent\\n")
            c.close()
            data, addr = u.recvfrom(512)
            u.sendto(data[:2] + bytes([data[2] | 0x80]) + data[3:], addr)
            """.write(to: agentScript, atomically: true, encoding: .utf8)
        let standIn = Process()
        standIn.executableURL = URL(fileURLWithPath: "/usr/bin/env")
        standIn.arguments = ["ip", "netns", "exec", ns, "python3", agentScript.path]
        let standInOut = Pipe()
        standIn.standardOutput = standInOut
        try standIn.run()
        processes.append(standIn)
        var standInText = ""
        while !standInText.contains("ready") {
            let d = standInOut.fileHandleForReading.availableData
            if d.isEmpty { break }
            standInText += String(decoding: d, as: UTF8.self)
        }
        try """
            import socket
            s = socket.socket(socket.AF_INET6)
            s.settimeout(5)
            s.connect(("fd99::8", 80))
            print("tcp", s.makefile().readline().strip(), *s.getpeername()[:2])
            u = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
            u.settimeout(5)
            u.sendto(bytes([0x12, 0x34, 1, 0]) + bytes(8), ("fd99::53", 53))
            data, src = u.recvfrom(512)
            print("dns", src[0], src[1], data[2] >> 7)
            """.write(to: script, atomically: true, encoding: .utf8)
        let client2 = Process()
        client2.executableURL = URL(fileURLWithPath: "/bin/sh")
        client2.arguments = ["-c", "echo $$ > \(cgroup)/cgroup.procs && exec ip netns exec \(ns) python3 \(script.path)"]
        let client2Out = Pipe(), client2Err = Pipe()
        client2.standardOutput = client2Out
        client2.standardError = client2Err
        try client2.run()
        processes.append(client2)
        let lines = String(decoding: client2Out.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
        client2.waitUntilExit()
        XCTAssertEqual(lines, "tcp agent fd99::8 80\ndns fd99::53 53 1\n",
                       String(decoding: client2Err.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self))
        standIn.waitUntilExit()
        standInText += String(decoding: standInOut.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
        let peer = try XCTUnwrap(standInText.split(separator: "\n").first { $0.hasPrefix("peer") }?.split(separator: " "))
        let found = dp.originalDestination(client: IPAddress(String(peer[1]))!, port: UInt16(peer[2])!)
        var st = stat()
        stat(cgroup, &st)
        XCTAssertEqual(found, Datapath.OriginalDestination(address: EndpointAddress(parsing: "[fd99::8]:80")!,
                                                           cgroupID: UInt64(st.st_ino)))
    }

    /// DNS queries to port 53 from the cgroup reach the agent's DNS listener: mesh hosts are answered with their
    /// service address, other names are relayed to the upstream resolver, and replies appear to come from the
    /// server the workload asked. The "upstream" here is a second DNSServer on loopback.
    func testDNSQueriesAreAnsweredForMeshHostsAndRelayedOtherwise() throws {
        let upstream = DNSServer(upstream: nil)
        upstream.update(hosts: ["example.org": [IPAddress("192.0.2.1")!]])
        try upstream.start(address: EndpointAddress(parsing: "127.0.0.1:0")!)
        defer { upstream.stop() }
        let mesh = DNSServer(upstream: EndpointAddress(parsing: "127.0.0.1:\(upstream.port)")!)
        mesh.update(hosts: ["db.shop.svc.cluster.local": [IPAddress("127.96.11.1")!]])
        try mesh.start(address: EndpointAddress(parsing: "127.0.0.1:0")!)
        defer { mesh.stop() }
        let dp = try Datapath(objectDirectory: objectDirectory, pinDirectory: pinDirectory)
        datapath = dp
        try dp.attach(cgroup: cgroup)
        try dp.setAgent(address: "127.0.0.1", port: Harness.deadPort(), dnsPort: mesh.port)

        let script = scratch.appendingPathComponent("dns.py")
        try """
            import socket, struct
            def query(name, qtype=1):
                q = struct.pack(">HHHHHH", 0x1234, 0x0100, 1, 0, 0, 0)
                for label in name.split("."):
                    q += bytes([len(label)]) + label.encode()
                return q + b"\\0" + struct.pack(">HH", qtype, 1)
            def answers(r):
                rcode, an = r[3] & 15, struct.unpack(">H", r[6:8])[0]
                i = 12
                while r[i]:
                    i += r[i] + 1
                i += 5
                ips = []
                for _ in range(an):
                    rdlen = struct.unpack(">H", r[i + 10:i + 12])[0]
                    ips.append(socket.inet_ntop(socket.AF_INET if rdlen == 4 else socket.AF_INET6, r[i + 12:i + 12 + rdlen]))
                    i += 12 + rdlen
                return rcode, ips
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.settimeout(5)
            s.sendto(query("db.shop.svc.cluster.local"), ("127.0.0.53", 53))
            r, src = s.recvfrom(512)
            print("unconnected", src[0], src[1], *answers(r))
            s.sendto(query("db.shop.svc.cluster.local", 28), ("127.0.0.53", 53))
            print("aaaa", *answers(s.recvfrom(512)[0]))
            c = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            c.settimeout(5)
            c.connect(("127.0.0.53", 53))
            c.send(query("example.org"))
            print("relayed", *c.getpeername(), *answers(c.recv(512)))
            c.send(query("nowhere.example"))
            print("unknown", *answers(c.recv(512)))
            """.write(to: script, atomically: true, encoding: .utf8)
        let p = Process()
        p.executableURL = URL(fileURLWithPath: "/bin/sh")
        p.arguments = ["-c", "echo $$ > \(cgroup)/cgroup.procs && exec python3 \(script.path)"]
        let out = Pipe(), err = Pipe()
        p.standardOutput = out
        p.standardError = err
        try p.run()
        processes.append(p)
        let text = String(decoding: out.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
        p.waitUntilExit()
        XCTAssertEqual(text.split(separator: "\n"), [
            "unconnected 127.0.0.53 53 0 ['127.96.11.1']",
            "aaaa 0 []",
            "relayed 127.0.0.53 53 0 ['192.0.2.1']",
            "unknown 2 []",
        ], String(decoding: err.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self))
        XCTAssertEqual(dp.counters().dnsQueries, 3, "two sendto and one connect")
    }

    func testACorruptObjectFileIsNamedAndNothingIsLeftBehind() throws {
        let dir = scratch.appendingPathComponent("corrupt")
        try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
        for f in try FileManager.default.contentsOfDirectory(atPath: objectDirectory) {
            try FileManager.default.copyItem(atPath: "\(objectDirectory)/\(f)", toPath: dir.appendingPathComponent(f).path)
        }
        try Data("not an ELF file".utf8).write(to: dir.appendingPathComponent("sockops.bpf.o"))
        XCTAssertThrowsError(try Datapath(objectDirectory: dir.path, pinDirectory: pinDirectory)) { error in
            XCTAssertTrue("\(error)".contains("corrupt/sockops.bpf.o"), "\(error)")
        }
        XCTAssertEqual(Datapath.attachedPrograms(cgroup: cgroup), 0)
        XCTAssertFalse(FileManager.default.fileExists(atPath: pinDirectory), "no maps left pinned")
    }

    func testTheAgentRefusesToCaptureItsOwnCgroup() throws {
        let config = scratch.appendingPathComponent("config")
        try FileManager.default.createDirectory(at: config, withIntermediateDirectories: true)
        try Harness.mesh(ports: [9]).write(to: config.appendingPathComponent("mesh.yaml"), atomically: true, encoding: .utf8)
        let binary = Harness.root.appendingPathComponent(".build/debug/sluice").path
        let p = Process()
        p.executableURL = URL(fileURLWithPath: "/bin/sh")
        p.arguments = ["-c", "echo $$ > \(cgroup)/cgroup.procs && exec \(binary) agent --local-config \(config.path) "
                       + "--cgroup \(cgroup) --pin-dir \(pinDirectory) --bpf-dir \(objectDirectory) --workers 1 "
                       + "--metrics 127.0.0.1:0 --readiness 127.0.0.1:0 --admin 127.0.0.1:0 --dns-port 0"]
        let err = Pipe()
        p.standardError = err
        try p.run()
        processes.append(p)
        let text = String(decoding: err.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
        p.waitUntilExit()
        XCTAssertEqual(p.terminationStatus, 1)
        XCTAssertTrue(text.contains("runs inside") && text.contains("the cgroup it would capture"), text)
        XCTAssertEqual(Datapath.attachedPrograms(cgroup: cgroup), 0, "nothing attached")
        XCTAssertFalse(FileManager.default.fileExists(atPath: "\(pinDirectory)/link_sl_connect4"))
        XCTAssertFalse(FileManager.default.fileExists(atPath: pinDirectory))
    }

    func testRegistryOnlyRefusesConnectsToUnknownDestinations() throws {
        // In a namespace of the test's own, an unknown destination has no route: not denied, a connect fails with
        // ENETUNREACH (101) and nothing leaves the machine; denied, it fails with EPERM (1).
        let ns = "sluice-test-\(UUID().uuidString.prefix(8))"
        let ip = Process()
        ip.executableURL = URL(fileURLWithPath: "/usr/bin/env")
        ip.arguments = ["sh", "-c", "ip netns add \(ns) && ip netns exec \(ns) ip link set lo up"]
        try ip.run()
        ip.waitUntilExit()
        defer {
            let del = Process()
            del.executableURL = URL(fileURLWithPath: "/usr/bin/env")
            del.arguments = ["ip", "netns", "del", ns]
            try? del.run()
            del.waitUntilExit()
        }
        let dp = try Datapath(objectDirectory: objectDirectory, pinDirectory: pinDirectory)
        datapath = dp
        try dp.attach(cgroup: cgroup)
        let script = scratch.appendingPathComponent("registry.py")
        try """
            import socket
            out = []
            for host in ["10.9.9.9", "127.0.0.1"]:
                s = socket.socket()
                s.settimeout(2)
                try:
                    s.connect((host, 1))
                    out.append("connected")
                except OSError as e:
                    out.append(str(e.errno))
            print(" ".join(out))
            """.write(to: script, atomically: true, encoding: .utf8)
        func run() throws -> String {
            let p = Process()
            p.executableURL = URL(fileURLWithPath: "/bin/sh")
            p.arguments = ["-c", "echo $$ > \(cgroup)/cgroup.procs && exec ip netns exec \(ns) python3 \(script.path)"]
            let out = Pipe()
            p.standardOutput = out
            try p.run()
            processes.append(p)
            defer { p.waitUntilExit() }
            return String(decoding: out.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
        }
        try dp.setAgent(address: "127.0.0.1", port: 15001, registryOnly: true)
        XCTAssertEqual(try run(), "\(EPERM) \(ECONNREFUSED)\n", "denied; loopback still passes")
        XCTAssertEqual(dp.counters().denied, 1)
        try dp.setAgent(address: "127.0.0.1", port: 15001, registryOnly: false)
        XCTAssertEqual(try run(), "\(ENETUNREACH) \(ECONNREFUSED)\n", "ALLOW_ANY: untouched")
    }

    /// An IPv6 service address whose endpoints are all IPv4 has nothing the kernel could rewrite to: it goes to
    /// the agent instead (review finding: this crashed the update).
    func testAnAddressWithoutBackendsOfItsFamilyGoesToTheAgent() throws {
        let dp = try Datapath(objectDirectory: objectDirectory, pinDirectory: pinDirectory)
        datapath = dp
        let backends = [NodeSnapshot.BPFService.Backend(address: EndpointAddress(parsing: "127.0.0.1:80")!, weight: 1)]
        try dp.apply([NodeSnapshot.BPFService(address: EndpointAddress(parsing: "[fd99::9]:80")!, protocol: .tcp,
                                              host: "mixed.test", action: .balance(loadBalancing: .random, backends: backends))])
        try dp.apply([])
    }

    func testAMissingObjectFileIsNamed() {
        XCTAssertThrowsError(try Datapath(objectDirectory: "/nonexistent", pinDirectory: pinDirectory)) { error in
            XCTAssertTrue("\(error)".contains("/nonexistent/connect4.bpf.o"), "\(error)")
            XCTAssertTrue("\(error)".contains("make bpf"), "\(error)")
        }
    }
}
