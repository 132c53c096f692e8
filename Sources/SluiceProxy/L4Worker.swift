import CSluiceLinux
import Glibc
import SluiceHTTP
import SluiceIdentity
import SluiceModel
import SluiceRing
import SluiceTelemetry
import Synchronization

/// Messages other threads post to a worker. Read between events, never while a request is in flight.
public enum WorkerMessage: Sendable {
    /// Serve this runtime from now on; connections already open finish on the one they started with.
    case update(ProxyRuntime, listenFDs: [Int32], counters: [SharedCounter])
    /// Stop accepting; close what is still open at `deadline` (monotonic nanoseconds).
    case drain(deadline: UInt64)
}

/// A mailbox with a wake-up: the only way into a worker from outside.
public final class WorkerMailbox: Sendable {
    private let queue = Mutex<[WorkerMessage]>([])
    private let wakeFD = Atomic<Int32>(-1)
    public init() {}
    func bind(fd: Int32) { wakeFD.store(fd, ordering: .releasing) }
    public func post(_ m: WorkerMessage) {
        queue.withLock { $0.append(m) }
        let fd = wakeFD.load(ordering: .acquiring)
        if fd >= 0 { EventLoop.wake(fd: fd) }
    }
    func take() -> [WorkerMessage] { queue.withLock { q in defer { q.removeAll() }; return q } }
}

/// Metric slots of a worker's own gauges (written to its shard, merged on scrape).
struct WorkerStats {
    let buffersInUse: Int
    let pipesInUse: Int
    let activeConnections: Int
    /// Captured connections whose original destination is not a service the agent knows (closed).
    let captureUnknown: Int
    let tlsHandshakes: Int
    let tlsHandshakeFailures: Int
    let authorizationDenied: Int
    let authorizationAudited: Int
    let authenticationFailed: Int
    /// Captured connections to ports of no declared protocol, by what their first bytes showed.
    let detectedHTTP: Int
    let detectedTCP: Int
    let detectionTimeouts: Int
    init(registry: MetricsRegistry, worker: Int) {
        let l = [("worker", String(worker))]
        buffersInUse = registry.gauge("sluice_worker_buffers_in_use", help: "Receive buffers held by connections",
                                      labels: l)
        pipesInUse = registry.gauge("sluice_worker_pipes_in_use", help: "Splice pipes holding data of a connection",
                                    labels: l)
        activeConnections = registry.gauge("sluice_worker_active_connections", help: "Open proxied connections",
                                           labels: l)
        captureUnknown = registry.counter("sluice_capture_unknown_destination_total",
                                          help: "Captured connections to no service the agent serves (closed)",
                                          labels: l)
        func detected(_ result: String) -> Int {
            registry.counter("sluice_protocol_detections_total",
                             help: "Captured connections to ports of no declared protocol, by detected protocol",
                             labels: l + [("result", result)])
        }
        detectedHTTP = detected("http")
        detectedTCP = detected("tcp")
        detectionTimeouts = detected("timeout")
        authorizationDenied = registry.counter("sluice_authorization_denied_total",
                                               help: "Requests denied by AuthorizationPolicy (403)", labels: l)
        authorizationAudited = registry.counter("sluice_authorization_audited_total",
                                                help: "Requests an AUDIT AuthorizationPolicy matched", labels: l)
        authenticationFailed = registry.counter("sluice_request_authentication_failed_total",
                                                help: "Requests refused for an invalid JWT (401)", labels: l)
        tlsHandshakes = registry.counter("sluice_tls_handshakes_total", help: "TLS handshakes completed by HTTPS listeners",
                                         labels: l)
        tlsHandshakeFailures = registry.counter("sluice_tls_handshake_failures_total",
                                                help: "TLS handshakes refused or failed (bad certificate, unknown name, not TLS)",
                                                labels: l)
    }
}

/// Proxies TCP on one io_uring: accepts on its own SO_REUSEPORT listeners, connects upstream, relays bytes.
public final class L4Worker: RingHandler {
    enum Op: UInt8 {
        case accept = 0, connect, connectTimeout, recvDown, recvUp, sendDown, sendUp, ignore, errorDown, errorUp
        case readableDown, readableUp, writableDown, writableUp
        // Protocol detection on a captured connection: readiness (or a retry's wait), and its linked timeout.
        case detectWait, detectTimeout
        // HTTP: downstream connection ops (slot in `hconns`), upstream ops (slot in `ups`), the worker's timer.
        case hRecv = 32, hSend, uConnect, uConnectTimeout, uSend, uRecv, timer
        // HBONE: tunnel connections (slot in `tunnels`) and their streams' plain sockets (slot in `tunnelStreams`).
        case tConnect = 64, tConnectTimeout, tRecv, tSend, sConnect, sConnectTimeout, sRecv, sSend
    }

