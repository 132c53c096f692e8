import Glibc
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
        public init(workers: Int = 1, connectionLimit: Int = 1 << 20, bufferCount: UInt16 = 256,
                    bufferSize: Int = 64 << 10, splice: Bool = true) {
            self.splice = splice
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
    /// The ports the listeners actually bound (useful when a config asks for port 0).
    public private(set) var boundPorts: [UInt16] = []

    public init(options: Options, registry: MetricsRegistry) {
        self.options = options
        self.registry = registry
        mailboxes = (0..<options.workers).map { _ in WorkerMailbox() }
    }

    public func start(_ runtime: ProxyRuntime) throws(StartError) {
        var fdsPerWorker: [[Int32]] = Array(repeating: [], count: options.workers)
        var ports: [UInt16] = []
        do {
            for l in runtime.listeners {
                var port = l.config.address.port
                for w in 0..<options.workers {
                    let fd = try Socket.listen(ip: l.config.address.ip.description, port: port)
                    if port == 0 { port = Socket.localPort(fd) }
                    fdsPerWorker[w].append(fd)
                }
                ports.append(port)
            }
        } catch {
            for fds in fdsPerWorker { for fd in fds { close(fd) } }
            throw .bind(error)
        }
        boundPorts = ports
        let counters = runtime.listeners.map { _ in SharedCounter() }
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
                    loop = try EventLoop(bufferCount: opts.bufferCount, bufferSize: opts.bufferSize)
                } catch {
                    startErrors.withLock { $0.append(error) }
                    readyCount.add(1, ordering: .releasing)
                    for fd in fds { close(fd) }
                    return
                }
                let worker = L4Worker(index: w, runtime: runtime, listenFDs: fds, listenerCounters: counters,
                                      connectionLimit: opts.connectionLimit, registry: registry, mailbox: mailbox,
                                      splice: opts.splice)
                readyCount.add(1, ordering: .releasing)
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

    /// Publishes a new runtime to every worker.
    public func update(_ runtime: ProxyRuntime) {
        for m in mailboxes { m.post(.update(runtime)) }
    }

    /// Stops accepting at once; connections get `timeout` to finish before they are closed.
    public func drain(timeout: Duration) {
        let deadline = EventLoop.monotonicNanos() + UInt64(max(0, timeout.nanosecondsClamped))
        for m in mailboxes { m.post(.drain(deadline: deadline)) }
    }

    /// Blocks until every worker has finished.
    public func wait() {
        for t in threads { pthread_join(t, nil) }
        threads.removeAll()
    }

    public var isRunning: Bool { runningWorkers.load(ordering: .acquiring) > 0 }
}
