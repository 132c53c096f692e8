import Glibc
import SluiceHTTP
import SluiceModel
import SluiceRing
import SluiceTelemetry
import Synchronization

/// Runs N io_uring workers that proxy the listeners of a ``ProxyRuntime``. Lifecycle: `start` (binds every
/// listener first, so a port in use fails before any thread starts), `update`, `drain`, `wait`.
public final class L4Server: @unchecked Sendable {
    public struct Options: Sendable {
        public var workers: Int
        /// Open connections per listener, over all workers.
        public var connectionLimit: Int
        public var bufferCount: UInt16
        public var bufferSize: Int
        /// Relay plain TCP with splice(2) (zero-copy through kernel pipes) instead of user-space buffers.
        public var splice: Bool
        /// Request head limits on HTTP listeners (431 / 414 beyond them).
        public var httpLimits: HTTP1Limits
        /// A request head must be complete this long after its first byte (slowloris); checked once a second.
        public var headerTimeout: Duration
        public init(workers: Int = 1, connectionLimit: Int = 1 << 20, bufferCount: UInt16 = 256,
                    bufferSize: Int = 64 << 10, splice: Bool = true, httpLimits: HTTP1Limits = HTTP1Limits(),
                    headerTimeout: Duration = .seconds(10)) {
            self.splice = splice
            self.httpLimits = httpLimits
            self.headerTimeout = headerTimeout
            self.workers = workers
            self.connectionLimit = connectionLimit
            self.bufferCount = bufferCount
            self.bufferSize = bufferSize
        }
    }

    public enum StartError: Error, CustomStringConvertible {
        case bind(Socket.BindError)
        case ring(RingError)
        public var description: String {
            switch self {
            case .bind(let e): e.description
            case .ring(let e): "cannot start an io_uring worker: \(e)"
            }
        }
    }

    public let options: Options
    public let registry: MetricsRegistry
    private let mailboxes: [WorkerMailbox]
    private var threads: [pthread_t] = []
    private let runningWorkers = Atomic<Int>(0)
    private let startErrors = Mutex<[RingError]>([])
    private let readyCount = Atomic<Int>(0)
    private let features = Mutex<RingFeatures?>(nil)
    /// The io_uring setup the kernel accepted (known once started), for the start-up log.
    public var ringFeatures: RingFeatures? { features.withLock { $0 } }
    private let ports = Mutex<[UInt16]>([])
    /// The ports the current listeners actually bound, in runtime order (useful when a config asks for port 0).
    public var boundPorts: [UInt16] { ports.withLock { $0 } }

    public init(options: Options, registry: MetricsRegistry) {
        self.options = options
        self.registry = registry
        mailboxes = (0..<options.workers).map { _ in WorkerMailbox() }
    }

    /// Listening sockets per listener address, one per worker, and the connection counter of each; kept across
    /// updates so that an unchanged listener keeps its sockets (no refused connections during a reload).
    private struct Bound {
        var fds: [Int32]
        var port: UInt16
        let counter: SharedCounter
    }
    private let bound = Mutex<[String: Bound]>([:])

    /// Listeners are matched by address across updates; port 0 (any free port) matches by name instead.
    private static func key(_ l: ListenerRuntime) -> String {
        l.config.address.port == 0 ? "\(l.config.address)#\(l.config.name)" : "\(l.config.address)"
    }

    /// Binds what `runtime` needs that is not bound yet. On failure nothing new stays open.
    private func bindListeners(_ runtime: ProxyRuntime) throws(StartError) -> (fds: [[Int32]], counters: [SharedCounter], ports: [UInt16]) {
        var table = bound.withLock { $0 }
        var opened: [Int32] = []
        var fdsPerWorker: [[Int32]] = Array(repeating: [], count: options.workers)
        var counters: [SharedCounter] = []
        var ports: [UInt16] = []
        do {
            for l in runtime.listeners {
                let key = Self.key(l)
                let address = l.config.address
                if table[key] == nil {
                    var port = address.port
                    var fds: [Int32] = []
                    for _ in 0..<options.workers {
                        let fd = try Socket.listen(ip: address.ip.description, port: port)
                        opened.append(fd)
                        if port == 0 { port = Socket.localPort(fd) }
                        fds.append(fd)
                    }
                    table[key] = Bound(fds: fds, port: port, counter: SharedCounter())
                }
                let b = table[key]!
                for w in 0..<options.workers { fdsPerWorker[w].append(b.fds[w]) }
                counters.append(b.counter)
                ports.append(b.port)
            }
        } catch {
            for fd in opened { close(fd) }
            throw .bind(error)
        }
        // Workers close the sockets of listeners that are gone; forget them here.
        let wanted = Set(runtime.listeners.map(Self.key))
        table = table.filter { wanted.contains($0.key) }
        bound.withLock { $0 = table }
        return (fdsPerWorker, counters, ports)
    }