    /// `detecting`: a captured connection to a port of no declared protocol, waiting for its first bytes.
    enum Phase: UInt8 { case free, detecting, connecting, relaying, closing }

    struct Conn {
        var generation: UInt32 = 0
        var phase: Phase = .free
        var relay = TCPRelay()
        var down: Int32 = -1
        var up: Int32 = -1
        var listener: Int32 = -1
        var cluster: WorkerCluster?
        var endpoint: Int32 = -1
        var attempts: UInt8 = 0
        var pending: Int32 = 0
        var lastActive: UInt64 = 0
        var connectStart: UInt64 = 0
        var clientHash: UInt64 = 0
        /// Splice mode: flows indexed by the side bytes are read from.
        var flows = (SpliceFlow(), SpliceFlow())
        /// Sides with an error watch armed (bit 0 downstream, bit 1 upstream).
        var watched: UInt8 = 0
        /// Detecting: the service the client dialled, and its port.
        var detecting: CapturedService?
        var detectingPort: UInt16 = 0
        /// Captured: the client's workload identity.
        var sourceIdentity: String?
    }

    struct Listening {
        var fd: Int32
        var runtimeIndex: Int
        let counter: SharedCounter
        let overflowSlot: Int
    }

    public let index: Int
    let mailbox: WorkerMailbox
    let registry: MetricsRegistry
    let shard: MetricShard
    let stats: WorkerStats
    var loop: EventLoop!
    var buffers: ProvidedBuffers!
    var runtime: ProxyRuntime
    var clusters: [ObjectIdentifier: WorkerCluster] = [:]
    var listeners: [Listening]
    var conns: ContiguousArray<Conn> = []
    var freeSlots: [UInt32] = []
    var openCount = 0
    var stalled: [(slot: UInt32, generation: UInt32, side: TCPRelay.Side)] = []
    var draining = false
    var drainDeadline: UInt64 = 0
    var lastIdleScan: UInt64 = 0
    /// Buffer pages were touched since they were last given back to the kernel.
    var buffersDirty = false
    public private(set) var finished = false
    /// Picks among a route's weighted clusters.
    var rng: FastRandom
    /// Drawn from the system's generator by each worker at each start: with a seed from the worker's index, every
    /// agent on every node made the same weighted, fault, mirror and sampling choices, and request IDs, after a start.
    let seed = UInt64.random(in: 1...UInt64.max)

    /// Called once the worker's listeners are armed (the server's start waits for it).
    var onAttached: (() -> Void)?
    /// Open connections allowed per listener, over all workers.
    let connectionLimit: Int64
    /// Relay with splice(2) through pipes (no copy into user space) instead of provided buffers.
    let splice: Bool
    let pipes: PipePool

