import CSluiceLinux
import Glibc
import SluiceHTTP
import SluiceIdentity
import SluiceModel
import SluiceRing
import SluiceTLS
import SluiceTelemetry

/// The pool key of outbound tunnels: who calls, which node, and which identity that node must present.
struct TunnelKey: Hashable {
    let source: String
    let node: String
    let destination: String
}

/// One HBONE connection to or from another node's agent: mutual TLS with workload certificates, HTTP/2 inside,
/// one CONNECT stream per proxied TCP connection (Istio ambient's wire format, so ztunnel speaks it too).
final class Tunnel {
    enum Phase { case connecting, handshaking, open, closing }
    let slot: UInt32
    let generation: UInt32
    let fd: Int32
    let outbound: Bool
    var phase: Phase
    let tls: TLSStream
    let h2: H2Session
    /// Outbound: the pool entry, and the identity the peer must present.
    let key: TunnelKey?
    /// The credentials generation the session's certificate comes from.
    let credentials: UInt64
    /// Inbound: the caller's SPIFFE identity (its client certificate), the name it asked for by SNI (the workload
    /// identity whose certificate this side presented), and its address.
    var peer: String?
    var requestedName: String?
    var peerIP: IPAddress?
    /// Inbound: which listener accepted it (its connection count).
    var listener: Int32 = -1
    var streams: [Int32: TunnelStream] = [:]
    /// Outbound streams waiting for the handshake before their CONNECT goes.
    var waiting: [TunnelStream] = []
    var pending = 0
    var goingAway = false
    var sending = false
    var out: UnsafeMutableRawPointer?
    var outLength = 0
    var outSent = 0
    var lastActive: UInt64
    let receiveBuffer: UnsafeMutableRawPointer
    /// The address a connect reads when the ring submits it (after the preparing call returned).
    let address = UnsafeMutablePointer<Socket.Address>.allocate(capacity: 1)

    static let receiveSize = 64 << 10

    init(slot: UInt32, generation: UInt32, fd: Int32, outbound: Bool, tls: TLSStream, key: TunnelKey?, credentials: UInt64,
         now: UInt64) {
        self.slot = slot
        self.generation = generation
        self.fd = fd
        self.outbound = outbound
        self.tls = tls
        self.key = key
        self.credentials = credentials
        phase = outbound ? .connecting : .handshaking
        h2 = H2Session(server: !outbound, window: Int32(L4Worker.tunnelWindow))
        lastActive = now
        receiveBuffer = .allocate(byteCount: Self.receiveSize, alignment: 16)
    }

    deinit {
        receiveBuffer.deallocate()
        address.deallocate()
        free(out)
    }
}

/// One CONNECT stream and the plain socket it carries: the captured client (outbound) or the connection to the
/// local workload (inbound).
final class TunnelStream {
    enum Phase { case awaitingResponse, connectingWorkload, open, closing }
    let slot: UInt32
    let generation: UInt32
    let fd: Int32
    let tunnel: Tunnel
    var id: Int32 = -1
    var phase: Phase
    var pending = 0
    var receiving = false
    /// Receiving stopped: the tunnel has enough of this stream's bytes queued.
    var paused = false
    /// The plain socket reached EOF (END_STREAM sent).
    var inputEnded = false
    /// The peer ended its side; once its bytes are written the plain socket's write side is shut.
    var peerEnded = false
    var shutDown = false
    /// nghttp2 closed the stream.
    var streamClosed = false
    /// Bytes from the tunnel for the plain socket: the send in flight, and what arrived meanwhile.
    var inFlight: [UInt8] = []
    var inFlightSent = 0
    var queued: [UInt8] = []
    var sending = false
    let receiveBuffer: UnsafeMutableRawPointer
    // Outbound accounting (the captured connection's listener and cluster).
    var listener: Int32 = -1
    var cluster: WorkerCluster?
    var endpoint: Int32 = -1
    /// Outbound: the CONNECT's authority (the endpoint), and the client's address for `forwarded` (nil when the
    /// plain side is the L7 proxy's own upstream connection, which carries many clients' requests).
    var authority = ""
    var clientIP: String?
    /// Counted among the worker's open connections (a drain waits for it): inbound streams and those carrying a
    /// captured connection; not the L7 proxy's bridged upstream connections (their upstream slot is what counts).
    var counted = true
    /// Inbound: the workload's address (read by the connect when the ring submits it).
    let target = UnsafeMutablePointer<Socket.Address>.allocate(capacity: 1)

    static let receiveSize = 32 << 10

    init(slot: UInt32, generation: UInt32, fd: Int32, tunnel: Tunnel, phase: Phase) {
        self.slot = slot
        self.generation = generation
        self.fd = fd
        self.tunnel = tunnel
        self.phase = phase
        receiveBuffer = .allocate(byteCount: Self.receiveSize, alignment: 16)
    }

    deinit {
        receiveBuffer.deallocate()
        target.deallocate()
    }
}

