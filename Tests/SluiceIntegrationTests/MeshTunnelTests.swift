import Foundation
import SluiceIdentity
import SluiceTestSupport
import XCTest

/// HBONE between nodes (root): three network namespaces — the CA, node n1 with a client workload (captured by its
/// agent's BPF programs), node n2 with an echo workload. The bytes between the nodes are TLS (captured on the
/// bridge with tcpdump), the destination sees the caller's workload identity (its AuthorizationPolicy admits one
/// identity of n1 and refuses the other), and certificates rotating every few seconds under load drop nothing.
final class MeshTunnelTests: XCTestCase {
    var dir = ""
    var net: NetnsHarness?
    var pins: [String] = []
    var control: Process?
    var controlArguments: [String] = []
    let sluice = Harness.root.appendingPathComponent(".build/debug/sluice").path
    let vip = "240.10.0.1"

    override func setUpWithError() throws {
        try NetnsHarness.requireRoot()
        dir = NSTemporaryDirectory() + "sluice-tunnel-\(UUID().uuidString)"
        try FileManager.default.createDirectory(atPath: "\(dir)/mesh", withIntermediateDirectories: true)
    }

    override func tearDown() {
        net?.tearDown()
        for pin in pins {
            _ = try? Harness.run(sluice, ["agent", "--uninstall-bpf", "--pin-dir", pin])
        }
        try? FileManager.default.removeItem(atPath: dir)
    }

    /// n1's second address: a workload of another identity on the same node; n2's second: an HTTP workload.
    func intruderAddress(_ net: NetnsHarness) -> String { "\(net.subnet).101" }
    func webAddress(_ net: NetnsHarness) -> String { "\(net.subnet).102" }
    let webVIP = "240.10.0.2"