    // HTTP state (see L4Worker+HTTP.swift).
    var hconns: ContiguousArray<HTTPConn> = []
    var hfree: [UInt32] = []
    var ups: ContiguousArray<UpConn> = []
    var upFree: [UInt32] = []
    var httpStalled: [(slot: UInt32, generation: UInt32, up: Bool)] = []
    var httpEvents: [HTTP1RequestReader.Event] = []
    var httpResponseEvents: [HTTP1ResponseReader.Event] = []
    /// Placeholders swapped in while a connection's reader is being fed (keeps the reader's buffer uniquely owned).
    var idleReader = HTTP1RequestReader()
    var idleResponseReader = HTTP1ResponseReader()
    var timers = TimerHeap()
    let timerSpec = UnsafeMutablePointer<__kernel_timespec>.allocate(capacity: 1)
    var rateBuckets: [RateLimitKey: TokenBucket] = [:]
    var requestMetrics = RequestMetrics()
    /// HTTP/2 upstream sessions with frames to flush after the current batch of events.
    var h2Dirty: [H2Upstream] = []
    /// HTTP/1.1 legs of HTTP/2 streams whose receive found no free buffer.
    var legStalled: [H1Leg] = []
    /// Protocol detection: the wait's timeout, the retry's pause, and where first bytes are peeked into.
    let detectSpec = UnsafeMutablePointer<__kernel_timespec>.allocate(capacity: 1)
    let detectRetrySpec: UnsafeMutablePointer<__kernel_timespec> = {
        let p = UnsafeMutablePointer<__kernel_timespec>.allocate(capacity: 1)
        p.initialize(to: __kernel_timespec(tv_sec: 0, tv_nsec: L4Worker.detectRetryNanos))
        return p
    }()
    let detectPeek = UnsafeMutableRawPointer.allocate(byteCount: ProtocolDetector.peekLength, alignment: 8)
    /// Verified JWTs by authenticator and token (see ``verifiedToken(_:_:)``); one worker's, unshared, emptied
    /// when the runtime (and with it every authenticator) is replaced.
    var jwtCache: [JWTCacheKey: VerifiedJWT] = [:]
    /// Clusters that freed a connection while requests wait for one (served by ``servePending()``).
    var pendingWake: [WorkerCluster] = []
    /// TLS connections whose session holds plaintext the engine asked for (delivered by ``drainTLSReady()``).
    var tlsReady: [(slot: UInt32, generation: UInt32)] = []
    // HBONE state (see L4Worker+Tunnel.swift).
    let tunnelStats: TunnelStats
    var tunnels: [Tunnel?] = []
    var tunnelGenerations: [UInt32] = []
    var tunnelFree: [UInt32] = []
    var tunnelStreams: [TunnelStream?] = []
    var tunnelStreamGenerations: [UInt32] = []
    var tunnelStreamFree: [UInt32] = []
    /// Outbound tunnels by (source identity, node, destination identity).
    var tunnelPool: [TunnelKey: Tunnel] = [:]
    /// Denial log lines this second (rate limit).
    var denialLogSecond: UInt64 = 0
    var denialLogCount = 0
    let tunnelConnectTimeout: UnsafeMutablePointer<__kernel_timespec> = {
        let p = UnsafeMutablePointer<__kernel_timespec>.allocate(capacity: 1)
        p.initialize(to: __kernel_timespec(tv_sec: 10, tv_nsec: 0))
        return p
    }()
    /// Finished exchanges kept for reuse.
    var exchangePool: [Exchange] = []
    /// Workers sharing the listeners (rate limits are split among them).
    let workerCount: Int
    let httpLimits: HTTP1Limits
    let headerTimeoutNanos: UInt64

    /// - Parameters:
    ///   - listenFDs: one SO_REUSEPORT socket per listener of `runtime`, in the same order; the worker owns them.
    ///   - listenerCounters: connection counters shared across workers, one per listener.
    public init(index: Int, runtime: ProxyRuntime, listenFDs: [Int32], listenerCounters: [SharedCounter],
                connectionLimit: Int, registry: MetricsRegistry, mailbox: WorkerMailbox, splice: Bool = false,
                workerCount: Int = 1, httpLimits: HTTP1Limits = HTTP1Limits(), headerTimeout: Duration = .seconds(10),
                onAttached: (() -> Void)? = nil) {
        self.index = index
        headerTimeoutNanos = headerTimeout.clampedNanoseconds
        self.workerCount = workerCount
        self.httpLimits = httpLimits
        self.onAttached = onAttached
        self.splice = splice
        self.runtime = runtime
        self.registry = registry
        self.mailbox = mailbox
        shard = registry.makeShard()
        stats = WorkerStats(registry: registry, worker: index)
        tunnelStats = TunnelStats(registry: registry, worker: index)
        pipes = PipePool(shard: shard, gauge: stats.pipesInUse)
        self.connectionLimit = Int64(connectionLimit)
        rng = FastRandom(seed: seed)
        listeners = []
        for (i, fd) in listenFDs.enumerated() {
            listeners.append(Listening(fd: fd, runtimeIndex: i, counter: listenerCounters[i], overflowSlot: overflowSlot(i)))
        }
    }

    public func attach(_ loop: EventLoop) {
        self.loop = loop
        buffers = loop.buffers
        mailbox.bind(fd: loop.wakeFD)
        adopt(runtime)
        for i in listeners.indices { armAccept(i) }
        // Messages posted before the mailbox knew this loop's eventfd (e.g. a drain right after start) woke
        // nobody: take them now.
        woken()
        onAttached?()
        onAttached = nil
    }

    // MARK: - configuration

