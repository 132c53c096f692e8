import CSluiceLinux
import Glibc
import SluiceHTTP
import SluiceModel
import SluiceRing

/// One HTTP/2 client connection: its session and its streams.
final class H2Downstream {
    let session = H2Session(server: true)
    var streams = StreamMap<H2Stream>()
}

/// One request stream of a client connection, bound to a stream of an upstream HTTP/2 connection.
final class H2Stream {
    let id: Int32
    let start: UInt64
    var cluster: WorkerCluster?
    var up: H2Upstream?
    var upStream: Int32 = -1
    var status = 0
    var flag = ResponseFlag.none
    var answered = false
    var counted = false
    /// The route's response header operations.
    var responseOps: HeaderOperations.Ops?
    /// Set when the upstream speaks HTTP/1.1: the translated request.
    var leg: H1Leg?
    /// The route's request timeout and the current attempt's per-try timeout, as monotonic deadlines (0: none).
    var deadline: UInt64 = 0
    var tryDeadline: UInt64 = 0
    // For retries: the route, the request as sent upstream, a copy of its body (nil once it outgrew the replay
    // limit or when the route does not retry), and how far the client got.
    var route: RouteRuntime?
    var request = H2Fields()
    var body: [UInt8]? = []
    var requestEnded = false
    var endStreamAtHead = false
    var retries = 0
    var hash: UInt64 = 0
    /// A fault delay or a retry's back-off: the stream goes upstream at this monotonic time (0: not waiting).
    var wakeAt: UInt64 = 0
    /// Body bytes that arrived while a fault delay held the stream (sent, and acknowledged, once it goes).
    var held: [UInt8] = []
    /// The route mirrors this stream: an HTTP/1.1 copy goes to this cluster once the request has ended.
    var shadowCluster: WorkerCluster?
    init(id: Int32, start: UInt64) {
        self.id = id
        self.start = start
    }
}

/// One HTTP/2 connection to an endpoint, shared by every client stream this worker routes there (multiplexed).
final class H2Upstream {
    let session = H2Session(server: false)
    let slot: UInt32
    let cluster: WorkerCluster
    let key: H2PoolKey
    var endpoint: Int { key.endpoint }
    /// Upstream stream id -> the client connection slot, its generation, and the client's stream id.
    var streams = StreamMap<(slot: UInt32, generation: UInt32, stream: Int32)>()
    var queue: [Segment] = []
    var sending = false
    var connected = false
    /// GOAWAY received or the connection failed: no new streams.
    var closing = false
    init(slot: UInt32, cluster: WorkerCluster, key: H2PoolKey) {
        self.slot = slot
        self.cluster = cluster
        self.key = key
    }
}

/// HTTP/2 upstream connections are shared per endpoint, and per identity when the endpoint is tunnelled.
struct H2PoolKey: Hashable {
    let endpoint: Int
    let identity: String?
}

/// HTTP/2 and gRPC: a client connection whose first bytes are the HTTP/2 preface (h2c with prior knowledge) is
/// served by an ``H2Session``; each request stream is routed like an HTTP/1.1 request and forwarded on a shared
/// HTTP/2 connection to the chosen endpoint (gRPC needs HTTP/2 end to end for its trailers). Flow control links
/// the two sessions: a stream's received DATA is acknowledged on one side only once the other side sent it.
extension L4Worker {
    static let h2Preface: [UInt8] = Array("PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".utf8)

    /// Whether the held bytes of a fresh connection start the HTTP/2 preface.
    func startsHTTP2(_ bytes: UnsafeRawBufferPointer) -> Bool {
        let n = min(bytes.count, Self.h2Preface.count)
        guard n >= 4 else { return false }
        for k in 0..<n where bytes[k] != Self.h2Preface[k] { return false }
        return true
    }

    /// Feeds the held receive buffer to the connection's HTTP/2 session.
    func pumpH2(_ slot: UInt32) {
        let i = Int(slot)
        guard let h2 = hconns[i].h2, hconns[i].inBuffer >= 0 else { return }
        let id = UInt16(hconns[i].inBuffer)
        let bytes = UnsafeRawBufferPointer(start: buffers.pointer(id) + Int(hconns[i].inPos),
                                           count: Int(hconns[i].inLength - hconns[i].inPos))
        let ok = h2.session.receive(bytes)
        hconns[i].inPos = hconns[i].inLength
        hconns[i].inBuffer = -1
        giveBack(id)
        handleDownstreamEvents(slot, h2)
        if !ok { hconns[i].closeAfterFlush = true }
        flushH2Down(slot)
        if !ok { return }
        receiveDown(slot)
    }