    /// Starts the CA on node 0 and agents on nodes 1 (capturing its workloads) and 2, waits until both agents have
    /// their tunnel credentials.
    /// - Parameter caDirectory: a plug-in CA (Istio's `cacerts` layout) instead of the generated root.
    /// - Parameter policy: more YAML for the mesh, given the network (for addresses).
    func startMesh(lifetime: String = "1h", policy: (NetnsHarness) -> String = { _ in "" }, caDirectory: String? = nil) throws -> NetnsHarness {
        let net = try NetnsHarness(nodes: 3)
        self.net = net
        try NetnsHarness.ip(["-n", net.namespace(1), "addr", "add", "\(intruderAddress(net))/24", "dev", "eth0"])
        try NetnsHarness.ip(["-n", net.namespace(2), "addr", "add", "\(webAddress(net))/24", "dev", "eth0"])
        // n1's two workloads also have cgroups of their own (inside the captured one): how the agent tells apart
        // clients that do not bind their address.
        for w in ["client", "intruder"] {
            try FileManager.default.createDirectory(atPath: net.workloadCgroup(1) + "/" + w, withIntermediateDirectories: true)
        }
        try """
            apiVersion: networking.istio.io/v1
            kind: WorkloadEntry
            metadata: {name: client, namespace: shop, annotations: {sluice.dev/node: n1, sluice.dev/cgroup: \(net.workloadCgroup(1))/client}}
            spec: {address: \(net.address(1)), labels: {app: client}, serviceAccount: client}
            ---
            apiVersion: networking.istio.io/v1
            kind: WorkloadEntry
            metadata: {name: intruder, namespace: shop, annotations: {sluice.dev/node: n1, sluice.dev/cgroup: \(net.workloadCgroup(1))/intruder}}
            spec: {address: \(intruderAddress(net)), labels: {app: intruder}, serviceAccount: intruder}
            ---
            apiVersion: networking.istio.io/v1
            kind: WorkloadEntry
            metadata: {name: echo, namespace: shop, annotations: {sluice.dev/node: n2}}
            spec: {address: \(net.address(2)), labels: {app: echo}, serviceAccount: echo}
            ---
            apiVersion: networking.istio.io/v1
            kind: ServiceEntry
            metadata: {name: echo, namespace: shop}
            spec:
              hosts: [echo.shop.svc.cluster.local]
              addresses: [\(vip)]
              location: MESH_INTERNAL
              resolution: STATIC
              ports: [{number: 7000, name: tcp-echo, protocol: TCP}]
              workloadSelector: {labels: {app: echo}}
            ---
            apiVersion: networking.istio.io/v1
            kind: WorkloadEntry
            metadata: {name: web, namespace: shop, annotations: {sluice.dev/node: n2}}
            spec: {address: \(webAddress(net)), labels: {app: web}, serviceAccount: web}
            ---
            apiVersion: networking.istio.io/v1
            kind: ServiceEntry
            metadata: {name: web, namespace: shop}
            spec:
              hosts: [web.shop.svc.cluster.local]
              addresses: [\(webVIP)]
              location: MESH_INTERNAL
              resolution: STATIC
              ports: [{number: 8080, name: http, protocol: HTTP}]
              workloadSelector: {labels: {app: web}}
            \(policy(net))
            """.write(toFile: "\(dir)/mesh/mesh.yaml", atomically: true, encoding: .utf8)
        try "tok-n1 n1\ntok-n2 n2\n".write(toFile: "\(dir)/tokens", atomically: true, encoding: .utf8)
        controlArguments = [sluice, "control", "--state-dir", "\(dir)/ca", "--config", "\(dir)/mesh", "--join-tokens", "\(dir)/tokens",
                            "--listen", "\(net.address(0)):15012", "--max-cert-lifetime", lifetime, "--metrics", "127.0.0.1:15014"]
        if let caDirectory {
            controlArguments += ["--ca-dir", caDirectory]
            try FileManager.default.createDirectory(atPath: "\(dir)/ca", withIntermediateDirectories: true)
            try FileManager.default.copyItem(atPath: "\(caDirectory)/root-cert.pem", toPath: "\(dir)/ca/root-cert.pem")
        }
        try restartControl(net)
        for node in [1, 2] {
            try "tok-n\(node)\n".write(toFile: "\(dir)/n\(node).token", atomically: true, encoding: .utf8)
            var args = [sluice, "agent", "--local-config", "\(dir)/mesh", "--node", "n\(node)", "--workers", "2",
                        "--control", "\(net.address(0)):15012", "--ca-root", "\(dir)/ca/root-cert.pem",
                        "--join-token", "\(dir)/n\(node).token", "--state-dir", "\(dir)/n\(node)", "--dns-port", "0",
                        "--metrics", "127.0.0.1:15020", "--readiness", "127.0.0.1:0", "--admin", "127.0.0.1:0",
                        "--log-level", "debug"]
            // Each agent captures its node's workloads (and enforces their PeerAuthentication in the kernel).
            let pin = "/sys/fs/bpf/\(net.id)-n\(node)"
            pins.append(pin)
            args += ["--cgroup", net.workloadCgroup(node), "--pin-dir", pin,
                     "--bpf-dir", Harness.root.appendingPathComponent(".build/bpf").path]
            try net.start(node, args, log: "\(dir)/n\(node).log")
        }
        for node in [1, 2] {
            XCTAssertTrue(wait(20) { self.read("n\(node).log").contains("tunnel credentials loaded") }, read("n\(node).log"))
        }
        // The echo workload on n2.
        let echo = """
            import socket, sys, threading
            s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(('\(net.address(2))', int(sys.argv[1]) if len(sys.argv) > 1 else 7000)); s.listen(128)
            def serve(c):
                while True:
                    d = c.recv(65536)
                    if not d: break
                    c.sendall(d)
                c.close()
            while True:
                c, _ = s.accept(); threading.Thread(target=serve, args=(c,), daemon=True).start()
            """
        try echo.write(toFile: "\(dir)/echo.py", atomically: true, encoding: .utf8)
        try net.start(2, ["python3", "\(dir)/echo.py"], log: "\(dir)/echo.log", workload: true)
        // Listening before any test traffic (from its own node: loopback, whatever its PeerAuthentication).
        XCTAssertTrue(wait(10) { (try? self.directEcho(net, from: 2, port: 7000)) == true }, "echo server did not start")
        try """
            import os, socket, sys, threading
            # count 0: until the file `stop` appears in this script's directory; prints "OK DONE" then.
            src, n, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
            stop = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'stop')
            payload = (b'PLAINTEXT-MARKER-0123456789-' * (n // 28 + 1))[:n]
            ok = done = 0
            while (done < count) if count else not os.path.exists(stop):
                done += 1
                try:
                    s = socket.socket(); s.settimeout(10)
                    if src != '-': s.bind((src, 0))
                    s.connect(('\(vip)', 7000))
                    t = threading.Thread(target=lambda: s.sendall(payload)); t.start()
                    got = b''
                    while len(got) < n:
                        d = s.recv(65536)
                        if not d: break
                        got += d
                    t.join(); s.close()
                    if got == payload: ok += 1
                except Exception as e:
                    print('error', type(e).__name__, file=sys.stderr)
            print(ok if count else '%d %d' % (ok, done), flush=True)
            """.write(toFile: "\(dir)/client.py", atomically: true, encoding: .utf8)
        return net
    }