    private func adopt(_ r: ProxyRuntime) {
        runtime = r
        // Verifications belong to the old runtime's authenticators (their issuers and audiences).
        jwtCache.removeAll()
        var next: [ObjectIdentifier: WorkerCluster] = [:]
        for c in r.clusters {
            next[ObjectIdentifier(c)] = clusters[ObjectIdentifier(c)]
                ?? WorkerCluster(runtime: c, seed: mix64(seed &+ UInt64(UInt(bitPattern: ObjectIdentifier(c).hashValue))))
        }
        clusters = next
    }

    public func woken() {
        for m in mailbox.take() {
            switch m {
            case .update(let r, let fds, let counters):
                adopt(r)
                adoptListeners(fds: fds, counters: counters)
            case .drain(let deadline):
                startDrain(deadline: deadline)
            }
        }
    }

    /// Listener entries only grow (an accept's user_data names its entry by index); entries of removed
    /// listeners keep fd -1.
    private func adoptListeners(fds: [Int32], counters: [SharedCounter]) {
        var byFD: [Int32: Int] = [:]
        for (i, l) in listeners.enumerated() where l.fd >= 0 { byFD[l.fd] = i }
        var kept = Set<Int>()
        for (ri, fd) in fds.enumerated() {
            if let i = byFD[fd] {
                listeners[i].runtimeIndex = ri
                kept.insert(i)
            } else {
                listeners.append(Listening(fd: fd, runtimeIndex: ri, counter: counters[ri], overflowSlot: overflowSlot(ri)))
                kept.insert(listeners.count - 1)
                if !draining { armAccept(listeners.count - 1) } else { close(fd); listeners[listeners.count - 1].fd = -1 }
            }
        }
        for i in listeners.indices where listeners[i].fd >= 0 && !kept.contains(i) { closeListener(i) }
    }

    private func overflowSlot(_ runtimeIndex: Int) -> Int {
        registry.counter("sluice_listener_overflow_total", help: "Connections refused by the listener's connection limit",
                         labels: [("listener", runtime.listeners[runtimeIndex].config.name)])
    }

    private func closeListener(_ i: Int) {
        let s = loop.uring.sqe()
        io_uring_prep_cancel64(s, UserData(slot: UInt32(i), generation: 0, op: Op.accept.rawValue).raw, 0)
        io_uring_sqe_set_data64(s, UserData(slot: 0, generation: 0, op: Op.ignore.rawValue).raw)
        close(listeners[i].fd)
        listeners[i].fd = -1
    }

    private func startDrain(deadline: UInt64) {
        guard !draining else { return }
        draining = true
        drainDeadline = deadline
        for i in listeners.indices where listeners[i].fd >= 0 { closeListener(i) }
        checkDrained()
    }

    func checkDrained() {
        if draining && openCount == 0 { finished = true }
    }

    public func tick(now: UInt64) {
        defer { if !tlsReady.isEmpty { drainTLSReady() } }
        if draining && now >= drainDeadline {
            for slot in conns.indices where [.detecting, .connecting, .relaying].contains(conns[slot].phase) {
                fail(UInt32(slot), reset: true)
            }
            for slot in hconns.indices where hconns[slot].phase == .open { teardownHTTP(UInt32(slot), reset: true) }
            closeAllTunnels()
        }
        if now - lastIdleScan >= 1_000_000_000 {
            lastIdleScan = now
            if buffersDirty && openCount == 0 && buffers.inUse == 0 {
                buffers.releaseMemory()
                buffersDirty = false
            }
            if openCount == 0 { pipes.drainPool() }
            scanHTTP(now: now)
            scanTunnels(now: now)
            retryPending()
            for slot in conns.indices where conns[slot].phase == .relaying {
                let c = conns[slot]
                if let cl = c.cluster, now - c.lastActive > cl.runtime.idleTimeoutNanos {
                    fail(UInt32(slot), reset: false)
                }
            }
        }
    }

    // MARK: - accept

    private func armAccept(_ i: Int) {
        guard listeners[i].fd >= 0 else { return }
        let s = loop.uring.sqe()
        io_uring_prep_multishot_accept(s, listeners[i].fd, nil, nil, Int32(SOCK_NONBLOCK.rawValue | SOCK_CLOEXEC.rawValue))
        io_uring_sqe_set_data64(s, UserData(slot: UInt32(i), generation: 0, op: Op.accept.rawValue).raw)
    }

