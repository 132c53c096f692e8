import CSluiceLinux
import Glibc

public struct RingError: Error, CustomStringConvertible, Sendable {
    public var operation: String
    public var errno: Int32
    public init(_ operation: String, errno: Int32) {
        self.operation = operation
        self.errno = errno
    }
    public var description: String {
        var text = "\(operation): \(String(cString: strerror(errno)))"
        if operation.hasPrefix("io_uring_queue_init") && (errno == EPERM || errno == ENOSYS) {
            text += " (io_uring is disabled: check /proc/sys/kernel/io_uring_disabled and seccomp)"
        } else if errno == ENOMEM {
            text += " (raise the memlock limit: ulimit -l, or LimitMEMLOCK= in the unit)"
        }
        return text
    }
}

/// Which optional io_uring features the running kernel accepted, detected once at start.
public struct RingFeatures: Sendable, CustomStringConvertible {
    public var singleIssuer = false
    public var deferTaskrun = false
    public var coopTaskrun = false
    public var description: String {
        "single_issuer=\(singleIssuer) defer_taskrun=\(deferTaskrun) coop_taskrun=\(coopTaskrun)"
    }
}

/// One io_uring instance. Owned by exactly one thread: the thread that created it submits and reaps
/// (SINGLE_ISSUER / DEFER_TASKRUN require it).
public final class IOUring {
    public var ring = io_uring()
    public let features: RingFeatures

    /// Creates a ring, trying the fastest setup flags first and falling back to what the kernel accepts.
    public init(entries: UInt32) throws(RingError) {
        let single = sl_setup_single_issuer(), deferTR = sl_setup_defer_taskrun(), coop = sl_setup_coop_taskrun()
        let attempts: [(UInt32, RingFeatures)] = [
            (single | deferTR, RingFeatures(singleIssuer: true, deferTaskrun: true)),
            (single | coop, RingFeatures(singleIssuer: true, coopTaskrun: true)),
            (coop, RingFeatures(coopTaskrun: true)),
            (0, RingFeatures()),
        ]
        var lastError: Int32 = 0
        for (flags, feats) in attempts {
            var params = io_uring_params()
            params.flags = flags | sl_setup_submit_all()
            let rc = io_uring_queue_init_params(entries, &ring, &params)
            if rc == 0 {
                features = feats
                return
            }
            lastError = -rc
            if lastError != EINVAL { break }
        }
        throw RingError("io_uring_queue_init", errno: lastError)
    }

    deinit { io_uring_queue_exit(&ring) }

    /// A submission entry, submitting first when the queue is full.
    @inline(__always)
    public func sqe() -> UnsafeMutablePointer<io_uring_sqe> {
        if let s = io_uring_get_sqe(&ring) { return s }
        _ = io_uring_submit(&ring)
        return io_uring_get_sqe(&ring)!
    }

    @discardableResult
    public func submitAndWait(_ count: UInt32) -> Int32 { io_uring_submit_and_wait(&ring, count) }

    /// Calls `body(userData, result, flags)` for every ready completion, then marks them seen.
    @inline(__always)
    public func reap(_ body: (UInt64, Int32, UInt32) -> Void) -> Int {
        var total = 0
        return withUnsafeTemporaryAllocation(of: UnsafeMutablePointer<io_uring_cqe>?.self, capacity: 256) { buf in
            while true {
                let n = io_uring_peek_batch_cqe(&ring, buf.baseAddress, 256)
                if n == 0 { break }
                for i in 0..<Int(n) {
                    let c = buf[i]!
                    body(c.pointee.user_data, c.pointee.res, c.pointee.flags)
                }
                io_uring_cq_advance(&ring, n)
                total += Int(n)
                if n < 256 { break }
            }
            return total
        }
    }
}
