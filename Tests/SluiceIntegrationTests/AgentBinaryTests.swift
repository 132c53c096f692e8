import Foundation
import Glibc
import XCTest

/// The `sluice` executable as operators and systemd run it.
final class AgentBinaryTests: XCTestCase {
    var binary: String { Harness.root.appendingPathComponent(".build/debug/sluice").path }
    var tmp: URL!

    override func setUpWithError() throws {
        tmp = FileManager.default.temporaryDirectory.appendingPathComponent("sluice-test-\(getpid())-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: tmp, withIntermediateDirectories: true)
        XCTAssertTrue(FileManager.default.isExecutableFile(atPath: binary), "build the sluice binary first")
    }

    override func tearDown() {
        try? FileManager.default.removeItem(at: tmp)
    }

    /// Runs the binary; it is sent SIGTERM after `terminateAfter` seconds, and killed after 30 s in any case so that
    /// a test never hangs the suite.
    func run(_ args: [String], terminateAfter: Double? = nil) throws -> (status: Int32, stderr: String) {
        let p = Process()
        p.executableURL = URL(fileURLWithPath: binary)
        p.arguments = args
        let err = Pipe()
        p.standardError = err
        p.standardOutput = FileHandle.nullDevice
        try p.run()
        if let t = terminateAfter {
            Thread.sleep(forTimeInterval: t)
            if p.isRunning { p.terminate() }
        }
        let pid = p.processIdentifier
        let watchdog = Thread {
            Thread.sleep(forTimeInterval: 30)
            kill(pid, SIGKILL)
        }
        watchdog.start()
        let data = err.fileHandleForReading.readDataToEndOfFile()
        p.waitUntilExit()
        return (p.terminationStatus, String(decoding: data, as: UTF8.self))
    }

    func agentArgs(_ dir: URL) -> [String] {
        ["agent", "--local-config", dir.path, "--workers", "1", "--metrics", "127.0.0.1:0", "--readiness", "127.0.0.1:0",
         "--admin", "127.0.0.1:0"]
    }

    func write(_ yaml: String) throws {
        try yaml.write(to: tmp.appendingPathComponent("mesh.yaml"), atomically: true, encoding: .utf8)
    }

    func testBadConfigExitsNonZeroNamingFileLineAndField() throws {
        try write(Harness.mesh(ports: [9]).replacingOccurrences(of: "resolution: STATIC", with: "resolution: SOMETIMES"))
        let (status, stderr) = try run(agentArgs(tmp))
        XCTAssertEqual(status, 1)
        XCTAssertTrue(stderr.contains("mesh.yaml:"), stderr)
        XCTAssertTrue(stderr.contains("spec.resolution"), stderr)
        XCTAssertTrue(stderr.contains("SOMETIMES"), stderr)
        XCTAssertEqual(stderr.split(separator: "\n").count, 1, "one line for one problem: \(stderr)")
    }

    func testValidateReportsEveryErrorAndExitsOne() throws {
        try write(Harness.mesh(ports: [9]).replacingOccurrences(of: "{tcp: 9}", with: "{tcp: 99999}")
                  + "\n---\napiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: x}\nspec: {}\n")
        let p = Process()
        p.executableURL = URL(fileURLWithPath: binary)
        p.arguments = ["validate", "-f", tmp.path]
        let out = Pipe()
        p.standardOutput = out
        try p.run()
        let text = String(decoding: out.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
        p.waitUntilExit()
        XCTAssertEqual(p.terminationStatus, 1)
        XCTAssertTrue(text.contains("99999 is out of range"), text)
        XCTAssertTrue(text.contains("required field 'host' is missing"), text)
    }

    func stdout(_ args: [String]) throws -> (status: Int32, text: String) {
        let p = Process()
        p.executableURL = URL(fileURLWithPath: binary)
        p.arguments = args
        let out = Pipe()
        p.standardOutput = out
        p.standardError = FileHandle.nullDevice
        try p.run()
        let text = String(decoding: out.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
        p.waitUntilExit()
        return (p.terminationStatus, text)
    }

    /// The Bookinfo example compiled for one node: the same bytes whether the resources come in three files or
    /// in one file in reverse order.
    func testCompilePrintsTheSameNodeSnapshotWhateverTheFileLayout() throws {
        let example = Harness.root.appendingPathComponent("examples/bookinfo")
        let (status, text) = try stdout(["compile", "-f", example.path, "--node", "node-b"])
        XCTAssertEqual(status, 0)
        let json = try XCTUnwrap(try JSONSerialization.jsonObject(with: Data(text.utf8)) as? [String: Any])
        let workloads = try XCTUnwrap(json["workloads"] as? [[String: Any]])
        XCTAssertEqual(workloads.compactMap { $0["name"] as? String }, ["mysqldb-v1", "ratings-v1", "reviews-v2", "reviews-v3"])
        XCTAssertEqual(workloads.first?["identity"] as? String, "spiffe://cluster.local/ns/bookinfo/sa/bookinfo-mysql")
        XCTAssertEqual((json["authorizationPolicies"] as? [Any])?.count, 1, "ratings runs on node-b")

        var documents: [String] = []
        for name in ["routing.yaml", "services.yaml", "workloads.yaml"] {
            let text = try String(contentsOf: example.appendingPathComponent(name), encoding: .utf8)
            documents += text.components(separatedBy: "\n---\n")
        }
        try documents.reversed().joined(separator: "\n---\n").write(to: tmp.appendingPathComponent("all.yaml"),
                                                                      atomically: true, encoding: .utf8)
        let (status2, reordered) = try stdout(["compile", "-f", tmp.path, "--node", "node-b"])
        XCTAssertEqual(status2, 0)
        XCTAssertEqual(reordered, text, "byte-identical output")
        let (_, other) = try stdout(["compile", "-f", example.path, "--node", "node-a"])
        XCTAssertNotEqual(other, text)
    }

    func testPortInUseExitsNonZeroWithTheFix() throws {
        let held = Harness.loopbackSocket(backlog: 1)
        defer { close(held.fd) }
        try write(Harness.mesh(ports: [9]).replacingOccurrences(of: "1000", with: "\(held.port)"))
        let (status, stderr) = try run(agentArgs(tmp))
        XCTAssertEqual(status, 1)
        XCTAssertTrue(stderr.contains("address already in use"), stderr)
        XCTAssertEqual(stderr.split(separator: "\n").count, 1, "one line: \(stderr)")
    }

    func testSigtermDrainsAndExitsCleanly() throws {
        try write(Harness.mesh(ports: [Harness.deadPort()]).replacingOccurrences(of: "1000",
                                                                              with: "\(Harness.deadPort())"))
        let (status, stderr) = try run(agentArgs(tmp) + ["--drain-timeout", "1s"], terminateAfter: 2)
        XCTAssertEqual(status, 0, stderr)
        XCTAssertTrue(stderr.contains("msg=draining"), stderr)
        XCTAssertTrue(stderr.contains("msg=stopped"), stderr)
    }
}