/// Worker-wide HBONE counters.
struct TunnelStats {
    let tunnelsOpened: (outbound: Int, inbound: Int)
    let tunnelsResumed: Int
    let tunnelFailures: (connect: Int, handshake: Int, identity: Int)
    /// Handshakes refused for the peer's certificate, by reason (see ``TLSStream/certificateProblem``), and
    /// inbound callers from another trust domain.
    let certificateRefusals: [String: Int]
    let streams: (opened: Int, accepted: Int, refused: Int, denied: Int, noIdentity: Int, unknownDestination: Int,
                  workloadUnreachable: Int)

    init(registry: MetricsRegistry, worker: Int) {
        let l = [("worker", String(worker))]
        func tunnels(_ direction: String) -> Int {
            registry.counter("sluice_hbone_tunnels_opened_total", help: "HBONE connections (mutual TLS) established",
                             labels: l + [("direction", direction)])
        }
        tunnelsOpened = (tunnels("outbound"), tunnels("inbound"))
        tunnelsResumed = registry.counter("sluice_hbone_tunnels_resumed_total",
                                          help: "Outbound HBONE connections that resumed a TLS session (no full handshake)", labels: l)
        func failure(_ reason: String) -> Int {
            registry.counter("sluice_hbone_tunnel_failures_total",
                             help: "HBONE connections that failed to connect, to handshake, or whose peer presented the wrong identity",
                             labels: l + [("reason", reason)])
        }
        tunnelFailures = (failure("connect"), failure("handshake"), failure("wrong_identity"))
        var refusals: [String: Int] = [:]
        for reason in ["no_certificate", "certificate_expired", "certificate_not_yet_valid", "certificate_untrusted",
                       "certificate_invalid", "wrong_trust_domain"] {
            refusals[reason] = failure(reason)
        }
        certificateRefusals = refusals
        func stream(_ direction: String, _ result: String) -> Int {
            registry.counter("sluice_hbone_streams_total", help: "HBONE CONNECT streams by direction and outcome",
                             labels: l + [("direction", direction), ("result", result)])
        }
        streams = (stream("outbound", "ok"), stream("inbound", "ok"), stream("outbound", "refused"),
                   stream("inbound", "denied"), stream("outbound", "no_identity"), stream("inbound", "unknown_destination"),
                   stream("inbound", "workload_unreachable"))
    }
}

extension L4Worker {
    /// Receive window of each tunnel stream and of each tunnel (HTTP/2 flow control).
    static let tunnelWindow = 1 << 20
    /// A stream's bytes queued in its tunnel beyond which its socket is not read, and below which it is again.
    static let tunnelHighWater = 256 << 10
    static let tunnelLowWater = 64 << 10
    static let denialLogLimit = 10
    /// An outbound tunnel without streams for this long is closed.
    static let tunnelIdleNanos: UInt64 = 60_000_000_000

    // MARK: - outbound

    /// The captured connection in `slot` goes to endpoint `e` on another node: through a pooled tunnel to that
    /// node's agent, presenting the client workload's certificate. The connection slot is handed over to a
    /// tunnel stream (which takes its counts).
    func openTunnelStream(_ slot: UInt32, endpoint e: Int, _ target: TunnelTarget) {
        let i = Int(slot)
        guard let settings = runtime.tunnels, conns[i].pending == 0 else {
            teardown(slot, reset: true)
            return
        }
        let credentials = settings.credentials.current
        guard let source = conns[i].sourceIdentity, let identity = credentials.identities[source] else {
            // A client that is no workload of this node (or one whose certificate has not come yet) has no identity
            // to present: nothing leaves the node in plaintext instead.
            shard.add(tunnelStats.streams.noIdentity)
            teardown(slot, reset: true)
            return
        }
        // The client's address goes in the CONNECT (`forwarded`), which may be submitted at once.
        let s = attachTunnelStream(fd: conns[i].down, source: identity, credentials: credentials, target: target,
                                   counting: .takenOver, clientIP: Self.ipString(Socket.peerAddress(conns[i].down)))
        guard let s else {
            shard.add(tunnelStats.tunnelFailures.connect)
            upstreamFailed(slot, reset: true)
            return
        }
        s.listener = conns[i].listener
        s.cluster = conns[i].cluster
        s.endpoint = Int32(e)
        // The connection's counts moved to the stream; the slot is reused.
        conns[i].down = -1
        conns[i].cluster = nil
        recycleConnSlot(slot)
    }

    /// Puts `fd`'s bytes on a CONNECT stream of the pooled tunnel for (`source`, the target's node and identity),
    /// opening the tunnel if needed. Nil when no tunnel could be started (the caller still owns `fd`).
    func attachTunnelStream(fd: Int32, source: MeshCredentials.Identity, credentials: MeshCredentials.Generation,
                            target: TunnelTarget, counting: StreamCounting, clientIP: String? = nil) -> TunnelStream? {
        let key = TunnelKey(source: source.uri, node: target.node, destination: target.identity)
        var tunnel = tunnelPool[key]
        if let t = tunnel, t.phase == .closing || t.goingAway || t.credentials != credentials.number {
            // A rotated certificate (or trust bundle) is not used for new streams: the old tunnel finishes its own.
            tunnelPool[key] = nil
            if t.streams.isEmpty && t.waiting.isEmpty { closeTunnel(t) }
            tunnel = nil
        }
        if tunnel == nil {
            tunnel = connectTunnel(key: key, target: target, identity: source, credentials: credentials.number)
            guard tunnel != nil else { return nil }
            tunnelPool[key] = tunnel
        }
        let t = tunnel!
        let s = newTunnelStream(fd: fd, tunnel: t, phase: .awaitingResponse, counting: counting)
        s.authority = target.authority
        s.clientIP = clientIP
        if t.phase == .open {
            submitConnect(s)
            flushTunnel(t)
        } else {
            t.waiting.append(s)
        }
        return s
    }

