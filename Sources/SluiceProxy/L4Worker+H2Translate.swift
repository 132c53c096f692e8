import CSluiceLinux
import Glibc
import SluiceHTTP
import SluiceModel
import SluiceRing

/// An HTTP/2 client stream sent to an HTTP/1.1 upstream (a port declared `HTTP`): the request head and body are
/// written as HTTP/1.1 on a pooled keep-alive connection, the response read back and sent as HTTP/2 frames.
final class H1Leg {
    let slot: UInt32
    let generation: UInt32
    let stream: Int32
    let cluster: WorkerCluster
    var endpoint = -1
    var up: UInt32 = 0
    /// The request head, kept so a request without body can be sent again on a fresh connection when a pooled one
    /// turns out closed.
    let head: [UInt8]
    let hasBody: Bool
    /// Body sent with chunked framing (the client gave no content-length).
    let chunked: Bool
    /// Bytes waiting to be sent, and the copy being sent.
    var pending: [UInt8] = []
    var inflight: UnsafeMutableRawPointer?
    var inflightLength = 0
    var inflightOffset = 0
    /// Body bytes of the client's stream not yet acknowledged to it (acknowledged once sent upstream).
    var unacknowledged = 0
    var bodyInFlight = 0
    var requestEnded = false
    var response = HTTP1ResponseReader()
    var responseDone = false
    var reused = false
    var gotBytes = false
    var receiving = false
    /// The client's stream holds this much response body not yet framed: reading the upstream waits.
    var paused = false
    /// The response body ends when the upstream closes.
    var untilClose = false
    /// The upstream may carry another request after this response.
    var keepAlive = true

    init(slot: UInt32, generation: UInt32, stream: Int32, cluster: WorkerCluster, head: [UInt8], hasBody: Bool,
         chunked: Bool) {
        self.slot = slot
        self.generation = generation
        self.stream = stream
        self.cluster = cluster
        self.head = head
        self.hasBody = hasBody
        self.chunked = chunked
    }
}

extension L4Worker {
    /// Response body queued on a client stream beyond which the upstream is not read until it drains.
    static let legPauseBytes = 256 << 10

    /// Starts forwarding stream `s` (already routed to `wc`) as HTTP/1.1. `fields` is the request as the upstream
    /// should see it (pseudo-fields included).
    func startLeg(_ slot: UInt32, _ h2: H2Downstream, _ s: H2Stream, _ wc: WorkerCluster, _ fields: H2Fields,
                  endStream: Bool, hash: UInt64) -> Bool {
        var method = "GET", path = "/", authority = ""
        var lines = ""
        var hasLength = false
        for k in 0..<fields.count {
            if fields.nameIs(k, ":method") { method = fields.value(k); continue }
            if fields.nameIs(k, ":path") { path = fields.value(k); continue }
            if fields.nameIs(k, ":authority") { authority = fields.value(k); continue }
            if fields.nameIs(k, ":scheme") || fields.nameIs(k, "te") { continue }
            if fields.nameIs(k, "content-length") { hasLength = true }
            lines += fields.name(k) + ": " + fields.value(k) + "\r\n"
        }
        let chunked = !endStream && !hasLength
        var head = "\(method) \(path) HTTP/1.1\r\nhost: \(authority)\r\n" + lines
        if chunked { head += "transfer-encoding: chunked\r\n" }
        head += "\r\n"
        let leg = H1Leg(slot: slot, generation: hconns[Int(slot)].generation, stream: s.id, cluster: wc,
                        head: Array(head.utf8), hasBody: !endStream, chunked: chunked)
        leg.response = HTTP1ResponseReader(limits: httpLimits)
        leg.response.answeringHEAD = method == "HEAD"
        leg.requestEnded = endStream
        leg.pending = leg.head
        guard connectLeg(leg, hash: hash, fresh: false) else { return false }
        s.leg = leg
        return true
    }

