import Foundation
import Glibc
import SluiceModel
import SluiceProxy
import SluiceRing
import XCTest

/// Loopback integration tests: real sockets, real io_uring workers, Python backends. Runs with the splice relay
/// (the default); ``L4ProxyBufferRelayTests`` runs every test again with the provided-buffer relay.
class L4ProxyTests: XCTestCase {
    var cleanups: [() -> Void] = []
    var spliceMode: Bool { true }
    /// Kernel-side memory a connection may hold per direction: two buffers, or one pipe.
    var heldPerDirection: Int64 { spliceMode ? 1 : 2 }

    func held(_ p: Harness.Proxy) -> Int64 {
        spliceMode ? p.metric("sluice_worker_pipes_in_use") : p.metric("sluice_worker_buffers_in_use")
    }

    override func setUp() {
        Harness.raiseFileLimit()
    }

    override func tearDown() {
        for c in cleanups.reversed() { c() }
        cleanups = []
    }

    func backends(_ specs: [String]) throws -> [UInt16] {
        let (p, ports) = try Harness.backends(specs)
        cleanups.append { p.terminate(); p.waitUntilExit() }
        return ports
    }

    func proxy(_ yaml: String, workers: Int = 2, connectionLimit: Int = 1 << 20, bufferCount: UInt16 = 256) throws
        -> Harness.Proxy
    {
        let p = try Harness.proxy(yaml, workers: workers, connectionLimit: connectionLimit, bufferCount: bufferCount,
                                  splice: spliceMode)
        cleanups.append { p.stop() }
        return p
    }

    func testForwardsLargePayloadIntactInBothDirections() throws {
        let ports = try backends(["echo:0"])
        let p = try proxy(Harness.mesh(ports: ports))
        let c = try Client(port: p.port)
        var rng = SystemRandomNumberGenerator()
        let payload = (0..<(4 << 20)).map { _ in UInt8.random(in: 0...255, using: &rng) }
        // Send from another thread so that echo back-pressure cannot deadlock the test.
        let sender = Thread { _ = c.send(payload); c.shutdownWrite() }
        sender.start()
        let echoed = c.receiveAll()
        XCTAssertEqual(echoed?.count, payload.count)
        XCTAssertTrue(echoed == payload, "bytes changed on the way")
        c.close()
        XCTAssertTrue(p.eventually { p.metric("istio_tcp_connections_closed_total") == 1 })
        XCTAssertEqual(p.metric("istio_tcp_received_bytes_total"), Int64(payload.count))
        XCTAssertEqual(p.metric("istio_tcp_sent_bytes_total"), Int64(payload.count))
    }

    func testHalfCloseIsPropagatedAndTheAnswerStillArrives() throws {
        let ports = try backends(["echo:0"])
        let p = try proxy(Harness.mesh(ports: ports))
        let c = try Client(port: p.port)
        XCTAssertTrue(c.send("question"))
        c.shutdownWrite()
        // The backend sees EOF only if the proxy shut down its write side; it then echoes and closes.
        XCTAssertEqual(c.receiveAll().map { String(decoding: $0, as: UTF8.self) }, "question")
        c.close()
    }

    func testRoundRobinSpreadsConnectionsOverEndpoints() throws {
        let ports = try backends(["tag:0:a", "tag:0:b", "tag:0:c"])
        let p = try proxy(Harness.mesh(ports: ports), workers: 1)
        var seen: [String: Int] = [:]
        for _ in 0..<30 {
            let c = try Client(port: p.port)
            seen[c.receiveLine() ?? "?", default: 0] += 1
            c.close()
        }
        XCTAssertEqual(seen, ["a": 10, "b": 10, "c": 10])
    }