    private func connectTunnel(key: TunnelKey, target: TunnelTarget, identity: MeshCredentials.Identity,
                               credentials: UInt64) -> Tunnel? {
        // Sessions are resumed per (node, identity): any worker's next tunnel there skips the full handshake.
        guard let tls = try? TLSStream(client: identity.client, serverName: target.serverName,
                                       checkHostName: false, sessionKey: "\(target.node)|\(target.identity)")
        else { return nil }
        let fd = Socket.stream(family: target.agent.family)
        guard fd >= 0 else { return nil }
        Socket.setNoDelay(fd)
        let t = newTunnel(fd: fd, outbound: true, tls: tls, key: key, credentials: credentials)
        t.address.initialize(to: target.agent)
        let s = loop.uring.sqe()
        t.address.withMemoryRebound(to: sockaddr.self, capacity: 1) { sa in io_uring_prep_connect(s, fd, sa, target.agent.length) }
        s.pointee.flags |= sl_iosqe_io_link()
        trackTunnel(s, t, .tConnect)
        let to = loop.uring.sqe()
        io_uring_prep_link_timeout(to, tunnelConnectTimeout, 0)
        trackTunnel(to, t, .tConnectTimeout)
        return t
    }

    private func submitConnect(_ s: TunnelStream) {
        let t = s.tunnel
        var fields = H2Fields()
        fields.append(":method", "CONNECT")
        fields.append(":authority", s.authority)
        // The client's own address, for the destination's `ipBlocks` (the tunnel's peer is the source agent).
        if let client = s.clientIP {
            fields.append("forwarded", client.contains(":") ? "for=\"[\(client)]\"" : "for=\(client)")
        }
        let id = t.h2.request(fields, endStream: false)
        guard id > 0 else {
            closeTunnelStream(s, reset: true)
            return
        }
        s.id = id
        t.streams[id] = s
    }

    // MARK: - inbound

    /// A connection on the HBONE listener: mutual TLS, the certificate of the workload identity the caller names by
    /// SNI.
    func acceptTunnel(fd: Int32, listener li: Int) {
        // One generation for both the certificates and the number the tunnel is filed under.
        guard let credentials = runtime.tunnels?.credentials.current, let names = credentials.serverNames,
            let tls = try? TLSStream(serving: names)
        else {
            // No certificate yet: nothing can be served securely.
            listeners[li].counter.add(-1)
            shard.add(tunnelStats.tunnelFailures.handshake)
            close(fd)
            return
        }
        Socket.setNoDelay(fd)
        let t = newTunnel(fd: fd, outbound: false, tls: tls, key: nil, credentials: credentials.number)
        t.listener = Int32(li)
        t.peerIP = IPAddress(Self.ipString(Socket.peerAddress(fd)))
        receiveTunnel(t)
    }

    /// A CONNECT from another node: the destination must be a workload of this node with the identity the caller
    /// asked for, and its AuthorizationPolicies must allow the caller.
    private func tunnelRequest(_ t: Tunnel, stream id: Int32, _ fields: H2Fields) {
        func refuse(_ status: String, _ counter: Int) {
            shard.add(counter)
            t.h2.respond(stream: id, H2Fields([(":status", status)]), endStream: true)
        }
        guard fields.first(":method") == "CONNECT", let authority = fields.first(":authority"),
            let destination = EndpointAddress(parsing: authority), t.listener >= 0,
            let inbound = runtime.listeners[listeners[Int(t.listener)].runtimeIndex].inbound
        else { return refuse("400", tunnelStats.streams.unknownDestination) }
        guard let w = inbound[destination.ip.description],
            t.requestedName == w.serverName
        else { return refuse("404", tunnelStats.streams.unknownDestination) }
        if let http = w.http[destination.port] {
            // The workload's policies need the requests: they go through the L7 pipeline, checked one by one.
            return tunnelRequestThroughHTTP(t, stream: id, http, client: Self.forwardedFor(fields) ?? t.peerIP,
                                            port: destination.port)
        }
        var request = AuthorizationRequest(sourceIP: Self.forwardedFor(fields) ?? t.peerIP, principal: t.peer,
                                           port: destination.port)
        request.destinationIP = destination.ip
        request.layer4 = true
        if case .deny(let policy, _) = w.authorization.evaluate(request) {
            shard.add(stats.authorizationDenied)
            logDenial(request, to: destination, workload: w.workload, policy: policy)
            return refuse("403", tunnelStats.streams.denied)
        }
        guard let address = Socket.Address(ip: destination.ip.description, port: destination.port) else {
            return refuse("400", tunnelStats.streams.unknownDestination)
        }
        let fd = Socket.stream(family: address.family)
        guard fd >= 0 else { return refuse("503", tunnelStats.streams.workloadUnreachable) }
        Socket.setNoDelay(fd)
        let s = newTunnelStream(fd: fd, tunnel: t, phase: .connectingWorkload)
        s.id = id
        s.target.initialize(to: address)
        t.streams[id] = s
        let sqe = loop.uring.sqe()
        s.target.withMemoryRebound(to: sockaddr.self, capacity: 1) { sa in io_uring_prep_connect(sqe, fd, sa, address.length) }
        sqe.pointee.flags |= sl_iosqe_io_link()
        trackStream(sqe, s, .sConnect)
        let to = loop.uring.sqe()
        io_uring_prep_link_timeout(to, tunnelConnectTimeout, 0)
        trackStream(to, s, .sConnectTimeout)
    }

