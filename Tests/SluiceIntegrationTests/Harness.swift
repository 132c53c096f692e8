import Foundation
import Glibc
import SluiceModel
import SluiceProxy
import SluiceRing
import SluiceTelemetry
import XCTest

/// Loopback test fixtures: Python backends, an in-process proxy, and blocking client sockets.
enum Harness {
    static let root = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
        .deletingLastPathComponent()

    static func raiseFileLimit() {
        var rl = rlimit()
        getrlimit(Int32(RLIMIT_NOFILE.rawValue), &rl)
        rl.rlim_cur = rl.rlim_max
        setrlimit(Int32(RLIMIT_NOFILE.rawValue), &rl)
    }

    /// Starts `Tests/Fixtures/backend.py` with the given specs (use port 0) and returns it with the bound ports.
    static func backends(_ specs: [String], script: String = "backend.py") throws -> (Process, [UInt16]) {
        let p = Process()
        p.executableURL = URL(fileURLWithPath: "/usr/bin/env")
        p.arguments = ["python3", root.appendingPathComponent("Tests/Fixtures/\(script)").path] + specs
        let out = Pipe()
        p.standardOutput = out
        // Not the test runner's stderr: a backend that outlived a crashed test would hold it open, and swift
        // test would wait for it forever.
        p.standardError = FileHandle.nullDevice
        try p.run()
        var text = ""
        let handle = out.fileHandleForReading
        while !text.contains("ready") {
            let d = handle.availableData
            if d.isEmpty { throw NSError(domain: "backend", code: 1, userInfo: [NSLocalizedDescriptionKey: "backend died: \(text)"]) }
            text += String(decoding: d, as: UTF8.self)
        }
        let line = text.split(separator: "\n").first { $0.hasPrefix("ports") }!
        return (p, line.split(separator: " ").dropFirst().map { UInt16($0)! })
    }

    /// Runs `executable` to completion; returns its standard output and exit status.
    static func run(_ executable: String, _ arguments: [String]) throws -> (output: String, status: Int32) {
        let p = Process()
        p.executableURL = URL(fileURLWithPath: executable)
        p.arguments = arguments
        let out = Pipe()
        p.standardOutput = out
        try p.run()
        let data = out.fileHandleForReading.readDataToEndOfFile()
        p.waitUntilExit()
        return (String(decoding: data, as: UTF8.self), p.terminationStatus)
    }

    /// A TCP socket bound to a free loopback port, listening with `backlog` unless nil.
    static func loopbackSocket(backlog: Int32?) -> (fd: Int32, port: UInt16) {
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        var a = sockaddr_in()
        a.sin_family = sa_family_t(AF_INET)
        a.sin_addr.s_addr = inet_addr("127.0.0.1")
        _ = withUnsafePointer(to: &a) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, 16) } }
        if let backlog { listen(fd, backlog) }
        return (fd, Socket.localPort(fd))
    }

    /// Polls `condition` every 100 ms until it holds or `timeout` passes; returns whether it held.
    static func wait(_ timeout: TimeInterval, _ condition: () -> Bool) -> Bool {
        let end = Date().addingTimeInterval(timeout)
        while Date() < end {
            if condition() { return true }
            Thread.sleep(forTimeInterval: 0.1)
        }
        return condition()
    }

    /// A port with nothing listening on it (bound then closed), below the ephemeral range: a client connecting to
    /// it again and again (health checks) can never be given it as its own source port (a self-connect would hold
    /// it, and a test that later starts a server there would fail).
    static func deadPort() -> UInt16 {
        while true {
            let port = UInt16.random(in: 20_000..<32_000)
            let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
            var a = sockaddr_in()
            a.sin_family = sa_family_t(AF_INET)
            a.sin_port = port.bigEndian
            a.sin_addr.s_addr = inet_addr("127.0.0.1")
            let ok = withUnsafePointer(to: &a) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, 16) } } == 0
            close(fd)
            if ok { return port }
        }
    }

    /// Compiles `yaml` (listener ports are replaced by free ones) and starts a proxy on it.
    static func proxy(_ yaml: String, workers: Int = 2, connectionLimit: Int = 1 << 20, bufferCount: UInt16 = 256,
                      splice: Bool = true, headerTimeout: Duration = .seconds(10), jwks: JWKSCache? = nil) throws -> Proxy
    {
        let (resources, diagnostics) = ResourceDecoder.decode(yaml, file: "test.yaml")
        let errors = diagnostics.filter { $0.severity == .error }
        if !errors.isEmpty { throw ConfigErrors(errors) }
        var snap = try SnapshotCompiler().compile(resources)
        for i in snap.listeners.indices { snap.listeners[i].address.port = 0 }
        let registry = MetricsRegistry()
        let runtime = try ProxyRuntime(snapshot: snap, registry: registry, jwks: jwks)
        let server = L4Server(options: .init(workers: workers, connectionLimit: connectionLimit, bufferCount: bufferCount,
                                             splice: splice, headerTimeout: headerTimeout),
                              registry: registry)
        try server.start(runtime)
        let health = HealthChecker()
        health.update(runtime)
        health.start()
        return Proxy(server: server, registry: registry, runtime: runtime, health: health, ports: server.boundPorts)
    }

    final class Proxy {
        let server: L4Server
        let registry: MetricsRegistry
        let runtime: ProxyRuntime
        let health: HealthChecker
        let ports: [UInt16]
        var port: UInt16 { ports[0] }
        init(server: L4Server, registry: MetricsRegistry, runtime: ProxyRuntime, health: HealthChecker, ports: [UInt16]) {
            self.server = server
            self.registry = registry
            self.runtime = runtime
            self.health = health
            self.ports = ports
        }
        /// Stops the proxy; a worker that does not finish fails the test (with its gauges) instead of hanging the suite.
        func stop(file: StaticString = #filePath, line: UInt = #line) {
            health.stop()
            server.drain(timeout: .zero)
            if !server.wait(timeout: .seconds(20)) {
                let gauges = registry.render().split(separator: "\n").filter { $0.hasPrefix("sluice_worker") }
                XCTFail("workers did not finish within 20 s of a drain: \(gauges)", file: file, line: line)
            }
        }
        func metric(_ name: String) -> Int64 { registry.total(name) }
        /// Waits until `condition` holds, up to `timeout` seconds.
        func eventually(_ timeout: Double = 10, _ condition: () -> Bool) -> Bool {
            let end = Date().addingTimeInterval(timeout)
            while Date() < end {
                if condition() { return true }
                usleep(20_000)
            }
            return condition()
        }
    }

    static func openDescriptors() -> Int {
        (try? FileManager.default.contentsOfDirectory(atPath: "/proc/self/fd").count) ?? -1
    }

    /// The mesh used by most tests: one TCP listener to `host` with the given endpoint ports.
    static func mesh(ports: [UInt16], policy: String = "", extra: String = "", listeners: Int = 1) -> String {
        var y = """
            apiVersion: networking.istio.io/v1
            kind: Gateway
            metadata: {name: gw}
            spec:
              servers:
            """
        for i in 0..<listeners { y += "\n  - port: {number: \(1000 + i), name: tcp\(i), protocol: TCP}\n    bind: 127.0.0.1\n    hosts: [\"*\"]" }
        for i in 0..<listeners {
            y += """

                ---
                apiVersion: networking.istio.io/v1
                kind: VirtualService
                metadata: {name: vs\(i)}
                spec:
                  hosts: [svc\(i).test.svc.cluster.local]
                  gateways: [gw]
                  tcp:
                  - match: [{port: \(1000 + i)}]
                    route:
                    - destination: {host: svc\(i).test.svc.cluster.local}
                ---
                apiVersion: networking.istio.io/v1
                kind: ServiceEntry
                metadata: {name: svc\(i)}
                spec:
                  hosts: [svc\(i).test.svc.cluster.local]
                  resolution: STATIC
                  ports: [{number: 80, name: tcp, protocol: TCP}]
                  endpoints:
                """
            let eps = listeners == 1 ? ports : [ports[i]]
            for p in eps { y += "\n  - {address: 127.0.0.1, ports: {tcp: \(p)}}" }
            if !policy.isEmpty {
                y += """

                    ---
                    apiVersion: networking.istio.io/v1
                    kind: DestinationRule
                    metadata: {name: dr\(i)}
                    spec:
                      host: svc\(i).test.svc.cluster.local
                      trafficPolicy:
                    \(policy.split(separator: "\n").map { "    " + $0 }.joined(separator: "\n"))
                    """
            }
        }
        return y + extra
    }
}