    private func handleDownstreamEvents(_ slot: UInt32, _ h2: H2Downstream) {
        // Upstream sessions written to are flushed once, after all events: their frames leave in one send.
        defer {
            while let up = h2Dirty.popLast() { flushH2Up(up) }
        }
        for e in h2.session.takeEvents() {
            guard hconns[Int(slot)].phase == .open else { return }
            switch e {
            case .headers(let sid, let fields, let endStream):
                beginStream(slot, h2, sid, fields, endStream: endStream)
            case .data(let sid, let bytes):
                if let s = h2.streams[sid], s.wakeAt != 0 && s.retries == 0 {
                    // Held by a fault delay: kept unacknowledged until the stream goes upstream.
                    s.held += bytes
                    continue
                }
                if let s = h2.streams[sid], s.body != nil {
                    if s.body!.count + bytes.count > Self.replayLimit { s.body = nil } else { s.body! += bytes }
                }
                if let leg = h2.streams[sid]?.leg {
                    legBody(leg, bytes)
                    continue
                }
                guard let s = h2.streams[sid], let up = s.up, s.upStream > 0 else {
                    h2.session.consume(stream: sid, bytes: bytes.count)
                    continue
                }
                bytes.withUnsafeBytes { up.session.send(stream: s.upStream, $0) }
                touchH2(up)
            case .end(let sid):
                h2.streams[sid]?.requestEnded = true
                if let s = h2.streams[sid], s.shadowCluster != nil { mirrorStream(s, identity: hconns[Int(slot)].sourceIdentity) }
                if let leg = h2.streams[sid]?.leg { legEnd(leg) }
                if let s = h2.streams[sid], let up = s.up, s.upStream > 0 {
                    up.session.finish(stream: s.upStream)
                    touchH2(up)
                }
            case .trailers(let sid, _):
                if let leg = h2.streams[sid]?.leg { legEnd(leg) }
                // Request trailers are rare (gRPC sends none); the body simply ends.
                if let s = h2.streams[sid], let up = s.up, s.upStream > 0 {
                    up.session.finish(stream: s.upStream)
                    touchH2(up)
                }
            case .drained(let sid, let n):
                if let leg = h2.streams[sid]?.leg { legDrained(leg, h2) }
                if let s = h2.streams[sid], let up = s.up, s.upStream > 0 {
                    up.session.consume(stream: s.upStream, bytes: n)
                    touchH2(up)
                }
            case .closed(let sid, let error):
                guard let s = h2.streams.removeValue(forKey: sid) else { continue }
                if let leg = s.leg { endLeg(leg, reusable: false) }
                if let up = s.up, s.upStream > 0, up.streams[s.upStream] != nil {
                    up.streams[s.upStream] = nil
                    if error != 0 || !s.answered { up.session.reset(stream: s.upStream) }
                    touchH2(up)
                }
                if error != 0 && s.flag == .none { s.flag = .downstreamReset }
                endStream(slot, s)
            case .goaway:
                break
            }
        }
    }