    /// An inbound stream to a workload port whose policies need the request: one end of a socket pair is the
    /// stream's plain side, the other an HTTP connection of this worker (as if accepted) whose client is the caller
    /// — its identity from the tunnel's certificate, its address from `forwarded` — routed to the workload alone
    /// through its AuthorizationPolicies and RequestAuthentications (403/401 answers go back through the stream).
    private func tunnelRequestThroughHTTP(_ t: Tunnel, stream id: Int32, _ http: InboundHTTP, client: IPAddress?, port: UInt16) {
        var pair: [Int32] = [-1, -1]
        guard t.listener >= 0,
            socketpair(AF_UNIX, Int32(SOCK_STREAM.rawValue | SOCK_NONBLOCK.rawValue | SOCK_CLOEXEC.rawValue), 0, &pair) == 0
        else {
            shard.add(tunnelStats.streams.workloadUnreachable)
            t.h2.respond(stream: id, H2Fields([(":status", "503")]), endStream: true)
            return
        }
        let li = Int(t.listener)
        // The HTTP connection counts against the listener as an accepted one would (given back when it closes).
        listeners[li].counter.add(1)
        guard let slot = acceptHTTP(fd: pair[1], listener: li, table: http.table, captured: http.cluster, port: port) else {
            close(pair[0])
            t.h2.respond(stream: id, H2Fields([(":status", "503")]), endStream: true)
            return
        }
        hconns[Int(slot)].principal = t.peer
        hconns[Int(slot)].client = client.map { "\($0)" } ?? ""
        let s = newTunnelStream(fd: pair[0], tunnel: t, phase: .open)
        s.id = id
        t.streams[id] = s
        shard.add(tunnelStats.streams.accepted)
        t.h2.respond(stream: id, H2Fields([(":status", "200")]), endStream: false)
        receivePlain(s)
    }

    static func forwardedFor(_ fields: H2Fields) -> IPAddress? {
        guard let f = fields.first("forwarded") else { return nil }
        for part in f.split(separator: ";") {
            let kv = part.drop { $0 == " " }
            guard kv.lowercased().hasPrefix("for=") else { continue }
            return IPAddress(String(kv.dropFirst(4).filter { $0 != "\"" && $0 != "[" && $0 != "]" }))
        }
        return nil
    }

    // MARK: - completions

    func completeTunnel(_ op: Op, _ ud: UserData, result: Int32) {
        switch op {
        case .tConnect, .tConnectTimeout, .tRecv, .tSend:
            let i = Int(ud.slot)
            guard i < tunnels.count, let t = tunnels[i], t.generation & 0xFF_FFFF == ud.generation else { return }
            t.pending -= 1
            switch op {
            case .tConnect: tunnelConnected(t, result: result)
            case .tRecv: tunnelReceived(t, result: result)
            case .tSend: tunnelSent(t, result: result)
            default: break
            }
            if t.phase == .closing && t.pending == 0 { freeTunnel(t) }
        default:
            let i = Int(ud.slot)
            guard i < tunnelStreams.count, let s = tunnelStreams[i], s.generation & 0xFF_FFFF == ud.generation else { return }
            s.pending -= 1
            switch op {
            case .sConnect: workloadConnected(s, result: result)
            case .sRecv: streamReceived(s, result: result)
            case .sSend: streamSent(s, result: result)
            default: break
            }
            if s.phase == .closing && s.pending == 0 { freeTunnelStream(s) }
        }
    }

    private func tunnelConnected(_ t: Tunnel, result: Int32) {
        guard t.phase == .connecting else { return }
        guard result == 0 else {
            shard.add(tunnelStats.tunnelFailures.connect)
            closeTunnel(t)
            return
        }
        t.phase = .handshaking
        _ = t.tls.handshake()
        flushTunnel(t)
        receiveTunnel(t)
    }

    private func receiveTunnel(_ t: Tunnel) {
        let s = loop.uring.sqe()
        io_uring_prep_recv(s, t.fd, t.receiveBuffer, Tunnel.receiveSize, 0)
        trackTunnel(s, t, .tRecv)
    }

