import Foundation
import Synchronization
import XCTest

/// The config API of `sluice control` (15017) end to end: the real binary, kubectl (the machine's) with the
/// `admin.kubeconfig` the control plane writes, and curl for the status codes kubectl hides.
final class ConfigAPITests: XCTestCase {
    var dir = ""
    var control: Process?
    var apiPort: UInt16 = 0

    static let rules = """
        apiVersion: networking.istio.io/v1
        kind: DestinationRule
        metadata: {name: reviews, namespace: shop}
        spec:
          host: reviews
          subsets:
          - {name: v1, labels: {version: v1}}
          - {name: v2, labels: {version: v2}}
        ---
        apiVersion: networking.istio.io/v1
        kind: VirtualService
        metadata: {name: reviews, namespace: shop, labels: {app: reviews}}
        spec:
          hosts: [reviews]
          http:
          - route:
            - destination: {host: reviews, subset: v1}
        """

    override func setUpWithError() throws {
        dir = NSTemporaryDirectory() + "sluice-api-\(UUID().uuidString)"
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        try "viewtoken,viewer,view\n".write(toFile: "\(dir)/tokens", atomically: true, encoding: .utf8)
        try Self.rules.write(toFile: "\(dir)/rules.yaml", atomically: true, encoding: .utf8)
        apiPort = Harness.deadPort()
        try startControl()
    }

    func startControl() throws {
        FileManager.default.createFile(atPath: "\(dir)/control.log", contents: nil)
        let p = Process()
        p.executableURL = Harness.root.appendingPathComponent(".build/debug/sluice")
        p.arguments = ["control", "--state-dir", "\(dir)/state", "--listen", "127.0.0.1:\(Harness.deadPort())",
                       "--api", "127.0.0.1:\(apiPort)", "--tokens", "\(dir)/tokens",
                       "--metrics", "127.0.0.1:\(Harness.deadPort())"]
        p.standardOutput = FileHandle(forWritingAtPath: "/dev/null")
        p.standardError = try FileHandle(forWritingTo: URL(fileURLWithPath: "\(dir)/control.log"))
        try p.run()
        control = p
        XCTAssertTrue(Harness.wait(10) { log.contains("control plane ready") }, log)
    }

    override func tearDown() {
        control?.terminate()
        control?.waitUntilExit()
        try? FileManager.default.removeItem(atPath: dir)
    }

    var log: String { (try? String(contentsOfFile: "\(dir)/control.log", encoding: .utf8)) ?? "" }

    /// The kubectl under test: the machine's (1.32), or Debian's 1.20 that `make deps` unpacks under .build.
    var kubectlBinary: String?

    func kubectlPath() throws -> String {
        guard let path = kubectlBinary ?? ["/usr/bin/kubectl", "/usr/local/bin/kubectl"].first(where: FileManager.default.isExecutableFile)
        else {
            if ProcessInfo.processInfo.environment["CI"] == "true" { XCTFail("kubectl is missing: make deps installs it") }
            throw XCTSkip("kubectl is not installed (make deps installs it)")
        }
        return path
    }

    func kubectl(_ args: [String]) throws -> (String, Int32) {
        try Harness.run(try kubectlPath(), ["--kubeconfig", "\(dir)/state/admin.kubeconfig"] + args)
    }

    /// Debian's `kubernetes-client` (kubectl 1.20), which reads OpenAPI v2 as gnostic protobuf before it applies and
    /// diffs with a server-side dry run through the v2 document's PATCH operations.
    func testDebiansKubectl120AppliesGetsDiffsAndDeletes() throws {
        let old = Harness.root.appendingPathComponent(".build/kubectl-1.20/usr/bin/kubectl").path
        guard FileManager.default.isExecutableFile(atPath: old) else {
            if ProcessInfo.processInfo.environment["CI"] == "true" { return XCTFail("\(old) is missing: make deps unpacks it") }
            throw XCTSkip("\(old) is missing (make deps unpacks Debian's kubernetes-client there)")
        }
        let (version, _) = try Harness.run(old, ["version", "--client", "--short"])
        XCTAssertTrue(version.contains("v1.20"), version)
        kubectlBinary = old
        try testKubectlAppliesGetsDiffsAndDeletes()
    }