    /// A request head on stream `sid`: route it and open the upstream stream (or answer it here).
    private func beginStream(_ slot: UInt32, _ h2: H2Downstream, _ sid: Int32, _ fields: H2Fields,
                             endStream: Bool) {
        let i = Int(slot)
        let s = H2Stream(id: sid, start: loop.now)
        h2.streams[sid] = s
        let table = hconns[i].table!
        var method = "", path = "/", authority = "", scheme = "http"
        var headers: [String: String] = [:]
        for k in 0..<fields.count {
            if fields.nameIs(k, ":method") { method = fields.value(k) }
            else if fields.nameIs(k, ":path") { path = fields.value(k) }
            else if fields.nameIs(k, ":authority") { authority = fields.value(k) }
            else if fields.nameIs(k, ":scheme") { scheme = fields.value(k) }
            else if table.needsHeaders || (authority.isEmpty && fields.nameIs(k, "host")) { headers[fields.name(k)] = fields.value(k) }
        }
        if authority.isEmpty { authority = headers["host"] ?? "" }
        var query: [String: String] = [:]
        var bare = path
        if table.router.needsQuery { (bare, query) = HTTPRequestFacts.split(target: path) } else if let q = path.firstIndex(of: "?") {
            bare = String(path[..<q])
        }
        let facts = HTTPRequestFacts(method: method, path: bare, query: query, authority: authority, scheme: scheme,
                                     headers: headers, port: hconns[i].port, sourceLabels: hconns[i].sourceLabels,
                                     gateway: table.gateway, principal: hconns[i].principal)
        let f: Forwarding
        switch route(facts, table: table, captured: hconns[i].captured, client: hconns[i].client) {
        case .answer(_, let status, let flag, let headers, let body):
            s.flag = flag
            answerStream(slot, h2, s, status: status, headers: headers, body: body)
            return
        case .forward(let forwarding):
            f = forwarding
        }
        let route = f.route, condition = f.condition, hash = f.hash
        s.cluster = f.cluster
        s.counted = f.counted
        s.responseOps = route?.route.headers?.response
        if let t = route?.timeoutNanos, t > 0 {
            s.deadline = loop.now &+ t
            scheduleStream(slot, stream: sid, at: s.deadline)
        }
        // The request as the upstream sees it: the client's fields minus connection-specific ones, plus the mesh's.
        var out = H2Fields()
        out.bytes.reserveCapacity(fields.bytes.count + 96)
        var forwarded = false, hasID = false, hasAuthority = false
        let rewrite = route?.route.rewrite
        for k in 0..<fields.count {
            if fields.nameIs(k, "connection") || fields.nameIs(k, "keep-alive") || fields.nameIs(k, "proxy-connection")
                || fields.nameIs(k, "transfer-encoding") || fields.nameIs(k, "upgrade") || fields.nameIs(k, "host")
                || (fields.nameIs(k, "te") && fields.value(k) != "trailers") {
                continue
            }
            if fields.nameIs(k, ":authority") {
                hasAuthority = true
                if let a = rewrite?.authority { out.append(":authority", a); continue }
            } else if fields.nameIs(k, ":path"), let uri = rewrite?.uri {
                let rest = route?.matchedPrefix(condition).map { bare.hasPrefix($0) ? String(bare.dropFirst($0.count)) : "" } ?? ""
                out.append(":path", uri + rest + path.dropFirst(bare.count))
                continue
            } else if fields.nameIs(k, "x-forwarded-for") {
                forwarded = true
                out.append("x-forwarded-for", fields.value(k) + ", " + hconns[i].client)
                continue
            } else if fields.nameIs(k, "x-request-id") {
                hasID = true
            }
            out.append(from: fields, k)
        }
        if !hasAuthority && !authority.isEmpty { out.append(":authority", rewrite?.authority ?? authority) }
        if !forwarded { out.append("x-forwarded-for", hconns[i].client) }
        out.append("x-forwarded-proto", scheme)
        if !hasID { out.append("x-request-id", requestID()) }
        if let ops = route?.route.headers?.request { applyH2(ops, to: &out) }
        s.route = route
        s.request = out
        s.endStreamAtHead = endStream
        s.requestEnded = endStream
        s.hash = hash
        if (route?.retry.attempts ?? RetryPolicy.istioDefault.attempts) == 0 { s.body = nil }
        if let route, let mirror = route.mirror, let mc = clusters[ObjectIdentifier(mirror)],
            rng.next(below: 10_000) < route.mirrorShare
        {
            s.shadowCluster = mc
            if s.body == nil { s.body = [] }
            if endStream { mirrorStream(s, identity: hconns[Int(slot)].sourceIdentity) }
        }
        if f.delay > 0 {
            // Fault delay: the stream waits here; its body, if any, is held until it goes.
            s.flag = .delayInjected
            s.wakeAt = loop.now &+ f.delay
            scheduleStream(slot, stream: sid, at: s.wakeAt)
            return
        }
        if !dispatchStream(slot, h2, s, replay: false) {
            s.flag = .noHealthyUpstream
            answerStream(slot, h2, s, status: 503, body: "no healthy upstream")
        }
    }