    /// Gives the leg a connection: a pooled idle one for its endpoint, or a new connect.
    private func connectLeg(_ leg: H1Leg, hash: UInt64, fresh: Bool) -> Bool {
        let wc = leg.cluster
        guard let e = wc.pick(now: loop.now, clientHash: hash, excluding: -1) else { return false }
        leg.endpoint = e
        if !fresh, let u = takeIdle(wc, endpoint: e, identity: hconns[Int(leg.slot)].sourceIdentity) {
            ups[Int(u)].leg = leg
            leg.up = u
            leg.reused = true
            wc.active[e] += 1
            flushLeg(leg)
            receiveLeg(leg)
            return true
        }
        guard let u = connectUp(wc, endpoint: e, identity: hconns[Int(leg.slot)].sourceIdentity) else { return false }
        wc.runtime.active.add(1)
        ups[Int(u)].leg = leg
        leg.up = u
        leg.reused = false
        return true
    }

    /// Request body from the client's stream.
    func legBody(_ leg: H1Leg, _ bytes: [UInt8]) {
        guard !bytes.isEmpty else { return }
        if leg.chunked { leg.pending += Array((String(bytes.count, radix: 16) + "\r\n").utf8) }
        leg.pending += bytes
        if leg.chunked { leg.pending += [0x0D, 0x0A] }
        leg.unacknowledged += bytes.count
        flushLeg(leg)
    }

    func legEnd(_ leg: H1Leg) {
        guard !leg.requestEnded else { return }
        leg.requestEnded = true
        if leg.chunked { leg.pending += Array("0\r\n\r\n".utf8) }
        flushLeg(leg)
    }

    private func flushLeg(_ leg: H1Leg) {
        guard leg.inflight == nil, !leg.pending.isEmpty, ups[Int(leg.up)].phase == .busy, ups[Int(leg.up)].leg === leg
        else { return }
        let p = malloc(leg.pending.count)!
        leg.pending.withUnsafeBytes { _ = memcpy(p, $0.baseAddress!, leg.pending.count) }
        leg.inflight = p
        leg.inflightLength = leg.pending.count
        leg.inflightOffset = 0
        leg.bodyInFlight = leg.unacknowledged
        leg.pending.removeAll(keepingCapacity: true)
        sendLeg(leg)
    }

    private func sendLeg(_ leg: H1Leg) {
        let s = loop.uring.sqe()
        io_uring_prep_send(s, ups[Int(leg.up)].fd, leg.inflight! + leg.inflightOffset, leg.inflightLength - leg.inflightOffset,
                           Int32(MSG_NOSIGNAL))
        trackUp(s, leg.up, .uSend)
    }

    private func receiveLeg(_ leg: H1Leg) {
        guard !leg.receiving, !leg.responseDone, !leg.paused, ups[Int(leg.up)].phase == .busy else { return }
        trackUp(bufferedReceive(ups[Int(leg.up)].fd), leg.up, .uRecv)
        leg.receiving = true
    }