    func testSlowReaderMakesTheProxyStopReadingAndHoldsBoundedBuffers() throws {
        // Upstream never reads: the proxy must stop reading the client instead of buffering without bound.
        let ports = try backends(["sink:0"])
        let p = try proxy(Harness.mesh(ports: ports))
        let c = try Client(port: p.port, timeout: 0.5)
        let chunk = [UInt8](repeating: 7, count: 64 << 10)
        var pushed = 0
        let end = Date().addingTimeInterval(3)
        while Date() < end {
            let n = chunk.withUnsafeBytes { send(c.fd, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL)) }
            if n <= 0 { break }  // the send timed out: the path is full
            pushed += n
        }
        XCTAssertLessThan(pushed, 64 << 20, "the client kept writing: nothing pushed back")
        XCTAssertLessThanOrEqual(held(p), heldPerDirection, "one direction holds two buffers or one pipe at most")
        c.reset()
        XCTAssertTrue(p.eventually { p.metric("sluice_worker_active_connections") == 0 })
        XCTAssertEqual(held(p), 0)
    }

    func testClientThatNeverReadsDoesNotStallTheWorker() throws {
        let ports = try backends(["firehose:0", "echo:0"])
        let yaml = Harness.mesh(ports: ports, listeners: 2)
        let p = try proxy(yaml, workers: 1)
        let stalled = try Client(port: p.ports[0])
        usleep(300_000)
        XCTAssertLessThanOrEqual(held(p), heldPerDirection)
        // The same worker keeps serving others while one peer stalls.
        for i in 0..<20 {
            let c = try Client(port: p.ports[1])
            XCTAssertTrue(c.send("ping \(i)"))
            XCTAssertEqual(c.receive(exactly: "ping \(i)".utf8.count).map { String(decoding: $0, as: UTF8.self) }, "ping \(i)")
            c.close()
        }
        stalled.reset()
        XCTAssertTrue(p.eventually { p.metric("sluice_worker_active_connections") == 0 })
    }

    func testUnreachableEndpointIsEjectedAndTrafficGoesElsewhere() throws {
        let ports = try backends(["tag:0:alive"])
        let dead = Harness.deadPort()
        let policy = """
            outlierDetection: {consecutiveGatewayErrors: 1, baseEjectionTime: 60s, maxEjectionPercent: 50}
            """
        let p = try proxy(Harness.mesh(ports: [dead, ports[0]], policy: policy), workers: 1)
        for _ in 0..<20 {
            let c = try Client(port: p.port)
            XCTAssertEqual(c.receiveLine(), "alive", "a refused connect is retried on another endpoint")
            c.close()
        }
        XCTAssertEqual(p.metric("sluice_outlier_ejections_total"), 1)
        XCTAssertEqual(p.metric("sluice_upstream_connect_failures_total"), 1, "ejected: not tried again")
    }

    func testActiveHealthCheckTakesADeadEndpointOutAndBackIn() throws {
        let ports = try backends(["tag:0:alive"])
        let dead = Harness.deadPort()
        let check = """

            ---
            apiVersion: sluice.dev/v1
            kind: HealthCheck
            metadata: {name: hc}
            spec: {host: svc0.test.svc.cluster.local, interval: 100ms, timeout: 200ms, unhealthyThreshold: 1}
            """
        let p = try proxy(Harness.mesh(ports: [dead, ports[0]], extra: check), workers: 1)
        let cluster = p.runtime.clusters[0]
        let deadIndex = cluster.config.endpoints.firstIndex { $0.address.port == dead }!
        XCTAssertTrue(p.eventually(5) { !cluster.health.isHealthy(deadIndex) })
        let failuresBefore = p.metric("sluice_upstream_connect_failures_total")
        for _ in 0..<10 {
            let c = try Client(port: p.port)
            XCTAssertEqual(c.receiveLine(), "alive")
            c.close()
        }
        XCTAssertEqual(p.metric("sluice_upstream_connect_failures_total"), failuresBefore, "unhealthy endpoint not tried")
        // The endpoint comes up: the next check brings it back.
        let (revived, _) = try Harness.backends(["tag:\(dead):revived"])
        cleanups.append { revived.terminate(); revived.waitUntilExit() }
        XCTAssertTrue(p.eventually(5) { cluster.health.isHealthy(deadIndex) })
        var seen = Set<String>()
        for _ in 0..<6 {
            let c = try Client(port: p.port)
            seen.insert(c.receiveLine() ?? "?")
            c.close()
        }
        XCTAssertEqual(seen, ["alive", "revived"])
    }

    func testConnectTimeoutFailsOverToAnotherEndpoint() throws {
        let ports = try backends(["tag:0:alive"])
        // A listener with a full backlog never completes new handshakes: connects to it time out.
        let (fd, blackhole) = Harness.loopbackSocket(backlog: 0)
        cleanups.append { close(fd) }
        var fillers: [Client] = []
        for _ in 0..<4 { if let c = try? Client(port: blackhole, timeout: 0.2) { fillers.append(c) } }
        cleanups.append { fillers.forEach { $0.close() } }
        let policy = "connectionPool: {tcp: {connectTimeout: 200ms}}"
        let p = try proxy(Harness.mesh(ports: [blackhole, ports[0]], policy: policy), workers: 1)
        for _ in 0..<4 {
            let c = try Client(port: p.port)
            XCTAssertEqual(c.receiveLine(), "alive")
            c.close()
        }
        XCTAssertGreaterThanOrEqual(p.metric("sluice_upstream_connect_failures_total"), 1)
    }

    func testNoAvailableEndpointClosesTheClientConnection() throws {
        let p = try proxy(Harness.mesh(ports: [Harness.deadPort()]), workers: 1)
        let c = try Client(port: p.port)
        XCTAssertEqual(c.receive(), [], "closed, not hung")
        c.close()
        XCTAssertTrue(p.eventually { p.metric("sluice_worker_active_connections") == 0 })
    }

    func testConnectionLimitRefusesConnectionsOverTheLimit() throws {
        let ports = try backends(["tag:0:x"])
        let p = try proxy(Harness.mesh(ports: ports), workers: 2, connectionLimit: 3)
        let held = try (0..<3).map { _ in try Client(port: p.port) }
        for c in held { XCTAssertEqual(c.receiveLine(), "x") }
        let extra = try Client(port: p.port)
        XCTAssertEqual(extra.receive(), [], "over the limit: closed at once")
        XCTAssertEqual(p.metric("sluice_listener_overflow_total"), 1)
        extra.close()
        held.forEach { $0.close() }
        XCTAssertTrue(p.eventually { p.metric("sluice_worker_active_connections") == 0 })
        let again = try Client(port: p.port)
        XCTAssertEqual(again.receiveLine(), "x", "capacity comes back when connections close")
        again.close()
    }

    func testDrainLetsOpenConnectionsFinishAndRefusesNewOnes() throws {
        let ports = try backends(["echo:0"])
        let p = try proxy(Harness.mesh(ports: ports), workers: 2)
        let open = try Client(port: p.port)
        XCTAssertTrue(open.send("before"))
        XCTAssertEqual(open.receive(exactly: 6).map { String(decoding: $0, as: UTF8.self) }, "before")
        p.server.drain(timeout: .seconds(10))
        usleep(200_000)
        XCTAssertThrowsError(try Client(port: p.port), "listener closed while draining")
        XCTAssertTrue(open.send("during"))
        XCTAssertEqual(open.receive(exactly: 6).map { String(decoding: $0, as: UTF8.self) }, "during")
        XCTAssertTrue(p.server.isRunning, "still serving the open connection")
        open.close()
        XCTAssertTrue(p.eventually(5) { !p.server.isRunning }, "workers finish once the last connection closes")
    }

    func testDrainRightAfterStartFinishes() throws {
        let p = try proxy(Harness.mesh(ports: [Harness.deadPort()]), workers: 2)
        p.server.drain(timeout: .zero)
        XCTAssertTrue(p.server.wait(timeout: .seconds(10)), "a drain posted before the workers' loops run is not lost")
    }

    func testDrainDeadlineClosesConnectionsThatDoNotFinish() throws {
        let ports = try backends(["echo:0"])
        let p = try proxy(Harness.mesh(ports: ports), workers: 1)
        let open = try Client(port: p.port)
        XCTAssertTrue(open.send("x"))
        XCTAssertEqual(open.receive(exactly: 1), [120])
        let start = Date()
        p.server.drain(timeout: .milliseconds(300))
        XCTAssertTrue(p.server.wait(timeout: .seconds(20)), "workers finish once the deadline closed the connection")
        XCTAssertLessThan(Date().timeIntervalSince(start), 3)
        XCTAssertNotEqual(open.receive(), [120], "the connection was closed by the deadline")
        open.close()
    }

    func testIdleTimeoutClosesQuietConnections() throws {
        let ports = try backends(["echo:0"])
        let p = try proxy(Harness.mesh(ports: ports, policy: "connectionPool: {tcp: {idleTimeout: 1s}}"), workers: 1)
        let c = try Client(port: p.port, timeout: 5)
        XCTAssertTrue(c.send("a"))
        XCTAssertEqual(c.receive(exactly: 1), [97])
        let start = Date()
        XCTAssertEqual(c.receive(), [], "closed by the proxy")
        XCTAssertGreaterThan(Date().timeIntervalSince(start), 0.5)
        c.close()
    }

    func testTenThousandConnectionsWithResetsAndStallsLeakNothing() throws {
        let ports = try backends(["echo:0", "firehose:0"])
        let p = try proxy(Harness.mesh(ports: ports, listeners: 2), workers: 2, bufferCount: 128)
        XCTAssertTrue(p.eventually { p.metric("sluice_worker_active_connections") == 0 })
        let fdBaseline = Harness.openDescriptors()
        var rng = SystemRandomNumberGenerator()
        var outcomes = [0, 0, 0, 0, 0]
        let payload = [UInt8](repeating: 1, count: 1024)
        for _ in 0..<40 {
            var stalled: [Client] = []
            for _ in 0..<250 {
                let kind = Int.random(in: 0..<5, using: &rng)
                let c = try Client(port: kind == 2 ? p.ports[1] : p.ports[0], timeout: 5)
                outcomes[kind] += 1
                switch kind {
                case 0:  // request and answer, then close
                    XCTAssertTrue(c.send(payload))
                    XCTAssertEqual(c.receive(exactly: payload.count)?.count, payload.count)
                    c.close()
                case 1:  // reset mid-stream
                    _ = c.send(payload)
                    c.reset()
                case 2:  // never reads a firehose; reset later
                    stalled.append(c)
                case 3:  // half-close, read the rest
                    XCTAssertTrue(c.send("half"))
                    c.shutdownWrite()
                    XCTAssertEqual(c.receiveAll()?.count, 4)
                    c.close()
                default:  // connect and go away
                    c.close()
                }
            }
            for c in stalled { c.reset() }
        }
        XCTAssertEqual(outcomes.reduce(0, +), 10_000)
        XCTAssertTrue(p.eventually(30) { p.metric("sluice_worker_active_connections") == 0 },
                      "still open: \(p.metric("sluice_worker_active_connections"))")
        XCTAssertEqual(p.metric("sluice_worker_buffers_in_use"), 0, "buffers leaked")
        XCTAssertEqual(p.metric("sluice_worker_pipes_in_use"), 0, "pipes leaked")
        XCTAssertTrue(p.eventually(5) { Harness.openDescriptors() == fdBaseline },
                      "descriptors leaked: \(Harness.openDescriptors()) vs \(fdBaseline)")
        XCTAssertEqual(p.metric("istio_tcp_connections_opened_total"), p.metric("istio_tcp_connections_closed_total"))
    }
}