    /// Sends the stream's request upstream: HTTP/2 for `HTTP2`/`GRPC` ports, translated to HTTP/1.1 for `HTTP`
    /// ports (Istio's port protocols). A replay (retry) sends the kept body in full.
    private func dispatchStream(_ slot: UInt32, _ h2: H2Downstream, _ s: H2Stream, replay: Bool) -> Bool {
        guard let wc = s.cluster else { return false }
        if let t = s.route?.perTryTimeoutNanos, t > 0 {
            s.tryDeadline = loop.now &+ t
            scheduleStream(slot, stream: s.id, at: s.tryDeadline)
        }
        let body = replay ? (s.body ?? []) : []
        let endNow = replay ? body.isEmpty : s.endStreamAtHead
        guard wc.runtime.config.protocol == .http2 || wc.runtime.config.protocol == .grpc else {
            guard startLeg(slot, h2, s, wc, s.request, endStream: endNow, hash: s.hash), let leg = s.leg else { return false }
            if replay && !body.isEmpty {
                legBody(leg, body)
                legEnd(leg)
            }
            return true
        }
        guard let up = h2Upstream(wc, hash: s.hash, identity: hconns[Int(slot)].sourceIdentity) else { return false }
        let usid = up.session.request(s.request, endStream: endNow)
        guard usid > 0 else { return false }
        s.up = up
        s.upStream = usid
        up.streams[usid] = (slot, hconns[Int(slot)].generation, s.id)
        if replay && !body.isEmpty {
            body.withUnsafeBytes { up.session.send(stream: usid, $0) }
            up.session.finish(stream: usid)
        }
        touchH2(up)
        return true
    }

    /// Whether the route's retry policy sends the stream again after `outcome`; if so, it goes after the policy's
    /// jittered back-off (``wakeStream(_:_:_:)``).
    func retryStream(_ slot: UInt32, _ h2: H2Downstream, _ s: H2Stream, _ outcome: AttemptOutcome) -> Bool {
        guard let wc = s.cluster, !s.answered else { return false }
        let policy = s.route?.retry ?? .istioDefault
        let decision = policy.decide(outcome, retriesDone: s.retries, bodyReplayable: s.requestEnded && s.body != nil,
                                     budgetAllows: retryBudgetAllows(wc), random: rng.next())
        guard case .retry(let after) = decision else { return false }
        s.retries += 1
        shard.add(wc.runtime.metrics.retries)
        if let leg = s.leg {
            endLeg(leg, reusable: false)
            s.leg = nil
        }
        if let up = s.up, s.upStream > 0 {
            if up.streams[s.upStream] != nil {
                up.streams[s.upStream] = nil
                up.session.reset(stream: s.upStream)
                touchH2(up)
            }
        }
        s.up = nil
        s.upStream = -1
        s.tryDeadline = 0
        guard after > .zero else { return dispatchStream(slot, h2, s, replay: true) }
        s.wakeAt = loop.now &+ after.clampedNanoseconds
        scheduleStream(slot, stream: s.id, at: s.wakeAt)
        return true
    }

    /// A stream's fault delay or retry back-off is over: it goes upstream (a retry with its whole kept body; a
    /// delayed first attempt with the body held meanwhile, the rest following as it comes).
    private func wakeStream(_ slot: UInt32, _ h2: H2Downstream, _ s: H2Stream) {
        s.wakeAt = 0
        var sent: Bool
        if s.retries > 0 || (s.requestEnded && s.body != nil) {
            if s.retries == 0 { s.body = s.held }
            sent = dispatchStream(slot, h2, s, replay: true)
            if s.retries == 0 && sent { h2.session.consume(stream: s.id, bytes: s.held.count) }
        } else {
            s.endStreamAtHead = s.requestEnded && s.held.isEmpty
            sent = dispatchStream(slot, h2, s, replay: false)
            if sent && !s.held.isEmpty {
                if let leg = s.leg {
                    legBody(leg, s.held)
                    if s.requestEnded { legEnd(leg) }
                } else if let up = s.up {
                    s.held.withUnsafeBytes { up.session.send(stream: s.upStream, $0) }
                    if s.requestEnded { up.session.finish(stream: s.upStream) }
                    touchH2(up)
                }
            }
        }
        s.held = []
        if !sent {
            s.flag = .noHealthyUpstream
            answerStream(slot, h2, s, status: 503, body: "no healthy upstream")
        }
        flushH2Down(slot)
    }

