import CSluiceLinux
import Glibc
import SluiceHTTP
import SluiceModel
import SluiceRing
import SluiceTLS

/// The HTTP/1.1 pipeline on a worker's ring: parse -> route -> fault -> rate limit -> destination -> circuit
/// breaker -> upstream (pooled keep-alive connections) -> retries and timeouts -> response -> metrics.
///
/// Memory per request is bounded: at most one receive buffer per direction is held while its bytes are being
/// forwarded (the side is not read again until they are sent), whatever the body's size. Bodies are forwarded
/// from the receive buffers without copying; only heads are rebuilt, and request bodies up to
/// ``L4Worker/replayLimit`` are kept for retries.
extension L4Worker {
    /// Request bodies up to this size are kept so a retry can send them again (Envoy's retry buffer).
    static let replayLimit = 64 << 10
    /// An idle keep-alive client connection is closed after this long.
    static let keepAliveIdleNanos: UInt64 = 3_600_000_000_000
    /// An idle pooled upstream connection is closed after this long (Istio's default idleTimeout is 1 hour; the
    /// pool is kept shorter so upstreams that close idle connections sooner are rarely met on a stale one).
    static let upstreamIdleNanos: UInt64 = 60_000_000_000

    /// `h2Stream`: an HTTP/2 stream's request timeout; its tag carries the stream id where others carry the
    /// connection's generation (checked against the stream's own deadline when it fires).
    enum TimerKind: UInt64 { case request = 0, perTry = 1, wake = 2, h2Stream = 3 }

    // MARK: - accept

    /// - Parameter identity: a captured client's workload identity (a gateway's is its listener's).
    @discardableResult
    func acceptHTTP(fd: Int32, listener li: Int, table: HTTPRouteTable, captured: ClusterRuntime?, port: UInt16,
                    tls: TLSServerNames? = nil, httpsRedirect: Bool = false, labels: [String: String] = [:],
                    identity: String? = nil) -> UInt32? {
        let slot = allocateHTTP()
        let i = Int(slot)
        if let tls, !startTLS(slot, tls) {
            listeners[li].counter.add(-1)
            close(fd)
            hfree.append(slot)
            return nil
        }
        hconns[i].httpsRedirect = httpsRedirect
        // A gateway's requests come from the gateway workload: `sourceLabels` match its labels (as in Istio).
        hconns[i].sourceLabels = labels
        hconns[i].sourceIdentity = runtime.listeners[listeners[li].runtimeIndex].identity
        Socket.setNoDelay(fd)
        hconns[i].fd = fd
        hconns[i].phase = .open
        hconns[i].listener = Int32(li)
        hconns[i].table = table
        hconns[i].captured = captured
        hconns[i].port = port
        hconns[i].lastActive = loop.now
        hconns[i].headStarted = loop.now
        hconns[i].reader = HTTP1RequestReader(limits: httpLimits)
        hconns[i].reader.framedBody = true
        let peer = Socket.peerAddress(fd).description
        hconns[i].client = peer.hasPrefix("[") ? String(peer.dropFirst().prefix { $0 != "]" })
            : String(peer.prefix { $0 != ":" })
        // Captured: the client is a workload of this node, whose labels `sourceLabels` matches select on.
        if captured != nil, let w = runtime.localWorkloads[hconns[i].client] { hconns[i].sourceLabels = w.workload.labels }
        if captured != nil { hconns[i].sourceIdentity = identity }
        openCount += 1
        shard.addSigned(stats.activeConnections, 1)
        receiveDown(slot)
        return slot
    }

    private func allocateHTTP() -> UInt32 {
        if let s = hfree.popLast() { return s }
        hconns.append(HTTPConn())
        return UInt32(hconns.count - 1)
    }

    func allocateUp() -> UInt32 {
        if let s = upFree.popLast() { return s }
        ups.append(UpConn())
        return UInt32(ups.count - 1)
    }

    @inline(__always)
    func trackDown(_ sqe: UnsafeMutablePointer<io_uring_sqe>, _ slot: UInt32, _ op: Op) {
        io_uring_sqe_set_data64(sqe, UserData(slot: slot, generation: hconns[Int(slot)].generation, op: op.rawValue).raw)
        hconns[Int(slot)].pending += 1
    }

    @inline(__always)
    func trackUp(_ sqe: UnsafeMutablePointer<io_uring_sqe>, _ u: UInt32, _ op: Op) {
        io_uring_sqe_set_data64(sqe, UserData(slot: u, generation: ups[Int(u)].generation, op: op.rawValue).raw)
        ups[Int(u)].pending += 1
    }

    // MARK: - completions

    func completeHTTP(_ op: Op, _ ud: UserData, result: Int32, flags: UInt32) {
        // Whatever a completion scheduled (some paths return early) arms the ring's timer.
        defer { armTimer() }
        let buffer: Int32 = flags & sl_cqe_f_buffer() != 0 ? Int32(flags >> sl_cqe_buffer_shift()) : -1
        if buffer >= 0 {
            buffers.taken()
            buffersDirty = true
            shard.addSigned(stats.buffersInUse, 1)
        }
        switch op {
        case .timer:
            timers.fired()
            fireTimers()
        case .hRecv, .hSend:
            let i = Int(ud.slot)
            guard i < hconns.count, hconns[i].generation & 0xFF_FFFF == ud.generation else {
                if buffer >= 0 { giveBack(UInt16(buffer)) }
                return
            }
            hconns[i].pending -= 1
            if op == .hRecv { receivedDown(ud.slot, result: result, buffer: buffer) } else { sentDown(ud.slot, result: result) }
            if hconns[i].phase == .closing && hconns[i].pending == 0 { freeHTTP(ud.slot) }
        default:
            let u = Int(ud.slot)
            guard u < ups.count, ups[u].generation & 0xFF_FFFF == ud.generation else {
                if buffer >= 0 { giveBack(UInt16(buffer)) }
                return
            }
            ups[u].pending -= 1
            if ups[u].leg != nil {
                legEvent(ud.slot, op, result: result, buffer: buffer)
                if ups[u].phase == .closing && ups[u].pending == 0 { freeUp(ud.slot) }
                return
            }
            if ups[u].h2 != nil {
                h2UpstreamEvent(ud.slot, op, result: result, buffer: buffer)
                if ups[u].phase == .closing && ups[u].pending == 0 { freeUp(ud.slot) }
                return
            }
            if ups[u].shadow != nil {
                shadowEvent(ud.slot, op, result: result, buffer: buffer)
                if ups[u].phase == .closing && ups[u].pending == 0 { freeUp(ud.slot) }
                return
            }
            if op == .uSend && ups[u].orphanHeld { orphanSendDone(ud.slot) }
            let owner = owningConn(ud.slot)
            switch op {
            case .uConnect:
                if let owner { upConnected(owner, ud.slot, result: result) }
            case .uSend:
                if let owner { sentUp(owner, result: result) }
            case .uRecv:
                if let owner {
                    receivedUp(owner, result: result, buffer: buffer)
                } else if buffer >= 0 {
                    giveBack(UInt16(buffer))
                }
            default:
                break
            }
            if ups[u].phase == .closing && ups[u].pending == 0 { freeUp(ud.slot) }
        }
    }

    /// The downstream slot whose exchange uses upstream connection `u`, if it is still using it.
    private func owningConn(_ u: UInt32) -> UInt32? {
        let c = ups[Int(u)]
        guard c.phase == .busy || c.phase == .connecting else { return nil }
        let i = Int(c.owner)
        guard hconns[i].generation == c.ownerGeneration, hconns[i].phase == .open, hconns[i].ex?.up == Int32(u) else {
            return nil
        }
        return c.owner
    }

