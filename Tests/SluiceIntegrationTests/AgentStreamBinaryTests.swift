import Foundation
import SluiceTLS
import Synchronization
import XCTest

/// The agent binary with no local config: it joins, holds the agent stream, serves what the control plane pushes,
/// reports a refused push as NACKED in `GET /sluice/v1/status`, and keeps serving — with the control plane down, and
/// after its own restart with the control plane still down (from the snapshot it persisted).
final class AgentStreamBinaryTests: XCTestCase {
    var dir = ""
    var control: Process?
    var agent: Process?
    var backend: Process?
    let caPort = Harness.deadPort(), apiPort = Harness.deadPort(), streamPort = Harness.deadPort()
    let adminPort = Harness.deadPort()

    override func setUpWithError() throws {
        dir = NSTemporaryDirectory() + "sluice-agent-stream-\(UUID().uuidString)"
        try FileManager.default.createDirectory(atPath: "\(dir)/mesh", withIntermediateDirectories: true)
        try "tok-n1 n1\n".write(toFile: "\(dir)/tokens", atomically: true, encoding: .utf8)
        try "tok-n1\n".write(toFile: "\(dir)/n1.token", atomically: true, encoding: .utf8)
    }

    override func tearDown() {
        for p in [agent, control, backend] {
            p?.terminate()
            p?.waitUntilExit()
        }
        try? FileManager.default.removeItem(atPath: dir)
    }

    func start(_ args: [String], log: String) throws -> Process {
        let p = Process()
        p.executableURL = Harness.root.appendingPathComponent(".build/debug/sluice")
        p.arguments = args
        FileManager.default.createFile(atPath: "\(dir)/\(log)", contents: nil)
        let handle = try FileHandle(forWritingTo: URL(fileURLWithPath: "\(dir)/\(log)"))
        handle.seekToEndOfFile()
        p.standardError = handle
        p.standardOutput = FileHandle.nullDevice
        try p.run()
        return p
    }

    func read(_ log: String) -> String { (try? String(contentsOfFile: "\(dir)/\(log)", encoding: .utf8)) ?? "" }

    func startControl(grace: String = "10s") throws {
        control = try start(["control", "--cleanup-grace", grace, "--state-dir", "\(dir)/state", "--config", "\(dir)/mesh", "--join-tokens",
                             "\(dir)/tokens", "--listen", "127.0.0.1:\(caPort)", "--api", "127.0.0.1:\(apiPort)",
                             "--stream", "127.0.0.1:\(streamPort)", "--metrics", "127.0.0.1:0"], log: "control.log")
        XCTAssertTrue(Harness.wait(10) { self.read("control.log").contains("control plane ready") }, read("control.log"))
    }

    func startAgent(_ extra: [String] = []) throws {
        agent = try start(["agent"] + extra + ["--control", "127.0.0.1:\(caPort)", "--stream-port", "\(streamPort)",
                           "--ca-root", "\(dir)/state/root-cert.pem", "--join-token", "\(dir)/n1.token", "--node", "n1",
                           "--workers", "1", "--state-dir", "\(dir)/agent", "--metrics", "127.0.0.1:0",
                           "--readiness", "127.0.0.1:0", "--admin", "127.0.0.1:\(adminPort)", "--dns-port", "0"],
                          log: "agent.log")
    }

    func stop(_ p: Process?) {
        p?.terminate()
        p?.waitUntilExit()
    }

    /// One connection through the gateway listener: the backend's tag line, or nil.
    func tag(_ port: UInt16) -> String? {
        guard let c = try? Client(port: port, timeout: 2) else { return nil }
        defer { c.close() }
        return c.receiveLine()
    }

    func api(_ method: String, _ path: String, _ json: String? = nil) throws -> (Int, String) {
        let token = try String(contentsOfFile: "\(dir)/state/admin-token", encoding: .utf8)
            .trimmingCharacters(in: .whitespacesAndNewlines)
        var args = ["-s", "--max-time", "10", "--cacert", "\(dir)/state/root-cert.pem", "--resolve",
                    "sluice-control:\(apiPort):127.0.0.1", "-H", "Authorization: Bearer \(token)", "-X", method,
                    "-w", "\n%{http_code}"]
        if let json { args += ["-H", "Content-Type: application/json", "-d", json] }
        let (out, _) = try Harness.run("/usr/bin/curl", args + ["https://sluice-control:\(apiPort)\(path)"])
        let lines = out.split(separator: "\n", omittingEmptySubsequences: false)
        return (Int(lines.last ?? "") ?? 0, lines.dropLast().joined(separator: "\n"))
    }

