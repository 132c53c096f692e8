import CSluiceLinux
import Glibc

/// A ring of kernel-provided receive buffers (one buffer group). Receives pick a free buffer only when data
/// arrives, so an idle connection holds no buffer memory.
///
/// Besides the `count` buffers the kernel hands out, `reserve` more of the same size (ids `count...`) are handed
/// out by ``takeReserve()`` for bytes the worker produces itself (plaintext decrypted from TLS records), so the
/// code that forwards received bytes treats both alike. ``recycle(_:)`` returns either kind where it came from.
public final class ProvidedBuffers {
    public let group: UInt16
    public let count: UInt16
    public let reserve: UInt16
    private var reserveFree: [UInt16]
    public let size: Int
    private let ringPtr: UnsafeMutablePointer<io_uring_buf_ring>
    private let memory: UnsafeMutableRawPointer
    private let mask: Int32
    private let uring: IOUring  // strong: the ring must outlive its registered buffer group
    /// Buffers handed out by the kernel and not yet recycled.
    public private(set) var inUse = 0

    /// - Parameters:
    ///   - count: number of buffers, a power of two (at most 32768).
    ///   - size: bytes per buffer.
    public init(ring: IOUring, group: UInt16, count: UInt16, size: Int, reserve: UInt16 = 0) throws(RingError) {
        precondition(count.nonzeroBitCount == 1 && count <= 32768 && reserve < 32768)
        var err: Int32 = 0
        guard let br = sl_setup_buf_ring(&ring.ring, UInt32(count), Int32(group), &err) else {
            throw RingError("io_uring_register_buf_ring", errno: -err)
        }
        let mem = mmap(nil, (Int(count) + Int(reserve)) * size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0)
        guard let mem, mem != MAP_FAILED else {
            sl_free_buf_ring(&ring.ring, br, UInt32(count), Int32(group))
            throw RingError("mmap buffers", errno: errno)
        }
        self.uring = ring
        self.ringPtr = br
        self.memory = mem
        self.group = group
        self.count = count
        self.reserve = reserve
        reserveFree = (0..<reserve).reversed().map { count + $0 }
        self.size = size
        self.mask = io_uring_buf_ring_mask(UInt32(count))
        for id in 0..<count {
            io_uring_buf_ring_add(br, memory + Int(id) * size, UInt32(size), id, mask, Int32(id))
        }
        io_uring_buf_ring_advance(br, Int32(count))
    }

    deinit {
        sl_free_buf_ring(&uring.ring, ringPtr, UInt32(count), Int32(group))
        munmap(memory, (Int(count) + Int(reserve)) * size)
    }

    /// Returns the buffers' pages to the kernel (they read back as zeros on next use). Call only while no buffer
    /// is handed out, e.g. when a worker has gone idle, so an idle agent does not keep its peak memory.
    public func releaseMemory() {
        precondition(inUse == 0)
        madvise(memory, (Int(count) + Int(reserve)) * size, MADV_DONTNEED)
    }

    @inline(__always)
    public func pointer(_ id: UInt16) -> UnsafeMutableRawPointer { memory + Int(id) * size }

    /// Records that the kernel handed out buffer `id` (from a completion's flags).
    @inline(__always) public func taken() { inUse += 1 }

    /// A buffer of the reserve, or nil when all are in use.
    @inline(__always)
    public func takeReserve() -> UInt16? {
        guard let id = reserveFree.popLast() else { return nil }
        inUse += 1
        return id
    }

    /// Gives buffer `id` back to the kernel (or to the reserve it came from).
    @inline(__always)
    public func recycle(_ id: UInt16) {
        if id >= count {
            reserveFree.append(id)
            inUse -= 1
            return
        }
        io_uring_buf_ring_add(ringPtr, memory + Int(id) * size, UInt32(size), id, mask, 0)
        io_uring_buf_ring_advance(ringPtr, 1)
        inUse -= 1
    }
}
