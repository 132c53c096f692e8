import Foundation
import XCTest

/// `sluice control` as the mesh CA, end to end with the binary, curl and openssl: a node joins with its one-time
/// token, then with its node certificate gets certificates for the workload identities it hosts — and nothing
/// else. Every refusal names its reason.
final class ControlPlaneTests: XCTestCase {
    var dir = ""
    var control: Process?
    var agent: Process?
    var port: UInt16 = 0
    let metricsPort = Harness.deadPort()

    override func setUpWithError() throws {
        dir = NSTemporaryDirectory() + "sluice-control-\(UUID().uuidString)"
        try FileManager.default.createDirectory(atPath: "\(dir)/mesh", withIntermediateDirectories: true)
        try """
            apiVersion: networking.istio.io/v1
            kind: WorkloadEntry
            metadata: {name: reviews-1, namespace: shop, annotations: {sluice.dev/node: n1}}
            spec: {address: 10.0.0.1, labels: {app: reviews}, serviceAccount: reviews}
            ---
            apiVersion: networking.istio.io/v1
            kind: WorkloadEntry
            metadata: {name: ratings-1, namespace: shop, annotations: {sluice.dev/node: n2}}
            spec: {address: 10.0.0.2, labels: {app: ratings}, serviceAccount: ratings}
            """.write(toFile: "\(dir)/mesh/mesh.yaml", atomically: true, encoding: .utf8)
        try "# token node\ntok-n1 n1\ntok-n2 n2\n".write(toFile: "\(dir)/tokens", atomically: true, encoding: .utf8)
        try startControl()
    }

    func startControl(lifetime: String = "1h", samePort: Bool = false) throws {
        if !samePort { port = Harness.deadPort() }
        let p = Process()
        p.executableURL = Harness.root.appendingPathComponent(".build/debug/sluice")
        p.arguments = ["control", "--state-dir", "\(dir)/state", "--config", "\(dir)/mesh", "--join-tokens", "\(dir)/tokens",
                       "--listen", "127.0.0.1:\(port)", "--max-cert-lifetime", lifetime, "--metrics", "127.0.0.1:\(metricsPort)"]
        p.standardOutput = FileHandle(forWritingAtPath: "/dev/null")
        p.standardError = try FileHandle(forWritingTo: URL(fileURLWithPath: { () -> String in
            FileManager.default.createFile(atPath: "\(dir)/control.log", contents: nil)
            return "\(dir)/control.log"
        }()))
        try p.run()
        control = p
        let deadline = Date().addingTimeInterval(10)
        while Date() < deadline, !((try? String(contentsOfFile: "\(dir)/control.log", encoding: .utf8)) ?? "").contains("ready") {
            Thread.sleep(forTimeInterval: 0.05)
        }
    }

    override func tearDown() {
        control?.terminate()
        control?.waitUntilExit()
        agent?.terminate()
        agent?.waitUntilExit()
        try? FileManager.default.removeItem(atPath: dir)
    }

    var log: String { (try? String(contentsOfFile: "\(dir)/control.log", encoding: .utf8)) ?? "" }

    /// A key and CSR made by OpenSSL (as any agent could), optionally naming a SPIFFE identity.
    func csr(_ name: String, uri: String? = nil) throws -> String {
        var args = ["req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-subj", "/",
                    "-keyout", "\(dir)/\(name).key", "-out", "\(dir)/\(name).csr"]
        if let uri { args += ["-addext", "subjectAltName=URI:\(uri)"] }
        XCTAssertEqual(try Harness.run("/usr/bin/openssl", args).status, 0)
        return try String(contentsOfFile: "\(dir)/\(name).csr", encoding: .utf8)
    }