    /// Sends the stream's mirror copy as HTTP/1.1 (Istio's `-shadow` authority), with the body if it was kept.
    private func mirrorStream(_ s: H2Stream, identity: String?) {
        guard let wc = s.shadowCluster else { return }
        s.shadowCluster = nil
        guard let body = s.retries == 0 && s.wakeAt != 0 ? s.held : s.body else {
            shard.add(wc.runtime.metrics.mirrorSkipped)
            return
        }
        sendShadow(wc, hash: s.hash, head: Self.shadowHead(s.request, bodyLength: body.count), body: body, identity: identity)
    }

    /// An HTTP/1.1 request head for an HTTP/2 request's fields, with the `-shadow` authority of a mirror copy.
    static func shadowHead(_ fields: H2Fields, bodyLength: Int) -> [UInt8] {
        let method = fields.first(":method") ?? "GET", path = fields.first(":path") ?? "/"
        var head = "\(method) \(path) HTTP/1.1\r\nhost: \(fields.first(":authority") ?? "")-shadow\r\n"
        for (name, value) in fields.pairs where !name.hasPrefix(":") && name != "te" && name != "content-length" {
            head += "\(name): \(value)\r\n"
        }
        head += "content-length: \(bodyLength)\r\nconnection: close\r\n\r\n"
        return Array(head.utf8)
    }

    func applyH2(_ ops: HeaderOperations.Ops, to fields: inout H2Fields) {
        let all = fields.pairs
        var plain = all.filter { !$0.name.hasPrefix(":") }.map { ($0.name, $0.value) }
        ops.apply(to: &plain)
        fields = H2Fields(all.filter { $0.name.hasPrefix(":") }.map { ($0.name, $0.value) } + plain)
    }

    /// Answers a stream from the proxy (no upstream).
    private func answerStream(_ slot: UInt32, _ h2: H2Downstream, _ s: H2Stream, status: Int,
                              headers: [(String, String)] = [], body: String = "") {
        s.status = status
        s.answered = true
        var fields = H2Fields()
        fields.append(":status", String(status))
        for (n, v) in headers { fields.append(n, v) }
        if !body.isEmpty { fields.append("content-type", "text/plain") }
        h2.session.respond(stream: s.id, fields, endStream: body.isEmpty)
        if !body.isEmpty {
            Array(body.utf8).withUnsafeBytes { h2.session.send(stream: s.id, $0) }
            h2.session.finish(stream: s.id)
        }
    }

    /// A stream's request timeout fired: 504 if nothing was answered yet, else a reset; the upstream half is
    /// cancelled either way.
    func h2StreamTimedOut(_ slot: UInt32, stream low: Int32, deadline: UInt64) {
        guard let h2 = hconns[Int(slot)].h2, let s = h2.streams.first(where: {
            ($0.value.deadline == deadline || $0.value.tryDeadline == deadline || $0.value.wakeAt == deadline)
                && $0.key & 0xFF_FFFF == low
        })?.value else { return }
        if s.wakeAt == deadline && s.deadline != deadline {
            if !s.answered { wakeStream(slot, h2, s) }
            return
        }
        if s.tryDeadline == deadline && s.deadline != deadline {
            // The attempt's own timeout: retried per the route's policy (a new attempt gets a new deadline).
            s.tryDeadline = 0
            if s.answered { return }
            if retryStream(slot, h2, s, .perTryTimeout) {
                flushH2Down(slot)
                return
            }
        }
        s.flag = .upstreamRequestTimeout
        if let leg = s.leg { endLeg(leg, reusable: false) }
        if let up = s.up, s.upStream > 0, up.streams[s.upStream] != nil {
            up.streams[s.upStream] = nil
            up.session.reset(stream: s.upStream)
            flushH2Up(up)
        }
        if s.answered {
            h2.session.reset(stream: s.id)
        } else {
            answerStream(slot, h2, s, status: 504, body: "upstream request timeout")
        }
        flushH2Down(slot)
    }

    /// Counts a finished stream.
    private func endStream(_ slot: UInt32, _ s: H2Stream) {
        let m = requestMetrics.slots(registry, cluster: s.cluster?.runtime, code: s.status, flag: s.flag,
                                     gateway: hconns[Int(slot)].table?.gateway)
        shard.add(m.total)
        shard.observe(m.duration, Double(loop.now &- s.start) / 1e6)
        if s.counted { s.cluster?.runtime.activeRequests.add(-1) }
    }

