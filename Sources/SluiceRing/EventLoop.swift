import CSluiceLinux
import Glibc

/// What a worker's event loop drives: the proxy logic that turns completions into new submissions.
public protocol RingHandler: AnyObject {
    /// Called once on the worker thread, before the first completion.
    func attach(_ loop: EventLoop)
    /// One completion of an operation this handler submitted. Ops 0..<``EventLoop/reservedOps`` are the handler's.
    func complete(_ userData: UserData, result: Int32, flags: UInt32)
    /// Periodic tick (``EventLoop/tickInterval``) for coarse timeouts and deadlines.
    func tick(now: UInt64)
    /// Another thread posted to this worker (see ``EventLoop/wake()``).
    func woken()
    /// The loop returns once this is true after a completion or tick.
    var finished: Bool { get }
}

/// A single-threaded io_uring event loop: one ring, one buffer group, a wake-up eventfd and a tick timer.
public final class EventLoop {
    public static let reservedOps: UInt8 = 250
    static let opWake: UInt8 = 254
    static let opTick: UInt8 = 253
    public static let tickInterval: Duration = .milliseconds(100)

    public let uring: IOUring
    public let buffers: ProvidedBuffers
    public let wakeFD: Int32
    private let wakeValue = UnsafeMutablePointer<UInt64>.allocate(capacity: 1)
    private let tickSpec = UnsafeMutablePointer<__kernel_timespec>.allocate(capacity: 1)
    /// Monotonic clock in nanoseconds, refreshed on each loop iteration.
    public private(set) var now: UInt64 = 0

    /// - Parameter reserveBuffers: buffers besides the kernel's, for bytes the handler produces (TLS plaintext).
    public init(entries: UInt32 = 4096, bufferCount: UInt16, bufferSize: Int, reserveBuffers: UInt16 = 0) throws(RingError) {
        uring = try IOUring(entries: entries)
        buffers = try ProvidedBuffers(ring: uring, group: 0, count: bufferCount, size: bufferSize, reserve: reserveBuffers)
        let fd = eventfd(0, Int32(EFD_CLOEXEC))
        guard fd >= 0 else { throw RingError("eventfd", errno: errno) }
        wakeFD = fd
        tickSpec.pointee = __kernel_timespec(tv_sec: 0, tv_nsec: Int64(Self.tickInterval.components.attoseconds / 1_000_000_000))
        now = Self.monotonicNanos()
    }

    deinit {
        close(wakeFD)
        wakeValue.deallocate()
        tickSpec.deallocate()
    }

    /// Thread-safe: makes the loop call ``RingHandler/woken()`` soon.
    public static func wake(fd: Int32) {
        var one: UInt64 = 1
        _ = write(fd, &one, 8)
    }

    public static func monotonicNanos() -> UInt64 {
        var ts = timespec()
        clock_gettime(CLOCK_MONOTONIC, &ts)
        return UInt64(ts.tv_sec) * 1_000_000_000 + UInt64(ts.tv_nsec)
    }

    private func armWake() {
        let s = uring.sqe()
        io_uring_prep_read(s, wakeFD, wakeValue, 8, 0)
        io_uring_sqe_set_data64(s, UserData(slot: 0, generation: 0, op: Self.opWake).raw)
    }

    private func armTick() {
        let s = uring.sqe()
        io_uring_prep_timeout(s, tickSpec, 0, 0)
        io_uring_sqe_set_data64(s, UserData(slot: 0, generation: 0, op: Self.opTick).raw)
    }

    /// Runs until the handler reports ``RingHandler/finished``. Call on the thread that created the loop.
    public func run<H: RingHandler>(_ handler: H) {
        handler.attach(self)
        armWake()
        armTick()
        while !handler.finished {
            let rc = uring.submitAndWait(1)
            if rc < 0 && rc != -EINTR && rc != -EAGAIN && rc != -EBUSY && rc != -ETIME {
                // Nothing sensible to do but retry; the kernel only fails here transiently.
                continue
            }
            now = Self.monotonicNanos()
            _ = uring.reap { raw, res, flags in
                let ud = UserData(raw: raw)
                switch ud.op {
                case Self.opWake:
                    armWake()
                    handler.woken()
                case Self.opTick:
                    armTick()
                    handler.tick(now: now)
                default:
                    handler.complete(ud, result: res, flags: flags)
                }
            }
        }
        // Flush whatever the handler queued last (closes, cancels) before the ring goes away.
        _ = io_uring_submit(&uring.ring)
    }
}

/// Starts a named OS thread. Ring workers need a thread of their own, not a Swift concurrency executor.
public func startThread(name: String, _ body: @escaping @Sendable () -> Void) -> pthread_t {
    final class Box: @unchecked Sendable {
        let body: @Sendable () -> Void
        let name: String
        init(_ body: @escaping @Sendable () -> Void, _ name: String) {
            self.body = body
            self.name = name
        }
    }
    let box = Unmanaged.passRetained(Box(body, name)).toOpaque()
    var tid = pthread_t()
    let rc = pthread_create(&tid, nil, { arg in
        let b = Unmanaged<AnyObject>.fromOpaque(arg!).takeRetainedValue() as! Box
        sl_set_thread_name(String(b.name.prefix(15)))
        b.body()
        return nil
    }, box)
    precondition(rc == 0, "pthread_create failed: \(rc)")
    return tid
}