    private func accepted(listener li: Int, fd: Int32) {
        let l = listeners[li]
        if draining {
            close(fd)
            return
        }
        if l.counter.add(1) >= connectionLimit {
            l.counter.add(-1)
            shard.add(l.overflowSlot)
            close(fd)
            return
        }
        let lr = runtime.listeners[l.runtimeIndex]
        let cr: ClusterRuntime
        if lr.inbound != nil {
            acceptTunnel(fd: fd, listener: li)
            return
        }
        if lr.capture != nil {
            // Captured by the BPF programs: the service follows from where the client was going.
            let peer = Socket.peerAddress(fd)
            guard let (service, original, cgroup) = lr.capturedService(peer: peer) else {
                l.counter.add(-1)
                shard.add(stats.captureUnknown)
                close(fd)
                return
            }
            let identity = runtime.sourceIdentity(cgroup: cgroup, address: Self.ipString(peer))
            switch service.pipeline {
            case .http:
                guard let table = lr.http else { fallthrough }
                acceptHTTP(fd: fd, listener: li, table: table, captured: service.cluster, port: original.port, identity: identity)
                return
            case .tcp:
                relay(fd: fd, listener: li, cluster: service.cluster, identity: identity)
                return
            case .detect:
                detectProtocol(fd: fd, listener: li, service: service, port: original.port, identity: identity)
                return
            }
        } else if let table = lr.http {
            let port = lr.config.address.port == 0 ? Socket.localPort(fd) : lr.config.address.port
            acceptHTTP(fd: fd, listener: li, table: table, captured: nil, port: port, tls: lr.tls,
                       httpsRedirect: lr.config.httpsRedirect, labels: lr.config.workloadLabels)
            return
        } else if lr.clusters.count == 1 {
            cr = lr.clusters[0]
        } else {
            var x = rng.next(below: lr.totalWeight)
            var chosen = lr.clusters.count - 1
            for (i, w) in lr.weights.enumerated() {
                if x < w { chosen = i; break }
                x -= w
            }
            cr = lr.clusters[chosen]
        }
        relay(fd: fd, listener: li, cluster: cr, identity: nil)
    }

    /// Relays an accepted connection's bytes to an endpoint of `cr`; `identity`: the captured client's workload
    /// identity (what a tunnel to another node presents).
    func relay(fd: Int32, listener li: Int, cluster cr: ClusterRuntime, identity: String?) {
        guard let wc = clusters[ObjectIdentifier(cr)] else {
            listeners[li].counter.add(-1)
            close(fd)
            return
        }
        let slot = allocate()
        Socket.setNoDelay(fd)
        conns[Int(slot)].down = fd
        conns[Int(slot)].listener = Int32(li)
        conns[Int(slot)].cluster = wc
        conns[Int(slot)].sourceIdentity = identity
        conns[Int(slot)].phase = .connecting
        conns[Int(slot)].lastActive = loop.now
        openCount += 1
        shard.addSigned(stats.activeConnections, 1)
        if case .consistentHash = cr.config.loadBalancer {
            conns[Int(slot)].clientHash = Socket.peerAddress(fd).ipHash
        }
        // Counted before the check so that teardown's decrement always matches.
        let before = cr.active.add(1)
        if let max = cr.config.maxConnections, before >= Int64(max) {
            shard.add(cr.metrics.closedOverflow)
            teardown(slot, reset: false)
            return
        }
        connectUpstream(slot, excluding: -1)
    }

    func allocate() -> UInt32 {
        if let s = freeSlots.popLast() { return s }
        conns.append(Conn())
        return UInt32(conns.count - 1)
    }

    // MARK: - upstream connect