    /// Returns a provided buffer to the kernel and lets a stalled receive go.
    func giveBack(_ id: UInt16) {
        buffers.recycle(id)
        shard.addSigned(stats.buffersInUse, -1)
        if let leg = legStalled.popLast() {
            receiveLegAgain(leg)
            return
        }
        while let w = httpStalled.popLast() {
            let i = Int(w.slot)
            guard hconns[i].generation == w.generation, hconns[i].phase == .open else { continue }
            if w.up {
                if hconns[i].ex != nil { receiveUp(w.slot) }
            } else {
                receiveDown(w.slot)
            }
            break
        }
    }

    // MARK: - downstream reading

    func receiveDown(_ slot: UInt32) {
        let i = Int(slot)
        // An HTTP/2 connection keeps reading while it drains (window updates, streams in flight).
        guard hconns[i].phase == .open, !hconns[i].receiving, hconns[i].inBuffer < 0,
            !hconns[i].closeAfterFlush || hconns[i].h2 != nil else { return }
        if hconns[i].tls != nil && receiveBufferedTLS(slot) { return }
        // Between requests of a keep-alive client nothing is there yet: wait for readiness instead of trying
        // a receive that fails first.
        let s = bufferedReceive(hconns[i].fd, pollFirst: hconns[i].ex == nil && hconns[i].requests > 0)
        trackDown(s, slot, .hRecv)
        hconns[i].receiving = true
    }

    private func receivedDown(_ slot: UInt32, result: Int32, buffer: Int32) {
        let i = Int(slot)
        hconns[i].receiving = false
        guard hconns[i].phase == .open else {
            if buffer >= 0 { giveBack(UInt16(buffer)) }
            return
        }
        if buffer >= 0 {
            guard result > 0 else {
                giveBack(UInt16(buffer))
                return
            }
            if hconns[i].tls != nil {
                receivedTLS(slot, bytes: result, buffer: UInt16(buffer))
            } else {
                deliverDown(slot, buffer: UInt16(buffer), length: result)
            }
            return
        }
        if result == -ENOBUFS {
            httpStalled.append((slot, hconns[i].generation, false))
            return
        }
        endOfInput(slot, result: result)
    }

    /// Bytes from the client (received, or decrypted) in `buffer`, which the connection now holds.
    func deliverDown(_ slot: UInt32, buffer: UInt16, length: Int32) {
        let i = Int(slot)
        if hconns[i].ex == nil && !hconns[i].reader.isInsideHead { hconns[i].headStarted = loop.now }
        hconns[i].lastActive = loop.now
        hconns[i].inBuffer = Int32(buffer)
        hconns[i].inPos = 0
        hconns[i].inLength = length
        pumpDown(slot)
    }

    /// The client went away (FIN or error). A request already read completes only if the client still waits
    /// for it: on a FIN with the request complete, the response is sent, then the connection closed.
    func endOfInput(_ slot: UInt32, result: Int32) {
        let i = Int(slot)
        if result == 0, let ex = hconns[i].ex, ex.requestDone, !ex.tunnel {
            hconns[i].closeAfterFlush = true
            return
        }
        if hconns[i].ex != nil { hconns[i].ex!.flag = .downstreamReset }
        teardownHTTP(slot, reset: result < 0)
    }

    /// Feeds the held receive buffer to the request reader and acts on what it finds.
    private func pumpDown(_ slot: UInt32) {
        let i = Int(slot)
        if hconns[i].h2 != nil {
            pumpH2(slot)
            return
        }
        while hconns[i].phase == .open, hconns[i].inBuffer >= 0, hconns[i].inPos < hconns[i].inLength {
            let id = UInt16(hconns[i].inBuffer)
            let start = Int(hconns[i].inPos)
            if hconns[i].requests == 0 && hconns[i].ex == nil && !hconns[i].reader.isInsideHead
                && startsHTTP2(UnsafeRawBufferPointer(start: buffers.pointer(id) + start, count: Int(hconns[i].inLength) - start))
            {
                // HTTP/2 with prior knowledge (h2c): this connection speaks HTTP/2 from now on.
                hconns[i].h2 = H2Downstream()
                pumpH2(slot)
                return
            }
            if hconns[i].ex?.tunnel == true {
                hconns[i].ex!.upQueue.append(.buffer(id, start..<Int(hconns[i].inLength)))
                hconns[i].inRefs += 1
                hconns[i].inPos = hconns[i].inLength
                break
            }
            let bytes = UnsafeRawBufferPointer(start: buffers.pointer(id) + start, count: Int(hconns[i].inLength) - start)
            var reader = hconns[i].reader
            hconns[i].reader = idleReader
            httpEvents.removeAll(keepingCapacity: true)
            let used = reader.feed(bytes) { httpEvents.append($0) }
            hconns[i].reader = reader
            hconns[i].inPos += Int32(used)
            for e in httpEvents {
                guard hconns[i].phase == .open else { break }
                switch e {
                case .head(let head, let headBytes):
                    begin(slot, head, headBytes)
                case .body(let r):
                    requestBody(slot, id, (r.lowerBound + start)..<(r.upperBound + start))
                case .end:
                    hconns[i].ex?.requestDone = true
                    if let ex = hconns[i].ex, let up = ex.h2up, ex.hadBody {
                        up.session.finish(stream: ex.h2stream)
                        touchH2(up)
                    }
                    if let ex = hconns[i].ex, ex.shadowHead != nil { mirror(ex, identity: hconns[i].sourceIdentity) }
                case .error(let err):
                    respondLocally(slot, status: err.status, flag: .downstreamProtocolError, close: true)
                }
            }
            if used == 0 || used < bytes.count && hconns[i].ex != nil { break }
        }
        releaseInputIfDone(slot)
        while let up = h2Dirty.popLast() { flushH2Up(up) }
        flushUp(slot)
        receiveDown(slot)
        // A local answer waits for the rest of the request body before the next request.
        if hconns[i].ex?.local == true && hconns[i].ex?.requestDone == true { finishIfSent(slot) }
    }

    func releaseInputIfDone(_ slot: UInt32) {
        let i = Int(slot)
        if hconns[i].inBuffer >= 0 && hconns[i].inRefs == 0 && hconns[i].inPos >= hconns[i].inLength {
            let id = UInt16(hconns[i].inBuffer)
            hconns[i].inBuffer = -1
            giveBack(id)
        }
    }

    private func requestBody(_ slot: UInt32, _ id: UInt16, _ r: Range<Int>) {
        let i = Int(slot)
        guard hconns[i].ex != nil, !hconns[i].ex!.local else { return }
        if hconns[i].ex!.replay != nil {
            if hconns[i].ex!.replay!.count + r.count > Self.replayLimit {
                hconns[i].ex!.replay = nil
            } else {
                hconns[i].ex!.replay!.append(contentsOf: UnsafeRawBufferPointer(start: buffers.pointer(id) + r.lowerBound, count: r.count))
            }
        }
        if let ex = hconns[i].ex, let up = ex.h2up {
            sendH2Body(ex, UnsafeRawBufferPointer(start: buffers.pointer(id) + r.lowerBound, count: r.count))
            touchH2(up)
            return
        }
        hconns[i].ex!.upQueue.append(.buffer(id, r))
        hconns[i].inRefs += 1
    }

    // MARK: - one request