    /// POSTs `body` as JSON; returns the status and the decoded answer.
    func post(_ path: String, _ body: [String: Any], cert: String? = nil) throws -> (Int, [String: Any]) {
        let file = "\(dir)/body-\(UUID().uuidString).json"
        try JSONSerialization.data(withJSONObject: body).write(to: URL(fileURLWithPath: file))
        var args = ["-s", "--max-time", "10", "--cacert", "\(dir)/state/root-cert.pem", "--resolve",
                    "sluice-control:\(port):127.0.0.1", "-d", "@\(file)", "-w", "\n%{http_code}"]
        if let cert { args += ["--cert", "\(dir)/\(cert).crt", "--key", "\(dir)/\(cert).key"] }
        let (out, _) = try Harness.run("/usr/bin/curl", args + ["https://sluice-control:\(port)\(path)"])
        let lines = out.split(separator: "\n", omittingEmptySubsequences: false)
        let json = (try? JSONSerialization.jsonObject(with: Data(lines.dropLast().joined(separator: "\n").utf8))) as? [String: Any]
        return (Int(lines.last ?? "") ?? 0, json ?? [:])
    }

    func testANodeJoinsOnceAndGetsCertificatesOnlyForItsOwnWorkloads() throws {
        // Join: the token admits n1 once, and only n1.
        var (status, answer) = try post("/v1/join", ["token": "tok-n1", "node": "n1", "csr": try csr("n1")])
        XCTAssertEqual(status, 200, "\(answer) \(log)")
        let chain = try XCTUnwrap(answer["certificateChain"] as? [String])
        try chain.joined().write(toFile: "\(dir)/n1.crt", atomically: true, encoding: .utf8)
        (status, answer) = try post("/v1/join", ["token": "tok-n1", "node": "n1", "csr": try csr("again")])
        XCTAssertEqual([status, answer["reason"] as? String] as [AnyHashable?], [403, "bad_token"])
        (status, answer) = try post("/v1/join", ["token": "tok-n2", "node": "n1", "csr": try csr("wrong")])
        XCTAssertEqual(answer["reason"] as? String, "bad_token", "a token is for its own node only")

        // With its node certificate, n1 gets reviews' certificate (reviews runs on n1)...
        let reviews = "spiffe://cluster.local/ns/shop/sa/reviews"
        (status, answer) = try post("/v1/certificates", ["identity": reviews, "csr": try csr("reviews", uri: reviews)], cert: "n1")
        XCTAssertEqual(status, 200, "\(answer)")
        let leaf = try XCTUnwrap((answer["certificateChain"] as? [String])?.first)
        try leaf.write(toFile: "\(dir)/reviews.crt", atomically: true, encoding: .utf8)
        let verified = try Harness.run("/usr/bin/openssl", ["verify", "-CAfile", "\(dir)/state/root-cert.pem", "\(dir)/reviews.crt"])
        XCTAssertEqual(verified.status, 0, verified.output)
        let text = try Harness.run("/usr/bin/openssl", ["x509", "-in", "\(dir)/reviews.crt", "-noout", "-ext", "subjectAltName",
                                                        "-enddate"]).output
        XCTAssertTrue(text.contains("URI:\(reviews)"), text)
        let notAfter = try XCTUnwrap(answer["notAfter"] as? Int)
        XCTAssertLessThanOrEqual(Double(notAfter) - Date().timeIntervalSince1970, 3600, "--max-cert-lifetime caps it")

        // ...but not ratings' (which runs on n2), and nothing without a node certificate.
        let ratings = "spiffe://cluster.local/ns/shop/sa/ratings"
        (status, answer) = try post("/v1/certificates", ["identity": ratings, "csr": try csr("ratings", uri: ratings)], cert: "n1")
        XCTAssertEqual([status, answer["reason"] as? String] as [AnyHashable?], [403, "not_authorized"])
        (status, answer) = try post("/v1/certificates", ["identity": reviews, "csr": try csr("anon", uri: reviews)])
        XCTAssertEqual([status, answer["reason"] as? String] as [AnyHashable?], [401, "unauthenticated"])
        // A workload certificate is not a node certificate.
        try (leaf + chain.dropFirst().joined()).write(toFile: "\(dir)/reviews-as-node.crt", atomically: true, encoding: .utf8)
        try FileManager.default.copyItem(atPath: "\(dir)/reviews.key", toPath: "\(dir)/reviews-as-node.key")
        (status, answer) = try post("/v1/certificates", ["identity": reviews, "csr": try csr("r2", uri: reviews)],
                                    cert: "reviews-as-node")
        XCTAssertEqual(answer["reason"] as? String, "unauthenticated")

        // Garbage and mismatched requests are refused with their reason; each decision is in the audit log.
        (status, answer) = try post("/v1/certificates", ["identity": reviews, "csr": "garbage"], cert: "n1")
        XCTAssertEqual([status, answer["reason"] as? String] as [AnyHashable?], [400, "malformed"])
        (status, answer) = try post("/v1/certificates", ["identity": reviews, "csr": try csr("mix", uri: ratings)], cert: "n1")
        XCTAssertEqual(answer["reason"] as? String, "identity_mismatch")
        (status, answer) = try post("/v1/join", ["nothing": true])
        XCTAssertEqual(status, 400)
        Thread.sleep(forTimeInterval: 0.2)
        XCTAssertTrue(log.contains("granted=true identity=\(reviews) requester=node:n1"), log)
        XCTAssertTrue(log.contains("granted=false identity=\(ratings) requester=node:n1"), log)
        // The outcomes are counted by reason.
        let metrics = try Harness.run("/usr/bin/curl", ["-s", "http://127.0.0.1:\(metricsPort)/metrics"]).output
        for line in ["result=\"granted\"} 2", "result=\"not_authorized\"} 1", "result=\"bad_token\"} 2",
                     "result=\"malformed\"} 1", "result=\"identity_mismatch\"} 1", "result=\"unauthenticated\"} 2"] {
            XCTAssertTrue(metrics.contains(line), "\(line) in \(metrics)")
        }
    }