/// Every test of ``L4ProxyTests`` again, with the provided-buffer relay instead of splice.
/// (Linux XCTest discovers only methods declared in the class itself, hence the overrides.)
final class L4ProxyBufferRelayTests: L4ProxyTests {
    override var spliceMode: Bool { false }
    override func testForwardsLargePayloadIntactInBothDirections() throws { try super.testForwardsLargePayloadIntactInBothDirections() }
    override func testHalfCloseIsPropagatedAndTheAnswerStillArrives() throws { try super.testHalfCloseIsPropagatedAndTheAnswerStillArrives() }
    override func testRoundRobinSpreadsConnectionsOverEndpoints() throws { try super.testRoundRobinSpreadsConnectionsOverEndpoints() }
    override func testSlowReaderMakesTheProxyStopReadingAndHoldsBoundedBuffers() throws { try super.testSlowReaderMakesTheProxyStopReadingAndHoldsBoundedBuffers() }
    override func testClientThatNeverReadsDoesNotStallTheWorker() throws { try super.testClientThatNeverReadsDoesNotStallTheWorker() }
    override func testUnreachableEndpointIsEjectedAndTrafficGoesElsewhere() throws { try super.testUnreachableEndpointIsEjectedAndTrafficGoesElsewhere() }
    override func testActiveHealthCheckTakesADeadEndpointOutAndBackIn() throws { try super.testActiveHealthCheckTakesADeadEndpointOutAndBackIn() }
    override func testConnectTimeoutFailsOverToAnotherEndpoint() throws { try super.testConnectTimeoutFailsOverToAnotherEndpoint() }
    override func testNoAvailableEndpointClosesTheClientConnection() throws { try super.testNoAvailableEndpointClosesTheClientConnection() }
    override func testConnectionLimitRefusesConnectionsOverTheLimit() throws { try super.testConnectionLimitRefusesConnectionsOverTheLimit() }
    override func testDrainLetsOpenConnectionsFinishAndRefusesNewOnes() throws { try super.testDrainLetsOpenConnectionsFinishAndRefusesNewOnes() }
    override func testDrainRightAfterStartFinishes() throws { try super.testDrainRightAfterStartFinishes() }
    override func testDrainDeadlineClosesConnectionsThatDoNotFinish() throws { try super.testDrainDeadlineClosesConnectionsThatDoNotFinish() }
    override func testIdleTimeoutClosesQuietConnections() throws { try super.testIdleTimeoutClosesQuietConnections() }
    override func testTenThousandConnectionsWithResetsAndStallsLeakNothing() throws { try super.testTenThousandConnectionsWithResetsAndStallsLeakNothing() }
}