    /// Istio's own Bookinfo rules (`../shared/istio-samples`, which CI has; a clone without it skips, or set
    /// ISTIO_SAMPLES): kubectl applies the DestinationRules and VirtualServices, `get -w` follows reviews while `diff`
    /// and `apply` move it from all-v1 to 80/20, and `delete` takes everything away.
    func testKubectlDrivesIstiosBookinfoRules() throws { try bookinfo() }

    func testDebiansKubectl120DrivesIstiosBookinfoRules() throws {
        let old = Harness.root.appendingPathComponent(".build/kubectl-1.20/usr/bin/kubectl").path
        guard FileManager.default.isExecutableFile(atPath: old) else {
            if ProcessInfo.processInfo.environment["CI"] == "true" { return XCTFail("\(old) is missing: make deps unpacks it") }
            throw XCTSkip("\(old) is missing (make deps unpacks Debian's kubernetes-client there)")
        }
        kubectlBinary = old
        try bookinfo()
    }

    func bookinfo() throws {
        let samples = ProcessInfo.processInfo.environment["ISTIO_SAMPLES"]
            ?? Harness.root.deletingLastPathComponent().appendingPathComponent("shared/istio-samples").path
        let net = "\(samples)/samples/bookinfo/networking"
        guard FileManager.default.fileExists(atPath: "\(net)/destination-rule-all.yaml") else {
            throw XCTSkip("Istio's samples are not at \(samples) (CI has them in ../shared; or set ISTIO_SAMPLES)")
        }
        var (out, status) = try kubectl(["apply", "-n", "bookinfo", "-f", "\(net)/destination-rule-all.yaml"])
        XCTAssertEqual(status, 0, out)
        for host in ["productpage", "reviews", "ratings", "details"] {
            XCTAssertTrue(out.contains("destinationrule.networking.istio.io/\(host) created"), out)
        }
        (out, status) = try kubectl(["apply", "-n", "bookinfo", "-f", "\(net)/virtual-service-all-v1.yaml"])
        XCTAssertEqual(status, 0, out)
        XCTAssertTrue(out.contains("virtualservice.networking.istio.io/reviews created"), out)
        (out, _) = try kubectl(["get", "dr", "-n", "bookinfo"])
        XCTAssertTrue(out.contains("HOST") && out.contains("reviews") && out.contains("details"), out)

        // get -w on reviews, in the background: one line per version of the object.
        let watch = Process()
        watch.executableURL = URL(fileURLWithPath: try kubectlPath())
        watch.arguments = ["--kubeconfig", "\(dir)/state/admin.kubeconfig", "get", "vs", "reviews", "-n", "bookinfo", "-w",
                           "-o", "jsonpath={.metadata.generation}{\" \"}{.spec.http[0].route[*].weight}{\"\\n\"}"]
        let pipe = Pipe()
        watch.standardOutput = pipe
        watch.standardError = pipe
        let seen = Mutex("")
        pipe.fileHandleForReading.readabilityHandler = { h in
            let text = String(decoding: h.availableData, as: UTF8.self)
            seen.withLock { $0 += text }
        }
        try watch.run()
        defer {
            watch.terminate()
            watch.waitUntilExit()
            pipe.fileHandleForReading.readabilityHandler = nil
        }
        XCTAssertTrue(Harness.wait(10) { seen.withLock { $0 }.contains("1") }, seen.withLock { $0 })

        (out, status) = try kubectl(["diff", "-n", "bookinfo", "-f", "\(net)/virtual-service-reviews-80-20.yaml"])
        XCTAssertEqual(status, 1, out)
        XCTAssertTrue(out.contains("weight: 80") && out.contains("weight: 20"), out)
        (out, status) = try kubectl(["apply", "-n", "bookinfo", "-f", "\(net)/virtual-service-reviews-80-20.yaml"])
        XCTAssertEqual(status, 0, out)
        XCTAssertTrue(out.contains("virtualservice.networking.istio.io/reviews configured"), out)
        XCTAssertTrue(Harness.wait(10) { seen.withLock { $0 }.contains("2 80 20") }, "get -w saw: \(seen.withLock { $0 })")

        (out, status) = try kubectl(["delete", "-n", "bookinfo", "-f", "\(net)/virtual-service-all-v1.yaml"])
        XCTAssertEqual(status, 0, out)
        (out, status) = try kubectl(["delete", "-n", "bookinfo", "-f", "\(net)/destination-rule-all.yaml"])
        XCTAssertEqual(status, 0, out)
        XCTAssertTrue(out.contains("destinationrule.networking.istio.io \"ratings\" deleted"), out)
        (out, status) = try kubectl(["get", "vs,dr", "-n", "bookinfo", "-o", "name"])
        XCTAssertEqual(status, 0)
        XCTAssertEqual(out, "", "left after delete")
    }