    /// A request head arrived: route it, apply the route's stages, and send it upstream (or answer it here).
    private func begin(_ slot: UInt32, _ head: HTTP1RequestHead, _ headBytes: [UInt8]) {
        let i = Int(slot)
        let ex = newExchange(start: hconns[i].headStarted)
        hconns[i].requests += 1
        let facts = headBytes.withUnsafeBytes { raw in requestFacts(slot, head, raw) }
        ex.isHEAD = facts.method == "HEAD"
        ex.clientKeepAlive = head.keepAlive && !draining
        ex.upgrade = head.upgrade
        ex.response = HTTP1ResponseReader(limits: httpLimits)
        ex.response.answeringHEAD = ex.isHEAD
        ex.response.framedBody = true
        hconns[i].ex = ex
        let table = hconns[i].table!
        if hconns[i].httpsRedirect {
            let target = String(decoding: headBytes[head.target], as: UTF8.self)
            respondLocally(slot, status: 301, headers: [("location", "https://\(facts.authority)\(target)")])
            return
        }

        let f: Forwarding
        switch route(facts, table: table, captured: hconns[i].captured, client: hconns[i].client) {
        case .answer(let r, let status, let flag, let headers, let body):
            ex.route = r
            respondLocally(slot, status: status, flag: flag, headers: headers, body: body)
            return
        case .forward(let forwarding):
            f = forwarding
        }
        let route = f.route, destination = f.destination
        ex.route = route
        ex.cluster = f.cluster
        ex.counted = f.counted
        ex.hash = f.hash
        ex.hadBody = head.framing != .none
        if f.delay > 0 {
            ex.wakeAt = loop.now &+ f.delay
            ex.flag = .delayInjected
        }
        if (route?.retry.attempts ?? 0) == 0 { hconns[i].ex!.replay = nil }
        let prefix = route?.matchedPrefix(f.condition)
        let plain = route.map { $0.route.rewrite == nil && $0.route.headers?.request == nil } ?? true
            && destination?.headers?.request == nil
        let fast = plain ? headBytes.withUnsafeBytes { raw in
            UpstreamRequest.fastHead(head, in: raw, clientAddress: hconns[i].client, scheme: facts.scheme,
                                     requestID: (rng.next(), rng.next()))
        } : nil
        if let (p, n) = fast {
            hconns[i].ex!.upHead = p
            hconns[i].ex!.upHeadLength = n
        } else {
            let upHead = headBytes.withUnsafeBytes { raw in
                UpstreamRequest.head(head, in: raw, route: route?.route, destination: destination,
                                     context: .init(clientAddress: hconns[i].client, scheme: facts.scheme,
                                                    requestID: requestID(), matchedPrefix: prefix))
            }
            let p = malloc(upHead.count)!
            upHead.withUnsafeBytes { _ = memcpy(p, $0.baseAddress!, upHead.count) }
            hconns[i].ex!.upHead = p
            hconns[i].ex!.upHeadLength = upHead.count
        }
        if let route, let mirror = route.mirror, let mc = clusters[ObjectIdentifier(mirror)],
            rng.next(below: 10_000) < route.mirrorShare
        {
            // Istio sends the copy with the authority suffixed "-shadow"; its answer is dropped.
            hconns[i].ex!.shadowCluster = mc
            hconns[i].ex!.shadowHead = headBytes.withUnsafeBytes { raw in
                UpstreamRequest.head(head, in: raw, route: route.route, destination: destination,
                                     context: .init(clientAddress: hconns[i].client, scheme: facts.scheme,
                                                    requestID: requestID(), matchedPrefix: prefix),
                                     replacing: [("host", facts.authority + "-shadow"), ("connection", "close")])
            }
            if hconns[i].ex!.replay == nil { hconns[i].ex!.replay = [] }
        }
        if let t = route?.timeoutNanos, t > 0 {
            hconns[i].ex!.deadline = loop.now &+ t
            schedule(slot, .request, at: hconns[i].ex!.deadline)
        }
        if hconns[i].ex!.wakeAt > 0 {
            schedule(slot, .wake, at: hconns[i].ex!.wakeAt)
        } else {
            dispatch(slot)
        }
    }

    /// What routing looks at, decoded from the head once (headers and query only when some route matches on
    /// them).
    private func requestFacts(_ slot: UInt32, _ head: HTTP1RequestHead, _ raw: UnsafeRawBufferPointer) -> HTTPRequestFacts {
        let i = Int(slot)
        let table = hconns[i].table!
        func text(_ r: Range<Int>) -> String { String(decoding: UnsafeRawBufferPointer(rebasing: raw[r]), as: UTF8.self) }
        var authority = ""
        var headers: [String: String] = [:]
        for (n, v) in head.headers {
            if n.count == 4 && HTTP1Parser.fieldName(raw, n, is: "host") { authority = text(v) }
            if table.needsHeaders { headers[text(n).lowercased()] = text(v) }
        }
        let target = text(head.target)
        var path = target, query: [String: String] = [:]
        if table.router.needsQuery {
            (path, query) = HTTPRequestFacts.split(target: target)
        } else if let q = target.firstIndex(of: "?") {
            path = String(target[..<q])
        }
        return HTTPRequestFacts(method: text(head.method), path: path, query: query, authority: authority,
                                scheme: hconns[i].tls == nil ? "http" : "https", headers: headers, port: hconns[i].port,
                                sourceLabels: hconns[i].sourceLabels, gateway: table.gateway, principal: hconns[i].principal)
    }

    static func hashKey(_ key: LoadBalancerSettings.HashKey, facts: HTTPRequestFacts, client: String) -> UInt64 {
        var h = Hasher()
        switch key {
        case .header(let name): h.combine(facts.headers[name.lowercased()] ?? "")
        case .cookie(let name): h.combine(Self.cookie(name, in: facts.headers["cookie"] ?? ""))
        case .queryParameter(let name): h.combine(facts.query[name] ?? "")
        case .sourceIP: h.combine(client)
        }
        return UInt64(bitPattern: Int64(h.finalize()))
    }

    static func cookie(_ name: String, in header: String) -> String {
        for part in header.split(separator: ";") {
            let kv = part.split(separator: "=", maxSplits: 1)
            if kv.count == 2 && kv[0].trimmingSpaces == name { return String(kv[1]) }
        }
        return ""
    }

    /// Takes a token from this worker's share of `limit` for the request's key; nil when admitted, else the
    /// seconds until the bucket refills.
    func takeToken(_ limit: RateLimitRuntime, facts: HTTPRequestFacts, client: String) -> Int? {
        let value: String
        switch limit.local.key {
        case .none: value = ""
        case .header(let h): value = facts.headers[h] ?? ""
        case .sourceIP: value = client
        // Identity arrives with mutual TLS (issue 6); until then every caller shares the plaintext bucket.
        case .sourcePrincipal: value = ""
        }
        let key = RateLimitKey(id: limit.id, value: value)
        var bucket = rateBuckets[key] ?? TokenBucket.share(of: limit.local.tokenBucket, worker: index, workers: workerCount,
                                                           now: loop.now)
        defer { rateBuckets[key] = bucket }
        return bucket.take(now: loop.now) ? nil : bucket.retryAfterSeconds(now: loop.now)
    }

    static func grpcCode(_ s: String) -> String {
        let names = ["OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "NOT_FOUND", "ALREADY_EXISTS",
                     "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION", "ABORTED", "OUT_OF_RANGE",
                     "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS", "UNAUTHENTICATED"]
        if Int(s) != nil { return s }
        return names.firstIndex(of: s.uppercased()).map(String.init) ?? "2"
    }

    func requestID() -> String {
        let a = rng.next(), b = rng.next()
        let hex = String(a, radix: 16) + String(b, radix: 16)
        return String(repeating: "0", count: max(0, 32 - hex.count)) + hex
    }

    private func overflow(_ slot: UInt32) {
        guard let wc = hconns[Int(slot)].ex?.cluster,
            case .answer(_, let status, let flag, let headers, let body) = overflowAnswer(wc, route: nil) else { return }
        respondLocally(slot, status: status, flag: flag, headers: headers, body: body)
    }

    // MARK: - upstream