    /// Completions on a leg's connection.
    func legEvent(_ u: UInt32, _ op: Op, result: Int32, buffer: Int32) {
        guard let leg = ups[Int(u)].leg, ups[Int(u)].phase != .closing else {
            if buffer >= 0 { giveBack(UInt16(buffer)) }
            return
        }
        // The client's connection or stream may be gone: then the leg only winds down.
        let i = Int(leg.slot)
        let h2 = hconns[i].generation == leg.generation && hconns[i].phase == .open ? hconns[i].h2 : nil
        let s = h2?.streams[leg.stream]
        switch op {
        case .uConnect:
            guard result == 0 else {
                shard.add(leg.cluster.runtime.metrics.connectFailures)
                if leg.cluster.outlier?.recordFailure(leg.endpoint, now: loop.now) == true {
                    shard.add(leg.cluster.runtime.metrics.ejections)
                }
                endLeg(leg, reusable: false)
                if let h2, let s { failLegStream(leg.slot, h2, s, flag: .upstreamConnectFailure) }
                return
            }
            ups[Int(u)].phase = .busy
            leg.cluster.active[leg.endpoint] += 1
            shard.add(leg.cluster.runtime.metrics.opened)
            flushLeg(leg)
            receiveLeg(leg)
        case .uSend:
            guard result > 0 else {
                endLeg(leg, reusable: false)
                if let h2, let s { failLegStream(leg.slot, h2, s, flag: .upstreamReset) }
                return
            }
            leg.inflightOffset += Int(result)
            if leg.inflightOffset < leg.inflightLength {
                sendLeg(leg)
                return
            }
            free(leg.inflight)
            leg.inflight = nil
            if let h2, leg.bodyInFlight > 0 {
                h2.session.consume(stream: leg.stream, bytes: leg.bodyInFlight)
                leg.unacknowledged -= leg.bodyInFlight
                leg.bodyInFlight = 0
                flushH2Down(leg.slot)
            }
            flushLeg(leg)
        case .uRecv:
            leg.receiving = false
            if buffer < 0 && result == -ENOBUFS {
                legStalled.append(leg)
                return
            }
            guard buffer >= 0, result > 0 else {
                if buffer >= 0 { giveBack(UInt16(buffer)) }
                let stale = leg.reused && !leg.gotBytes && !leg.hasBody
                endLeg(leg, reusable: false)
                guard let h2, let s else { return }
                if stale {
                    // A pooled connection the upstream had closed: send the request again on a fresh one.
                    leg.pending = leg.head
                    leg.responseDone = false
                    if !connectLeg(leg, hash: 0, fresh: true) { failLegStream(leg.slot, h2, s, flag: .upstreamReset) }
                } else if s.answered && leg.untilClose {
                    leg.responseDone = true
                    h2.session.finish(stream: leg.stream)
                    flushH2Down(leg.slot)
                } else {
                    failLegStream(leg.slot, h2, s, flag: .upstreamReset)
                }
                return
            }
            leg.gotBytes = true
            let id = UInt16(buffer)
            guard let h2, let s else {
                giveBack(id)
                endLeg(leg, reusable: false)
                return
            }
            let all = UnsafeRawBufferPointer(start: buffers.pointer(id), count: Int(result))
            var offset = 0
            var extra = false
            feeding: while offset < all.count {
            let bytes = UnsafeRawBufferPointer(rebasing: all[offset...])
            var events: [HTTP1ResponseReader.Event] = []
            let used = leg.response.feed(bytes) { events.append($0) }
            offset += used
            var interim = false
            for e in events {
                switch e {
                case .head(let h, let headBytes):
                    if h.status < 200 {
                        // 1xx: not passed on; the final head follows on the same connection.
                        interim = true
                        continue
                    }
                    if h.status >= 500 {
                        let retried = retryStream(leg.slot, h2, s, .response(status: h.status, grpcStatus: nil))
                        if retried {
                            giveBack(id)
                            flushH2Down(leg.slot)
                            return
                        }
                    }
                    s.status = h.status
                    s.answered = true
                    var fields = H2Fields()
                    fields.append(":status", String(h.status))
                    headBytes.withUnsafeBytes { b in
                        for (n, v) in h.headers {
                            let name = String(decoding: UnsafeRawBufferPointer(rebasing: b[n]), as: UTF8.self).lowercased()
                            if ["connection", "keep-alive", "proxy-connection", "transfer-encoding", "upgrade"].contains(name) {
                                continue
                            }
                            fields.append(name, String(decoding: UnsafeRawBufferPointer(rebasing: b[v]), as: UTF8.self))
                        }
                    }
                    if let ops = s.responseOps { applyH2(ops, to: &fields) }
                    leg.keepAlive = h.keepAlive
                    leg.untilClose = h.framing == .untilClose
                    h2.session.respond(stream: leg.stream, fields, endStream: h.framing == .none)
                case .body(let r):
                    h2.session.send(stream: leg.stream, UnsafeRawBufferPointer(rebasing: bytes[r]))
                case .end:
                    if interim {
                        leg.response.next()
                    } else {
                        leg.responseDone = true
                    }
                case .error:
                    giveBack(id)
                    endLeg(leg, reusable: false)
                    failLegStream(leg.slot, h2, s, flag: .upstreamProtocolError)
                    return
                }
            }
            if leg.responseDone {
                extra = offset < all.count
                break feeding
            }
            if used == 0 { break }
            }
            giveBack(id)
            if leg.responseDone {
                if !s.answered { break }
                h2.session.finish(stream: leg.stream)
                endLeg(leg, reusable: !extra && leg.requestEnded && leg.keepAlive && leg.inflight == nil
                           && leg.pending.isEmpty)
                flushH2Down(leg.slot)
                return
            }
            flushH2Down(leg.slot)
            leg.paused = h2.session.queuedBytes(stream: leg.stream) > Self.legPauseBytes
            receiveLeg(leg)
        default:
            break
        }
    }