    var adminToken: String {
        ((try? String(contentsOfFile: "\(dir)/state/admin-token", encoding: .utf8)) ?? "")
            .trimmingCharacters(in: .whitespacesAndNewlines)
    }

    /// One HTTPS request with curl; returns the status and the body as JSON (or text under "text").
    func call(_ method: String, _ path: String, token: String? = nil, body: String? = nil,
              type: String = "application/json") throws -> (Int, [String: Any]) {
        var args = ["-s", "--max-time", "10", "--cacert", "\(dir)/state/root-cert.pem", "--resolve",
                    "sluice-control:\(apiPort):127.0.0.1", "-X", method, "-w", "\n%{http_code}"]
        if let token { args += ["-H", "Authorization: Bearer \(token)"] }
        if let body {
            let file = "\(dir)/body-\(UUID().uuidString)"
            try body.write(toFile: file, atomically: true, encoding: .utf8)
            args += ["-H", "Content-Type: \(type)", "--data-binary", "@\(file)"]
        }
        let (out, _) = try Harness.run("/usr/bin/curl", args + ["https://sluice-control:\(apiPort)\(path)"])
        let lines = out.split(separator: "\n", omittingEmptySubsequences: false)
        let text = lines.dropLast().joined(separator: "\n")
        let json = (try? JSONSerialization.jsonObject(with: Data(text.utf8))) as? [String: Any] ?? ["text": text]
        return (Int(lines.last ?? "") ?? 0, json)
    }

    static let vsPath = "/apis/networking.istio.io/v1/namespaces/shop/virtualservices"

    func testKubectlAppliesGetsDiffsAndDeletes() throws {
        var (out, status) = try kubectl(["apply", "-f", "\(dir)/rules.yaml"])
        XCTAssertEqual(status, 0, out)
        XCTAssertTrue(out.contains("destinationrule.networking.istio.io/reviews created"), out)
        XCTAssertTrue(out.contains("virtualservice.networking.istio.io/reviews created"), out)
        (out, status) = try kubectl(["apply", "-f", "\(dir)/rules.yaml"])
        XCTAssertTrue(out.contains("virtualservice.networking.istio.io/reviews unchanged"), out)

        (out, status) = try kubectl(["get", "vs", "-n", "shop", "-o", "json"])
        XCTAssertEqual(status, 0)
        let list = try JSONSerialization.jsonObject(with: Data(out.utf8)) as! [String: Any]
        let item = (list["items"] as! [[String: Any]])[0]
        let meta = item["metadata"] as! [String: Any]
        XCTAssertNotNil(meta["uid"])
        XCTAssertNotNil(meta["creationTimestamp"])
        XCTAssertEqual(meta["generation"] as? Int, 1)
        let rv = try XCTUnwrap(Int(meta["resourceVersion"] as? String ?? ""))
        (out, _) = try kubectl(["get", "virtualservices", "-A"])
        XCTAssertTrue(out.contains("shop") && out.contains("reviews"), out)

        // diff: nothing to change is exit 0; a new weight is exit 1 and shows it.
        (out, status) = try kubectl(["diff", "-f", "\(dir)/rules.yaml"])
        XCTAssertEqual(status, 0, out)
        let changed = Self.rules.replacingOccurrences(of: "- destination: {host: reviews, subset: v1}",
                                                      with: "- destination: {host: reviews, subset: v1}\n      weight: 90\n    - destination: {host: reviews, subset: v2}\n      weight: 10")
        try changed.write(toFile: "\(dir)/changed.yaml", atomically: true, encoding: .utf8)
        (out, status) = try kubectl(["diff", "-f", "\(dir)/changed.yaml"])
        XCTAssertEqual(status, 1, out)
        XCTAssertTrue(out.contains("+      weight: 10"), out)
        (out, status) = try kubectl(["apply", "-f", "\(dir)/changed.yaml"])
        XCTAssertTrue(out.contains("virtualservice.networking.istio.io/reviews configured"), out)
        (out, _) = try kubectl(["get", "vs", "reviews", "-n", "shop", "-o", "jsonpath={.metadata.generation} {.metadata.resourceVersion}"])
        let parts = out.split(separator: " ")
        XCTAssertEqual(parts.first, "2")
        XCTAssertGreaterThan(Int(parts.last ?? "") ?? 0, rv)

        // A subset no DestinationRule defines is refused, naming the field (istioctl analyze's IST0101).
        let bad = changed.replacingOccurrences(of: "subset: v2", with: "subset: v9")
        try bad.write(toFile: "\(dir)/bad.yaml", atomically: true, encoding: .utf8)
        (out, status) = try kubectl(["apply", "-f", "\(dir)/bad.yaml"])
        XCTAssertNotEqual(status, 0)
        (out, _) = try kubectl(["get", "vs", "reviews", "-n", "shop", "-o", "yaml"])
        XCTAssertTrue(out.contains("subset: v2") && !out.contains("v9"), "a refused write changed nothing: \(out)")

        // kubectl deletes in file order: the DestinationRule first, which the VirtualService still needs, so that
        // delete is refused (the mesh would not compile) and the VirtualService goes; a second pass takes the rule.
        (out, status) = try kubectl(["delete", "-f", "\(dir)/rules.yaml"])
        XCTAssertEqual(status, 1, out)
        XCTAssertTrue(out.contains("virtualservice.networking.istio.io \"reviews\" deleted"), out)
        (out, status) = try kubectl(["delete", "-f", "\(dir)/rules.yaml", "--ignore-not-found"])
        XCTAssertEqual(status, 0, out)
        XCTAssertTrue(out.contains("destinationrule.networking.istio.io \"reviews\" deleted"), out)
        (out, status) = try kubectl(["get", "vs", "-n", "shop"])
        XCTAssertFalse(out.contains("reviews"), out)
        XCTAssertTrue(log.contains("msg=audit") && log.contains("verb=delete") && log.contains("user=admin"), log)
    }