    func testTheGeneratedRootSurvivesARestartAndItsKeyIsPrivate() throws {
        let root = try String(contentsOfFile: "\(dir)/state/root-cert.pem", encoding: .utf8)
        let mode = try FileManager.default.attributesOfItem(atPath: "\(dir)/state/root-key.pem")[.posixPermissions] as? Int
        XCTAssertEqual(mode, 0o600)
        control?.terminate()
        control?.waitUntilExit()
        try startControl()
        XCTAssertTrue(log.contains("ready"), log)
        XCTAssertEqual(try String(contentsOfFile: "\(dir)/state/root-cert.pem", encoding: .utf8), root)
    }

    func serial(_ path: String) -> String {
        (try? Harness.run("/usr/bin/openssl", ["x509", "-in", path, "-noout", "-serial"]).output) ?? ""
    }

    func waitFor(_ timeout: TimeInterval, _ condition: () -> Bool) -> Bool { Harness.wait(timeout, condition) }

    /// The agent binary as Istio's node agent: joins with its token, gets the certificate of the workload on its
    /// node (key 0600, never sent), renews it before it expires, keeps it while the control plane is down, and
    /// renews again once the control plane is back.
    func testTheAgentObtainsRotatesAndKeepsWorkloadCertificates() throws {
        control?.terminate()
        control?.waitUntilExit()
        try startControl(lifetime: "6s", samePort: true)
        try "tok-n1\n".write(toFile: "\(dir)/n1.token", atomically: true, encoding: .utf8)
        let a = Process()
        a.executableURL = Harness.root.appendingPathComponent(".build/debug/sluice")
        a.arguments = ["agent", "--local-config", "\(dir)/mesh", "--node", "n1", "--workers", "1",
                       "--control", "127.0.0.1:\(port)", "--ca-root", "\(dir)/state/root-cert.pem",
                       "--join-token", "\(dir)/n1.token", "--state-dir", "\(dir)/agent",
                       "--metrics", "127.0.0.1:0", "--readiness", "127.0.0.1:0", "--admin", "127.0.0.1:0"]
        FileManager.default.createFile(atPath: "\(dir)/agent.log", contents: nil)
        a.standardError = try FileHandle(forWritingTo: URL(fileURLWithPath: "\(dir)/agent.log"))
        a.standardOutput = FileHandle(forWritingAtPath: "/dev/null")
        try a.run()
        agent = a
        let agentLog = { (try? String(contentsOfFile: "\(self.dir)/agent.log", encoding: .utf8)) ?? "" }
        let crt = "\(dir)/agent/certs/shop_reviews.crt", key = "\(dir)/agent/certs/shop_reviews.key"
        XCTAssertTrue(waitFor(10) { FileManager.default.fileExists(atPath: crt) }, agentLog() + log)
        for f in [crt, key] {
            XCTAssertEqual(try FileManager.default.attributesOfItem(atPath: f)[.posixPermissions] as? Int, 0o600, f)
        }
        XCTAssertEqual(try Harness.run("/usr/bin/openssl", ["verify", "-CAfile", "\(dir)/state/root-cert.pem", crt]).status, 0)
        XCTAssertTrue(try Harness.run("/usr/bin/openssl", ["x509", "-in", crt, "-noout", "-ext", "subjectAltName"]).output
            .contains("URI:spiffe://cluster.local/ns/shop/sa/reviews"))
        // Only n1's workload: ratings runs on n2.
        XCTAssertFalse(FileManager.default.fileExists(atPath: "\(dir)/agent/certs/shop_ratings.crt"))

        // Rotation at about half of the 6 s lifetime.
        let first = serial(crt)
        XCTAssertTrue(waitFor(6) { self.serial(crt) != first }, agentLog())

        // The control plane goes away: renewals fail with back-off, the certificate in place stays.
        control?.terminate()
        control?.waitUntilExit()
        let during = serial(crt)
        XCTAssertTrue(waitFor(6) { agentLog().contains("renewal failed; the current certificate stays in use") }, agentLog())
        XCTAssertEqual(serial(crt), during)
        XCTAssertTrue(FileManager.default.fileExists(atPath: key))

        // Back: the next attempt succeeds.
        try startControl(lifetime: "6s", samePort: true)
        XCTAssertTrue(waitFor(10) { self.serial(crt) != during }, agentLog())
    }