    /// (Re)starts the control plane on node 0 and waits until it is ready.
    func restartControl(_ net: NetnsHarness) throws {
        if let control, control.isRunning {
            control.terminate()
            control.waitUntilExit()
        }
        control = try net.start(0, controlArguments, log: "\(dir)/control.log")
        XCTAssertTrue(wait(10) { self.read("control.log").contains("control plane ready") }, read("control.log"))
    }

    /// Whether a plain connection from node `from` to node 2's `port` gets its echo (2 s at most).
    func directEcho(_ net: NetnsHarness, from: Int, port: Int) throws -> Bool {
        let script = "import socket;s=socket.create_connection(('\(net.address(2))',\(port)),timeout=2);"
            + "s.sendall(b'ping');print(s.recv(10).decode())"
        return try net.run(from, ["python3", "-c", script]).output.contains("ping")
    }

    /// Echo exchanges of `bytes` each from `source` on n1 through the VIP; returns how many came back whole.
    /// `source` "-": the client does not bind an address (its connections come from loopback once captured), and
    /// runs in the child cgroup `cgroup` of the captured one.
    func exchanges(_ net: NetnsHarness, from source: String, bytes: Int, count: Int = 1, cgroup: String? = nil) throws -> Int {
        let (out, _) = try net.runWorkload(1, ["python3", "\(dir)/client.py", source, String(bytes), String(count)], cgroup: cgroup)
        return Int(out.split(separator: "\n").last.map { $0.trimmingCharacters(in: .whitespaces) } ?? "") ?? -1
    }

    func read(_ name: String) -> String { (try? String(contentsOfFile: "\(dir)/\(name)", encoding: .utf8)) ?? "" }

    func wait(_ timeout: TimeInterval, _ condition: () -> Bool) -> Bool { Harness.wait(timeout, condition) }

    /// Node `i`'s metric lines (no comments).
    func scrape(_ net: NetnsHarness, _ i: Int) -> [Substring] {
        let text = (try? net.run(i, ["curl", "-s", "--max-time", "5", "http://127.0.0.1:15020/metrics"]).output) ?? ""
        return text.split(separator: "\n").filter { !$0.hasPrefix("#") }
    }

    /// The value of the metric lines of node `i` whose text contains every one of `parts`, summed.
    func metric(_ net: NetnsHarness, _ i: Int, _ parts: [String]) -> Double {
        scrape(net, i).filter { l in parts.allSatisfy { l.contains($0) } }
            .compactMap { Double($0.split(separator: " ").last ?? "") }.reduce(0, +)
    }

    /// Node `i`'s Sluice metrics that are not zero (for failure messages).
    func metrics(_ net: NetnsHarness, _ i: Int) -> String {
        "node \(i):\n" + scrape(net, i).filter { !$0.hasSuffix(" 0") && $0.contains("sluice_") }
            .joined(separator: "\n") + "\n"
    }

