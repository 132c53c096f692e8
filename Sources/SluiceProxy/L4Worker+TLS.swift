import CSluiceLinux
import Glibc
import SluiceRing
import SluiceTLS

/// TLS on downstream HTTP connections (HTTPS gateway servers), between the socket and the HTTP engine.
///
/// Receiving: ciphertext lands in a provided buffer, is copied into the session and the buffer given back at
/// once; plaintext is decrypted into a buffer of the worker's reserve (same size and ids as provided buffers),
/// which the HTTP/1.1 and HTTP/2 code then forwards exactly as it would a plaintext receive. Plaintext left in
/// the session is delivered the next time the engine asks to receive, from ``drainTLSReady()`` so the engine is
/// never re-entered.
///
/// Sending: the queued segments are encrypted at once (their receive buffers go back right away) and the records
/// leave in one send of worker memory; one such send is in flight per connection, so what is encrypted but not yet
/// sent stays bounded by ``tlsBatch``.
extension L4Worker {
    /// Plaintext encrypted into one send.
    static let tlsBatch = 256 << 10

    func startTLS(_ slot: UInt32, _ names: TLSServerNames) -> Bool {
        do {
            hconns[Int(slot)].tls = try TLSStream(serving: names)
            return true
        } catch {
            shard.add(stats.tlsHandshakeFailures)
            return false
        }
    }

    /// The engine wants bytes: when the session already holds some, they are delivered without a receive.
    func receiveBufferedTLS(_ slot: UInt32) -> Bool {
        let i = Int(slot)
        guard let tls = hconns[i].tls, tls.handshakeDone, tls.hasBufferedInput else { return false }
        hconns[i].receiving = true
        tlsReady.append((slot, hconns[i].generation))
        return true
    }

    /// Delivers plaintext that waited in sessions (called once the current completion is handled).
    func drainTLSReady() {
        var k = 0
        while k < tlsReady.count {
            let w = tlsReady[k]
            k += 1
            let i = Int(w.slot)
            guard hconns[i].generation == w.generation, hconns[i].phase == .open, hconns[i].receiving else { continue }
            hconns[i].receiving = false
            decryptDown(w.slot)
        }
        tlsReady.removeAll(keepingCapacity: true)
    }

    /// Ciphertext arrived in provided buffer `buffer`.
    func receivedTLS(_ slot: UInt32, bytes: Int32, buffer: UInt16) {
        let i = Int(slot)
        let tls = hconns[i].tls!
        tls.receive(UnsafeRawBufferPointer(start: buffers.pointer(buffer), count: Int(bytes)))
        giveBack(buffer)
        guard hconns[i].phase == .open else { return }
        hconns[i].lastActive = loop.now
        if !tls.handshakeDone {
            switch tls.handshake() {
            case .needInput:
                flushDown(slot)
                receiveDown(slot)
                return
            case .failed:
                shard.add(stats.tlsHandshakeFailures)
                teardownHTTP(slot, reset: false)
                return
            case .done:
                shard.add(stats.tlsHandshakes)
                hconns[i].principal = tls.peerURIs.first
                // The next head's clock starts now: the handshake had its own.
                hconns[i].headStarted = loop.now
            }
        }
        decryptDown(slot)
    }

    /// Decrypts what the session holds into a reserve buffer and hands it to the engine.
    private func decryptDown(_ slot: UInt32) {
        let i = Int(slot)
        let tls = hconns[i].tls!
        guard let id = buffers.takeReserve() else {
            httpStalled.append((slot, hconns[i].generation, false))
            return
        }
        buffersDirty = true
        shard.addSigned(stats.buffersInUse, 1)
        let result = tls.read(into: UnsafeMutableRawBufferPointer(start: buffers.pointer(id), count: buffers.size))
        // Reading may have produced records to send (a key update's answer, session tickets).
        if tls.pendingOutput > 0 { flushDown(slot) }
        switch result {
        case .bytes(let n):
            deliverDown(slot, buffer: id, length: Int32(n))
        case .needInput:
            giveBack(id)
            receiveDown(slot)
        case .closed:
            giveBack(id)
            endOfInput(slot, result: 0)
        case .failed:
            giveBack(id)
            endOfInput(slot, result: -EPROTO)
        }
    }

    /// Encrypts the queued segments and sends the records (or only pending handshake records).
    func flushTLSDown(_ slot: UInt32) {
        let i = Int(slot)
        guard hconns[i].phase == .open, !hconns[i].sending, let tls = hconns[i].tls else { return }
        // Marked sending first: finishing a segment may queue more and ask to flush again.
        hconns[i].sending = true
        var encrypted = 0
        while encrypted < Self.tlsBatch, !hconns[i].outQueue.isEmpty, hconns[i].phase == .open {
            let seg = hconns[i].outQueue.removeFirst()
            let base = seg.buffer >= 0 ? buffers.pointer(UInt16(seg.buffer)) : seg.owned!
            tls.write(UnsafeRawBufferPointer(start: base + Int(seg.offset), count: Int(seg.length)))
            encrypted += Int(seg.length)
            finishSegment(slot, seg, downSide: true)
        }
        let n = tls.pendingOutput
        guard n > 0, hconns[i].phase == .open else {
            hconns[i].sending = false
            return
        }
        let out = malloc(n)!
        let taken = tls.takeOutput(into: UnsafeMutableRawBufferPointer(start: out, count: n))
        hconns[i].tlsOut = out
        hconns[i].tlsOutLength = Int32(taken)
        hconns[i].tlsOutSent = 0
        sendTLSRecords(slot)
    }

    private func sendTLSRecords(_ slot: UInt32) {
        let i = Int(slot)
        let s = loop.uring.sqe()
        let sent = Int(hconns[i].tlsOutSent)
        io_uring_prep_send(s, hconns[i].fd, hconns[i].tlsOut! + sent, Int(hconns[i].tlsOutLength) - sent, Int32(MSG_NOSIGNAL))
        trackDown(s, slot, .hSend)
    }

    func sentTLS(_ slot: UInt32, result: Int32) {
        let i = Int(slot)
        guard hconns[i].phase == .open else { return }
        guard result >= 0 else {
            hconns[i].sending = false
            hconns[i].ex?.flag = .downstreamReset
            teardownHTTP(slot, reset: true)
            return
        }
        hconns[i].lastActive = loop.now
        hconns[i].tlsOutSent += result
        if hconns[i].tlsOutSent < hconns[i].tlsOutLength {
            sendTLSRecords(slot)
            return
        }
        free(hconns[i].tlsOut)
        hconns[i].tlsOut = nil
        hconns[i].sending = false
        flushDown(slot)
        finishIfSent(slot)
    }

    /// A TLS handshake that has not finished in the header timeout is cut, as a slow head would be.
    func handshakeTooSlow(_ i: Int, now: UInt64) -> Bool {
        guard let tls = hconns[i].tls, !tls.handshakeDone else { return false }
        return now &- hconns[i].headStarted > headerTimeoutNanos
    }
}
