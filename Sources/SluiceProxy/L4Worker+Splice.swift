import CSluiceLinux
import Glibc
import SluiceRing
import SluiceTelemetry

/// One direction of a spliced connection: bytes move source socket -> pipe -> sink socket inside the kernel.
///
/// Hand-written on purpose: this is the byte hot path of plain TCP, and splice(2) moves page references
/// instead of copying through user space (on loopback and for most NICs), which a buffer-based relay cannot.
struct SpliceFlow {
    var pipeRead: Int32 = -1
    var pipeWrite: Int32 = -1
    /// Bytes spliced into the pipe and not yet out of it.
    var inPipe = 0
    var eof = false
    var shutDown = false
}

/// Pipes for splicing, reused across connections. A connection holds a pipe only while its bytes are in it,
/// so idle connections cost no pipe; the pool is emptied when the worker goes idle.
final class PipePool {
    private var free: [(Int32, Int32)] = []
    private let shard: MetricShard
    private let gauge: Int
    static let pipeSize: Int32 = 1 << 20
    static let maxPooled = 64

    init(shard: MetricShard, gauge: Int) {
        self.shard = shard
        self.gauge = gauge
    }

    func acquire(_ f: inout SpliceFlow) -> Bool {
        if f.pipeRead >= 0 { return true }
        if let p = free.popLast() {
            (f.pipeRead, f.pipeWrite) = p
        } else {
            var fds: (Int32, Int32) = (-1, -1)
            // Larger pipes move more per syscall; the kernel caps this at /proc/sys/fs/pipe-max-size.
            let rc = withUnsafeMutableBytes(of: &fds) { sl_pipe($0.baseAddress!.assumingMemoryBound(to: Int32.self), Self.pipeSize) }
            guard rc == 0 else { return false }
            (f.pipeRead, f.pipeWrite) = fds
        }
        shard.addSigned(gauge, 1)
        return true
    }

    /// Gives the pipe back (empty) or closes it (still holding bytes of a connection that is going away).
    func release(_ f: inout SpliceFlow) {
        guard f.pipeRead >= 0 else { return }
        if f.inPipe == 0 && free.count < Self.maxPooled {
            free.append((f.pipeRead, f.pipeWrite))
        } else {
            close(f.pipeRead)
            close(f.pipeWrite)
        }
        f.pipeRead = -1
        f.pipeWrite = -1
        f.inPipe = 0
        shard.addSigned(gauge, -1)
    }

    func drainPool() {
        for (r, w) in free {
            close(r)
            close(w)
        }
        free.removeAll()
    }

    deinit { drainPool() }
}

extension L4Worker {
    @inline(__always)
    func fd(_ slot: UInt32, _ side: TCPRelay.Side) -> Int32 {
        side == .downstream ? conns[Int(slot)].down : conns[Int(slot)].up
    }

    @inline(__always)
    func withFlow<R>(_ slot: UInt32, _ source: TCPRelay.Side, _ body: (inout SpliceFlow) -> R) -> R {
        source == .downstream ? body(&conns[Int(slot)].flows.0) : body(&conns[Int(slot)].flows.1)
    }

    func waitReadable(_ slot: UInt32, _ source: TCPRelay.Side) {
        let s = loop.uring.sqe()
        io_uring_prep_poll_add(s, fd(slot, source), UInt32(POLLIN) | sl_pollrdhup())
        track(s, slot, source == .downstream ? .readableDown : .readableUp)
    }

    func waitWritable(_ slot: UInt32, _ sink: TCPRelay.Side) {
        let s = loop.uring.sqe()
        io_uring_prep_poll_add(s, fd(slot, sink), UInt32(POLLOUT))
        track(s, slot, sink == .downstream ? .writableDown : .writableUp)
    }

    /// The source is readable: move what it has into the pipe, then on to the sink.
    func spliceIn(_ slot: UInt32, _ source: TCPRelay.Side) {
        let src = fd(slot, source)
        conns[Int(slot)].lastActive = loop.now
        let m = conns[Int(slot)].cluster!.runtime.metrics
        let pool = pipes
        var failure: Int32 = 0
        var moved = 0
        withFlow(slot, source) { f in
            guard pool.acquire(&f) else {
                failure = EMFILE
                return
            }
            while true {
                let n = sl_splice_move(src, f.pipeWrite, Int(PipePool.pipeSize))
                if n > 0 {
                    f.inPipe += n
                    moved += n
                    // A short read almost always means the socket is drained; if not, the level-triggered
                    // poll fires again at once. Saves the EAGAIN syscall on every small message.
                    if n < Int(PipePool.pipeSize) { break }
                    continue
                }
                if n == 0 {
                    f.eof = true
                } else if n != -Int(EAGAIN) {
                    failure = Int32(-n)
                }
                break  // EAGAIN: the socket is drained or the pipe is full
            }
        }
        if moved > 0 { shard.add(source == .downstream ? m.receivedBytes : m.sentBytes, UInt64(moved)) }
        if failure != 0 {
            failRelay(slot, reset: failure == ECONNRESET)
            return
        }
        spliceOut(slot, source)
    }

    /// Moves the pipe's bytes of the flow read from `source` to the other side; waits for the sink or the source
    /// as needed, and half-closes once the source has ended and everything is delivered.
    func spliceOut(_ slot: UInt32, _ source: TCPRelay.Side) {
        enum Next { case failed(Int32), waitForSink, readMore, ended(shutDownNow: Bool) }
        let sink = source.other
        let dst = fd(slot, sink)
        let pool = pipes
        let next: Next = withFlow(slot, source) { f in
            while f.inPipe > 0 {
                let n = sl_splice_move(f.pipeRead, dst, f.inPipe)
                if n > 0 {
                    f.inPipe -= n
                } else if n < 0 && n != -Int(EAGAIN) {
                    return .failed(Int32(-n))
                } else {
                    return .waitForSink
                }
            }
            pool.release(&f)
            guard f.eof else { return .readMore }
            defer { f.shutDown = true }
            return .ended(shutDownNow: !f.shutDown)
        }
        switch next {
        case .failed(let e):
            failRelay(slot, reset: e == ECONNRESET || e == EPIPE)
        case .waitForSink:
            // Back-pressure: the sink is full; do not read the source until it drains, but still notice if the
            // source resets meanwhile.
            waitWritable(slot, sink)
            watchErrors(slot, source)
        case .readMore:
            waitReadable(slot, source)
        case .ended(let shutDownNow):
            if shutDownNow { shutdown(dst, Int32(SHUT_WR)) }
            if conns[Int(slot)].flows.0.shutDown && conns[Int(slot)].flows.1.shutDown { teardown(slot, reset: false) }
        }
    }
}