    func testBytesBetweenNodesAreTLSAndTheDestinationSeesTheCallersIdentity() throws {
        let net = try startMesh(policy: { net in """
            ---
            apiVersion: security.istio.io/v1
            kind: AuthorizationPolicy
            metadata: {name: echo-callers, namespace: shop}
            spec:
              selector: {matchLabels: {app: echo}}
              action: ALLOW
              rules: [{from: [{source: {principals: [cluster.local/ns/shop/sa/client]}}]}]
            """ })
        // Everything on the bridge, from before the first byte.
        let pcap = "\(dir)/bridge.pcap"
        let dump = Process()
        dump.executableURL = URL(fileURLWithPath: "/usr/sbin/ip")
        dump.arguments = ["netns", "exec", net.bridgeNamespace, "tcpdump", "-i", "br0", "-U", "-s", "0", "-w", pcap, "tcp"]
        dump.standardOutput = FileHandle.nullDevice
        dump.standardError = FileHandle.nullDevice
        try dump.run()
        defer { if dump.isRunning { dump.terminate(); dump.waitUntilExit() } }
        Thread.sleep(forTimeInterval: 1)

        // The client's identity is allowed: 3 exchanges of 1 MB each way, whole.
        XCTAssertEqual(try exchanges(net, from: net.address(1), bytes: 1 << 20, count: 3), 3, metrics(net, 1) + metrics(net, 2))
        // Another workload of the same node, with its own identity, is refused by the destination (and logged there).
        XCTAssertEqual(try exchanges(net, from: intruderAddress(net), bytes: 1000), 0)
        XCTAssertTrue(wait(2) { self.read("n2.log").contains(
            "connection denied by AuthorizationPolicy: source=cluster.local/ns/shop/sa/intruder source_ip=\(self.intruderAddress(net))") },
                      read("n2.log"))
        // Clients that do not bind an address are told apart by their cgroup.
        XCTAssertEqual(try exchanges(net, from: "-", bytes: 1000, cgroup: "client"), 1)
        XCTAssertEqual(try exchanges(net, from: "-", bytes: 1000, cgroup: "intruder"), 0)

        // HTTP through the L7 proxy goes through the tunnel too (pooled upstream connections, per identity).
        try FileManager.default.createDirectory(atPath: "\(dir)/www", withIntermediateDirectories: true)
        try String(repeating: "PLAINTEXT-MARKER-HTTP ", count: 500).write(toFile: "\(dir)/www/page.txt", atomically: true, encoding: .utf8)
        try net.start(2, ["python3", "-m", "http.server", "8080", "--bind", webAddress(net), "--directory", "\(dir)/www"],
                      workload: true)
        var served = 0
        for attempt in 0..<50 where served < 5 {
            let (out, _) = try net.runWorkload(1, ["curl", "-s", "--max-time", "5", "--interface", net.address(1), "-o", "/dev/null",
                                                   "-w", "%{http_code}", "http://\(webVIP):8080/page.txt"])
            if out == "200" { served += 1 } else if served == 0 && attempt < 45 { Thread.sleep(forTimeInterval: 0.1) } else { break }
        }
        XCTAssertEqual(served, 5, metrics(net, 1) + metrics(net, 2))

        Thread.sleep(forTimeInterval: 0.5)
        dump.terminate()
        dump.waitUntilExit()
        let captured = try Data(contentsOf: URL(fileURLWithPath: pcap))
        XCTAssertGreaterThan(captured.count, 5 << 20, "the exchanges crossed the bridge")
        XCTAssertNil(captured.range(of: Data("PLAINTEXT-MARKER".utf8)), "plaintext payload on the wire")
        XCTAssertNil(captured.range(of: Data("GET /page.txt".utf8)), "plaintext request on the wire")
        let hbone = try Harness.run("/usr/bin/tcpdump", ["-r", pcap, "-nn", "tcp port 15008"]).output
        let direct = try Harness.run("/usr/bin/tcpdump", ["-r", pcap, "-nn", "tcp port 7000 or tcp port 8080"]).output
        XCTAssertGreaterThan(hbone.split(separator: "\n").count, 100)
        XCTAssertEqual(direct.split(separator: "\n").filter { $0.contains(" IP ") }.count, 0, direct)
        // No PeerAuthentication: PERMISSIVE, a client outside the mesh (node 0 runs no agent) reaches the workload.
        XCTAssertTrue(try directEcho(net, from: 0, port: 7000))

        XCTAssertGreaterThanOrEqual(metric(net, 2, ["sluice_hbone_streams_total", "direction=\"inbound\"", "result=\"ok\""]), 4)
        XCTAssertEqual(metric(net, 2, ["sluice_hbone_streams_total", "direction=\"inbound\"", "result=\"denied\""]), 2)
        // (Refusals also count the HTTP calls made before the web server listened: workload unreachable, 503.)
        XCTAssertGreaterThanOrEqual(metric(net, 1, ["sluice_hbone_streams_total", "direction=\"outbound\"", "result=\"refused\""]), 1)
        // Tunnels are pooled per worker by (source identity, destination node, destination identity): the client's
        // calls to echo used at most one per worker (2), to web at most 2 more, the other identity at most 2 more.
        XCTAssertGreaterThanOrEqual(metric(net, 1, ["sluice_hbone_streams_total", "direction=\"outbound\"", "result=\"ok\""]), 4)
        XCTAssertLessThanOrEqual(metric(net, 1, ["sluice_hbone_tunnels_opened_total", "direction=\"outbound\""]), 6)
    }