    func testEveryVerbAnswersKubernetesStatus() throws {
        let token = adminToken
        let vs = #"{"apiVersion":"networking.istio.io/v1","kind":"VirtualService","metadata":{"name":"r","namespace":"shop"},"spec":{"hosts":["r"],"http":[{"route":[{"destination":{"host":"r"}}]}]}}"#
        XCTAssertEqual(try call("GET", Self.vsPath).0, 401)
        XCTAssertEqual(try call("GET", Self.vsPath, token: "wrong").0, 401)
        XCTAssertEqual(try call("GET", Self.vsPath, token: "viewtoken").0, 200)
        let forbidden = try call("POST", Self.vsPath, token: "viewtoken", body: vs)
        XCTAssertEqual(forbidden.0, 403)
        XCTAssertEqual(forbidden.1["reason"] as? String, "Forbidden")

        var (code, o) = try call("POST", Self.vsPath, token: token, body: vs)
        XCTAssertEqual(code, 201, "\(o)")
        let rv = ((o["metadata"] as? [String: Any])?["resourceVersion"] as? String) ?? ""
        (code, o) = try call("POST", Self.vsPath, token: token, body: vs)
        XCTAssertEqual(code, 409)
        XCTAssertEqual(o["reason"] as? String, "AlreadyExists")
        (code, o) = try call("GET", Self.vsPath + "/missing", token: token)
        XCTAssertEqual(code, 404)
        XCTAssertEqual(o["reason"] as? String, "NotFound")
        XCTAssertEqual(o["kind"] as? String, "Status")

        // Replace: stale resourceVersion -> 409 Conflict; the current one -> 200 and a new version.
        let stale = vs.replacingOccurrences(of: #""namespace":"shop""#, with: #""namespace":"shop","resourceVersion":"999""#)
        (code, o) = try call("PUT", Self.vsPath + "/r", token: token, body: stale)
        XCTAssertEqual(code, 409)
        XCTAssertEqual(o["reason"] as? String, "Conflict")
        let fresh = vs.replacingOccurrences(of: #""namespace":"shop""#, with: #""namespace":"shop","resourceVersion":"\#(rv)""#)
        (code, o) = try call("PUT", Self.vsPath + "/r", token: token, body: fresh.replacingOccurrences(of: #"["r"]"#, with: #"["r","r2"]"#))
        XCTAssertEqual(code, 200, "\(o)")

        // Patches.
        (code, o) = try call("PATCH", Self.vsPath + "/r", token: token, body: #"{"metadata":{"labels":{"team":"a"}}}"#,
                             type: "application/merge-patch+json")
        XCTAssertEqual(code, 200, "\(o)")
        XCTAssertEqual(((o["metadata"] as? [String: Any])?["labels"] as? [String: String])?["team"], "a")
        (code, o) = try call("PATCH", Self.vsPath + "/r", token: token,
                             body: #"[{"op":"replace","path":"/spec/hosts/1","value":"r3"}]"#, type: "application/json-patch+json")
        XCTAssertEqual(code, 200, "\(o)")
        XCTAssertEqual((o["spec"] as? [String: Any])?["hosts"] as? [String], ["r", "r3"])
        (code, _) = try call("PATCH", Self.vsPath + "/r", token: token, body: "{}", type: "application/strategic-merge-patch+json")
        XCTAssertEqual(code, 415)
        (code, _) = try call("GET", Self.vsPath + "?labelSelector=team%3Da", token: token)
        XCTAssertEqual(code, 200)
        XCTAssertEqual(((try call("GET", Self.vsPath + "?labelSelector=team%3Db", token: token).1)["items"] as? [Any])?.count, 0)

        // Invalid: the cause names the field; too large: 413; not JSON: 400.
        let invalid = vs.replacingOccurrences(of: #"{"host":"r"}"#, with: #"{"host":"r","subset":"nope"}"#)
            .replacingOccurrences(of: #""name":"r""#, with: #""name":"r9""#)
        (code, o) = try call("POST", Self.vsPath, token: token, body: invalid)
        XCTAssertEqual(code, 422, "\(o)")
        XCTAssertEqual(o["reason"] as? String, "Invalid")
        let causes = (o["details"] as? [String: Any])?["causes"] as? [[String: Any]] ?? []
        XCTAssertEqual(causes.first?["field"] as? String, "spec.http[0].route[0].destination.subset", "\(o)")
        (code, o) = try call("POST", Self.vsPath, token: token,
                             body: vs.replacingOccurrences(of: #""hosts":["r"]"#, with: #""hosts":["\#(String(repeating: "a", count: 1_600_000))"]"#))
        XCTAssertEqual(code, 413)
        XCTAssertEqual(o["reason"] as? String, "RequestEntityTooLarge")
        XCTAssertEqual(try call("POST", Self.vsPath, token: token, body: "{not json").0, 400)
        XCTAssertEqual(try call("GET", Self.vsPath + "/r9", token: token).0, 404, "refused writes store nothing")

        // Dry run stores nothing; delete answers the object, then 404.
        let dry = vs.replacingOccurrences(of: #""name":"r""#, with: #""name":"dry""#)
        XCTAssertEqual(try call("POST", Self.vsPath + "?dryRun=All", token: token, body: dry).0, 201)
        XCTAssertEqual(try call("GET", Self.vsPath + "/dry", token: token).0, 404)
        XCTAssertEqual(try call("DELETE", Self.vsPath + "/r", token: token).0, 200)
        XCTAssertEqual(try call("DELETE", Self.vsPath + "/r", token: token).0, 404)

        // Deleting a node: admins only; one the control plane never saw is NotFound.
        XCTAssertEqual(try call("DELETE", "/sluice/v1/nodes/n1", token: "viewtoken").1["reason"] as? String, "Forbidden")
        XCTAssertEqual(try call("DELETE", "/sluice/v1/nodes/n1", token: token).1["reason"] as? String, "NotFound")

        // Discovery and OpenAPI.
        XCTAssertEqual(try call("GET", "/version", token: token).1["major"] as? String, "1")
        let paths = try call("GET", "/openapi/v3", token: token).1["paths"] as? [String: Any] ?? [:]
        XCTAssertNotNil(paths["apis/networking.istio.io/v1"])
        XCTAssertEqual(try call("GET", "/openapi/v3/apis/security.istio.io/v1", token: token).0, 200)
    }

    /// schemathesis (PyPI) reads the served OpenAPI v3 document of each API group and sends what it generates from
    /// the schemas (Istio's CRDs, with valid, edge and malformed values, every verb) with zero 5xx answers allowed.
    /// Watches get `timeoutSeconds=1` (Tests/Fixtures/schemathesis_hooks.py): the server must end them itself.
    func testSchemathesisFindsNoServerErrorInAnyGroup() throws {
        let seed = ProcessInfo.processInfo.environment["SEED"].flatMap(UInt32.init) ?? UInt32.random(in: 1...UInt32.max)
        print("schemathesis seed \(seed) (SEED=\(seed) repeats it)")
        guard (try? Harness.run("/usr/bin/env", ["python3", "-c", "import schemathesis"]))?.status == 0 else {
            if ProcessInfo.processInfo.environment["CI"] == "true" { return XCTFail("schemathesis is missing: make deps installs it") }
            throw XCTSkip("schemathesis is not installed (make deps installs it)")
        }
        let fixtures = Harness.root.appendingPathComponent("Tests/Fixtures").path
        for document in ["apis/networking.istio.io/v1", "apis/security.istio.io/v1", "apis/telemetry.istio.io/v1",
                         "apis/sluice.dev/v1"] {
            // Run from the test's directory: schemathesis keeps a cache where it runs.
            let (out, status) = try Harness.run("/usr/bin/env", [
                "-C", dir, "PYTHONPATH=\(fixtures)", "SCHEMATHESIS_HOOKS=schemathesis_hooks", "python3", "-m", "schemathesis.cli", "run",
                "https://127.0.0.1:\(apiPort)/openapi/v3/\(document)", "--url", "https://127.0.0.1:\(apiPort)",
                "-H", "Authorization: Bearer \(adminToken)", "--tls-verify", "false", "-c", "not_a_server_error",
                "--phases", "examples,fuzzing", "-n", "10", "--seed", "\(seed)", "--no-shrink", "-w", "2",
                "--request-timeout", "10", "--generation-database", "none", "--no-color",
            ])
            XCTAssertEqual(status, 0, "\(document), seed \(seed):\n\(out.suffix(6_000))\n\(log.suffix(3_000))")
            XCTAssertTrue(out.contains("passed"), out.suffix(2_000).description)
        }
        XCTAssertFalse(log.contains("level=error"), log.suffix(3_000).description)
    }

    func testWatchFollowsWritesFromAResourceVersionAndStoreSurvivesRestart() throws {
        let token = adminToken
        let vs = #"{"apiVersion":"networking.istio.io/v1","kind":"VirtualService","metadata":{"name":"w","namespace":"shop"},"spec":{"hosts":["w"],"http":[{"route":[{"destination":{"host":"w"}}]}]}}"#
        let (code, o) = try call("POST", Self.vsPath, token: token, body: vs)
        XCTAssertEqual(code, 201)
        let rv = ((o["metadata"] as? [String: Any])?["resourceVersion"] as? String) ?? ""
        XCTAssertEqual(try call("PATCH", Self.vsPath + "/w", token: token, body: #"{"metadata":{"labels":{"x":"1"}}}"#,
                                type: "application/merge-patch+json").0, 200)
        XCTAssertEqual(try call("DELETE", Self.vsPath + "/w", token: token).0, 200)
        // Events after `rv`: the patch and the delete, in order, as newline-delimited JSON.
        let (_, stream) = try call("GET", Self.vsPath + "?watch=true&resourceVersion=\(rv)&timeoutSeconds=1", token: token)
        let text = stream["text"] as? String ?? ""
        let events = text.split(separator: "\n").compactMap {
            (try? JSONSerialization.jsonObject(with: Data($0.utf8))) as? [String: Any]
        }
        XCTAssertEqual(events.map { $0["type"] as? String ?? "" }, ["MODIFIED", "DELETED"], text)

        // Restart: the store keeps what was acknowledged, and the change log (a watch resumes, not re-lists).
        XCTAssertEqual(try call("POST", Self.vsPath, token: token, body: vs).0, 201)
        control?.terminate()
        control?.waitUntilExit()
        try startControl()
        XCTAssertEqual(try call("GET", Self.vsPath + "/w", token: token).0, 200)
        let (_, again) = try call("GET", Self.vsPath + "?watch=true&resourceVersion=\(rv)&timeoutSeconds=1", token: token)
        XCTAssertEqual((again["text"] as? String ?? "").split(separator: "\n").count, 3)
    }
}