    /// Picks an endpoint and an upstream connection for the exchange: a pooled idle one, or a new connect.
    func dispatch(_ slot: UInt32) {
        let i = Int(slot)
        guard let ex = hconns[i].ex, let wc = ex.cluster else { return }
        // Istio's port protocols: HTTP2 and GRPC ports speak HTTP/2 upstream.
        if wc.runtime.config.protocol == .http2 || wc.runtime.config.protocol == .grpc {
            dispatchH2(slot)
            return
        }
        // A retry prefers another endpoint, but goes back to the same one when it is the only one available.
        guard let e = wc.pick(now: loop.now, clientHash: ex.hash, excluding: Int(ex.lastEndpoint))
            ?? (ex.lastEndpoint >= 0 ? wc.pick(now: loop.now, clientHash: ex.hash, excluding: -1) : nil) else {
            respondLocally(slot, status: 503, flag: .noHealthyUpstream, body: "no healthy upstream")
            return
        }
        hconns[i].ex!.lastEndpoint = Int32(e)
        if let u = takeIdle(wc, endpoint: e, identity: hconns[i].sourceIdentity) {
            ups[Int(u)].owner = slot
            ups[Int(u)].ownerGeneration = hconns[i].generation
            hconns[i].ex!.up = Int32(u)
            hconns[i].ex!.reused = true
            startAttempt(slot)
            return
        }
        // Circuit breaker: connections to the cluster over all workers. At the limit the request waits for a
        // connection (Envoy's pending requests), up to `http1MaxPendingRequests` over all workers.
        let before = wc.runtime.active.add(1)
        if let max = wc.runtime.config.maxConnections, before >= Int64(max) {
            wc.runtime.active.add(-1)
            if !enqueuePending(slot, wc) { overflow(slot) }
            return
        }
        guard let u = connectUp(wc, endpoint: e, identity: hconns[i].sourceIdentity) else {
            wc.runtime.active.add(-1)
            attemptFailed(slot, .connectFailure)
            return
        }
        ups[Int(u)].owner = slot
        ups[Int(u)].ownerGeneration = hconns[i].generation
        hconns[i].ex!.up = Int32(u)
        hconns[i].ex!.reused = false
    }

    /// Opens a connection to endpoint `e` of `wc` in a new upstream slot: the connect is linked to the cluster's
    /// connect timeout and completes as `.uConnect` on the slot. Nil when no socket could be made. The caller
    /// counts it in the cluster's connections and says who owns the slot.
    ///
    /// An endpoint on another node is reached through an HBONE tunnel presenting `identity` (the requests'
    /// source workload); without one, nothing is sent.
    func connectUp(_ wc: WorkerCluster, endpoint e: Int, identity: String?) -> UInt32? {
        if let target = wc.runtime.tunnelTargets[e] { return connectUpThroughTunnel(wc, endpoint: e, target, identity: identity) }
        let addr = wc.runtime.addresses + e
        let fd = Socket.stream(family: addr.pointee.family)
        guard fd >= 0 else { return nil }
        Socket.setNoDelay(fd)
        let u = allocateUp()
        ups[Int(u)].fd = fd
        ups[Int(u)].phase = .connecting
        ups[Int(u)].cluster = wc
        ups[Int(u)].endpoint = Int32(e)
        ups[Int(u)].connectStart = loop.now
        let s = loop.uring.sqe()
        addr.withMemoryRebound(to: sockaddr_storage.self, capacity: 1) { p in
            p.withMemoryRebound(to: sockaddr.self, capacity: 1) { sa in io_uring_prep_connect(s, fd, sa, addr.pointee.length) }
        }
        s.pointee.flags |= sl_iosqe_io_link()
        trackUp(s, u, .uConnect)
        let t = loop.uring.sqe()
        io_uring_prep_link_timeout(t, wc.runtime.connectTimeout, 0)
        trackUp(t, u, .uConnectTimeout)
        return u
    }

    /// A pooled idle connection to endpoint `e` of `wc`, now busy; nil when the pool has none.
    func takeIdle(_ wc: WorkerCluster, endpoint e: Int, identity: String?) -> UInt32? {
        // Tunnelled connections present an identity: only requests of that identity reuse them.
        let wanted = wc.runtime.tunnelTargets[e] == nil ? nil : identity
        var k = wc.idle[e].count - 1
        while k >= 0 {
            let u = wc.idle[e][k]
            if ups[Int(u)].phase != .idle {
                wc.idle[e].remove(at: k)
            } else if ups[Int(u)].identity == wanted {
                wc.idle[e].remove(at: k)
                ups[Int(u)].phase = .busy
                return u
            }
            k -= 1
        }
        return nil
    }

    private func upConnected(_ slot: UInt32, _ u: UInt32, result: Int32) {
        let wc = ups[Int(u)].cluster!
        let e = Int(ups[Int(u)].endpoint)
        if result == 0 {
            ups[Int(u)].phase = .busy
            shard.add(wc.runtime.metrics.opened)
            shard.observe(wc.runtime.metrics.connectDuration, Double(loop.now - ups[Int(u)].connectStart) / 1e6)
            startAttempt(slot)
            return
        }
        shard.add(wc.runtime.metrics.connectFailures)
        if wc.outlier?.recordFailure(e, now: loop.now) == true { shard.add(wc.runtime.metrics.ejections) }
        attemptFailed(slot, .connectFailure)
    }

    /// The upstream connection is ready: send the head (then the body already read) and read the response.
    private func startAttempt(_ slot: UInt32) {
        let i = Int(slot)
        guard let ex = hconns[i].ex else { return }
        hconns[i].ex!.upQueue.insert(.borrowed(ex.upHead!, length: ex.upHeadLength), at: 0)
        if let route = ex.route, route.perTryTimeoutNanos > 0 {
            hconns[i].ex!.tryDeadline = loop.now &+ route.perTryTimeoutNanos
            schedule(slot, .perTry, at: hconns[i].ex!.tryDeadline)
        }
        let e = Int(ex.lastEndpoint)
        ex.cluster!.active[e] += 1
        receiveUp(slot)
        flushUp(slot)
    }

    private func flushUp(_ slot: UInt32) {
        let i = Int(slot)
        guard let ex = hconns[i].ex, ex.up >= 0, !ex.upSending, let seg = ex.upQueue.first,
            ups[Int(ex.up)].phase == .busy else { return }
        let u = UInt32(ex.up)
        let s = loop.uring.sqe()
        let base = seg.buffer >= 0 ? buffers.pointer(UInt16(seg.buffer)) : seg.owned!
        io_uring_prep_send(s, ups[Int(u)].fd, base + Int(seg.offset), Int(seg.length), Int32(MSG_NOSIGNAL))
        trackUp(s, u, .uSend)
        hconns[i].ex!.upSending = true
    }

    private func sentUp(_ slot: UInt32, result: Int32) {
        let i = Int(slot)
        hconns[i].ex!.upSending = false
        guard result >= 0 else {
            attemptFailed(slot, .reset)
            return
        }
        var seg = hconns[i].ex!.upQueue[0]
        if result < seg.length {
            seg.offset += result
            seg.length -= result
            hconns[i].ex!.upQueue[0] = seg
        } else {
            hconns[i].ex!.upQueue.removeFirst()
            finishSegment(slot, seg, downSide: false)
        }
        flushUp(slot)
    }

    /// A sent (or dropped) segment no longer needs its memory.
    func finishSegment(_ slot: UInt32, _ seg: Segment, downSide: Bool) {
        let i = Int(slot)
        if seg.buffer >= 0 {
            if downSide {
                hconns[i].ex?.upRefs -= 1
                releaseUpstreamInputIfDone(slot)
            } else {
                hconns[i].inRefs -= 1
                if hconns[i].inRefs == 0 && hconns[i].inPos >= hconns[i].inLength {
                    releaseInputIfDone(slot)
                    receiveDown(slot)
                }
            }
        } else if seg.frees {
            free(seg.owned)
        }
    }

    private func receiveUp(_ slot: UInt32) {
        let i = Int(slot)
        guard let ex = hconns[i].ex, ex.up >= 0, !ex.upReceiving, ex.upBuffer < 0, !ex.responseDone || ex.tunnel,
            ups[Int(ex.up)].phase == .busy else { return }
        let u = UInt32(ex.up)
        // The first receive of an attempt is posted with the request: the response cannot be there yet.
        trackUp(bufferedReceive(ups[Int(u)].fd, pollFirst: !ex.gotBytes), u, .uRecv)
        hconns[i].ex!.upReceiving = true
    }