    /// A buffer is free again: the stalled receive goes.
    func receiveLegAgain(_ leg: H1Leg) {
        guard ups[Int(leg.up)].leg === leg else { return }
        receiveLeg(leg)
    }

    /// The client drained some of the stream's response: read the upstream again if it was paused.
    func legDrained(_ leg: H1Leg, _ h2: H2Downstream) {
        guard leg.paused, h2.session.queuedBytes(stream: leg.stream) <= Self.legPauseBytes / 2 else { return }
        leg.paused = false
        receiveLeg(leg)
    }

    /// Detaches the leg from its connection: back to the pool, or closed.
    func endLeg(_ leg: H1Leg, reusable: Bool) {
        let u = leg.up
        guard ups[Int(u)].leg === leg else { return }
        if let p = leg.inflight {
            // A send may still read it: freed with the connection, once its operations are done.
            ups[Int(u)].retained = p
            leg.inflight = nil
        }
        ups[Int(u)].leg = nil
        if ups[Int(u)].phase == .busy { leg.cluster.active[leg.endpoint] -= 1 }
        if reusable && ups[Int(u)].phase == .busy && !leg.receiving && !draining {
            ups[Int(u)].phase = .idle
            ups[Int(u)].requests += 1
            ups[Int(u)].idleSince = loop.now
            leg.cluster.idle[leg.endpoint].append(u)
        } else {
            stopUp(u)
        }
    }

    private func failLegStream(_ slot: UInt32, _ h2: H2Downstream, _ s: H2Stream, flag: ResponseFlag) {
        if retryStream(slot, h2, s, flag == .upstreamConnectFailure ? .connectFailure : .reset) {
            flushH2Down(slot)
            return
        }
        s.flag = flag
        if s.answered {
            h2.session.reset(stream: s.id)
        } else {
            s.answered = true
            s.status = 503
            var fields = H2Fields()
            fields.append(":status", "503")
            h2.session.respond(stream: s.id, fields, endStream: true)
        }
        flushH2Down(slot)
    }
}