    private func tunnelReceived(_ t: Tunnel, result: Int32) {
        guard t.phase == .handshaking || t.phase == .open else { return }
        guard result > 0 else {
            if t.phase == .handshaking { shard.add(tunnelStats.tunnelFailures.handshake) }
            closeTunnel(t)
            return
        }
        t.lastActive = loop.now
        t.tls.receive(UnsafeRawBufferPointer(start: t.receiveBuffer, count: Int(result)))
        if t.phase == .handshaking {
            switch t.tls.handshake() {
            case .needInput:
                flushTunnel(t)
                receiveTunnel(t)
                return
            case .failed(let why):
                // Counted by what was wrong with the peer's certificate, when that was it.
                let reason = t.tls.certificateProblem
                    ?? (why.contains("did not return a certificate") ? "no_certificate" : nil)
                shard.add(reason.flatMap { tunnelStats.certificateRefusals[$0] } ?? tunnelStats.tunnelFailures.handshake)
                closeTunnel(t)
                return
            case .done:
                guard handshakeFinished(t) else { return }
            }
        }
        // Plaintext: HTTP/2 frames. Decrypted in place into the receive buffer (its ciphertext is in the session).
        while t.phase == .open {
            let r = t.tls.read(into: UnsafeMutableRawBufferPointer(start: t.receiveBuffer, count: Tunnel.receiveSize))
            switch r {
            case .bytes(let n):
                // The server's session tickets have been read by now: keep one for the next tunnel there.
                if t.outbound { t.tls.rememberSession() }
                if !t.h2.receive(UnsafeRawBufferPointer(start: t.receiveBuffer, count: n)) {
                    flushTunnel(t)
                    closeTunnel(t)
                    return
                }
                handleTunnelEvents(t)
                continue
            case .needInput:
                break
            case .closed, .failed:
                closeTunnel(t)
                return
            }
            break
        }
        guard t.phase == .open else { return }
        flushTunnel(t)
        receiveTunnel(t)
    }

    /// Checks who the peer is: outbound, the identity the registry expects of the destination; inbound, any
    /// identity of the mesh (its certificate chained to the trust bundle), which authorization then judges.
    private func handshakeFinished(_ t: Tunnel) -> Bool {
        let uris = t.tls.peerURIs
        if let key = t.key {
            guard uris.contains(key.destination) else {
                shard.add(tunnelStats.tunnelFailures.identity)
                closeTunnel(t)
                return false
            }
            shard.add(tunnelStats.tunnelsOpened.outbound)
            if t.tls.resumed { shard.add(tunnelStats.tunnelsResumed) }
        } else {
            guard let peer = uris.first(where: { $0.hasPrefix("spiffe://") }) else {
                shard.add(tunnelStats.tunnelFailures.identity)
                closeTunnel(t)
                return false
            }
            // A certificate of the mesh's CA for another trust domain (a federated or misissued one) is no caller
            // of this mesh.
            guard SPIFFEID(peer)?.trustDomain == runtime.snapshot.mesh.trustDomain else {
                shard.add(tunnelStats.certificateRefusals["wrong_trust_domain"]!)
                closeTunnel(t)
                return false
            }
            t.peer = peer
            t.requestedName = t.tls.serverName
            shard.add(tunnelStats.tunnelsOpened.inbound)
        }
        t.phase = .open
        let waiting = t.waiting
        t.waiting = []
        for s in waiting where s.phase == .awaitingResponse { submitConnect(s) }
        return true
    }

    private func handleTunnelEvents(_ t: Tunnel) {
        for event in t.h2.takeEvents() {
            switch event {
            case .headers(let id, let fields, _):
                if t.outbound {
                    guard let s = t.streams[id] else { continue }
                    tunnelResponse(s, status: fields.first(":status"))
                } else {
                    tunnelRequest(t, stream: id, fields)
                }
            case .data(let id, let bytes):
                // Bytes that come with the CONNECT (before the workload answered) wait for the connection.
                guard let s = t.streams[id], s.phase == .open || s.phase == .connectingWorkload else {
                    t.h2.consume(stream: id, bytes: bytes.count)
                    continue
                }
                s.queued.append(contentsOf: bytes)
                if !s.sending && s.phase == .open { sendPlain(s) }
            case .end(let id):
                guard let s = t.streams[id] else { continue }
                s.peerEnded = true
                if !s.sending && s.phase == .open { shutDownIfDone(s) }
            case .closed(let id, let error):
                guard let s = t.streams.removeValue(forKey: id) else { continue }
                s.streamClosed = true
                if error != 0 || s.phase != .open {
                    closeTunnelStream(s, reset: true)
                } else if !s.sending {
                    closeTunnelStream(s, reset: false)
                }
            case .drained(let id, _):
                guard let s = t.streams[id], s.paused, t.h2.queuedBytes(stream: id) < Self.tunnelLowWater else { continue }
                s.paused = false
                receivePlain(s)
            case .goaway:
                t.goingAway = true
                if let k = t.key, tunnelPool[k] === t { tunnelPool[k] = nil }
            case .trailers:
                break
            }
        }
        if t.phase == .open && t.goingAway && t.streams.isEmpty { closeTunnel(t) }
    }