    // MARK: - upstream connections

    /// The worker's HTTP/2 connection to an endpoint of `wc` (one per endpoint, shared — per identity when
    /// tunnelled), connecting if needed.
    func h2Upstream(_ wc: WorkerCluster, hash: UInt64, identity: String?) -> H2Upstream? {
        guard let e = wc.pick(now: loop.now, clientHash: hash, excluding: -1) else { return nil }
        let key = H2PoolKey(endpoint: e, identity: wc.runtime.tunnelTargets[e] == nil ? nil : identity)
        if let existing = wc.h2[key], !existing.closing { return existing }
        guard let u = connectUp(wc, endpoint: e, identity: identity) else { return nil }
        wc.runtime.active.add(1)
        let up = H2Upstream(slot: u, cluster: wc, key: key)
        ups[Int(u)].h2 = up
        wc.h2[key] = up
        return up
    }

    /// Completions on an HTTP/2 upstream connection.
    func h2UpstreamEvent(_ u: UInt32, _ op: Op, result: Int32, buffer: Int32) {
        let i = Int(u)
        guard let up = ups[i].h2 else { return }
        guard ups[i].phase != .closing else {
            if buffer >= 0 { giveBack(UInt16(buffer)) }
            return
        }
        switch op {
        case .uConnect:
            guard result == 0 else {
                shard.add(up.cluster.runtime.metrics.connectFailures)
                if up.cluster.outlier?.recordFailure(up.endpoint, now: loop.now) == true {
                    shard.add(up.cluster.runtime.metrics.ejections)
                }
                failH2Upstream(up, flag: .upstreamConnectFailure)
                return
            }
            ups[i].phase = .busy
            up.connected = true
            up.cluster.outlier?.recordSuccess(up.endpoint)
            shard.add(up.cluster.runtime.metrics.opened)
            receiveH2Up(u)
            flushH2Up(up)
        case .uSend:
            up.sending = false
            guard result >= 0 else { failH2Upstream(up, flag: .upstreamReset); return }
            var seg = up.queue[0]
            if result < seg.length {
                seg.offset += result
                seg.length -= result
                up.queue[0] = seg
            } else {
                up.queue.removeFirst()
                free(seg.owned)
            }
            flushH2Up(up)
        case .uRecv:
            guard buffer >= 0, result > 0 else {
                if buffer >= 0 { giveBack(UInt16(buffer)) }
                if result == -ENOBUFS {
                    receiveH2Up(u)  // retried on the next completion; the pool refills as sends finish
                    return
                }
                failH2Upstream(up, flag: .upstreamReset)
                return
            }
            let ok = up.session.receive(UnsafeRawBufferPointer(start: buffers.pointer(UInt16(buffer)), count: Int(result)))
            giveBack(UInt16(buffer))
            handleUpstreamEvents(up)
            if !ok {
                failH2Upstream(up, flag: .upstreamProtocolError)
                return
            }
            flushH2Up(up)
            receiveH2Up(u)
        default:
            break
        }
    }