/// HTTP/1.1 clients to `HTTP2`/`GRPC` ports: the exchange's request becomes a stream on the shared HTTP/2
/// connection to the endpoint, and the stream's response is written back as HTTP/1.1 (chunked unless the upstream
/// gave a length).
extension L4Worker {
    /// Sends the exchange's request as an HTTP/2 stream.
    func dispatchH2(_ slot: UInt32) {
        let i = Int(slot)
        guard let ex = hconns[i].ex, let wc = ex.cluster, let head = ex.upHead else { return }
        guard let up = h2Upstream(wc, hash: ex.hash, identity: hconns[i].sourceIdentity) else {
            respondLocally(slot, status: 503, flag: .noHealthyUpstream, body: "no healthy upstream")
            return
        }
        // The head as built for HTTP/1.1 (routing, rewrites, mesh fields applied) becomes the HTTP/2 head.
        let raw = UnsafeRawBufferPointer(start: head, count: ex.upHeadLength)
        guard case .head(let h) = HTTP1Parser.parseRequestHead(raw, limits: HTTP1Limits.lenient) else {
            respondLocally(slot, status: 502, flag: .upstreamProtocolError, body: "request could not be translated")
            return
        }
        var fields = H2Fields()
        fields.append(":method", String(decoding: UnsafeRawBufferPointer(rebasing: raw[h.method]), as: UTF8.self))
        fields.append(":scheme", "http")
        fields.append(":path", String(decoding: UnsafeRawBufferPointer(rebasing: raw[h.target]), as: UTF8.self))
        for (n, v) in h.headers where HTTP1Parser.fieldName(raw, n, is: "host") {
            fields.append(":authority", String(decoding: UnsafeRawBufferPointer(rebasing: raw[v]), as: UTF8.self))
        }
        for (n, v) in h.headers {
            let name = String(decoding: UnsafeRawBufferPointer(rebasing: raw[n]), as: UTF8.self).lowercased()
            if ["host", "connection", "keep-alive", "proxy-connection", "transfer-encoding", "upgrade"].contains(name) { continue }
            let value = String(decoding: UnsafeRawBufferPointer(rebasing: raw[v]), as: UTF8.self)
            if name == "te" && value != "trailers" { continue }
            fields.append(name, value)
        }
        // `te` is hop-by-hop in HTTP/1.1 and was dropped; gRPC servers refuse a stream without `te: trailers`.
        if fields.first("te") == nil && (wc.runtime.config.protocol == .grpc
            || fields.first("content-type")?.hasPrefix("application/grpc") == true) {
            fields.append("te", "trailers")
        }
        let usid = up.session.request(fields, endStream: !ex.hadBody)
        guard usid > 0 else {
            respondLocally(slot, status: 503, flag: .upstreamReset, body: "upstream refused the stream")
            return
        }
        ex.h2up = up
        ex.h2stream = usid
        if h.framing == .chunked { ex.chunkDecoder = BodyDecoder(.chunked) }
        up.streams[usid] = (slot, hconns[i].generation, -1)
        // Body bytes read before the stream existed.
        let queued = ex.upQueue
        ex.upQueue.removeAll(keepingCapacity: true)
        for seg in queued {
            let base = seg.buffer >= 0 ? UnsafeRawPointer(buffers.pointer(UInt16(seg.buffer))) : UnsafeRawPointer(seg.owned!)
            sendH2Body(ex, UnsafeRawBufferPointer(start: base + Int(seg.offset), count: Int(seg.length)))
            finishQueued(slot, seg, downSide: false)
        }
        if ex.requestDone && ex.hadBody { up.session.finish(stream: usid) }
        flushH2Up(up)
        releaseInputIfDone(slot)
        receiveDown(slot)
    }

    /// Request body bytes (as received, chunked framing included) onto the exchange's HTTP/2 stream.
    func sendH2Body(_ ex: Exchange, _ bytes: UnsafeRawBufferPointer) {
        guard let up = ex.h2up, ex.h2stream > 0 else { return }
        if var d = ex.chunkDecoder {
            _ = try? d.feed(bytes) { r in up.session.send(stream: ex.h2stream, UnsafeRawBufferPointer(rebasing: bytes[r])) }
            ex.chunkDecoder = d
        } else {
            up.session.send(stream: ex.h2stream, bytes)
        }
    }

