import CSluiceLinux
import Glibc
import SluiceHTTP
import SluiceRing

/// Protocol detection for captured connections to ports that declare no protocol (Istio's sniffing): the worker
/// peeks at the client's first bytes without consuming them, so whichever pipeline takes the connection reads
/// them itself (the TCP relay, spliced or not, needs no replay).
///
/// A connection waits for readability under a linked timeout (the mesh's `protocolDetectionTimeout`); bytes that
/// are still ambiguous (`GE`) are peeked again after ``detectRetryNanos``. A client that says nothing within the
/// timeout (a server-first protocol) is relayed as TCP.
extension L4Worker {
    static let detectRetryNanos: Int64 = 2_000_000

    func detectProtocol(fd: Int32, listener li: Int, service: CapturedService, port: UInt16, identity: String?) {
        let slot = allocate()
        let i = Int(slot)
        conns[i].down = fd
        conns[i].sourceIdentity = identity
        conns[i].listener = Int32(li)
        conns[i].phase = .detecting
        conns[i].detecting = service
        conns[i].detectingPort = port
        conns[i].connectStart = loop.now
        conns[i].lastActive = loop.now
        openCount += 1
        shard.addSigned(stats.activeConnections, 1)
        awaitFirstBytes(slot)
    }

    private func awaitFirstBytes(_ slot: UInt32) {
        let i = Int(slot)
        let timeout = runtime.snapshot.mesh.protocolDetectionTimeout.clampedNanoseconds
        let left = Int64(timeout) - Int64(loop.now &- conns[i].connectStart)
        detectSpec.pointee = __kernel_timespec(tv_sec: max(0, left) / 1_000_000_000, tv_nsec: max(0, left) % 1_000_000_000)
        let poll = loop.uring.sqe()
        io_uring_prep_poll_add(poll, conns[i].down, UInt32(POLLIN) | sl_pollrdhup())
        poll.pointee.flags |= sl_iosqe_io_link()
        io_uring_sqe_set_data64(poll, UserData(slot: slot, generation: conns[i].generation, op: Op.detectWait.rawValue).raw)
        let t = loop.uring.sqe()
        io_uring_prep_link_timeout(t, detectSpec, 0)
        io_uring_sqe_set_data64(t, UserData(slot: slot, generation: conns[i].generation, op: Op.detectTimeout.rawValue).raw)
        conns[i].pending += 2
    }

    private func peekAgainSoon(_ slot: UInt32) {
        let i = Int(slot)
        let s = loop.uring.sqe()
        io_uring_prep_timeout(s, detectRetrySpec, 0, 0)
        io_uring_sqe_set_data64(s, UserData(slot: slot, generation: conns[i].generation, op: Op.detectWait.rawValue).raw)
        conns[i].pending += 1
    }

    /// Every wait of the connection has completed: peek and decide (or wait again).
    func detected(_ slot: UInt32) {
        let i = Int(slot)
        let fd = conns[i].down
        let n = recv(fd, detectPeek, ProtocolDetector.peekLength, Int32(MSG_PEEK | MSG_DONTWAIT))
        let err = errno
        if n == 0 || (n < 0 && err != EAGAIN && err != EWOULDBLOCK) {
            // Gone before saying anything.
            teardown(slot, reset: n < 0)
            return
        }
        let timedOut = loop.now &- conns[i].connectStart >= runtime.snapshot.mesh.protocolDetectionTimeout.clampedNanoseconds
        let verdict = n > 0 ? ProtocolDetector.classify(UnsafeRawBufferPointer(start: detectPeek, count: n)) : .needMore
        switch verdict {
        case .needMore where !timedOut:
            if n > 0 { peekAgainSoon(slot) } else { awaitFirstBytes(slot) }
            return
        case .http1, .http2:
            shard.add(stats.detectedHTTP)
        case .tcp, .needMore:
            shard.add(timedOut && verdict == .needMore ? stats.detectionTimeouts : stats.detectedTCP)
        }
        // Hand the socket over: the slot goes, the connection stays counted against its listener.
        let service = conns[i].detecting!
        let li = Int(conns[i].listener)
        let port = conns[i].detectingPort
        let identity = conns[i].sourceIdentity
        conns[i].down = -1
        conns[i].phase = .closing
        freeConn(slot)
        let lr = runtime.listeners[listeners[li].runtimeIndex]
        if verdict == .http1 || verdict == .http2, let table = lr.http {
            acceptHTTP(fd: fd, listener: li, table: table, captured: service.cluster, port: port, identity: identity)
        } else {
            relay(fd: fd, listener: li, cluster: service.cluster, identity: identity)
        }
    }
}