    /// Callers without a valid certificate of this mesh get no tunnel, each refusal counted by its reason: none,
    /// another CA's, expired, not yet valid, and one of the mesh's own CA for another trust domain.
    func testTunnelsRefuseCallersWithoutAMeshCertificate() throws {
        let net = try startMesh()
        let pki = "\(dir)/pki"
        XCTAssertEqual(try Harness.run("/bin/sh", [Harness.root.appendingPathComponent("Tests/Fixtures/make_certs.sh").path, pki, "spiffe://cluster.local/ns/shop/sa/client"]).status, 0)
        let target = "\(net.address(2)):15008"
        let sni = "echo.shop.hbone.sluice"
        func handshake(_ extra: [String]) throws -> Int32 {
            try net.run(1, ["sh", "-c", "echo | timeout 5 openssl s_client -connect \(target) -servername \(sni) -tls1_3 "
                                + "-CAfile \(dir)/ca/root-cert.pem -verify_return_error -quiet \(extra.joined(separator: " ")) >/dev/null 2>&1; "
                                + "echo $?"]).status
        }
        // Certificates from the mesh's own root, wrong in time or trust domain.
        let root = read("ca/root-cert.pem"), rootKey = read("ca/root-key.pem")
        func issue(_ name: String, trustDomain: String = "cluster.local", at now: Date) throws -> [String] {
            let ca = try CertificateAuthority(trustDomain: trustDomain, certificatePEM: root, keyPEM: rootKey, rootPEM: [root])
            let id = SPIFFEID(trustDomain: trustDomain, namespace: "shop", serviceAccount: "client")
            let key = WorkloadKey()
            let issued = try ca.sign(requestPEM: try key.signingRequest(for: id), for: id, lifetime: .seconds(3600),
                                     requester: "test", now: now)
            try issued.certificate.write(toFile: "\(dir)/\(name).crt", atomically: true, encoding: .utf8)
            try key.privateKeyPEM.write(toFile: "\(dir)/\(name).key", atomically: true, encoding: .utf8)
            return ["-cert", "\(dir)/\(name).crt", "-key", "\(dir)/\(name).key"]
        }
        let cases: [(reason: String, options: [String])] = [
            ("no_certificate", []),
            ("certificate_untrusted", ["-cert", "\(pki)/spiffe-client.crt", "-key", "\(pki)/spiffe-client.key"]),
            ("certificate_expired", try issue("expired", at: Date().addingTimeInterval(-2 * 86_400))),
            ("certificate_not_yet_valid", try issue("early", at: Date().addingTimeInterval(86_400))),
            ("wrong_trust_domain", try issue("foreign", trustDomain: "other.example", at: Date())),
        ]
        for c in cases { _ = try handshake(c.options) }
        for c in cases {
            XCTAssertTrue(wait(5) { self.metric(net, 2, ["sluice_hbone_tunnel_failures_total", "reason=\"\(c.reason)\""]) == 1 },
                          c.reason + "\n" + metrics(net, 2))
        }
        XCTAssertEqual(metric(net, 2, ["sluice_hbone_tunnels_opened_total", "direction=\"inbound\""]), 0)
        // The legitimate path still works.
        XCTAssertEqual(try exchanges(net, from: net.address(1), bytes: 10000), 1)
    }

    /// Certificates that live 6 seconds rotate about every 3 while connections keep coming: none fails.
    func testCertificateRotationUnderLoadDropsNothing() throws {
        let net = try startMesh(lifetime: "6s")
        let crt = "\(dir)/n1/certs/shop_client.crt"
        let first = try Harness.run("/usr/bin/openssl", ["x509", "-in", crt, "-noout", "-serial"]).output
        // About 10 seconds of new connections, each a 64 KB exchange.
        let start = Date()
        var done = 0, ok = 0
        while Date().timeIntervalSince(start) < 10 {
            ok += try exchanges(net, from: net.address(1), bytes: 64 << 10, count: 20)
            done += 20
        }
        let last = try Harness.run("/usr/bin/openssl", ["x509", "-in", crt, "-noout", "-serial"]).output
        XCTAssertNotEqual(first, last, "the certificate rotated during the run")
        XCTAssertEqual(ok, done, metrics(net, 1) + metrics(net, 2))
        XCTAssertGreaterThan(done, 40)
        // New tunnels were opened with the new certificates.
        XCTAssertGreaterThanOrEqual(metric(net, 1, ["sluice_hbone_tunnels_opened_total", "direction=\"outbound\""]), 2)
    }