    private func tunnelResponse(_ s: TunnelStream, status: String?) {
        guard s.phase == .awaitingResponse else { return }
        let e = Int(s.endpoint)
        guard status == "200" else {
            // Refused (denied, unknown destination, workload unreachable): the client sees a reset, as Istio's
            // ztunnel gives it.
            shard.add(tunnelStats.streams.refused)
            if status == "503", let wc = s.cluster { _ = wc.outlier?.recordFailure(e, now: loop.now) }
            closeTunnelStream(s, reset: true)
            return
        }
        shard.add(tunnelStats.streams.opened)
        if let wc = s.cluster {
            wc.outlier?.recordSuccess(e)
            wc.active[e] += 1
            shard.add(wc.runtime.metrics.opened)
        }
        s.phase = .open
        receivePlain(s)
    }

    private func workloadConnected(_ s: TunnelStream, result: Int32) {
        guard s.phase == .connectingWorkload else { return }
        let t = s.tunnel
        guard result == 0, t.phase == .open, !s.streamClosed else {
            if result != 0 {
                shard.add(tunnelStats.streams.workloadUnreachable)
                if t.phase == .open && !s.streamClosed {
                    t.h2.respond(stream: s.id, H2Fields([(":status", "503")]), endStream: true)
                    flushTunnel(t)
                }
            }
            s.streamClosed = true
            closeTunnelStream(s, reset: true)
            return
        }
        shard.add(tunnelStats.streams.accepted)
        s.phase = .open
        t.h2.respond(stream: s.id, H2Fields([(":status", "200")]), endStream: false)
        flushTunnel(t)
        receivePlain(s)
        sendPlain(s)
        if !s.sending { shutDownIfDone(s) }
    }

    // MARK: - plain side

    private func receivePlain(_ s: TunnelStream) {
        guard s.phase == .open, !s.receiving, !s.inputEnded, !s.paused else { return }
        s.receiving = true
        let sqe = loop.uring.sqe()
        io_uring_prep_recv(sqe, s.fd, s.receiveBuffer, TunnelStream.receiveSize, 0)
        trackStream(sqe, s, .sRecv)
    }

    private func streamReceived(_ s: TunnelStream, result: Int32) {
        s.receiving = false
        guard s.phase == .open else { return }
        let t = s.tunnel
        guard t.phase == .open, !s.streamClosed else {
            closeTunnelStream(s, reset: true)
            return
        }
        if result > 0 {
            t.h2.send(stream: s.id, UnsafeRawBufferPointer(start: s.receiveBuffer, count: Int(result)))
            if let wc = s.cluster { shard.add(wc.runtime.metrics.receivedBytes, UInt64(result)) }
            if t.h2.queuedBytes(stream: s.id) >= Self.tunnelHighWater { s.paused = true } else { receivePlain(s) }
            flushTunnel(t)
        } else if result == 0 {
            s.inputEnded = true
            t.h2.finish(stream: s.id)
            flushTunnel(t)
        } else {
            closeTunnelStream(s, reset: true)
        }
    }

    private func sendPlain(_ s: TunnelStream) {
        if s.inFlightSent == s.inFlight.count {
            guard !s.queued.isEmpty else {
                s.sending = false
                return
            }
            swap(&s.inFlight, &s.queued)
            s.queued.removeAll(keepingCapacity: true)
            s.inFlightSent = 0
        }
        s.sending = true
        let sqe = loop.uring.sqe()
        s.inFlight.withUnsafeBytes { b in
            io_uring_prep_send(sqe, s.fd, b.baseAddress! + s.inFlightSent, b.count - s.inFlightSent, Int32(MSG_NOSIGNAL))
        }
        trackStream(sqe, s, .sSend)
    }

    private func streamSent(_ s: TunnelStream, result: Int32) {
        guard s.phase == .open else { return }
        let t = s.tunnel
        guard result >= 0 else {
            s.sending = false
            closeTunnelStream(s, reset: true)
            return
        }
        s.inFlightSent += Int(result)
        if let wc = s.cluster { shard.add(wc.runtime.metrics.sentBytes, UInt64(result)) }
        // Written on: the peer may send as much again.
        if !s.streamClosed && t.phase == .open {
            t.h2.consume(stream: s.id, bytes: Int(result))
            flushTunnel(t)
        }
        if s.inFlightSent == s.inFlight.count {
            s.inFlight.removeAll(keepingCapacity: true)
            s.inFlightSent = 0
        }
        sendPlain(s)
        if !s.sending {
            if s.streamClosed { closeTunnelStream(s, reset: false) } else { shutDownIfDone(s) }
        }
    }

    private func shutDownIfDone(_ s: TunnelStream) {
        if s.peerEnded && !s.shutDown && s.queued.isEmpty {
            s.shutDown = true
            shutdown(s.fd, Int32(SHUT_WR))
        }
    }

    // MARK: - tunnel output

    /// Frames nghttp2 has to send, encrypted, in one send of worker memory; one send in flight per tunnel.
    func flushTunnel(_ t: Tunnel) {
        guard !t.sending, t.phase == .open || t.phase == .handshaking else { return }
        if t.phase == .open {
            let frames = t.h2.takeOutput()
            if !frames.isEmpty { frames.withUnsafeBytes { _ = t.tls.write($0) } }
        }
        let n = t.tls.pendingOutput
        if n > 0 {
            let out = malloc(n)!
            t.outLength = t.tls.takeOutput(into: UnsafeMutableRawBufferPointer(start: out, count: n))
            t.out = out
            t.outSent = 0
            t.sending = true
            sendTunnelRecords(t)
        }
        // Framing DATA reports what left each stream's queue (a paused socket may be read again).
        if t.phase == .open { handleTunnelEvents(t) }
    }