    private func connectUpstream(_ slot: UInt32, excluding: Int) {
        let i = Int(slot)
        let wc = conns[i].cluster!
        guard let e = wc.pick(now: loop.now, clientHash: conns[i].clientHash, excluding: excluding) else {
            upstreamFailed(slot)
            return
        }
        if let target = wc.runtime.tunnelTargets[e] {
            openTunnelStream(slot, endpoint: e, target)
            return
        }
        // A workload of this node is called without a tunnel: its AuthorizationPolicies are checked here, as its
        // node's agent checks a tunnelled caller.
        if runtime.localPolicies, !localCallAllowed(slot, endpoint: wc.runtime.config.endpoints[e].address) {
            shard.add(stats.authorizationDenied)
            teardown(slot, reset: true)
            return
        }
        let addr = wc.runtime.addresses + e
        let fd = Socket.stream(family: addr.pointee.family)
        guard fd >= 0 else {
            upstreamFailed(slot)
            return
        }
        Socket.setNoDelay(fd)
        conns[i].up = fd
        conns[i].endpoint = Int32(e)
        conns[i].attempts += 1
        conns[i].connectStart = loop.now
        let s = loop.uring.sqe()
        addr.withMemoryRebound(to: sockaddr_storage.self, capacity: 1) { p in
            p.withMemoryRebound(to: sockaddr.self, capacity: 1) { sa in
                io_uring_prep_connect(s, fd, sa, addr.pointee.length)
            }
        }
        s.pointee.flags |= sl_iosqe_io_link()
        track(s, slot, .connect)
        let t = loop.uring.sqe()
        io_uring_prep_link_timeout(t, wc.runtime.connectTimeout, 0)
        track(t, slot, .connectTimeout)
    }

    /// Tags `sqe` as operation `op` of the slot's current incarnation and counts it as pending: the slot is
    /// freed only once every tracked operation has completed.
    @inline(__always)
    func track(_ sqe: UnsafeMutablePointer<io_uring_sqe>, _ slot: UInt32, _ op: Op) {
        io_uring_sqe_set_data64(sqe, UserData(slot: slot, generation: conns[Int(slot)].generation, op: op.rawValue).raw)
        conns[Int(slot)].pending += 1
    }

    private func connectCompleted(_ slot: UInt32, result: Int32) {
        let i = Int(slot)
        let wc = conns[i].cluster!
        let e = Int(conns[i].endpoint)
        if conns[i].phase == .closing { return }
        if result == 0 {
            wc.outlier?.recordSuccess(e)
            wc.active[e] += 1
            shard.add(wc.runtime.metrics.opened)
            shard.observe(wc.runtime.metrics.connectDuration, Double(loop.now - conns[i].connectStart) / 1e6)
            conns[i].phase = .relaying
            conns[i].lastActive = loop.now
            if splice {
                // The readable polls also report errors; a side gets an error watch only when back-pressure
                // stops polling it (see waitWritable), which keeps short connections to the fewest operations.
                waitReadable(slot, .downstream)
                waitReadable(slot, .upstream)
            } else {
                watchErrors(slot, .downstream)
                watchErrors(slot, .upstream)
                perform(slot, conns[i].relay.start())
            }
            return
        }
        shard.add(wc.runtime.metrics.connectFailures)
        if wc.outlier?.recordFailure(e, now: loop.now) == true { shard.add(wc.runtime.metrics.ejections) }
        close(conns[i].up)
        conns[i].up = -1
        conns[i].endpoint = -1
        if Int(conns[i].attempts) < wc.connectAttempts && !draining {
            connectUpstream(slot, excluding: e)
        } else {
            upstreamFailed(slot)
        }
    }

    /// No endpoint could be reached: close the client (Istio's response flag UF).
    func upstreamFailed(_ slot: UInt32, reset: Bool = false) {
        shard.add(conns[Int(slot)].cluster!.runtime.metrics.closedUpstreamFailure)
        teardown(slot, reset: reset)
    }

    // MARK: - completions