/// A blocking client socket with timeouts.
final class Client: @unchecked Sendable {
    let fd: Int32

    init(port: UInt16, timeout: Double = 5) throws {
        fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        var tv = timeval(tv_sec: Int(timeout), tv_usec: Int((timeout - Double(Int(timeout))) * 1e6))
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
        setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
        var a = sockaddr_in()
        a.sin_family = sa_family_t(AF_INET)
        a.sin_port = port.bigEndian
        a.sin_addr.s_addr = inet_addr("127.0.0.1")
        let rc = withUnsafePointer(to: &a) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, 16) } }
        if rc != 0 {
            let e = errno
            Glibc.close(fd)
            throw POSIXError(POSIXErrorCode(rawValue: e)!)
        }
    }

    func send(_ bytes: [UInt8]) -> Bool {
        var off = 0
        while off < bytes.count {
            let n = bytes[off...].withUnsafeBytes { Glibc.send(fd, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL)) }
            if n <= 0 { return false }
            off += n
        }
        return true
    }

    func send(_ s: String) -> Bool { send(Array(s.utf8)) }

    /// Reads up to `max` bytes; nil on timeout or error, [] on EOF.
    func receive(max: Int = 65536) -> [UInt8]? {
        var buf = [UInt8](repeating: 0, count: max)
        let n = buf.withUnsafeMutableBytes { recv(fd, $0.baseAddress, max, 0) }
        if n < 0 { return nil }
        return Array(buf[0..<n])
    }

    /// Reads exactly `count` bytes (nil if the stream ends or times out first).
    func receive(exactly count: Int) -> [UInt8]? {
        var out: [UInt8] = []
        while out.count < count {
            guard let d = receive(max: min(65536, count - out.count)), !d.isEmpty else { return nil }
            out += d
        }
        return out
    }

    func receiveLine() -> String? {
        var out: [UInt8] = []
        while !out.contains(10) {
            guard let d = receive(max: 1), !d.isEmpty else { return nil }
            out += d
        }
        return String(decoding: out.dropLast(), as: UTF8.self)
    }

    /// Reads until EOF; nil on timeout.
    func receiveAll() -> [UInt8]? {
        var out: [UInt8] = []
        while true {
            guard let d = receive() else { return nil }
            if d.isEmpty { return out }
            out += d
        }
    }

    func shutdownWrite() { shutdown(fd, Int32(SHUT_WR)) }

    func reset() {
        var l = linger(l_onoff: 1, l_linger: 0)
        setsockopt(fd, SOL_SOCKET, SO_LINGER, &l, socklen_t(MemoryLayout<linger>.size))
        Glibc.close(fd)
    }

    func close() { Glibc.close(fd) }
}