    private func receivedUp(_ slot: UInt32, result: Int32, buffer: Int32) {
        let i = Int(slot)
        hconns[i].ex!.upReceiving = false
        if buffer >= 0 && result > 0 {
            hconns[i].ex!.upBuffer = buffer
            hconns[i].ex!.upPos = 0
            hconns[i].ex!.upLength = result
            hconns[i].ex!.gotBytes = true
            pumpUp(slot)
            return
        }
        if buffer >= 0 { giveBack(UInt16(buffer)) }
        if result == -ENOBUFS {
            httpStalled.append((slot, hconns[i].generation, true))
            return
        }
        let ex = hconns[i].ex!
        if ex.tunnel {
            // An upgraded connection ends when either side closes.
            hconns[i].ex!.responseDone = true
            hconns[i].ex!.requestDone = true
            hconns[i].closeAfterFlush = true
            finishIfSent(slot)
            return
        }
        if ex.responseStarted {
            if result == 0, ex.responseUntilClose {
                // The body was delimited by the close: so it is for the client.
                hconns[i].ex!.responseDone = true
                hconns[i].ex!.upReusable = false
                hconns[i].closeAfterFlush = true
                finishIfSent(slot)
            } else {
                // Truncated: the client must not mistake what it got for a complete response.
                hconns[i].ex!.flag = .upstreamReset
                teardownHTTP(slot, reset: true)
            }
            return
        }
        attemptFailed(slot, .reset)
    }

    private func pumpUp(_ slot: UInt32) {
        let i = Int(slot)
        while hconns[i].phase == .open, let ex = hconns[i].ex, ex.upBuffer >= 0, ex.upPos < ex.upLength {
            let id = UInt16(ex.upBuffer)
            let start = Int(ex.upPos)
            if ex.tunnel {
                enqueueDown(slot, .buffer(id, start..<Int(ex.upLength)))
                hconns[i].ex!.upPos = ex.upLength
                break
            }
            let bytes = UnsafeRawBufferPointer(start: buffers.pointer(id) + start, count: Int(ex.upLength) - start)
            var reader = ex.response
            // A head that starts with this buffer can be forwarded from it (no copy) when it passes unchanged.
            var headAt: Int? = reader.isInsideHead || ex.interim ? nil : start
            hconns[i].ex!.response = idleResponseReader
            httpResponseEvents.removeAll(keepingCapacity: true)
            let used = reader.feed(bytes) { httpResponseEvents.append($0) }
            hconns[i].ex!.response = reader
            hconns[i].ex!.upPos += Int32(used)
            for e in httpResponseEvents {
                guard hconns[i].phase == .open, hconns[i].ex != nil else { return }
                switch e {
                case .head(let h, let headBytes):
                    if !responseHead(slot, h, headBytes, inBuffer: headAt.map { (id, $0) }) { return }
                    headAt = nil
                case .body(let r):
                    enqueueDown(slot, .buffer(id, (r.lowerBound + start)..<(r.upperBound + start)))
                case .end:
                    if hconns[i].ex!.interim {
                        // A 1xx response: the final one follows on the same connection.
                        hconns[i].ex!.interim = false
                        hconns[i].ex!.response.next()
                    } else {
                        hconns[i].ex!.responseDone = true
                    }
                case .error:
                    if hconns[i].ex!.responseStarted {
                        hconns[i].ex!.flag = .upstreamProtocolError
                        teardownHTTP(slot, reset: true)
                        return
                    }
                    hconns[i].ex!.upReusable = false
                    closeUpstream(slot)
                    respondLocally(slot, status: 502, flag: .upstreamProtocolError, body: "upstream sent an invalid response")
                    return
                }
            }
            guard hconns[i].ex != nil else { return }
            if hconns[i].ex!.tunnel { continue }
            if hconns[i].ex!.responseDone {
                // Bytes after the response: the upstream is out of step; never reuse it.
                if hconns[i].ex!.upPos < hconns[i].ex!.upLength { hconns[i].ex!.upReusable = false }
                hconns[i].ex!.upPos = hconns[i].ex!.upLength
            }
            if used == 0 { break }
        }
        releaseUpstreamInputIfDone(slot)
        flushDown(slot)
        receiveUp(slot)
        // Bytes the client sent after the upgrade request now go through the tunnel.
        if hconns[i].ex?.tunnel == true && hconns[i].inBuffer >= 0 { pumpDown(slot) }
    }

    /// Queues part of the exchange's upstream receive buffer for the client, merged with the previous segment
    /// when they are adjacent (a head and its body leave in one send).
    private func enqueueDown(_ slot: UInt32, _ seg: Segment) {
        let i = Int(slot)
        if var last = hconns[i].outQueue.last, last.buffer == seg.buffer, last.offset + last.length == seg.offset {
            last.length += seg.length
            hconns[i].outQueue[hconns[i].outQueue.count - 1] = last
            return
        }
        hconns[i].outQueue.append(seg)
        hconns[i].ex!.upRefs += 1
    }

    /// Handles a response head. Returns false when the attempt was dropped for a retry.
    /// - Parameter inBuffer: the receive buffer and offset the head starts at, when all of it is there.
    private func responseHead(_ slot: UInt32, _ h: HTTP1ResponseHead, _ headBytes: [UInt8],
                              inBuffer: (UInt16, Int)?) -> Bool {
        let i = Int(slot)
        let ex = hconns[i].ex!
        let wc = ex.cluster!
        let e = Int(ex.lastEndpoint)
        if h.status >= 100 && h.status < 200 && h.status != 101 {
            hconns[i].outQueue.append(Segment.copy(headBytes))
            hconns[i].ex!.interim = true
            return true
        }
        let grpc = Self.grpcStatus(h, headBytes)
        if wc.outlier != nil {
            if h.status >= 500 {
                if wc.outlier!.recordFailure(e, now: loop.now, gateway: (502...504).contains(h.status)) {
                    shard.add(wc.runtime.metrics.ejections)
                }
            } else {
                wc.outlier!.recordSuccess(e)
            }
        }
        let policy = ex.route?.retry ?? .istioDefault
        let decision = policy.decide(.response(status: h.status, grpcStatus: grpc), retriesDone: ex.retries,
                                     bodyReplayable: ex.requestDone && (ex.replay != nil || !ex.hadBody),
                                     budgetAllows: retryBudgetAllows(wc), random: rng.next())
        if case .retry(let after) = decision {
            hconns[i].ex!.upReusable = false
            closeUpstream(slot)
            retry(slot, after: after)
            return false
        }
        hconns[i].ex!.status = h.status
        hconns[i].ex!.responseStarted = true
        hconns[i].ex!.tryDeadline = 0
        hconns[i].ex!.responseUntilClose = h.framing == .untilClose
        if !h.keepAlive { hconns[i].ex!.upReusable = false }
        var ops: [HeaderOperations.Ops] = []
        if let o = ex.route?.route.headers?.response { ops.append(o) }
        let closing = !ex.clientKeepAlive || h.framing == .untilClose || draining
        if closing { hconns[i].closeAfterFlush = true }
        let upgrade = h.status == 101 && ex.upgrade
        if let seg = HTTPResponses.downstreamHead(h, headBytes, ops: ops, close: closing && !upgrade, upgrade: upgrade) {
            hconns[i].outQueue.append(seg)
        } else if let (id, at) = inBuffer {
            enqueueDown(slot, .buffer(id, at..<(at + h.length)))
        } else {
            hconns[i].outQueue.append(.copy(headBytes))
        }
        if upgrade {
            hconns[i].ex!.tunnel = true
            hconns[i].ex!.upReusable = false
            hconns[i].closeAfterFlush = false
            hconns[i].reader = idleReader  // the connection no longer carries HTTP/1.1 requests
        }
        return true
    }

    static func grpcStatus(_ h: HTTP1ResponseHead, _ bytes: [UInt8]) -> Int? {
        bytes.withUnsafeBytes { raw in
            for (n, v) in h.headers where n.count == 11 {
                if String(decoding: UnsafeRawBufferPointer(rebasing: raw[n]), as: UTF8.self).lowercased() == "grpc-status" {
                    return Int(String(decoding: UnsafeRawBufferPointer(rebasing: raw[v]), as: UTF8.self))
                }
            }
            return nil
        }
    }