    /// An event of an HTTP/2 upstream stream that serves an HTTP/1.1 client's exchange.
    func h1ExchangeEvent(_ slot: UInt32, _ up: H2Upstream, _ e: H2Session.Event) {
        let i = Int(slot)
        guard let ex = hconns[i].ex, ex.h2up === up, !ex.local else { return }
        let closing = !ex.clientKeepAlive || draining
        switch e {
        case .headers(let sid, let fields, let endStream):
            guard let status = Int(fields.first(":status") ?? ""), status >= 200 else { return }
            if status >= 500 || endStream,
                retryOverH2(slot, .response(status: status, grpcStatus: endStream ? fields.first("grpc-status").flatMap { Int($0) } : nil))
            {
                return
            }
            ex.status = status
            ex.responseStarted = true
            var head = "HTTP/1.1 \(status) \(HTTPResponses.reason(status))\r\n"
            var hasLength = false
            for k in 0..<fields.count {
                let name = fields.name(k)
                if name.hasPrefix(":") { continue }
                if name == "content-length" { hasLength = true }
                head += name + ": " + fields.value(k) + "\r\n"
            }
            if let ops = ex.route?.route.headers?.response {
                var pairs = head.split(separator: "\r\n").dropFirst().compactMap { line -> (String, String)? in
                    guard let c = line.firstIndex(of: ":") else { return nil }
                    return (String(line[..<c]), String(line[line.index(after: c)...]).trimmingSpaces)
                }
                ops.apply(to: &pairs)
                head = "HTTP/1.1 \(status) \(HTTPResponses.reason(status))\r\n" + pairs.map { "\($0.0): \($0.1)\r\n" }.joined()
            }
            if endStream && !hasLength && !ex.isHEAD { head += "content-length: 0\r\n" }
            if !endStream && !hasLength && !ex.isHEAD {
                head += "transfer-encoding: chunked\r\n"
                ex.chunkedResponse = true
            }
            if closing {
                head += "connection: close\r\n"
                hconns[i].closeAfterFlush = true
            }
            head += "\r\n"
            hconns[i].outQueue.append(.copy(Array(head.utf8)))
            if endStream { h1StreamDone(slot, ex, sid) }
        case .data(let sid, let bytes):
            guard !bytes.isEmpty else { return }
            var out: [UInt8] = []
            if ex.chunkedResponse { out += Array((String(bytes.count, radix: 16) + "\r\n").utf8) }
            out += bytes
            if ex.chunkedResponse { out += [0x0D, 0x0A] }
            hconns[i].outQueue.append(.copy(out))
            up.session.consume(stream: sid, bytes: bytes.count)
        case .trailers(let sid, let fields):
            if ex.chunkedResponse {
                var t = "0\r\n"
                for k in 0..<fields.count { t += fields.name(k) + ": " + fields.value(k) + "\r\n" }
                hconns[i].outQueue.append(.copy(Array((t + "\r\n").utf8)))
                ex.chunkedResponse = false
            }
            h1StreamDone(slot, ex, sid)
        case .end(let sid):
            if ex.chunkedResponse {
                hconns[i].outQueue.append(.copy(Array("0\r\n\r\n".utf8)))
                ex.chunkedResponse = false
            }
            h1StreamDone(slot, ex, sid)
        case .closed(let sid, let error):
            up.streams[sid] = nil
            guard error != 0, !ex.responseDone else { return }
            if !ex.responseStarted && retryOverH2(slot, error == UInt32(NGHTTP2_REFUSED_STREAM.rawValue) ? .refusedStream : .reset) {
                return
            }
            ex.h2up = nil
            if ex.responseStarted {
                ex.flag = .upstreamReset
                teardownHTTP(slot, reset: true)
            } else {
                respondLocally(slot, status: 503, flag: .upstreamReset, body: "upstream reset before headers")
            }
        case .drained, .goaway:
            break
        }
        flushDown(slot)
        if hconns[i].ex?.responseDone == true { finishIfSent(slot) }
    }

    /// An HTTP/1.1 client's request on an HTTP/2 upstream failed before its response started: whether the
    /// route's retry policy sends it again (head and kept body on a new stream, after the back-off).
    func retryOverH2(_ slot: UInt32, _ outcome: AttemptOutcome) -> Bool {
        guard let ex = hconns[Int(slot)].ex, let wc = ex.cluster, !ex.responseStarted else { return false }
        let policy = ex.route?.retry ?? .istioDefault
        let decision = policy.decide(outcome, retriesDone: ex.retries,
                                     bodyReplayable: ex.requestDone && (ex.replay != nil || !ex.hadBody),
                                     budgetAllows: retryBudgetAllows(wc), random: rng.next())
        guard case .retry(let after) = decision else { return false }
        releaseH2Stream(ex)
        retry(slot, after: after)
        return true
    }

    private func h1StreamDone(_ slot: UInt32, _ ex: Exchange, _ sid: Int32) {
        ex.responseDone = true
    }

    /// The exchange is over: its HTTP/2 stream is released (reset if still open).
    func releaseH2Stream(_ ex: Exchange) {
        guard let up = ex.h2up, ex.h2stream > 0 else { return }
        if up.streams.removeValue(forKey: ex.h2stream) != nil && !ex.responseDone {
            up.session.reset(stream: ex.h2stream)
        }
        ex.h2up = nil
        ex.h2stream = -1
        touchH2(up)
        while let u = h2Dirty.popLast() { flushH2Up(u) }
    }
}