    /// A backend answering "A" behind a gateway listener of the seeded mesh; returns the listener's port.
    func servingMesh() throws -> UInt16 {
        let (b, ports) = try Harness.backends(["tag:0:A"])
        backend = b
        let gatewayPort = Harness.deadPort()
        try Harness.mesh(ports: ports).replacingOccurrences(of: "number: 1000", with: "number: \(gatewayPort)")
            .replacingOccurrences(of: "port: 1000", with: "port: \(gatewayPort)")
            .write(toFile: "\(dir)/mesh/mesh.yaml", atomically: true, encoding: .utf8)
        return gatewayPort
    }

    func status() throws -> [String: Any]? {
        let (code, body) = try api("GET", "/sluice/v1/status")
        guard code == 200, let o = try JSONSerialization.jsonObject(with: Data(body.utf8)) as? [String: Any] else { return nil }
        return (o["items"] as? [[String: Any]])?.first { $0["node"] as? String == "n1" }
    }

    /// The `sluice` CLI with the control plane's kubeconfig: output (combined) and exit status.
    func sluice(_ args: [String], stdin: String? = nil) throws -> (String, Int32) {
        let p = Process()
        p.executableURL = Harness.root.appendingPathComponent(".build/debug/sluice")
        // `workload add|remove` write files of this host; every other verb talks to the API.
        p.arguments = args[0] == "workload" ? args : [args[0], "--kubeconfig", "\(dir)/state/admin.kubeconfig"] + args.dropFirst()
        let pipe = Pipe()
        p.standardOutput = pipe
        p.standardError = pipe
        let input = Pipe()
        p.standardInput = input
        try p.run()
        if let stdin { input.fileHandleForWriting.write(Data(stdin.utf8)) }
        try input.fileHandleForWriting.close()
        let out = String(decoding: pipe.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
        p.waitUntilExit()
        return (out, p.terminationStatus)
    }

    /// kubectl's verbs on the config API: created / unchanged / configured, tables, -o yaml, diff's exit codes,
    /// delete in reverse dependency order, and refusals with the server's reason.
    func testTheCLIAppliesGetsDiffsAndDeletes() throws {
        try startControl()
        let yaml = """
            apiVersion: networking.istio.io/v1
            kind: VirtualService
            metadata: {name: reviews}
            spec:
              hosts: [reviews.shop.svc.cluster.local]
              http: [{route: [{destination: {host: reviews.shop.svc.cluster.local, subset: v1}}]}]
            ---
            apiVersion: networking.istio.io/v1
            kind: DestinationRule
            metadata: {name: reviews}
            spec:
              host: reviews.shop.svc.cluster.local
              subsets: [{name: v1, labels: {version: v1}}]
            ---
            apiVersion: networking.istio.io/v1
            kind: ServiceEntry
            metadata: {name: reviews}
            spec:
              hosts: [reviews.shop.svc.cluster.local]
              ports: [{number: 9080, name: http, protocol: HTTP}]
              resolution: STATIC
              endpoints: [{address: 10.0.0.1}]
            """
        try yaml.write(toFile: "\(dir)/app.yaml", atomically: true, encoding: .utf8)
        var (out, code) = try sluice(["apply", "-f", "\(dir)/app.yaml", "-n", "shop"])
        XCTAssertEqual(code, 0, out)
        // Entries before the rules that name them, whatever the file's order.
        XCTAssertEqual(out.split(separator: "\n"), ["serviceentry.networking.istio.io/reviews created",
                                                    "destinationrule.networking.istio.io/reviews created",
                                                    "virtualservice.networking.istio.io/reviews created"])
        (out, code) = try sluice(["apply", "-f", "\(dir)/app.yaml", "-n", "shop"])
        XCTAssertEqual(code, 0, out)
        XCTAssertTrue(out.split(separator: "\n").allSatisfy { $0.hasSuffix(" unchanged") }, out)
        (out, code) = try sluice(["diff", "-f", "\(dir)/app.yaml", "-n", "shop"])
        XCTAssertEqual(code, 0, out)
        let changed = yaml.replacingOccurrences(of: "10.0.0.1", with: "10.0.0.2")
        (out, code) = try sluice(["diff", "-f", "-", "-n", "shop"], stdin: changed)
        XCTAssertEqual(code, 1, out)
        XCTAssertTrue(out.contains("-  - address: 10.0.0.1") && out.contains("+  - address: 10.0.0.2"), out)
        (out, code) = try sluice(["apply", "-f", "-", "-n", "shop"], stdin: changed)
        XCTAssertTrue(out.contains("serviceentry.networking.istio.io/reviews configured"), out)
        XCTAssertEqual(code, 0, out)

        (out, code) = try sluice(["get", "vs", "-n", "shop"])
        XCTAssertEqual(code, 0, out)
        XCTAssertTrue(out.hasPrefix("NAME      GATEWAYS   HOSTS"), out)
        XCTAssertTrue(out.contains("reviews"), out)
        (out, code) = try sluice(["get", "se", "-A"])
        XCTAssertTrue(out.hasPrefix("NAMESPACE   NAME"), out)
        (out, code) = try sluice(["get", "dr", "reviews", "-n", "shop", "-o", "yaml"])
        XCTAssertEqual(code, 0, out)
        XCTAssertTrue(out.contains("kind: DestinationRule") && out.contains("resourceVersion:"), out)
        (out, code) = try sluice(["get", "nosuchkind"])
        XCTAssertEqual(code, 1)
        XCTAssertTrue(out.contains("doesn't have a resource type \"nosuchkind\""), out)

        // A write the mesh refuses is refused with the server's reason, and exits 1.
        (out, code) = try sluice(["apply", "-f", "-", "-n", "shop"],
                                 stdin: yaml.replacingOccurrences(of: "subset: v1", with: "subset: v9"))
        XCTAssertEqual(code, 1, out)
        XCTAssertTrue(out.contains("Error from server (Invalid)") && out.contains("v9"), out)

        (out, code) = try sluice(["delete", "-f", "\(dir)/app.yaml", "-n", "shop"])
        XCTAssertEqual(code, 0, out)
        XCTAssertEqual(out.split(separator: "\n").first, "virtualservice.networking.istio.io \"reviews\" deleted")
        (out, code) = try sluice(["delete", "vs", "reviews", "-n", "shop"])
        XCTAssertEqual(code, 1)
        XCTAssertTrue(out.contains("NotFound"), out)
        (out, code) = try sluice(["delete", "vs", "reviews", "-n", "shop", "--ignore-not-found"])
        XCTAssertEqual(code, 0, out)
    }

    /// `sluice analyze`: the stored mesh alone, files over it (a file's object replaces the stored one), files alone;
    /// istioctl's line form with stable codes, `-o json`, the namespace scope, exit 79 on errors (or on warnings with
    /// `--failure-threshold Warning`), 1 when it cannot run.
    func testAnalyzeFindsProblemsInTheStoredMeshAndInFilesOverIt() throws {
        try startControl()
        let stored = """
            apiVersion: networking.istio.io/v1
            kind: ServiceEntry
            metadata: {name: reviews, namespace: shop}
            spec:
              hosts: [reviews.shop.svc.cluster.local]
              ports: [{number: 9080, name: http, protocol: HTTP}]
              resolution: STATIC
              endpoints: [{address: 10.0.0.1}]
            ---
            apiVersion: networking.istio.io/v1
            kind: DestinationRule
            metadata: {name: reviews, namespace: shop}
            spec:
              host: reviews.shop.svc.cluster.local
              subsets: [{name: v1, labels: {version: v1}}]
            ---
            apiVersion: networking.istio.io/v1
            kind: VirtualService
            metadata: {name: reviews, namespace: shop}
            spec:
              hosts: [reviews.shop.svc.cluster.local]
              http:
              - route: [{destination: {host: reviews.shop.svc.cluster.local, subset: v1}}]
              - match: [{uri: {prefix: /late}}]
                route: [{destination: {host: reviews.shop.svc.cluster.local}}]
            """
        var (out, code) = try sluice(["apply", "-f", "-"], stdin: stored)
        XCTAssertEqual(code, 0, out)
        (out, code) = try sluice(["analyze", "-n", "shop"])
        XCTAssertEqual(code, 0, out)
        XCTAssertTrue(out.contains("Warning [SLC0130] (VirtualService shop/reviews) VirtualService rule http[1] is never used"), out)
        (out, code) = try sluice(["analyze", "-n", "elsewhere"])
        XCTAssertEqual(code, 0, out)
        XCTAssertTrue(out.contains("No validation issues found when analyzing namespace: elsewhere."), out)
        (out, code) = try sluice(["analyze", "-A", "--failure-threshold", "Warning"])
        XCTAssertEqual(code, 79, out)

        // A file that moves the route to a subset nothing defines: an error located in the file.
        let v3 = stored.components(separatedBy: "---\n")[2].replacingOccurrences(of: "subset: v1", with: "subset: v3")
        try v3.write(toFile: "\(dir)/reviews-v3.yaml", atomically: true, encoding: .utf8)
        (out, code) = try sluice(["analyze", "-n", "shop", "-f", "\(dir)/reviews-v3.yaml"])
        XCTAssertEqual(code, 79, out)
        XCTAssertTrue(out.contains("Error [SLC0101] (VirtualService shop/reviews \(dir)/reviews-v3.yaml:1) Referenced subset v3 of reviews.shop.svc.cluster.local not found (at spec.http[0].route[0].destination.subset)"), out)
        XCTAssertTrue(out.contains("Error: Analyzers found issues when analyzing namespace: shop."), out)
        let p = Process()
        p.executableURL = Harness.root.appendingPathComponent(".build/debug/sluice")
        p.arguments = ["analyze", "--kubeconfig", "\(dir)/state/admin.kubeconfig", "-n", "shop", "-o", "json", "\(dir)/reviews-v3.yaml"]
        let pipe = Pipe()
        p.standardOutput = pipe
        p.standardError = FileHandle.nullDevice
        try p.run()
        let json = pipe.fileHandleForReading.readDataToEndOfFile()
        p.waitUntilExit()
        XCTAssertEqual(p.terminationStatus, 79)
        let messages = try XCTUnwrap(try JSONSerialization.jsonObject(with: json) as? [[String: String]])
        let error = try XCTUnwrap(messages.first { $0["level"] == "Error" })
        XCTAssertEqual(error["code"], "SLC0101")
        XCTAssertEqual(error["name"], "ReferencedResourceNotFound")
        XCTAssertEqual(error["origin"], "VirtualService shop/reviews")
        XCTAssertEqual(error["reference"], "\(dir)/reviews-v3.yaml:1")
        XCTAssertEqual(error["path"], "spec.http[0].route[0].destination.subset")

        // The same file with a DestinationRule that defines v3 replaces the stored one: nothing wrong.
        try (v3 + "\n---\n" + stored.components(separatedBy: "---\n")[1].replacingOccurrences(of: "name: v1", with: "name: v3"))
            .write(toFile: "\(dir)/reviews-v3-dr.yaml", atomically: true, encoding: .utf8)
        (out, code) = try sluice(["analyze", "-n", "shop", "-f", "\(dir)/reviews-v3-dr.yaml"])
        XCTAssertEqual(code, 0, out)
        XCTAssertFalse(out.contains("Error"), out)
        // The file alone, without the server: no DestinationRule anywhere.
        (out, code) = try sluice(["analyze", "--use-kube=false", "\(dir)/reviews-v3.yaml"])
        XCTAssertEqual(code, 79, out)
        XCTAssertTrue(out.contains("[SLC0101]"), out)
        (out, code) = try sluice(["analyze", "-f", "\(dir)/no-such-file.yaml"])
        XCTAssertEqual(code, 1, out)
        XCTAssertTrue(out.contains("does not exist"), out)
        // The stored mesh did not change.
        (out, code) = try sluice(["get", "dr", "reviews", "-n", "shop", "-o", "yaml"])
        XCTAssertTrue(out.contains("name: v1") && !out.contains("name: v3"), out)
    }

    /// Registration: `sluice workload add` writes the entry, the agent registers it as owned by its node, the CA then
    /// grants that identity to the node (and only then), `workload remove` takes it away again; a workload on another
    /// node is refused; an offline node's workloads go after the cleanup grace.
    func testRegistrationAndTheCAsGrantsFollowTheHostsWorkloads() throws {
        try startControl(grace: "2s")
        let workloads = "\(dir)/workloads"
        var (out, code) = try sluice(["workload", "add", "reviews-1", "-n", "shop", "--service-account", "reviews",
                                      "--address", "127.0.0.1", "--labels", "app=reviews,version=v1", "--ports", "http=9080",
                                      "--cgroup", "/sys/fs/cgroup/reviews", "--dir", workloads])
        XCTAssertEqual(code, 0, out)
        try startAgent(["--workloads", workloads])
        let cert = "\(dir)/agent/certs/shop_reviews.crt"
        XCTAssertTrue(Harness.wait(15) { FileManager.default.fileExists(atPath: cert) }, read("agent.log") + read("control.log"))
        (out, code) = try sluice(["get", "we", "reviews-1", "-n", "shop", "-o", "json"])
        XCTAssertEqual(code, 0, out)
        XCTAssertTrue(out.contains("\"sluice.dev/node\" : \"n1\"") && out.contains("\"sluice.dev/registered-by\" : \"n1\""), out)
        XCTAssertTrue(read("control.log").contains("verb=register"), read("control.log"))

        // An entry that names another node is refused, and the rest stays.
        try """
            apiVersion: networking.istio.io/v1
            kind: WorkloadEntry
            metadata: {name: elsewhere, namespace: shop, annotations: {sluice.dev/node: n2}}
            spec: {address: 10.0.0.9, serviceAccount: ratings}
            """.write(toFile: "\(workloads)/shop.elsewhere.yaml", atomically: true, encoding: .utf8)
        XCTAssertTrue(Harness.wait(10) { self.read("agent.log").contains("cannot register a workload on node n2") }, read("agent.log"))
        (out, code) = try sluice(["get", "we", "-n", "shop", "-o", "name"])
        XCTAssertEqual(out.split(separator: "\n"), ["workloadentry.networking.istio.io/reviews-1"], out)
        try FileManager.default.removeItem(atPath: "\(workloads)/shop.elsewhere.yaml")

        // Removed on the host: the entry goes, and with it the node's certificate for that identity.
        (out, code) = try sluice(["workload", "remove", "reviews-1", "-n", "shop", "--dir", workloads])
        XCTAssertEqual(code, 0, out)
        XCTAssertTrue(Harness.wait(10) { !FileManager.default.fileExists(atPath: cert) }, read("agent.log"))
        (out, _) = try sluice(["get", "we", "-n", "shop", "-o", "name"])
        XCTAssertEqual(out.trimmingCharacters(in: .whitespacesAndNewlines), "No resources found in shop namespace.")

        // Added again, then the node goes offline: after the grace its workloads are gone.
        (out, code) = try sluice(["workload", "add", "reviews-1", "-n", "shop", "--service-account", "reviews",
                                  "--address", "127.0.0.1", "--unit", "reviews.service", "--dir", workloads])
        XCTAssertTrue(Harness.wait(10) { (try? self.sluice(["get", "we", "-n", "shop", "-o", "name"]))?.0.contains("reviews-1") == true })
        stop(agent)
        Thread.sleep(forTimeInterval: 1)
        XCTAssertTrue(try sluice(["get", "we", "-n", "shop", "-o", "name"]).0.contains("reviews-1"), "removed before the grace")
        XCTAssertTrue(Harness.wait(10) { (try? self.sluice(["get", "we", "-n", "shop", "-o", "name"]))?.0.contains("reviews-1") == false },
                      read("control.log"))
        XCTAssertTrue(read("control.log").contains("removed the workloads of an offline node"))
    }

    /// `sluice delete node` (as `kubectl delete node`): the workloads the node registered go at once rather than after
    /// the grace, its agent is told and keeps serving, and its stream is refused from then on, across a restart of the
    /// control plane too; a node deleted already, or never seen, is NotFound.
    func testADeletedNodeLosesItsWorkloadsAndIsRefusedUntilItJoinsAgain() throws {
        try startControl(grace: "1h")
        let workloads = "\(dir)/workloads"
        var (out, code) = try sluice(["workload", "add", "reviews-1", "-n", "shop", "--service-account", "reviews",
                                      "--address", "127.0.0.1", "--unit", "reviews.service", "--dir", workloads])
        XCTAssertEqual(code, 0, out)
        try startAgent(["--workloads", workloads])
        XCTAssertTrue(Harness.wait(15) { (try? self.sluice(["get", "we", "-n", "shop", "-o", "name"]))?.0.contains("reviews-1") == true },
                      read("agent.log") + read("control.log"))
        XCTAssertNotNil(try status())

        (out, code) = try sluice(["delete", "node", "n1"])
        XCTAssertEqual(code, 0, out)
        XCTAssertEqual(out, "node \"n1\" deleted (1 registered workload(s) removed, its agent's stream ended)\n")
        (out, _) = try sluice(["get", "we", "-n", "shop", "-o", "name"])
        XCTAssertEqual(out.trimmingCharacters(in: .whitespacesAndNewlines), "No resources found in shop namespace.")
        let log = read("control.log")
        XCTAssertTrue(log.contains("verb=delete-node") && log.contains("resource=nodes"), log)
        XCTAssertTrue(Harness.wait(10) { self.read("agent.log").contains("n1 was deleted: join it again") }, read("agent.log"))
        XCTAssertNil(try status(), "a deleted node is not connected")

        (out, code) = try sluice(["delete", "node", "n1"])
        XCTAssertEqual(code, 1, out)
        XCTAssertTrue(out.contains("nodes \"n1\" not found"), out)
        XCTAssertEqual(try api("DELETE", "/sluice/v1/nodes/never-seen").0, 404)
        XCTAssertEqual(try api("GET", "/sluice/v1/nodes/never-seen").0, 405)

        // A restart does not undo it: the agent, still retrying, is refused again and registers nothing.
        let refusals = read("agent.log").components(separatedBy: "was deleted").count
        stop(control)
        try startControl(grace: "1h")
        XCTAssertTrue(Harness.wait(20) { self.read("agent.log").components(separatedBy: "was deleted").count > refusals },
                      read("agent.log"))
        XCTAssertNil(try status())
        (out, _) = try sluice(["get", "we", "-n", "shop", "-o", "name"])
        XCTAssertEqual(out.trimmingCharacters(in: .whitespacesAndNewlines), "No resources found in shop namespace.")
    }

    /// The Python `kubernetes` client's CustomObjectsApi: create, get, list, patch, watch, delete, a refusal.
    func testThePythonKubernetesClientWorksUnchanged() throws {
        try startControl()
        let (out, status) = try Harness.run("/usr/bin/env", ["python3", Harness.root.appendingPathComponent("Tests/Fixtures/k8s_client.py").path,
                                                             "\(dir)/state/admin.kubeconfig"])
        XCTAssertEqual(status, 0, out + read("control.log"))
        XCTAssertTrue(out.hasSuffix("ok\n"), out)
    }

    /// `kill -9` of the control plane in the middle of a write load: every write it acknowledged is there after the
    /// restart, the agent kept serving meanwhile, and it resumed its stream (naming what it holds) instead of
    /// starting over.
    func testKill9UnderWriteLoadLosesNoAcknowledgedWrite() throws {
        let gatewayPort = try servingMesh()
        try startControl()
        try startAgent()
        XCTAssertTrue(Harness.wait(15) { self.tag(gatewayPort) == "A" }, read("agent.log"))
        XCTAssertTrue(Harness.wait(5) { (try? self.status())??["sync"] as? String == "SYNCED" })

        // Writers create WorkloadEntries as fast as the API answers; the control plane is killed under them.
        let acknowledged = Mutex<[String]>([])
        let stop = Atomic<Bool>(false)
        let token = try String(contentsOfFile: "\(dir)/state/admin-token", encoding: .utf8)
            .trimmingCharacters(in: .whitespacesAndNewlines)
        let writers = (0..<4).map { w in
            Thread { [dir, apiPort] in
                var client = HTTPSClient(address: "127.0.0.1:\(apiPort)", serverName: "sluice-control",
                                         rootCA: "\(dir)/state/root-cert.pem")
                client.timeout = 2
                var n = 0
                while !stop.load(ordering: .relaxed) {
                    n += 1
                    let name = "w\(w)-\(n)"
                    let body = #"{"apiVersion":"networking.istio.io/v1","kind":"WorkloadEntry","metadata":{"name":"\#(name)"},"#
                        + #""spec":{"address":"10.7.\#(w).\#(n % 250)"}}"#
                    let r = try? client.request("POST", "/apis/networking.istio.io/v1/namespaces/load/workloadentries",
                                                headers: [("authorization", "Bearer \(token)"), ("content-type", "application/json")],
                                                body: Array(body.utf8))
                    if r?.status == 201 { acknowledged.withLock { $0.append(name) } }
                }
            }
        }
        for t in writers { t.start() }
        Thread.sleep(forTimeInterval: 1.5)
        kill(control!.processIdentifier, SIGKILL)
        control!.waitUntilExit()
        let killedAt = acknowledged.withLock { $0.count }
        Thread.sleep(forTimeInterval: 0.3)
        stop.store(true, ordering: .relaxed)
        XCTAssertGreaterThan(killedAt, 20, "the load was too light to mean anything")
        // The agent serves on while the control plane is gone.
        XCTAssertEqual(tag(gatewayPort), "A")

        try startControl()
        let (code, body) = try api("GET", "/apis/networking.istio.io/v1/namespaces/load/workloadentries")
        XCTAssertEqual(code, 200)
        let stored = Set(((try JSONSerialization.jsonObject(with: Data(body.utf8)) as? [String: Any])?["items"] as? [[String: Any]] ?? [])
            .compactMap { ($0["metadata"] as? [String: Any])?["name"] as? String })
        let lost = acknowledged.withLock { $0 }.filter { !stored.contains($0) }
        XCTAssertEqual(lost, [], "acknowledged writes lost after kill -9 (\(stored.count) stored)")
        XCTAssertTrue(Harness.wait(15) { (try? self.status())??["sync"] as? String == "SYNCED" }, read("agent.log"))
        let resumed = read("control.log").components(separatedBy: "\n").last { $0.contains("agent connected") } ?? ""
        XCTAssertFalse(resumed.contains("holds=0"), resumed)
        XCTAssertEqual(tag(gatewayPort), "A")
    }

    /// `sluice proxy-config`: what the agent serves, asked of it over the stream.
    func assertProxyConfig(gatewayPort: UInt16) throws {
        var (out, code) = try sluice(["proxy-config", "n1", "all"])
        XCTAssertEqual(code, 0, out)
        XCTAssertEqual(out.components(separatedBy: "\n\n").count, 5, out)
        (out, code) = try sluice(["proxy-config", "n1", "listeners"])
        XCTAssertEqual(code, 0, out)
        XCTAssertTrue(out.hasPrefix("ADDRESS"), out)
        let listener = out.split(separator: "\n").first { $0.contains("\(gatewayPort)") }.map(String.init) ?? ""
        XCTAssertTrue(listener.contains("127.0.0.1") && listener.contains("TCP") && listener.contains("gateway default/gw")
                      && listener.contains("svc0.test.svc.cluster.local"), out)
        (out, code) = try sluice(["proxy-config", "n1", "clusters"])
        XCTAssertEqual(code, 0, out)
        XCTAssertTrue(out.contains("svc0.test.svc.cluster.local") && out.contains("ROUND_ROBIN"), out)
        // istioctl's order (section first) works too.
        (out, code) = try sluice(["proxy-config", "endpoints", "n1"])
        XCTAssertEqual(code, 0, out)
        XCTAssertTrue(out.split(separator: "\n").contains { $0.hasPrefix("127.0.0.1:") && $0.contains("HEALTHY") }, out)
        (out, code) = try sluice(["proxy-config", "n1", "routes"])
        XCTAssertTrue(out.contains("vs0.default") && out.contains("tcp[0]"), out)
        (out, code) = try sluice(["proxy-config", "n1", "secrets"])
        XCTAssertEqual(code, 0, out)
        let node = out.split(separator: "\n").first { $0.hasPrefix("spiffe://cluster.local/ns/sluice-nodes/sa/n1") } ?? ""
        XCTAssertTrue(node.contains("Cert Chain") && node.contains("ACTIVE") && node.contains("true"), out)
        XCTAssertTrue(out.contains("ROOTCA"), out)
        XCTAssertFalse(out.contains("PRIVATE KEY"), out)
        // -o json: the agent's own account, with its version.
        let p = Process()
        p.executableURL = Harness.root.appendingPathComponent(".build/debug/sluice")
        p.arguments = ["proxy-config", "--kubeconfig", "\(dir)/state/admin.kubeconfig", "n1", "all", "-o", "json"]
        let pipe = Pipe()
        p.standardOutput = pipe
        try p.run()
        let json = pipe.fileHandleForReading.readDataToEndOfFile()
        p.waitUntilExit()
        let dump = try XCTUnwrap(try JSONSerialization.jsonObject(with: json) as? [String: Any])
        XCTAssertEqual(dump["node"] as? String, "n1")
        XCTAssertGreaterThan(dump["version"] as? Int ?? 0, 0)
        XCTAssertEqual((dump["listeners"] as? [[String: Any]])?.first?["port"] as? Int, Int(gatewayPort))
        (out, code) = try sluice(["proxy-config", "n9", "listeners"])
        XCTAssertEqual(code, 1, out)
        XCTAssertTrue(out.contains("NotFound") && out.contains("no agent connected"), out)
        (out, code) = try sluice(["proxy-config", "n1", "nonsense"])
        XCTAssertNotEqual(code, 0, out)
    }

    func testTheAgentServesThePushedMeshAndKeepsServingWithoutTheControlPlane() throws {
        let gatewayPort = try servingMesh()
        try startControl()
        try startAgent()
        XCTAssertTrue(Harness.wait(15) { self.tag(gatewayPort) == "A" }, read("agent.log") + read("control.log"))
        XCTAssertTrue(Harness.wait(5) { (try? self.status())??["sync"] as? String == "SYNCED" }, "\((try? status()) ?? nil ?? [:])")
        XCTAssertTrue(FileManager.default.fileExists(atPath: "\(dir)/agent/snapshot.json"))
        // `sluice status`, as istioctl proxy-status.
        let (table, code) = try sluice(["status"])
        XCTAssertEqual(code, 0)
        let row = table.split(separator: "\n").map { $0.split(separator: " ").map(String.init) }
        XCTAssertEqual(row.first?.prefix(2), ["NODE", "STATUS"], table)
        XCTAssertEqual(row.dropFirst().first?.prefix(2), ["n1", "SYNCED"], table)
        try assertProxyConfig(gatewayPort: gatewayPort)

        // A push the agent cannot serve (its port is taken): NACKED with the agent's reason, the old listener serves.
        let (held, heldPort) = Harness.loopbackSocket(backlog: 1)
        defer { Glibc.close(held) }
        let gateway = """
            {"apiVersion":"networking.istio.io/v1","kind":"Gateway","metadata":{"name":"taken","namespace":"default"},
             "spec":{"servers":[{"port":{"number":\(heldPort),"name":"tcp","protocol":"TCP"},"bind":"127.0.0.1","hosts":["*"]}]}}
            """
        let route = """
            {"apiVersion":"networking.istio.io/v1","kind":"VirtualService","metadata":{"name":"taken","namespace":"default"},
             "spec":{"hosts":["svc0.test.svc.cluster.local"],"gateways":["taken"],
                     "tcp":[{"match":[{"port":\(heldPort)}],"route":[{"destination":{"host":"svc0.test.svc.cluster.local"}}]}]}}
            """
        XCTAssertEqual(try api("POST", "/apis/networking.istio.io/v1/namespaces/default/gateways", gateway).0, 201)
        XCTAssertEqual(try api("POST", "/apis/networking.istio.io/v1/namespaces/default/virtualservices", route).0, 201)
        XCTAssertTrue(Harness.wait(10) { (try? self.status())??["sync"] as? String == "NACKED" }, "\((try? status()) ?? nil ?? [:])")
        XCTAssertTrue((try status()?["error"] as? String ?? "").contains("in use"), "\((try? status()) ?? nil ?? [:])")
        XCTAssertEqual(tag(gatewayPort), "A")
        // Taken away again: the next push (a full snapshot) is accepted.
        XCTAssertEqual(try api("DELETE", "/apis/networking.istio.io/v1/namespaces/default/virtualservices/taken").0, 200)
        XCTAssertEqual(try api("DELETE", "/apis/networking.istio.io/v1/namespaces/default/gateways/taken").0, 200)
        XCTAssertTrue(Harness.wait(10) { (try? self.status())??["sync"] as? String == "SYNCED" }, "\((try? status()) ?? nil ?? [:])")

        // The control plane goes down: traffic is unaffected.
        stop(control)
        for _ in 0..<5 { XCTAssertEqual(tag(gatewayPort), "A") }
        // The agent restarts while the control plane is still down: it serves the snapshot it persisted.
        stop(agent)
        try startAgent()
        XCTAssertTrue(Harness.wait(10) { self.tag(gatewayPort) == "A" }, read("agent.log"))
        XCTAssertTrue(read("agent.log").contains("serving the snapshot persisted by the last run"))
        // The control plane is back: the agent resumes its stream (naming the version it holds) and is in sync.
        try startControl()
        XCTAssertTrue(Harness.wait(15) { (try? self.status())??["sync"] as? String == "SYNCED" }, read("agent.log"))
        let resumed = read("control.log").components(separatedBy: "\n").last { $0.contains("agent connected") } ?? ""
        XCTAssertFalse(resumed.contains("holds=0"), resumed)
        XCTAssertEqual(tag(gatewayPort), "A")
    }
}