    func retryBudgetAllows(_ wc: WorkerCluster) -> Bool {
        guard let max = wc.runtime.config.httpPool?.maxRetries else { return true }
        return wc.runtime.activeRetries.current < Int64(max)
    }

    private func releaseUpstreamInputIfDone(_ slot: UInt32) {
        let i = Int(slot)
        guard let ex = hconns[i].ex, ex.upBuffer >= 0, ex.upRefs == 0, ex.upPos >= ex.upLength else { return }
        let id = UInt16(ex.upBuffer)
        ex.upBuffer = -1
        giveBack(id)
        receiveUp(slot)
    }

    /// An attempt failed before a response head: retry (per the route's policy) or answer with the error.
    private func attemptFailed(_ slot: UInt32, _ outcome: AttemptOutcome) {
        let i = Int(slot)
        guard let ex = hconns[i].ex else { return }
        let reusedAndSilent = ex.reused && !ex.gotBytes && outcome == .reset
        hconns[i].ex!.upReusable = false
        closeUpstream(slot)
        // A pooled connection the upstream had closed: try a fresh one, not counted as a retry (Envoy does too).
        if reusedAndSilent && ex.requestDone && (ex.replay != nil || !ex.hadBody) {
            retry(slot, after: .zero, counts: false)
            return
        }
        let policy = ex.route?.retry ?? .istioDefault
        let decision = policy.decide(outcome, retriesDone: ex.retries,
                                     bodyReplayable: ex.requestDone && (ex.replay != nil || !ex.hadBody),
                                     budgetAllows: ex.cluster.map(retryBudgetAllows) ?? false, random: rng.next())
        if case .retry(let after) = decision {
            retry(slot, after: after)
            return
        }
        let retried = ex.retries > 0
        switch outcome {
        case .connectFailure:
            respondLocally(slot, status: 503, flag: retried ? .upstreamRetryLimitExceeded : .upstreamConnectFailure,
                           body: "upstream connect error or disconnect/reset before headers. reset reason: connection failure")
        case .perTryTimeout:
            respondLocally(slot, status: 504, flag: .upstreamRequestTimeout, body: "upstream request timeout")
        default:
            respondLocally(slot, status: 503, flag: retried ? .upstreamRetryLimitExceeded : .upstreamReset,
                           body: "upstream connect error or disconnect/reset before headers. reset reason: connection termination")
        }
    }

    /// Sends the request again after `after`: the head and the kept body, on another connection.
    func retry(_ slot: UInt32, after: Duration, counts: Bool = true) {
        let i = Int(slot)
        guard let ex = hconns[i].ex else { return }
        dropUpQueue(slot)
        if let body = ex.replay, !body.isEmpty { ex.upQueue.append(Segment.copy(body)) }
        if counts {
            ex.retries += 1
            ex.retriesCounted += 1
            ex.cluster!.runtime.activeRetries.add(1)
            shard.add(ex.cluster!.runtime.metrics.retries)
        }
        ex.response = HTTP1ResponseReader(limits: httpLimits)
        ex.response.answeringHEAD = ex.isHEAD
        ex.response.framedBody = true
        ex.gotBytes = false
        ex.interim = false
        ex.tryDeadline = 0
        hconns[i].ex = ex
        let wait = after.clampedNanoseconds
        if wait == 0 {
            dispatch(slot)
        } else {
            hconns[i].ex!.wakeAt = loop.now &+ wait
            schedule(slot, .wake, at: hconns[i].ex!.wakeAt)
        }
    }

    /// Drops what was queued for the upstream (the attempt is over). Input the queue held is released and the
    /// client read again, unless a send of it is still in flight on the closed connection (see ``orphan``).
    func dropUpQueue(_ slot: UInt32) {
        let i = Int(slot)
        guard let ex = hconns[i].ex else { return }
        for seg in ex.upQueue { finishQueued(slot, seg, downSide: false) }
        ex.upQueue.removeAll(keepingCapacity: true)
        releaseInputIfDone(slot)
        receiveDown(slot)
    }

    /// Drops a queued segment without sending it.
    func finishQueued(_ slot: UInt32, _ seg: Segment, downSide: Bool) {
        let i = Int(slot)
        if seg.buffer >= 0 {
            if downSide { hconns[i].ex?.upRefs -= 1 } else { hconns[i].inRefs -= 1 }
        } else if seg.frees {
            free(seg.owned)
        }
    }

    /// Releases the exchange's upstream connection: back to the pool when it can carry another request.
    private func closeUpstream(_ slot: UInt32) {
        let i = Int(slot)
        guard let ex = hconns[i].ex, ex.up >= 0 else { return }
        let u = UInt32(ex.up)
        hconns[i].ex!.up = -1
        if ex.upSending, let seg = ex.upQueue.first {
            // The send in flight may still read its bytes after the close: they stay alive until it completes.
            ex.upQueue.removeFirst()
            if seg.buffer >= 0 {
                ups[Int(u)].orphanSlot = slot
                ups[Int(u)].orphanGeneration = hconns[i].generation
                ups[Int(u)].orphanHeld = true
            } else if seg.frees {
                ups[Int(u)].retained = seg.owned
            } else if let head = ex.upHead, seg.owned == head {
                let copy = malloc(ex.upHeadLength)!
                memcpy(copy, head, ex.upHeadLength)
                ex.upHead = copy
                ups[Int(u)].retained = head
            }
        }
        hconns[i].ex!.upSending = false
        hconns[i].ex!.upReceiving = false
        if ex.upBuffer >= 0 && ex.upRefs == 0 {
            let id = UInt16(ex.upBuffer)
            ex.upBuffer = -1
            giveBack(id)
        }
        let wc = ups[Int(u)].cluster!
        if ups[Int(u)].phase == .busy { wc.active[Int(ups[Int(u)].endpoint)] -= 1 }
        if !wc.pending.isEmpty { pendingWake.append(wc) }
        let reusable = ex.upReusable && ups[Int(u)].phase == .busy && ex.requestDone && ex.upQueue.isEmpty
            && ex.responseDone && !draining
            && (wc.runtime.config.httpPool?.maxRequestsPerConnection.map { ups[Int(u)].requests + 1 < $0 } ?? true)
            && !neededElsewhere(wc)
        if reusable {
            ups[Int(u)].phase = .idle
            ups[Int(u)].requests += 1
            ups[Int(u)].idleSince = loop.now
            wc.idle[Int(ups[Int(u)].endpoint)].append(u)
            return
        }
        stopUp(u)
    }

    func stopUp(_ u: UInt32) {
        let c = ups[Int(u)]
        guard c.phase != .closing && c.phase != .free else { return }
        if c.phase == .busy || c.phase == .idle { shard.add(c.cluster!.runtime.metrics.closed) }
        ups[Int(u)].phase = .closing
        c.cluster!.runtime.active.add(-1)
        if !c.cluster!.pending.isEmpty { pendingWake.append(c.cluster!) }
        stop(c.fd, reset: false, cancel: c.pending > 0)
        if c.pending == 0 { freeUp(u) }
    }

    /// The send a closed upstream still had in flight is over: the client's input it read can be released.
    private func orphanSendDone(_ u: UInt32) {
        let i = Int(u)
        ups[i].orphanHeld = false
        let slot = ups[i].orphanSlot
        if ups[i].orphanBuffer >= 0 {
            // The client connection is gone; its buffer waited for this send.
            giveBack(UInt16(ups[i].orphanBuffer))
            ups[i].orphanBuffer = -1
            return
        }
        guard Int(slot) < hconns.count, hconns[Int(slot)].generation == ups[i].orphanGeneration,
            hconns[Int(slot)].phase != .free else { return }
        hconns[Int(slot)].inRefs -= 1
        if hconns[Int(slot)].phase == .open {
            releaseInputIfDone(slot)
            receiveDown(slot)
        }
    }

    // MARK: - mirroring