    private func handleUpstreamEvents(_ up: H2Upstream) {
        var touched: [UInt32] = []
        for e in up.session.takeEvents() {
            let sid: Int32
            switch e {
            case .headers(let s, _, _), .trailers(let s, _), .data(let s, _), .end(let s), .closed(let s, _),
                 .drained(let s, _):
                sid = s
            case .goaway:
                up.closing = true
                if up.cluster.h2[up.key] === up { up.cluster.h2[up.key] = nil }
                continue
            }
            if let (slot, gen, dsid) = up.streams[sid], dsid == -1 {
                // An HTTP/1.1 client's exchange rides this stream.
                if hconns[Int(slot)].generation == gen && hconns[Int(slot)].phase == .open {
                    h1ExchangeEvent(slot, up, e)
                } else if case .data(let s, let b) = e {
                    up.session.consume(stream: s, bytes: b.count)
                }
                continue
            }
            guard let (slot, gen, dsid) = up.streams[sid], hconns[Int(slot)].generation == gen,
                hconns[Int(slot)].phase == .open, let h2 = hconns[Int(slot)].h2, let s = h2.streams[dsid] else {
                if case .data(let s, let b) = e { up.session.consume(stream: s, bytes: b.count) }
                continue
            }
            if !touched.contains(slot) { touched.append(slot) }
            switch e {
            case .headers(_, let fields, let endStream):
                // Interim (1xx) heads are not passed on.
                let status = Int(fields.first(":status") ?? "") ?? 502
                if status < 200 { continue }
                let grpc = endStream ? fields.first("grpc-status").flatMap { Int($0) } : nil
                if status >= 500 || grpc != nil, retryStream(slot, h2, s, .response(status: status, grpcStatus: grpc)) {
                    continue
                }
                s.status = status
                s.answered = true
                if status >= 500 {
                    if up.cluster.outlier?.recordFailure(up.endpoint, now: loop.now,
                                                         gateway: (502...504).contains(status)) == true {
                        shard.add(up.cluster.runtime.metrics.ejections)
                    }
                } else {
                    up.cluster.outlier?.recordSuccess(up.endpoint)
                }
                var out = fields
                if (0..<fields.count).contains(where: {
                    fields.nameIs($0, "connection") || fields.nameIs($0, "keep-alive") || fields.nameIs($0, "transfer-encoding")
                }) {
                    out = H2Fields(fields.pairs.filter { !["connection", "keep-alive", "transfer-encoding"].contains($0.name) }
                        .map { ($0.name, $0.value) })
                }
                if let ops = s.responseOps { applyH2(ops, to: &out) }
                h2.session.respond(stream: dsid, out, endStream: endStream)
            case .data(_, let bytes):
                bytes.withUnsafeBytes { h2.session.send(stream: dsid, $0) }
            case .trailers(_, let fields):
                h2.session.finish(stream: dsid, trailers: fields)
            case .end:
                h2.session.finish(stream: dsid)
            case .drained(_, let n):
                h2.session.consume(stream: dsid, bytes: n)
            case .closed(_, let error):
                up.streams[sid] = nil
                if error != 0 {
                    let refused = error == UInt32(NGHTTP2_REFUSED_STREAM.rawValue)
                    if !s.answered && retryStream(slot, h2, s, refused ? .refusedStream : .reset) { continue }
                    if !s.answered {
                        s.flag = .upstreamReset
                        answerStream(slot, h2, s, status: 503, body: "upstream reset before headers")
                    } else {
                        s.flag = .upstreamReset
                        h2.session.reset(stream: dsid, error: error)
                    }
                }
            case .goaway:
                break
            }
        }
        for slot in touched { flushH2Down(slot) }
    }

    /// The upstream connection is gone: streams without a response get 503, the others are reset.
    private func failH2Upstream(_ up: H2Upstream, flag: ResponseFlag) {
        up.closing = true
        if up.cluster.h2[up.key] === up { up.cluster.h2[up.key] = nil }
        let streams = up.streams
        up.streams.removeAll()
        for (_, (slot, gen, dsid)) in streams {
            if dsid == -1 {
                guard hconns[Int(slot)].generation == gen, hconns[Int(slot)].phase == .open, let ex = hconns[Int(slot)].ex,
                    ex.h2up === up else { continue }
                ex.h2up = nil
                if ex.responseStarted {
                    ex.flag = flag
                    teardownHTTP(slot, reset: true)
                } else {
                    respondLocally(slot, status: 503, flag: flag,
                                   body: "upstream connect error or disconnect/reset before headers")
                }
                continue
            }
            guard hconns[Int(slot)].generation == gen, hconns[Int(slot)].phase == .open, let h2 = hconns[Int(slot)].h2,
                let s = h2.streams[dsid] else { continue }
            if s.up === up {
                s.up = nil
                s.upStream = -1
            }
            if !s.answered && retryStream(slot, h2, s, flag == .upstreamConnectFailure ? .connectFailure : .reset) {
                flushH2Down(slot)
                continue
            }
            s.flag = flag
            if s.answered {
                h2.session.reset(stream: dsid)
            } else {
                answerStream(slot, h2, s, status: 503,
                             body: "upstream connect error or disconnect/reset before headers")
            }
            flushH2Down(slot)
        }
        // A send in flight may still read the first segment: it is freed with the connection.
        for (k, seg) in up.queue.enumerated() where seg.frees {
            if k == 0 && up.sending { ups[Int(up.slot)].retained = seg.owned } else { free(seg.owned) }
        }
        up.queue.removeAll()
        stopUp(up.slot)
    }