    /// Across the network (root): the CA in a namespace of its own, the agent on another node reaches it over
    /// the bridge and gets its workload's certificate.
    func testAnAgentOnAnotherNodeGetsItsCertificateAcrossTheNetwork() throws {
        try NetnsHarness.requireRoot()
        let net = try NetnsHarness(nodes: 2)
        defer { net.tearDown() }
        let sluice = Harness.root.appendingPathComponent(".build/debug/sluice").path
        try net.start(0, [sluice, "control", "--state-dir", "\(dir)/ns-state", "--config", "\(dir)/mesh", "--join-tokens",
                          "\(dir)/tokens", "--listen", "\(net.address(0)):15012"], log: "\(dir)/ns-control.log")
        XCTAssertTrue(waitFor(10) { FileManager.default.fileExists(atPath: "\(self.dir)/ns-state/control.crt") })
        try "tok-n1\n".write(toFile: "\(dir)/ns-n1.token", atomically: true, encoding: .utf8)
        try net.start(1, [sluice, "agent", "--local-config", "\(dir)/mesh", "--node", "n1", "--workers", "1",
                          "--control", "\(net.address(0)):15012", "--ca-root", "\(dir)/ns-state/root-cert.pem",
                          "--join-token", "\(dir)/ns-n1.token", "--state-dir", "\(dir)/ns-agent",
                          "--metrics", "127.0.0.1:0", "--readiness", "127.0.0.1:0", "--admin", "127.0.0.1:0"],
                      log: "\(dir)/ns-agent.log")
        let crt = "\(dir)/ns-agent/certs/shop_reviews.crt"
        XCTAssertTrue(waitFor(15) { FileManager.default.fileExists(atPath: crt) },
                      ((try? String(contentsOfFile: "\(dir)/ns-agent.log", encoding: .utf8)) ?? ""))
        XCTAssertEqual(try Harness.run("/usr/bin/openssl", ["verify", "-CAfile", "\(dir)/ns-state/root-cert.pem", crt]).status, 0)
        let audit = (try? String(contentsOfFile: "\(dir)/ns-control.log", encoding: .utf8)) ?? ""
        XCTAssertTrue(audit.contains("requester=join:n1"), audit)
    }
}