    /// Binds every listener, starts the workers and returns once each has its listeners armed, so a drain or
    /// update posted right after cannot race a worker that is still starting.
    public func start(_ runtime: ProxyRuntime) throws(StartError) {
        // splice(2) into a socket the peer reset raises SIGPIPE (it has no MSG_NOSIGNAL): the data plane handles
        // EPIPE itself, so the signal must not end the process that embeds it.
        signal(SIGPIPE, SIG_IGN)
        let (fdsPerWorker, counters, bound) = try bindListeners(runtime)
        ports.withLock { $0 = bound }
        for w in 0..<options.workers {
            let fds = fdsPerWorker[w]
            let mailbox = mailboxes[w]
            let opts = options
            let registry = registry
            runningWorkers.add(1, ordering: .relaxed)
            threads.append(startThread(name: "sluice-w\(w)") { [self] in
                defer { runningWorkers.subtract(1, ordering: .releasing) }
                let loop: EventLoop
                do throws(RingError) {
                    // A quarter as many again for TLS plaintext (only touched pages cost memory).
                    loop = try EventLoop(bufferCount: opts.bufferCount, bufferSize: opts.bufferSize,
                                         reserveBuffers: max(16, opts.bufferCount / 4))
                } catch {
                    startErrors.withLock { $0.append(error) }
                    readyCount.add(1, ordering: .releasing)
                    for fd in fds { close(fd) }
                    return
                }
                if w == 0 { features.withLock { $0 = loop.uring.features } }
                let worker = L4Worker(index: w, runtime: runtime, listenFDs: fds, listenerCounters: counters,
                                      connectionLimit: opts.connectionLimit, registry: registry, mailbox: mailbox,
                                      splice: opts.splice, workerCount: opts.workers, httpLimits: opts.httpLimits,
                                      headerTimeout: opts.headerTimeout,
                                      onAttached: { self.readyCount.add(1, ordering: .releasing) })
                loop.run(worker)
            })
        }
        while readyCount.load(ordering: .acquiring) < options.workers { usleep(1000) }
        if let e = startErrors.withLock({ $0.first }) {
            drain(timeout: .zero)
            wait()
            throw .ring(e)
        }
    }

    /// Publishes a new runtime to every worker: new listeners are bound first (a bind failure rejects the whole
    /// update and the old runtime keeps serving), removed ones are closed by the workers, unchanged ones keep
    /// their sockets. Connections already open finish on the runtime they started with.
    public func update(_ runtime: ProxyRuntime) throws(StartError) {
        let (fdsPerWorker, counters, bound) = try bindListeners(runtime)
        ports.withLock { $0 = bound }
        for (w, m) in mailboxes.enumerated() {
            m.post(.update(runtime, listenFDs: fdsPerWorker[w], counters: counters))
        }
    }

    /// Stops accepting at once; connections get `timeout` to finish before they are closed.
    public func drain(timeout: Duration) {
        let deadline = EventLoop.monotonicNanos() &+ min(timeout.clampedNanoseconds, UInt64.max / 2)
        for m in mailboxes { m.post(.drain(deadline: deadline)) }
    }

    /// Waits up to `timeout` for every worker to finish; false if some are still running (nothing is joined then).
    public func wait(timeout: Duration) -> Bool {
        let deadline = EventLoop.monotonicNanos() &+ min(timeout.clampedNanoseconds, UInt64.max / 2)
        while isRunning {
            if EventLoop.monotonicNanos() >= deadline { return false }
            usleep(5_000)
        }
        wait()
        return true
    }

    /// Blocks until every worker has finished.
    public func wait() {
        for t in threads { pthread_join(t, nil) }
        threads.removeAll()
    }

    public var isRunning: Bool { runningWorkers.load(ordering: .acquiring) > 0 }
}