    /// Sends the exchange's mirrored copy (head and the kept body) on a connection of its own.
    private func mirror(_ ex: Exchange, identity: String?) {
        guard let head = ex.shadowHead, let wc = ex.shadowCluster else { return }
        ex.shadowHead = nil
        // A body too large to keep cannot be copied: the request is not mirrored (counted).
        guard let body = ex.replay, ex.requestDone else {
            shard.add(wc.runtime.metrics.mirrorSkipped)
            return
        }
        sendShadow(wc, hash: ex.hash, head: head, body: body, identity: identity)
    }

    /// Sends a mirror copy on a connection of its own to an endpoint of `wc`; its answer is read and dropped.
    func sendShadow(_ wc: WorkerCluster, hash: UInt64, head: [UInt8], body: [UInt8], identity: String?) {
        guard let e = wc.pick(now: loop.now, clientHash: hash, excluding: -1),
            let u = connectUp(wc, endpoint: e, identity: identity) else {
            return
        }
        wc.runtime.active.add(1)
        let n = head.count + body.count
        let p = malloc(max(1, n))!
        head.withUnsafeBytes { _ = memcpy(p, $0.baseAddress!, head.count) }
        body.withUnsafeBytes { if let b = $0.baseAddress { _ = memcpy(p + head.count, b, body.count) } }
        ups[Int(u)].shadow = p
        ups[Int(u)].shadowLength = n
    }

    /// A mirror connection's completions: connect, send everything, read and drop until the upstream closes.
    private func shadowEvent(_ u: UInt32, _ op: Op, result: Int32, buffer: Int32) {
        let i = Int(u)
        if buffer >= 0 { giveBack(UInt16(buffer)) }
        guard ups[i].phase != .closing else { return }
        switch op {
        case .uConnect:
            guard result == 0 else { stopUp(u); return }
            ups[i].phase = .busy
            shard.add(ups[i].cluster!.runtime.metrics.mirrored)
            let s = loop.uring.sqe()
            io_uring_prep_send(s, ups[i].fd, ups[i].shadow!, ups[i].shadowLength, Int32(MSG_NOSIGNAL))
            trackUp(s, u, .uSend)
        case .uSend:
            guard result > 0 else { stopUp(u); return }
            ups[i].shadow! += Int(result)
            ups[i].shadowLength -= Int(result)
            ups[i].shadowSent += Int(result)
            if ups[i].shadowLength > 0 {
                let s = loop.uring.sqe()
                io_uring_prep_send(s, ups[i].fd, ups[i].shadow!, ups[i].shadowLength, Int32(MSG_NOSIGNAL))
                trackUp(s, u, .uSend)
            } else {
                trackUp(bufferedReceive(ups[i].fd), u, .uRecv)
            }
        case .uRecv:
            guard result > 0 else { stopUp(u); return }
            trackUp(bufferedReceive(ups[i].fd), u, .uRecv)
        default:
            break
        }
    }

    func freeUp(_ u: UInt32) {
        let i = Int(u)
        if let p = ups[i].shadow { free(p - ups[i].shadowSent) }
        if let p = ups[i].retained { free(p) }
        if ups[i].orphanBuffer >= 0 { giveBack(UInt16(ups[i].orphanBuffer)) }
        if ups[i].fd >= 0 { close(ups[i].fd) }
        let gen = (ups[i].generation + 1) & 0xFF_FFFF
        ups[i] = UpConn()
        ups[i].generation = gen
        upFree.append(u)
    }

    // MARK: - downstream writing

    /// Answers the current request from the proxy (creating the exchange if the head never parsed).
    func respondLocally(_ slot: UInt32, status: Int, flag: ResponseFlag = .none, headers: [(String, String)] = [],
                        body: String? = nil, close: Bool = false) {
        let i = Int(slot)
        if hconns[i].ex == nil { hconns[i].ex = newExchange(start: hconns[i].headStarted) }
        if hconns[i].ex!.responseStarted {
            // Part of an upstream response is already out: a second response cannot follow it.
            if flag != .none { hconns[i].ex!.flag = flag }
            teardownHTTP(slot, reset: true)
            return
        }
        hconns[i].ex!.upReusable = false
        closeUpstream(slot)
        releaseH2Stream(hconns[i].ex!)
        dropUpQueue(slot)
        hconns[i].ex!.local = true
        hconns[i].ex!.status = status
        if flag != .none { hconns[i].ex!.flag = flag }
        hconns[i].ex!.responseStarted = true
        hconns[i].ex!.responseDone = true
        let closing = close || !hconns[i].ex!.clientKeepAlive || draining
        if closing { hconns[i].closeAfterFlush = true }
        if close { hconns[i].ex!.requestDone = true }
        var extra = headers
        if hconns[i].ex!.upHead == nil { extra.append(("x-request-id", requestID())) }
        hconns[i].outQueue.append(.copy(HTTPResponses.local(status: status, headers: extra, body: body, close: closing,
                                                            isHEAD: hconns[i].ex!.isHEAD)))
        flushDown(slot)
    }

    func flushDown(_ slot: UInt32) {
        let i = Int(slot)
        if hconns[i].tls != nil {
            flushTLSDown(slot)
            return
        }
        guard hconns[i].phase == .open, !hconns[i].sending, let seg = hconns[i].outQueue.first else { return }
        let s = loop.uring.sqe()
        let base = seg.buffer >= 0 ? buffers.pointer(UInt16(seg.buffer)) : seg.owned!
        io_uring_prep_send(s, hconns[i].fd, base + Int(seg.offset), Int(seg.length), Int32(MSG_NOSIGNAL))
        trackDown(s, slot, .hSend)
        hconns[i].sending = true
    }

    private func sentDown(_ slot: UInt32, result: Int32) {
        let i = Int(slot)
        if hconns[i].tls != nil {
            sentTLS(slot, result: result)
            return
        }
        hconns[i].sending = false
        guard hconns[i].phase == .open else { return }
        guard result >= 0 else {
            hconns[i].ex?.flag = .downstreamReset
            teardownHTTP(slot, reset: true)
            return
        }
        hconns[i].lastActive = loop.now
        var seg = hconns[i].outQueue[0]
        if result < seg.length {
            seg.offset += result
            seg.length -= result
            hconns[i].outQueue[0] = seg
        } else {
            hconns[i].outQueue.removeFirst()
            finishSegment(slot, seg, downSide: true)
        }
        flushDown(slot)
        finishIfSent(slot)
    }

    /// Once the response is out and the request read: count it, and take the next one.
    func finishIfSent(_ slot: UInt32) {
        let i = Int(slot)
        guard hconns[i].phase == .open, !hconns[i].sending, hconns[i].outQueue.isEmpty else { return }
        if hconns[i].h2 != nil {
            closeH2IfDone(slot)
            return
        }
        guard let ex = hconns[i].ex else {
            if hconns[i].closeAfterFlush { teardownHTTP(slot, reset: false) }
            return
        }
        guard ex.responseDone, !ex.tunnel || hconns[i].closeAfterFlush else { return }
        if !ex.requestDone {
            if ex.local && !hconns[i].closeAfterFlush {
                // Keep reading (and dropping) the rest of the body; the exchange ends with it.
                return
            }
            hconns[i].closeAfterFlush = true
        }
        endExchange(slot)
        if hconns[i].closeAfterFlush || draining {
            teardownHTTP(slot, reset: false)
            return
        }
        hconns[i].reader.next()
        hconns[i].headStarted = loop.now
        pumpDown(slot)
    }