    /// Istio's plug-in CA root rotation, with the control plane restarted at each step (6-second certificates, so
    /// every step reaches every agent within seconds) while connections keep coming: trust A; trust A and B; sign
    /// with B; trust B only. Not one exchange fails.
    func testRootRotationDropsNothing() throws {
        let cacerts = "\(dir)/cacerts"
        try FileManager.default.createDirectory(atPath: cacerts, withIntermediateDirectories: true)
        for name in ["a", "b"] {
            XCTAssertEqual(try Harness.run("/usr/bin/openssl", [
                "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-days", "2",
                "-subj", "/O=cluster.local/CN=Root \(name.uppercased())", "-keyout", "\(dir)/root-\(name).key",
                "-out", "\(dir)/root-\(name).crt", "-addext", "basicConstraints=critical,CA:TRUE",
                "-addext", "keyUsage=critical,keyCertSign,cRLSign"]).status, 0)
        }
        let rootA = read("root-a.crt"), rootB = read("root-b.crt")
        func plug(signing: String, trusting: [String]) throws {
            try read("root-\(signing).crt").write(toFile: "\(cacerts)/ca-cert.pem", atomically: true, encoding: .utf8)
            try read("root-\(signing).key").write(toFile: "\(cacerts)/ca-key.pem", atomically: true, encoding: .utf8)
            try trusting.joined().write(toFile: "\(cacerts)/root-cert.pem", atomically: true, encoding: .utf8)
        }
        try plug(signing: "a", trusting: [rootA])
        let net = try startMesh(lifetime: "6s", caDirectory: cacerts)

        // Load: echo exchanges one after another until the file `stop` appears.
        let load = try net.start(1, ["python3", "\(dir)/client.py", net.address(1), String(16 << 10), "0"],
                                 log: "\(dir)/load.log", workload: true)
        func bundle(_ node: Int) -> String { read("n\(node)/certs/root-cert.pem") }
        func issuer(_ node: Int, _ sa: String) -> String {
            (try? Harness.run("/usr/bin/openssl", ["x509", "-in", "\(dir)/n\(node)/certs/shop_\(sa).crt", "-noout", "-issuer"]).output) ?? ""
        }
        Thread.sleep(forTimeInterval: 2)
        // 1. Trust both roots, still signing with A: every agent receives the two-root bundle.
        try plug(signing: "a", trusting: [rootA, rootB])
        try restartControl(net)
        XCTAssertTrue(wait(20) { [1, 2].allSatisfy { bundle($0).contains(rootA) && bundle($0).contains(rootB) } })
        // 2. Sign with B: new certificates chain to B, peers still on A's accept them.
        try plug(signing: "b", trusting: [rootA, rootB])
        try restartControl(net)
        XCTAssertTrue(wait(20) { issuer(1, "client").contains("Root B") && issuer(2, "echo").contains("Root B") })
        Thread.sleep(forTimeInterval: 7)  // every certificate signed by A has expired by now
        // 3. Drop A.
        try plug(signing: "b", trusting: [rootB])
        try restartControl(net)
        XCTAssertTrue(wait(20) { [1, 2].allSatisfy { !bundle($0).contains(rootA) && bundle($0).contains(rootB) } })
        Thread.sleep(forTimeInterval: 2)
        FileManager.default.createFile(atPath: "\(dir)/stop", contents: nil)
        load.waitUntilExit()
        let counts = read("load.log").split(separator: "\n").last?.split(separator: " ").compactMap { Int($0) } ?? []
        XCTAssertEqual(counts.count, 2, read("load.log"))
        guard counts.count == 2 else { return }
        XCTAssertGreaterThan(counts[1], 50)
        XCTAssertEqual(counts[0], counts[1], read("load.log") + read("n1.log") + read("n2.log"))
    }

    /// PeerAuthentication STRICT on the echo workload, PERMISSIVE on its port 7001: plaintext from outside the mesh
    /// is refused on 7000 (dropped in the kernel, counted) and accepted on 7001, while mesh callers keep coming in
    /// through the tunnel.
    func testStrictPeerAuthenticationRefusesPlaintextFromOutsideTheMesh() throws {
        let net = try startMesh(policy: { net in """
            ---
            apiVersion: security.istio.io/v1
            kind: PeerAuthentication
            metadata: {name: echo-strict, namespace: shop}
            spec:
              selector: {matchLabels: {app: echo}}
              mtls: {mode: STRICT}
              portLevelMtls: {7001: {mode: PERMISSIVE}}
            """ })
        try net.start(2, ["python3", "\(dir)/echo.py", "7001"], log: "\(dir)/echo-7001.log", workload: true)
        XCTAssertTrue(wait(10) { (try? self.directEcho(net, from: 2, port: 7001)) == true })
        XCTAssertEqual(try exchanges(net, from: net.address(1), bytes: 100_000, count: 2), 2, metrics(net, 1) + metrics(net, 2) + read("n2.log"))
        XCTAssertFalse(try directEcho(net, from: 0, port: 7000), "plaintext into a STRICT port")
        XCTAssertTrue(Harness.wait(5) { (try? self.directEcho(net, from: 0, port: 7001)) == true }, "PERMISSIVE port")
        XCTAssertGreaterThan(metric(net, 2, ["sluice_bpf_peer_authentication_dropped_total"]), 0)
        // The mesh path still works after the refusals.
        XCTAssertEqual(try exchanges(net, from: net.address(1), bytes: 1000), 1)
    }