    private func sendTunnelRecords(_ t: Tunnel) {
        let s = loop.uring.sqe()
        io_uring_prep_send(s, t.fd, t.out! + t.outSent, t.outLength - t.outSent, Int32(MSG_NOSIGNAL))
        trackTunnel(s, t, .tSend)
    }

    private func tunnelSent(_ t: Tunnel, result: Int32) {
        guard t.phase == .open || t.phase == .handshaking else { return }
        guard result >= 0 else {
            closeTunnel(t)
            return
        }
        t.lastActive = loop.now
        t.outSent += Int(result)
        if t.outSent < t.outLength {
            sendTunnelRecords(t)
            return
        }
        free(t.out)
        t.out = nil
        t.sending = false
        flushTunnel(t)
    }

    // MARK: - closing

    func closeTunnel(_ t: Tunnel) {
        guard t.phase != .closing else { return }
        t.phase = .closing
        if let k = t.key, tunnelPool[k] === t { tunnelPool[k] = nil }
        for s in t.waiting { closeTunnelStream(s, reset: true) }
        t.waiting = []
        for s in Array(t.streams.values) {
            s.streamClosed = true
            closeTunnelStream(s, reset: true)
        }
        t.streams = [:]
        if t.listener >= 0 {
            listeners[Int(t.listener)].counter.add(-1)
            t.listener = -1
        }
        stop(t.fd, reset: false, cancel: t.pending > 0)
        if t.pending == 0 { freeTunnel(t) }
    }

    func closeTunnelStream(_ s: TunnelStream, reset: Bool) {
        guard s.phase != .closing else { return }
        let wasOpen = s.phase == .open
        s.phase = .closing
        let t = s.tunnel
        if s.id > 0 && !s.streamClosed && t.phase == .open {
            t.h2.reset(stream: s.id)
            t.streams[s.id] = nil
            flushTunnel(t)
        }
        if let wc = s.cluster {
            if wasOpen {
                shard.add(wc.runtime.metrics.closed)
                wc.active[Int(s.endpoint)] -= 1
            }
            wc.runtime.active.add(-1)
        }
        if s.listener >= 0 { listeners[Int(s.listener)].counter.add(-1) }
        stop(s.fd, reset: reset, cancel: s.pending > 0)
        if s.pending == 0 { freeTunnelStream(s) }
        // An outbound tunnel no longer in the pool (rotated credentials, GOAWAY) closes with its last stream.
        if t.phase == .open, t.streams.isEmpty, t.waiting.isEmpty, let k = t.key, tunnelPool[k] !== t { closeTunnel(t) }
    }

    /// Idle outbound tunnels close (tick).
    func scanTunnels(now: UInt64) {
        for case let t? in tunnels where t.phase == .open && t.outbound && t.streams.isEmpty && t.waiting.isEmpty {
            if now &- t.lastActive > Self.tunnelIdleNanos { closeTunnel(t) }
        }
    }

    /// Drain's deadline: everything tunnelled goes.
    func closeAllTunnels() {
        for case let t? in tunnels where t.phase != .closing { closeTunnel(t) }
    }

    // MARK: - tables

    private func newTunnel(fd: Int32, outbound: Bool, tls: TLSStream, key: TunnelKey?, credentials: UInt64) -> Tunnel {
        let slot: UInt32
        if let s = tunnelFree.popLast() { slot = s } else {
            tunnels.append(nil)
            tunnelGenerations.append(0)
            slot = UInt32(tunnels.count - 1)
        }
        let t = Tunnel(slot: slot, generation: tunnelGenerations[Int(slot)], fd: fd, outbound: outbound, tls: tls, key: key,
                       credentials: credentials, now: loop.now)
        tunnels[Int(slot)] = t
        return t
    }

    private func freeTunnel(_ t: Tunnel) {
        guard tunnels[Int(t.slot)] === t else { return }
        close(t.fd)
        tunnels[Int(t.slot)] = nil
        tunnelGenerations[Int(t.slot)] = (t.generation + 1) & 0xFF_FFFF
        tunnelFree.append(t.slot)
    }

    enum StreamCounting { case new, takenOver, none }

    /// - Parameter counting: whether the stream counts as an open connection, and whether it takes over the count
    ///   of the captured connection it carries.
    private func newTunnelStream(fd: Int32, tunnel: Tunnel, phase: TunnelStream.Phase,
                                 counting: StreamCounting = .new) -> TunnelStream {
        let slot: UInt32
        if let s = tunnelStreamFree.popLast() { slot = s } else {
            tunnelStreams.append(nil)
            tunnelStreamGenerations.append(0)
            slot = UInt32(tunnelStreams.count - 1)
        }
        let s = TunnelStream(slot: slot, generation: tunnelStreamGenerations[Int(slot)], fd: fd, tunnel: tunnel, phase: phase)
        tunnelStreams[Int(slot)] = s
        s.counted = counting != .none
        if counting == .new {
            openCount += 1
            shard.addSigned(stats.activeConnections, 1)
        }
        return s
    }