    public func complete(_ ud: UserData, result: Int32, flags: UInt32) {
        guard let op = Op(rawValue: ud.op) else { return }
        if op == .accept {
            let li = Int(ud.slot)
            if flags & sl_cqe_f_more() == 0 && !draining { armAccept(li) }
            if result >= 0 {
                accepted(listener: li, fd: result)
            }
            return
        }
        if op == .ignore { return }
        if op.rawValue >= Op.tConnect.rawValue {
            completeTunnel(op, ud, result: result)
            return
        }
        if op.rawValue >= Op.hRecv.rawValue {
            completeHTTP(op, ud, result: result, flags: flags)
            if !tlsReady.isEmpty { drainTLSReady() }
            if !pendingWake.isEmpty { servePending() }
            return
        }
        let slot = ud.slot
        let i = Int(slot)
        // A completion always belongs to the slot's current incarnation: slots are reused only once no
        // operation is pending, so the generation check guards against bugs, not races.
        guard i < conns.count, conns[i].generation & 0xFF_FFFF == ud.generation else {
            if flags & sl_cqe_f_buffer() != 0 {
                buffers.taken()
                buffers.recycle(UInt16(flags >> sl_cqe_buffer_shift()))
            }
            return
        }
        conns[i].pending -= 1
        switch op {
        case .connect:
            connectCompleted(slot, result: result)
        case .connectTimeout:
            break
        case .recvDown, .recvUp:
            let side: TCPRelay.Side = op == .recvDown ? .downstream : .upstream
            if flags & sl_cqe_f_buffer() != 0 {
                let id = UInt16(flags >> sl_cqe_buffer_shift())
                buffers.taken()
                buffersDirty = true
                shard.addSigned(stats.buffersInUse, 1)
                if result > 0 && conns[i].phase == .relaying {
                    conns[i].lastActive = loop.now
                    let m = conns[i].cluster!.runtime.metrics
                    shard.add(side == .downstream ? m.receivedBytes : m.sentBytes, UInt64(result))
                    perform(slot, conns[i].relay.received(from: side, .init(buffer: id, length: result)))
                } else {
                    release(id)
                }
            } else if conns[i].phase == .relaying {
                if result == 0 {
                    perform(slot, conns[i].relay.receivedEOF(from: side))
                } else if result == -ENOBUFS {
                    conns[i].relay.receiveStalled(side)
                    stalled.append((slot, conns[i].generation, side))
                } else {
                    failRelay(slot, reset: result == -ECONNRESET)
                }
            }
        case .sendDown, .sendUp:
            if conns[i].phase == .relaying {
                let side: TCPRelay.Side = op == .sendDown ? .downstream : .upstream
                if result >= 0 {
                    conns[i].lastActive = loop.now
                    perform(slot, conns[i].relay.sent(to: side, bytes: result))
                } else {
                    failRelay(slot, reset: result == -ECONNRESET || result == -EPIPE)
                }
            }
        case .errorDown, .errorUp:
            // A reset while back-pressure keeps this side unread: nothing else would notice it.
            if conns[i].phase == .relaying && result > 0 && Int32(result) & Int32(POLLERR) != 0 {
                failRelay(slot, reset: true)
            }
        case .readableDown, .readableUp:
            if conns[i].phase == .relaying {
                if result < 0 { failRelay(slot, reset: false) } else { spliceIn(slot, op == .readableDown ? .downstream : .upstream) }
            }
        case .writableDown, .writableUp:
            // The sink can take more: flush the pipe of the flow that writes to it.
            if conns[i].phase == .relaying {
                if result < 0 { failRelay(slot, reset: false) } else { spliceOut(slot, op == .writableDown ? .upstream : .downstream) }
            }
        case .detectWait, .detectTimeout:
            if conns[i].phase == .detecting && conns[i].pending == 0 { detected(slot) }
        case .accept, .ignore, .hRecv, .hSend, .uConnect, .uConnectTimeout, .uSend, .uRecv, .timer,
             .tConnect, .tConnectTimeout, .tRecv, .tSend, .sConnect, .sConnectTimeout, .sRecv, .sSend:
            break
        }
        if conns[i].phase == .closing && conns[i].pending == 0 { freeConn(slot) }
    }

    // MARK: - relay actions

    @inline(__always)
    private func perform(_ slot: UInt32, _ actions: TCPRelay.Actions) {
        for a in actions {
            switch a {
            case .receive(let side): postReceive(slot, side)
            case .send(let side, let chunk): postSend(slot, side, chunk)
            case .shutdownWrite(let side): shutdown(fd(slot, side), Int32(SHUT_WR))
            case .release(let id): release(id)
            case .close(let reset): teardown(slot, reset: reset)
            }
        }
    }

    /// Watches a socket for errors (a peer's reset) for the life of the connection. Poll mask 0: only
    /// POLLERR/POLLHUP wake it, so it costs nothing while data flows.
    func watchErrors(_ slot: UInt32, _ side: TCPRelay.Side) {
        let bit: UInt8 = side == .downstream ? 1 : 2
        guard conns[Int(slot)].watched & bit == 0 else { return }
        conns[Int(slot)].watched |= bit
        let s = loop.uring.sqe()
        io_uring_prep_poll_add(s, fd(slot, side), 0)
        track(s, slot, side == .downstream ? .errorDown : .errorUp)
    }

    @inline(__always)
    private func postReceive(_ slot: UInt32, _ side: TCPRelay.Side) {
        track(bufferedReceive(fd(slot, side)), slot, side == .downstream ? .recvDown : .recvUp)
    }