    /// A call between two workloads of one node goes through no tunnel and no proxy, but still through the
    /// destination's AuthorizationPolicy: the kernel checks it at connect() (the service stays kernel-balanced), by
    /// the service address and by the workload's own address, with the decisions the agent wrote per caller cgroup.
    func testCallsWithinANodeAreAuthorizedByTheDestinationsPolicy() throws {
        let net = try startMesh(policy: { net in """
            ---
            apiVersion: networking.istio.io/v1
            kind: WorkloadEntry
            metadata: {name: neighbour, namespace: shop, annotations: {sluice.dev/node: n1}}
            spec: {address: \(net.subnet).103, labels: {app: neighbour}, serviceAccount: neighbour}
            ---
            apiVersion: networking.istio.io/v1
            kind: ServiceEntry
            metadata: {name: neighbour, namespace: shop}
            spec:
              hosts: [neighbour.shop.svc.cluster.local]
              addresses: [240.10.0.3]
              location: MESH_INTERNAL
              resolution: STATIC
              ports: [{number: 7000, name: tcp-echo, protocol: TCP}]
              workloadSelector: {labels: {app: neighbour}}
            ---
            apiVersion: security.istio.io/v1
            kind: AuthorizationPolicy
            metadata: {name: neighbour-callers, namespace: shop}
            spec:
              selector: {matchLabels: {app: neighbour}}
              action: ALLOW
              rules: [{from: [{source: {principals: [cluster.local/ns/shop/sa/client]}}]}]
            """ })
        try NetnsHarness.ip(["-n", net.namespace(1), "addr", "add", "\(net.subnet).103/24", "dev", "eth0"])
        let echo = read("echo.py").replacingOccurrences(of: "'\(net.address(2))'", with: "'\(net.subnet).103'")
        try echo.write(toFile: "\(dir)/echo-n1.py", atomically: true, encoding: .utf8)
        try net.start(1, ["python3", "\(dir)/echo-n1.py", "7000"], log: "\(dir)/echo-n1.log", workload: true)
        let client = read("client.py").replacingOccurrences(of: "'\(vip)'", with: "'240.10.0.3'")
        try client.write(toFile: "\(dir)/client-n1.py", atomically: true, encoding: .utf8)
        func calls(_ cgroup: String) throws -> Int {
            let (out, _) = try net.runWorkload(1, ["python3", "\(dir)/client-n1.py", "-", "1000", "2"], cgroup: cgroup)
            return Int(out.split(separator: "\n").last.map { $0.trimmingCharacters(in: .whitespaces) } ?? "") ?? -1
        }
        XCTAssertTrue(Harness.wait(5) { (try? calls("client")) == 2 }, read("n1.log"))
        XCTAssertEqual(try calls("intruder"), 0)
        XCTAssertEqual(metric(net, 1, ["sluice_bpf_authorization_denied_total"]), 2, metrics(net, 1))
        // Dialling the workload's address instead of the service's changes nothing.
        func direct(_ cgroup: String) throws -> Bool {
            let script = "import socket;s=socket.create_connection(('\(net.subnet).103',7000),timeout=2);s.sendall(b'hi');print(s.recv(10).decode())"
            return try net.runWorkload(1, ["python3", "-c", script], cgroup: cgroup).output.contains("hi")
        }
        XCTAssertTrue(try direct("client"))
        XCTAssertFalse(try direct("intruder"))
        XCTAssertEqual(metric(net, 1, ["sluice_bpf_authorization_denied_total"]), 3)
        XCTAssertEqual(metric(net, 1, ["sluice_bpf_redirected_total"]), 0, "no proxy hop")
        XCTAssertEqual(metric(net, 1, ["sluice_hbone_streams_total"]), 0, "no tunnel within the node")
    }

