import Glibc
import SluiceModel
import SluiceRing
import Synchronization

/// Active TCP and HTTP health checks on a thread of their own (control path, never a data-plane worker). Each round
/// connects to every endpoint of every checked cluster at once and waits up to the check's timeout; results
/// go to the clusters' ``HealthTable``s, which workers read without locks.
public final class HealthChecker: @unchecked Sendable {
    private let clusters = Mutex<[ClusterRuntime]>([])
    private let stopped = Atomic<Bool>(false)
    private var thread: pthread_t?

    struct Streak { var ok = 0; var bad = 0 }
    private var streaks: [ObjectIdentifier: [Streak]] = [:]
    private var lastRun: [ObjectIdentifier: UInt64] = [:]

    public init() {}

    public func update(_ runtime: ProxyRuntime) {
        clusters.withLock { $0 = runtime.clusters.filter { $0.config.healthCheck != nil } }
    }

    public func start() {
        thread = startThread(name: "sluice-health") { [self] in
            while !stopped.load(ordering: .relaxed) {
                runDue(now: EventLoop.monotonicNanos())
                usleep(50_000)
            }
        }
    }

    public func stop() {
        stopped.store(true, ordering: .relaxed)
        if let t = thread { pthread_join(t, nil) }
        thread = nil
    }

    func runDue(now: UInt64) {
        let current = clusters.withLock { $0 }
        // Forget clusters a reload replaced, so state does not pile up across updates.
        let live = Set(current.map(ObjectIdentifier.init))
        if streaks.keys.contains(where: { !live.contains($0) }) {
            streaks = streaks.filter { live.contains($0.key) }
            lastRun = lastRun.filter { live.contains($0.key) }
        }
        for c in current {
            guard let hc = c.config.healthCheck else { continue }
            let id = ObjectIdentifier(c)
            let interval = hc.interval.clampedNanoseconds
            if let last = lastRun[id], now - last < interval { continue }
            lastRun[id] = now
            check(c, hc)
        }
    }

    private func check(_ c: ClusterRuntime, _ hc: HealthCheck) {
        let n = c.config.endpoints.count
        var s = streaks[ObjectIdentifier(c)] ?? Array(repeating: Streak(), count: n)
        let results = Self.probe(addresses: (0..<n).map { c.addresses[$0] },
                                 timeoutMillis: Int32(clamping: hc.timeout.milliseconds)) { () -> HealthProbe? in
            if let h = hc.http {
                return HTTPHealthProbe(path: h.path, host: h.host ?? c.config.serviceHost, expected: h.expectedStatuses)
            }
            if let g = hc.grpc { return GRPCHealthProbe(service: g.serviceName, authority: g.authority ?? c.config.serviceHost) }
            return nil
        }
        for i in 0..<n {
            if results[i] {
                s[i].ok += 1
                s[i].bad = 0
                if s[i].ok >= hc.healthyThreshold { c.health.set(i, healthy: true) }
            } else {
                s[i].bad += 1
                s[i].ok = 0
                if s[i].bad >= hc.unhealthyThreshold { c.health.set(i, healthy: false) }
            }
        }
        streaks[ObjectIdentifier(c)] = s
    }

    /// Connects to all addresses in parallel; true where the TCP handshake completed within the timeout and,
    /// when `probe` makes one for the connection (HTTP, gRPC), it judged the answer healthy in that time too.
    static func probe(addresses: [Socket.Address], timeoutMillis: Int32, probe: () -> HealthProbe? = { nil }) -> [Bool] {
        var result = Array(repeating: false, count: addresses.count)
        var pfds: [pollfd] = []
        var index: [Int] = []
        var probes: [HealthProbe?] = []
        for (i, a) in addresses.enumerated() {
            let fd = Socket.stream(family: a.family)
            guard fd >= 0 else { continue }
            var addr = a
            let rc = withUnsafePointer(to: &addr.storage) {
                $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, addr.length) }
            }
            if rc == 0 || errno == EINPROGRESS {
                pfds.append(pollfd(fd: fd, events: Int16(POLLOUT), revents: 0))
                index.append(i)
                probes.append(probe())
            } else {
                close(fd)
            }
        }
        let deadline = EventLoop.monotonicNanos() + UInt64(max(1, timeoutMillis)) * 1_000_000
        var open = pfds.count
        func finish(_ k: Int, _ ok: Bool) {
            result[index[k]] = ok
            close(pfds[k].fd)
            pfds[k].fd = -1
            open -= 1
        }
        // The few bytes a check sends fit a fresh socket's buffer: one send takes them whole.
        func send(_ k: Int, _ bytes: [UInt8]) -> Bool {
            bytes.isEmpty || bytes.withUnsafeBytes { Glibc.send(pfds[k].fd, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL)) } == bytes.count
        }
        while open > 0 {
            let now = EventLoop.monotonicNanos()
            guard now < deadline else { break }
            let rc = poll(&pfds, nfds_t(pfds.count), Int32((deadline - now) / 1_000_000) + 1)
            if rc <= 0 { if rc < 0 && errno == EINTR { continue }; break }
            for k in pfds.indices where pfds[k].fd >= 0 && pfds[k].revents != 0 {
                if pfds[k].events == Int16(POLLOUT) {
                    var err: Int32 = 0
                    var len = socklen_t(4)
                    getsockopt(pfds[k].fd, SOL_SOCKET, SO_ERROR, &err, &len)
                    guard err == 0, probes[k] != nil else { finish(k, err == 0); continue }
                    guard send(k, probes[k]!.start()) else { finish(k, false); continue }
                    pfds[k].events = Int16(POLLIN)
                    pfds[k].revents = 0
                    continue
                }
                var buf = [UInt8](repeating: 0, count: 4096)
                let n = recv(pfds[k].fd, &buf, buf.count, Int32(MSG_DONTWAIT))
                if n <= 0 { finish(k, false); continue }
                let (verdict, reply) = probes[k]!.receive(Array(buf[0..<n]))
                if let verdict {
                    finish(k, verdict)
                } else if !send(k, reply) {
                    finish(k, false)
                }
            }
        }
        for p in pfds where p.fd >= 0 { close(p.fd) }
        return result
    }
}