    /// A receive on `fd` into a buffer the kernel picks from the worker's group when data arrives (an idle
    /// socket holds no buffer). The caller tags the returned entry.
    @inline(__always)
    func bufferedReceive(_ fd: Int32, pollFirst: Bool = false) -> UnsafeMutablePointer<io_uring_sqe> {
        let s = loop.uring.sqe()
        io_uring_prep_recv(s, fd, nil, buffers.size, 0)
        s.pointee.flags |= sl_iosqe_buffer_select()
        s.pointee.buf_group = buffers.group
        if pollFirst { s.pointee.ioprio |= UInt16(IORING_RECVSEND_POLL_FIRST) }
        return s
    }

    @inline(__always)
    private func postSend(_ slot: UInt32, _ side: TCPRelay.Side, _ chunk: TCPRelay.Chunk) {
        let s = loop.uring.sqe()
        io_uring_prep_send(s, fd(slot, side), buffers.pointer(chunk.buffer) + Int(chunk.offset), Int(chunk.length),
                           Int32(MSG_NOSIGNAL))
        track(s, slot, side == .downstream ? .sendDown : .sendUp)
    }

    @inline(__always)
    private func release(_ id: UInt16) {
        buffers.recycle(id)
        shard.addSigned(stats.buffersInUse, -1)
        // A receive that found the pool empty may go now.
        while let w = stalled.popLast() {
            let i = Int(w.slot)
            guard conns[i].generation == w.generation, conns[i].phase == .relaying else { continue }
            perform(w.slot, conns[i].relay.resumeReceive(w.side))
            break
        }
    }

    private func fail(_ slot: UInt32, reset: Bool) {
        let i = Int(slot)
        if conns[i].phase == .relaying {
            failRelay(slot, reset: reset)
        } else if conns[i].phase == .connecting || conns[i].phase == .detecting {
            teardown(slot, reset: reset)
        }
    }

    @inline(__always)
    func failRelay(_ slot: UInt32, reset: Bool) {
        if splice { teardown(slot, reset: reset) } else { perform(slot, conns[Int(slot)].relay.failed(reset: reset)) }
    }

    /// Starts closing: cancels whatever is pending on both sockets; the slot is freed when the last
    /// completion arrives.
    func teardown(_ slot: UInt32, reset: Bool) {
        let i = Int(slot)
        guard conns[i].phase != .closing && conns[i].phase != .free else { return }
        let wasRelaying = conns[i].phase == .relaying
        conns[i].phase = .closing
        if let wc = conns[i].cluster {
            if wasRelaying {
                shard.add(wc.runtime.metrics.closed)
                wc.active[Int(conns[i].endpoint)] -= 1
            }
            wc.runtime.active.add(-1)
        }
        listeners[Int(conns[i].listener)].counter.add(-1)
        pipes.release(&conns[i].flows.0)
        pipes.release(&conns[i].flows.1)
        stop(conns[i].down, reset: reset, cancel: conns[i].pending > 0)
        stop(conns[i].up, reset: reset, cancel: conns[i].pending > 0)
        if conns[i].pending == 0 { freeConn(slot) }
    }

    /// Makes a closing socket send RST if the peer reset, and cancels every operation still pending on it.
    func stop(_ fd: Int32, reset: Bool, cancel: Bool) {
        guard fd >= 0 else { return }
        if reset { Socket.setLingerZero(fd) }
        if cancel {
            let s = loop.uring.sqe()
            io_uring_prep_cancel_fd(s, fd, UInt32(IORING_ASYNC_CANCEL_ALL))
            io_uring_sqe_set_data64(s, UserData(slot: 0, generation: 0, op: Op.ignore.rawValue).raw)
        }
    }

    /// Reuses a connection slot whose socket and counts were handed over (to a tunnel stream).
    func recycleConnSlot(_ slot: UInt32) {
        let i = Int(slot)
        let gen = (conns[i].generation + 1) & 0xFF_FFFF
        conns[i] = Conn()
        conns[i].generation = gen
        freeSlots.append(slot)
    }

    func freeConn(_ slot: UInt32) {
        let i = Int(slot)
        if conns[i].down >= 0 { close(conns[i].down) }
        if conns[i].up >= 0 { close(conns[i].up) }
        let gen = (conns[i].generation + 1) & 0xFF_FFFF
        conns[i] = Conn()
        conns[i].generation = gen
        freeSlots.append(slot)
        openCount -= 1
        shard.addSigned(stats.activeConnections, -1)
        checkDrained()
    }
}