    /// PeerAuthentication DISABLE on a workload: callers on other nodes send it plaintext, as Istio's auto mTLS
    /// does — no tunnel, and the kernel balances the service again.
    func testDisabledPeerAuthenticationTakesPlaintext() throws {
        let net = try startMesh(policy: { _ in """
            ---
            apiVersion: security.istio.io/v1
            kind: PeerAuthentication
            metadata: {name: echo-plaintext, namespace: shop}
            spec:
              selector: {matchLabels: {app: echo}}
              mtls: {mode: DISABLE}
            """ })
        XCTAssertEqual(try exchanges(net, from: net.address(1), bytes: 10_000, count: 2), 2)
        XCTAssertEqual(metric(net, 1, ["sluice_hbone_streams_total"]), 0, "no tunnel")
        XCTAssertEqual(metric(net, 1, ["sluice_bpf_balanced_total"]), 2, metrics(net, 1))
    }

    /// A workload whose AuthorizationPolicy names request attributes has its requests checked one by one by its own
    /// node's agent (the tunnel's stream goes through the L7 pipeline there): the caller's identity comes from the
    /// tunnel, the method and path from each request; a denied request gets Envoy's 403 back through the tunnel.
    /// Its RequestAuthentication is checked there too (a bad token: 401).
    func testRequestsToAWorkloadAreCheckedOneByOneByItsNodesAgent() throws {
        let issuer = TestJWT()
        let jwks = issuer.jwks.replacingOccurrences(of: "\"", with: "\\\"")
        let net = try startMesh(policy: { _ in """
            ---
            apiVersion: security.istio.io/v1
            kind: RequestAuthentication
            metadata: {name: web-jwt, namespace: shop}
            spec:
              selector: {matchLabels: {app: web}}
              jwtRules: [{issuer: "https://issuer.example", jwks: "\(jwks)"}]
            ---
            apiVersion: security.istio.io/v1
            kind: AuthorizationPolicy
            metadata: {name: web-readers, namespace: shop}
            spec:
              selector: {matchLabels: {app: web}}
              action: ALLOW
              rules:
              - from: [{source: {principals: [cluster.local/ns/shop/sa/client]}}]
                to: [{operation: {methods: [GET], paths: ["/page.txt"]}}]
            """ })
        try FileManager.default.createDirectory(atPath: "\(dir)/www", withIntermediateDirectories: true)
        try "hello".write(toFile: "\(dir)/www/page.txt", atomically: true, encoding: .utf8)
        try "other".write(toFile: "\(dir)/www/other.txt", atomically: true, encoding: .utf8)
        try net.start(2, ["python3", "-m", "http.server", "8080", "--bind", webAddress(net), "--directory", "\(dir)/www"],
                      workload: true)
        XCTAssertTrue(wait(10) {
            (try? net.run(2, ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "http://\(self.webAddress(net)):8080/page.txt"]).output) == "200"
        })
        func get(_ path: String, as cgroup: String, method: String = "GET", token: String? = nil) throws -> String {
            try net.runWorkload(1, ["curl", "-s", "--max-time", "5", "-X", method, "-w", " %{http_code}"]
                                + (token.map { ["-H", "Authorization: Bearer \($0)"] } ?? []) + ["http://\(webVIP):8080\(path)"],
                                cgroup: cgroup).output
        }
        XCTAssertEqual(try get("/page.txt", as: "client"), "hello 200", metrics(net, 1) + metrics(net, 2))
        XCTAssertEqual(try get("/other.txt", as: "client"), "RBAC: access denied 403", "the path is not allowed")
        XCTAssertEqual(try get("/page.txt", as: "client", method: "DELETE"), "RBAC: access denied 403", "nor the method")
        XCTAssertEqual(try get("/page.txt", as: "intruder"), "RBAC: access denied 403", "nor another identity")
        XCTAssertEqual(try get("/page.txt", as: "client"), "hello 200", "the tunnel still serves")
        let exp = Int(Date().timeIntervalSince1970) + 600
        XCTAssertEqual(try get("/page.txt", as: "client", token: issuer.token(["iss": "https://issuer.example", "sub": "a", "exp": exp])),
                       "hello 200", "a valid token")
        XCTAssertTrue(try get("/page.txt", as: "client", token: "garbage").hasSuffix(" 401"), "a bad token")
        XCTAssertEqual(metric(net, 2, ["sluice_authorization_denied_total"]), 3)
    }
}
