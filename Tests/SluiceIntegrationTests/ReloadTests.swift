import Foundation
import Glibc
import Logging
import SluiceAgent
import SluiceModel
import SluiceProxy
import SluiceTelemetry
import XCTest

/// `--local-config DIR` hot reload: changes apply without a restart, a bad update keeps the last good config.
final class ReloadTests: XCTestCase {
    func testConfigChangesApplyLiveAndBadUpdatesKeepTheLastGoodConfig() throws {
        Harness.raiseFileLimit()
        let (backends, ports) = try Harness.backends(["tag:0:a", "tag:0:b"])
        defer { backends.terminate(); backends.waitUntilExit() }
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("sluice-reload-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(at: dir) }
        let file = dir.appendingPathComponent("mesh.yaml")
        let p1 = Harness.deadPort(), p2 = Harness.deadPort()
        func config(endpoint: UInt16, listeners: [UInt16]) -> String {
            var y = Harness.mesh(ports: [endpoint]).replacingOccurrences(of: "1000", with: "\(listeners[0])")
            if listeners.count > 1 {
                y = y.replacingOccurrences(of: "    hosts: [\"*\"]", with: "    hosts: [\"*\"]\n  - port: {number: \(listeners[1]), name: tcp9, protocol: TCP}\n    bind: 127.0.0.1\n    hosts: [\"*\"]")
                y = y.replacingOccurrences(of: "  - match: [{port: \(listeners[0])}]", with: "  - match: []")
            }
            return y
        }
        try config(endpoint: ports[0], listeners: [p1]).write(to: file, atomically: true, encoding: .utf8)
        var opts = Agent.Options(localConfig: dir.path, workers: 2, metricsAddress: "127.0.0.1:0",
                                 readinessAddress: "127.0.0.1:0", adminAddress: "127.0.0.1:0")
        opts.reloadInterval = .milliseconds(50)
        let agent = Agent(options: opts, logger: Logger(label: "test"))
        try agent.start()
        defer { agent.drainAndStop() }
        func answer(_ port: UInt16) -> String? { (try? Client(port: port))?.receiveLine() }
        func waitReloads(_ n: Int) -> Bool {
            for _ in 0..<200 where agent.reloads.load(ordering: .relaxed) < n { usleep(20_000) }
            return agent.reloads.load(ordering: .relaxed) == n
        }

        XCTAssertEqual(answer(p1), "a")
        let held = try Client(port: p1)
        XCTAssertEqual(held.receiveLine(), "a")

        // New endpoint and a second listener.
        try config(endpoint: ports[1], listeners: [p1, p2]).write(to: file, atomically: true, encoding: .utf8)
        XCTAssertTrue(waitReloads(1))
        XCTAssertEqual(answer(p1), "b", "routing follows the new endpoints")
        XCTAssertEqual(answer(p2), "b", "the new listener serves")
        XCTAssertTrue(held.send("still here"))
        XCTAssertEqual(held.receive(exactly: 10).map { String(decoding: $0, as: UTF8.self) }, "still here",
                       "an open connection survives the reload on the config it started with")

        // A broken update is rejected whole; the last good config keeps serving.
        try (config(endpoint: ports[0], listeners: [p1]) + "\n---\napiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: broken}\nspec: {trafficPolicy: {}}\n")
            .write(to: file, atomically: true, encoding: .utf8)
        usleep(500_000)
        XCTAssertEqual(agent.reloads.load(ordering: .relaxed), 1)
        XCTAssertEqual(answer(p1), "b")
        XCTAssertEqual(answer(p2), "b")

        // Removing a listener closes it.
        try config(endpoint: ports[0], listeners: [p1]).write(to: file, atomically: true, encoding: .utf8)
        XCTAssertTrue(waitReloads(2))
        XCTAssertEqual(answer(p1), "a")
        usleep(100_000)
        XCTAssertThrowsError(try Client(port: p2), "removed listener no longer accepts")
        held.close()
    }

    func testUnchangedClustersKeepTheirHealthAcrossAReload() throws {
        let (backends, ports) = try Harness.backends(["tag:0:alive"])
        defer { backends.terminate(); backends.waitUntilExit() }
        let dead = Harness.deadPort()
        let check = "\n---\napiVersion: sluice.dev/v1\nkind: HealthCheck\nmetadata: {name: hc}\n"
            + "spec: {host: svc0.test.svc.cluster.local, interval: 1h, timeout: 200ms, unhealthyThreshold: 1}\n"
        let (resources, _) = ResourceDecoder.decode(Harness.mesh(ports: [dead, ports[0]], extra: check), file: "m.yaml")
        let snapshot = try SnapshotCompiler().compile(resources)
        let registry = MetricsRegistry()
        let first = try ProxyRuntime(snapshot: snapshot, registry: registry)
        let health = HealthChecker()
        health.update(first)
        health.start()
        defer { health.stop() }
        let deadIndex = first.clusters[0].config.endpoints.firstIndex { $0.address.port == dead }!
        for _ in 0..<100 where first.clusters[0].health.isHealthy(deadIndex) { usleep(20_000) }
        XCTAssertFalse(first.clusters[0].health.isHealthy(deadIndex))
        // Same cluster, one more listener elsewhere: the cluster object, and what it knows, carries over.
        var changed = snapshot
        changed.listeners.append(changed.listeners[0])
        let second = try ProxyRuntime(snapshot: changed, registry: registry, previous: first)
        XCTAssertTrue(second.clusters[0] === first.clusters[0])
        XCTAssertFalse(second.clusters[0].health.isHealthy(deadIndex), "no hour-long wait for the next check")
        var moved = snapshot
        moved.clusters[0].connectTimeout = .seconds(1)
        XCTAssertFalse(try ProxyRuntime(snapshot: moved, registry: registry, previous: first).clusters[0] === first.clusters[0],
                       "a changed cluster starts fresh")
    }
}