    private func freeTunnelStream(_ s: TunnelStream) {
        guard tunnelStreams[Int(s.slot)] === s else { return }
        close(s.fd)
        tunnelStreams[Int(s.slot)] = nil
        tunnelStreamGenerations[Int(s.slot)] = (s.generation + 1) & 0xFF_FFFF
        tunnelStreamFree.append(s.slot)
        if s.counted {
            openCount -= 1
            shard.addSigned(stats.activeConnections, -1)
            checkDrained()
        }
    }

    @inline(__always)
    private func trackTunnel(_ sqe: UnsafeMutablePointer<io_uring_sqe>, _ t: Tunnel, _ op: Op) {
        io_uring_sqe_set_data64(sqe, UserData(slot: t.slot, generation: t.generation, op: op.rawValue).raw)
        t.pending += 1
    }

    @inline(__always)
    private func trackStream(_ sqe: UnsafeMutablePointer<io_uring_sqe>, _ s: TunnelStream, _ op: Op) {
        io_uring_sqe_set_data64(sqe, UserData(slot: s.slot, generation: s.generation, op: op.rawValue).raw)
        s.pending += 1
    }

    /// The IP of a socket address as text, without port or brackets.
    static func ipString(_ a: Socket.Address) -> String {
        let peer = a.description
        return peer.hasPrefix("[") ? String(peer.dropFirst().prefix { $0 != "]" }) : String(peer.prefix { $0 != ":" })
    }

    // MARK: - the L7 proxy's upstream connections

    /// An upstream connection of the L7 proxy to an endpoint on another node: one end of a socket pair is the
    /// connection the HTTP code drives as any other, the other end is the plain side of a CONNECT stream in a
    /// tunnel presenting `identity`. "Connected" at once; a refused stream reaches the HTTP code as a reset.
    ///
    /// The pair costs a copy each way through the kernel; carrying the HTTP code's bytes straight into the stream
    /// would save it (next step for the L7-over-HBONE path).
    func connectUpThroughTunnel(_ wc: WorkerCluster, endpoint e: Int, _ target: TunnelTarget, identity: String?) -> UInt32? {
        guard let settings = runtime.tunnels else { return nil }
        let credentials = settings.credentials.current
        guard let identity, let source = credentials.identities[identity] else {
            shard.add(tunnelStats.streams.noIdentity)
            return nil
        }
        var pair: [Int32] = [-1, -1]
        guard socketpair(AF_UNIX, Int32(SOCK_STREAM.rawValue | SOCK_NONBLOCK.rawValue | SOCK_CLOEXEC.rawValue), 0, &pair) == 0
        else { return nil }
        guard attachTunnelStream(fd: pair[1], source: source, credentials: credentials, target: target, counting: .none) != nil
        else {
            close(pair[0])
            close(pair[1])
            shard.add(tunnelStats.tunnelFailures.connect)
            return nil
        }
        let u = allocateUp()
        ups[Int(u)].fd = pair[0]
        ups[Int(u)].phase = .connecting
        ups[Int(u)].cluster = wc
        ups[Int(u)].endpoint = Int32(e)
        ups[Int(u)].connectStart = loop.now
        ups[Int(u)].identity = identity
        let s = loop.uring.sqe()
        io_uring_prep_nop(s)
        trackUp(s, u, .uConnect)
        return u
    }

    // MARK: - calls between workloads of this node

    /// Whether the captured client in `slot` may connect to `endpoint` when that is a workload of this node: its
    /// AuthorizationPolicies judge the client's identity, address and the port (L4 fields).
    func localCallAllowed(_ slot: UInt32, endpoint: EndpointAddress) -> Bool {
        guard let w = runtime.localWorkloads[endpoint.ip.description], !w.authorization.isEmpty else { return true }
        let i = Int(slot)
        var request = AuthorizationRequest(sourceIP: IPAddress(Self.ipString(Socket.peerAddress(conns[i].down))),
                                           principal: conns[i].sourceIdentity, port: endpoint.port)
        request.destinationIP = endpoint.ip
        request.layer4 = true
        if case .deny(let policy, _) = w.authorization.evaluate(request) {
            logDenial(request, to: endpoint, workload: w.workload, policy: policy)
            return false
        }
        return true
    }

    /// One line per denied connection, at most ``denialLogLimit`` per second per worker (a flood of refused
    /// callers must not become a flood of log lines; the counters keep the full count).
    func logDenial(_ r: AuthorizationRequest, to destination: EndpointAddress, workload: NodeSnapshot.Workload, policy: String?) {
        guard let log = runtime.tunnels?.logDenial else { return }
        let second = loop.now / 1_000_000_000
        if second != denialLogSecond {
            denialLogSecond = second
            denialLogCount = 0
        }
        denialLogCount += 1
        guard denialLogCount <= Self.denialLogLimit else { return }
        log("connection denied by AuthorizationPolicy: source=\(r.principal ?? "none") source_ip=\(r.sourceIP.map { "\($0)" } ?? "-") "
            + "destination=\(destination) workload=\(workload.namespace)/\(workload.name) "
            + "policy=\(policy ?? "no ALLOW policy matched")")
    }
}