    private func receiveH2Up(_ u: UInt32) {
        trackUp(bufferedReceive(ups[Int(u)].fd), u, .uRecv)
    }

    /// Sends what the upstream session has to say, one send at a time.
    func flushH2Up(_ up: H2Upstream) {
        // Sending produces events too (bodies drained into DATA frames, streams closed): act on them until the
        // session is quiet.
        for _ in 0..<16 {
            let out = up.session.takeOutput()
            if !out.isEmpty { Self.appendOwned(&up.queue, out, firstInFlight: up.sending) }
            if up.session.events.isEmpty { break }
            handleUpstreamEvents(up)
        }
        guard up.connected, !up.sending, let seg = up.queue.first, ups[Int(up.slot)].phase == .busy,
            ups[Int(up.slot)].h2 === up else { return }
        let s = loop.uring.sqe()
        io_uring_prep_send(s, ups[Int(up.slot)].fd, seg.owned! + Int(seg.offset), Int(seg.length), Int32(MSG_NOSIGNAL))
        trackUp(s, up.slot, .uSend)
        up.sending = true
    }

    /// Sends what the client session has to say (through the connection's ordinary send queue).
    func flushH2Down(_ slot: UInt32) {
        let i = Int(slot)
        guard let h2 = hconns[i].h2 else { return }
        for _ in 0..<16 {
            let out = h2.session.takeOutput()
            if !out.isEmpty { Self.appendOwned(&hconns[i].outQueue, out, firstInFlight: hconns[i].sending) }
            if h2.session.events.isEmpty || hconns[i].phase != .open { break }
            handleDownstreamEvents(slot, h2)
        }
        // Once nghttp2 neither reads nor writes (GOAWAY after a protocol error went out), the connection is done.
        if hconns[i].phase == .open && h2.session.isFinished { hconns[i].closeAfterFlush = true }
        flushDown(slot)
        closeH2IfDone(slot)
    }

    /// Marks an upstream session for one flush at the end of the current batch of events.
    func touchH2(_ up: H2Upstream) {
        if !h2Dirty.contains(where: { $0 === up }) { h2Dirty.append(up) }
    }

    /// Adds bytes to a send queue, growing its last owned segment when that one is not being sent: frames
    /// produced in a burst leave in one send.
    static func appendOwned(_ queue: inout [Segment], _ bytes: [UInt8], firstInFlight: Bool) {
        if var last = queue.last, last.buffer < 0, last.frees, last.offset == 0, !(queue.count == 1 && firstInFlight) {
            let grown = realloc(last.owned, Int(last.length) + bytes.count)!
            bytes.withUnsafeBytes { _ = memcpy(grown + Int(last.length), $0.baseAddress!, bytes.count) }
            last.owned = grown
            last.length += Int32(bytes.count)
            queue[queue.count - 1] = last
            return
        }
        queue.append(.copy(bytes))
    }

    /// A draining (or failed) HTTP/2 connection closes once its streams are done and everything is sent.
    func closeH2IfDone(_ slot: UInt32) {
        let i = Int(slot)
        guard hconns[i].phase == .open, hconns[i].closeAfterFlush, let h2 = hconns[i].h2 else { return }
        if (h2.streams.isEmpty || h2.session.failed || h2.session.isFinished) && hconns[i].outQueue.isEmpty
            && !hconns[i].sending {
            teardownHTTP(slot, reset: false)
        }
    }

    /// A client HTTP/2 connection closes: its streams' upstream halves are reset.
    func teardownH2(_ slot: UInt32) {
        guard let h2 = hconns[Int(slot)].h2 else { return }
        for (_, s) in h2.streams {
            if let leg = s.leg { endLeg(leg, reusable: false) }
            if let up = s.up, s.upStream > 0, up.streams[s.upStream] != nil {
                up.streams[s.upStream] = nil
                up.session.reset(stream: s.upStream)
                flushH2Up(up)
            }
            if s.flag == .none && !s.answered { s.flag = .downstreamReset }
            endStream(slot, s)
        }
        h2.streams.removeAll()
    }
}