    /// Metrics, circuit-breaker counts and the upstream connection of the finished exchange.
    private func endExchange(_ slot: UInt32) {
        let i = Int(slot)
        guard let ex = hconns[i].ex else { return }
        closeUpstream(slot)
        if ex.queued {
            ex.queued = false
            ex.cluster?.runtime.pendingRequests.add(-1)
        }
        let m = requestMetrics.slots(registry, cluster: ex.cluster?.runtime, code: ex.status, flag: ex.flag,
                                     gateway: hconns[i].table?.gateway)
        shard.add(m.total)
        shard.observe(m.duration, Double(loop.now &- ex.start) / 1e6)
        releaseH2Stream(ex)
        if ex.counted { ex.cluster?.runtime.activeRequests.add(-1) }
        if ex.retriesCounted > 0 { ex.cluster?.runtime.activeRetries.add(Int64(-ex.retriesCounted)) }
        for seg in ex.upQueue { finishQueued(slot, seg, downSide: false) }
        if ex.upBuffer >= 0 {
            // A send from it may still be in flight when the connection is being torn down.
            if hconns[i].sending { hconns[i].spareBuffer = ex.upBuffer } else { giveBack(UInt16(ex.upBuffer)) }
        }
        if let p = ex.upHead { free(p) }
        hconns[i].ex = nil
        if exchangePool.count < 4096 { exchangePool.append(ex) }
    }

    private func newExchange(start: UInt64) -> Exchange {
        guard let ex = exchangePool.popLast() else { return Exchange(start: start) }
        ex.reset(start: start)
        return ex
    }

    // MARK: - timers

    /// An HTTP/2 stream's request deadline.
    func scheduleStream(_ slot: UInt32, stream: Int32, at deadline: UInt64) {
        let tag = UInt64(slot) | (UInt64(UInt32(stream)) & 0xFF_FFFF) << 32 | TimerKind.h2Stream.rawValue << 56
        timers.schedule(at: deadline, tag: tag)
    }

    private func schedule(_ slot: UInt32, _ kind: TimerKind, at deadline: UInt64) {
        let tag = UInt64(slot) | UInt64(hconns[Int(slot)].generation) << 32 | kind.rawValue << 56
        timers.schedule(at: deadline, tag: tag)
    }

    func armTimer() {
        guard let d = timers.nextToArm() else { return }
        timerSpec.pointee = __kernel_timespec(tv_sec: Int64(d / 1_000_000_000), tv_nsec: Int64(d % 1_000_000_000))
        let s = loop.uring.sqe()
        io_uring_prep_timeout(s, timerSpec, 0, UInt32(IORING_TIMEOUT_ABS))
        io_uring_sqe_set_data64(s, UserData(slot: 0, generation: 0, op: Op.timer.rawValue).raw)
    }

    private func fireTimers() {
        let now = EventLoop.monotonicNanos()
        while let t = timers.popDue(now: now) {
            let slot = UInt32(truncatingIfNeeded: t.tag)
            let gen = UInt32(truncatingIfNeeded: t.tag >> 32) & 0xFF_FFFF
            let i = Int(slot)
            if TimerKind(rawValue: t.tag >> 56) == .h2Stream {
                if i < hconns.count, hconns[i].phase == .open { h2StreamTimedOut(slot, stream: Int32(gen), deadline: t.deadline) }
                continue
            }
            guard i < hconns.count, hconns[i].generation == gen, hconns[i].phase == .open, let ex = hconns[i].ex else { continue }
            switch TimerKind(rawValue: t.tag >> 56) {
            case .request where ex.deadline == t.deadline && !ex.responseDone:
                if ex.responseStarted {
                    hconns[i].ex!.flag = .upstreamRequestTimeout
                    teardownHTTP(slot, reset: true)
                } else {
                    hconns[i].ex!.upReusable = false
                    respondLocally(slot, status: 504, flag: .upstreamRequestTimeout, body: "upstream request timeout")
                }
            case .perTry where ex.tryDeadline == t.deadline && !ex.responseStarted:
                attemptFailed(slot, .perTryTimeout)
            case .wake where ex.wakeAt == t.deadline:
                hconns[i].ex!.wakeAt = 0
                if ex.up < 0 && !ex.local { dispatch(slot) }
            default:
                break
            }
        }
    }

    // MARK: - closing

    func teardownHTTP(_ slot: UInt32, reset: Bool) {
        let i = Int(slot)
        guard hconns[i].phase == .open else { return }
        teardownH2(slot)
        if hconns[i].ex != nil {
            hconns[i].ex!.upReusable = false
            if !hconns[i].ex!.responseDone || !hconns[i].ex!.requestDone {
                if hconns[i].ex!.flag == .none { hconns[i].ex!.flag = .downstreamReset }
                if !hconns[i].ex!.responseStarted { hconns[i].ex!.status = 0 }
            }
            endExchange(slot)
        }
        hconns[i].phase = .closing
        listeners[Int(hconns[i].listener)].counter.add(-1)
        stop(hconns[i].fd, reset: reset, cancel: hconns[i].pending > 0)
        if hconns[i].pending == 0 { freeHTTP(slot) }
    }

    /// Frees the slot once no operation is pending: only then may the buffers its sends read from be reused.
    private func freeHTTP(_ slot: UInt32) {
        let i = Int(slot)
        if hconns[i].fd >= 0 { close(hconns[i].fd) }
        for seg in hconns[i].outQueue {
            if seg.buffer < 0 && seg.frees { free(seg.owned) }
        }
        if hconns[i].inBuffer >= 0 {
            // A closed upstream's send may still read it: the connection that sends it gives it back.
            if hconns[i].inRefs > 0, let u = ups.indices.first(where: {
                ups[$0].orphanHeld && ups[$0].orphanSlot == slot && ups[$0].orphanGeneration == hconns[i].generation
            }) {
                ups[u].orphanBuffer = hconns[i].inBuffer
            } else {
                giveBack(UInt16(hconns[i].inBuffer))
            }
        }
        if hconns[i].spareBuffer >= 0 { giveBack(UInt16(hconns[i].spareBuffer)) }
        if let p = hconns[i].tlsOut { free(p) }
        let gen = (hconns[i].generation + 1) & 0xFF_FFFF
        hconns[i] = HTTPConn()
        hconns[i].generation = gen
        hfree.append(slot)
        openCount -= 1
        shard.addSigned(stats.activeConnections, -1)
        checkDrained()
    }

    /// Periodic checks (from the worker's tick): slow heads, idle keep-alive clients, idle pooled upstreams.
    func scanHTTP(now: UInt64) {
        for i in hconns.indices where hconns[i].phase == .open && hconns[i].ex == nil {
            let slot = UInt32(i)
            if let h2 = hconns[i].h2 {
                // HTTP/2 drains with GOAWAY: streams in flight finish, then the connection closes.
                if draining && !hconns[i].closeAfterFlush {
                    h2.session.goAway()
                    hconns[i].closeAfterFlush = true
                    flushH2Down(slot)
                }
                if (draining && h2.streams.isEmpty && hconns[i].outQueue.isEmpty)
                    || (h2.streams.isEmpty && now &- hconns[i].lastActive > Self.keepAliveIdleNanos) {
                    teardownHTTP(slot, reset: false)
                }
                continue
            }
            if handshakeTooSlow(i, now: now) {
                teardownHTTP(slot, reset: false)
            } else if hconns[i].reader.isInsideHead && now &- hconns[i].headStarted > headerTimeoutNanos {
                respondLocally(slot, status: 408, flag: .downstreamProtocolError, body: "header timeout", close: true)
            } else if draining || now &- hconns[i].lastActive > Self.keepAliveIdleNanos {
                teardownHTTP(slot, reset: false)
            }
        }
        // A mirror's upstream that neither answers nor closes is dropped after 30 s.
        for u in ups.indices where ups[u].shadow != nil && ups[u].phase != .closing
            && now &- ups[u].connectStart > 30_000_000_000 {
            stopUp(UInt32(u))
        }
        for u in ups.indices where ups[u].phase == .idle {
            let wc = ups[u].cluster!
            let limit = wc.runtime.config.httpPool?.idleTimeout?.clampedNanoseconds ?? Self.upstreamIdleNanos
            if draining || now &- ups[u].idleSince > limit {
                wc.idle[Int(ups[u].endpoint)].removeAll { $0 == UInt32(u) }
                stopUp(UInt32(u))
            }
        }
    }
}
