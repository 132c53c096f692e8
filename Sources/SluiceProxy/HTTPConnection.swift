import Glibc
import SluiceHTTP
import SluiceRing
import SluiceTLS

/// Bytes waiting to be sent on one socket: part of a provided receive buffer (forwarded without copying) or
/// memory the worker owns (message heads it built).
struct Segment {
    /// Provided buffer id, or -1 for owned memory.
    var buffer: Int32
    var owned: UnsafeMutableRawPointer?
    var offset: Int32
    var length: Int32
    /// Free `owned` once sent (heads kept for a retry are freed by the exchange instead).
    var frees: Bool

    static func buffer(_ id: UInt16, _ range: Range<Int>) -> Segment {
        Segment(buffer: Int32(id), owned: nil, offset: Int32(range.lowerBound), length: Int32(range.count), frees: false)
    }

    /// Copies `bytes` into memory the segment owns.
    static func copy(_ bytes: UnsafeRawBufferPointer) -> Segment {
        let p = malloc(max(1, bytes.count))!
        if let base = bytes.baseAddress { memcpy(p, base, bytes.count) }
        return Segment(buffer: -1, owned: p, offset: 0, length: Int32(bytes.count), frees: true)
    }

    static func copy(_ bytes: [UInt8]) -> Segment { bytes.withUnsafeBytes { copy($0) } }

    /// Sends owned bytes that someone else frees.
    static func borrowed(_ p: UnsafeMutableRawPointer, length: Int) -> Segment {
        Segment(buffer: -1, owned: p, offset: 0, length: Int32(length), frees: false)
    }
}

/// Why an exchange ended the way it did: Envoy's response flags, as Istio's metrics label them.
enum ResponseFlag: String {
    case none = "-"
    /// No route (404).
    case noRoute = "NR"
    /// No healthy upstream.
    case noHealthyUpstream = "UH"
    case upstreamConnectFailure = "UF"
    case upstreamOverflow = "UO"
    case upstreamRequestTimeout = "UT"
    case upstreamRetryLimitExceeded = "URX"
    case upstreamReset = "UR"
    case upstreamProtocolError = "UPE"
    case downstreamReset = "DC"
    case faultInjected = "FI"
    case delayInjected = "DI"
    case rateLimited = "RL"
    case downstreamProtocolError = "DPE"
}

/// One request and its response on a downstream connection. A class: the pipeline stages update it in place
/// through the connection's reference instead of copying a large struct in and out of the connection table.
final class Exchange {
    var start: UInt64
    var route: RouteRuntime?
    var cluster: WorkerCluster?
    /// The request head as sent upstream (kept for retries; freed when the exchange ends).
    var upHead: UnsafeMutableRawPointer?
    var upHeadLength = 0
    /// Upstream connection slot, -1 while none is assigned.
    var up: Int32 = -1
    var upQueue: [Segment] = []
    var upSending = false
    /// The whole request has been read from the client.
    var requestDone = false
    /// A copy of the request body for retries; nil once it outgrew ``L4Worker/replayLimit`` (then no retry).
    var replay: [UInt8]? = []
    var isHEAD = false
    var clientKeepAlive = true
    var upgrade = false
    /// After a 101, bytes are relayed opaquely in both directions.
    var tunnel = false
    var response = HTTP1ResponseReader()
    var upBuffer: Int32 = -1
    var upPos: Int32 = 0
    var upLength: Int32 = 0
    var upRefs: Int32 = 0
    var upReceiving = false
    var responseStarted = false
    var responseDone = false
    /// The upstream connection can carry another request afterwards.
    var upReusable = true
    var status = 0
    var flag = ResponseFlag.none
    var retries = 0
    /// Answered by the proxy itself (error, redirect, direct response, fault abort, rate limit): no upstream.
    var local = false
    /// Request timeout, per-try timeout, and the wake-up of a fault delay or retry back-off (0: none).
    var deadline: UInt64 = 0
    var tryDeadline: UInt64 = 0
    var wakeAt: UInt64 = 0
    /// Counted in the cluster's active requests (circuit breaker).
    var counted = false
    /// Retries counted in the cluster's retry budget.
    var retriesCounted = 0
    /// Consistent-hash key of the request (for `consistentHash` clusters).
    var hash: UInt64 = 0
    /// Endpoint of the current (or last) attempt.
    var lastEndpoint: Int32 = -1
    /// The attempt's connection came from the pool.
    var reused = false
    /// Waiting in its cluster's pending queue for a connection (`http1MaxPendingRequests`).
    var queued = false
    /// The attempt received any byte.
    var gotBytes = false
    /// The response being read is a 1xx: the final one follows.
    var interim = false
    /// The response body ends when the upstream closes.
    var responseUntilClose = false
    var hadBody = false
    /// A mirrored copy to send once the whole request is read (Istio's `mirror`): its head, and its cluster.
    var shadowHead: [UInt8]?
    var shadowCluster: WorkerCluster?
    /// An `HTTP2`/`GRPC` upstream: the stream carrying this exchange, the client's chunked body being unframed,
    /// and whether the response is being written chunked.
    var h2up: H2Upstream?
    var h2stream: Int32 = -1
    var chunkDecoder: BodyDecoder?
    var chunkedResponse = false

    /// Makes a finished exchange ready for the next request (the worker keeps a pool: no allocation per request,
    /// and the queues keep their capacity).
    func reset(start: UInt64) {
        self.start = start
        route = nil
        cluster = nil
        upHead = nil
        upHeadLength = 0
        up = -1
        upQueue.removeAll(keepingCapacity: true)
        upSending = false
        requestDone = false
        if replay == nil { replay = [] } else { replay!.removeAll(keepingCapacity: true) }
        isHEAD = false
        clientKeepAlive = true
        upgrade = false
        tunnel = false
        response = HTTP1ResponseReader()
        upBuffer = -1
        upPos = 0
        upLength = 0
        upRefs = 0
        upReceiving = false
        responseStarted = false
        responseDone = false
        upReusable = true
        status = 0
        flag = ResponseFlag.none
        retries = 0
        local = false
        deadline = 0
        tryDeadline = 0
        wakeAt = 0
        counted = false
        retriesCounted = 0
        hash = 0
        lastEndpoint = -1
        reused = false
        queued = false
        gotBytes = false
        interim = false
        responseUntilClose = false
        hadBody = false
        shadowHead = nil
        shadowCluster = nil
        h2up = nil
        h2stream = -1
        chunkDecoder = nil
        chunkedResponse = false
    }

    init(start: UInt64) { self.start = start }
}

/// One downstream HTTP/1.1 connection.
struct HTTPConn {
    enum Phase: UInt8 { case free, open, closing }
    var generation: UInt32 = 0
    var phase = Phase.free
    var fd: Int32 = -1
    var listener: Int32 = -1
    var pending: Int32 = 0
    var table: HTTPRouteTable?
    /// Captured connections: the service the client dialled (its default route) and that port.
    var captured: ClusterRuntime?
    var port: UInt16 = 0
    var reader = HTTP1RequestReader()
    var inBuffer: Int32 = -1
    var inPos: Int32 = 0
    var inLength: Int32 = 0
    var inRefs: Int32 = 0
    var receiving = false
    var sending = false
    var outQueue: [Segment] = []
    /// Close once everything queued is sent.
    var closeAfterFlush = false
    var lastActive: UInt64 = 0
    var headStarted: UInt64 = 0
    var client = ""
    /// The client workload's labels (captured connections from a workload of this node).
    var sourceLabels: [String: String] = [:]
    /// The workload identity its upstream tunnels present: the client workload's (captured), the gateway's.
    var sourceIdentity: String?
    var ex: Exchange?
    var requests = 0
    /// A receive buffer of the last exchange that a cancelled send may still read: given back when the slot is freed.
    var spareBuffer: Int32 = -1
    /// Set once the client spoke the HTTP/2 preface.
    var h2: H2Downstream?
    /// HTTPS listeners: the TLS session between the socket and the engine, and the records being sent.
    var tls: TLSStream?
    var tlsOut: UnsafeMutableRawPointer?
    var tlsOutLength: Int32 = 0
    var tlsOutSent: Int32 = 0
    /// Every request is answered with a redirect to https (an HTTP server's `tls.httpsRedirect`).
    var httpsRedirect = false
    /// The client certificate's identity (URI SAN) once a mutual TLS handshake verified it.
    var principal: String?
}

/// One upstream connection, in use by an exchange or idle in its cluster's pool.
struct UpConn {
    enum Phase: UInt8 { case free, connecting, busy, idle, closing }
    var generation: UInt32 = 0
    var phase = Phase.free
    var fd: Int32 = -1
    var pending: Int32 = 0
    var cluster: WorkerCluster?
    var endpoint: Int32 = -1
    /// The downstream connection using it.
    var owner: UInt32 = 0
    var ownerGeneration: UInt32 = 0
    var idleSince: UInt64 = 0
    var requests = 0
    var connectStart: UInt64 = 0
    /// A mirror's fire-and-forget request: no client waits for it; the bytes to send, freed when it closes.
    var shadow: UnsafeMutableRawPointer?
    var shadowLength = 0
    var shadowSent = 0
    /// An HTTP/2 connection shared by many streams.
    var h2: H2Upstream?
    /// Set when the endpoint is reached through an HBONE tunnel: the identity the tunnel presents (a pooled
    /// connection is reused only for requests of the same identity).
    var identity: String?
    /// An HTTP/2 client stream's HTTP/1.1 request on this connection.
    var leg: H1Leg?
    /// Memory a cancelled send may still read: freed with the connection.
    var retained: UnsafeMutableRawPointer?
    /// A send of a client's receive buffer was in flight when the exchange let go of this connection: the client
    /// connection's input stays held until it completes (or, if the client is gone, `orphanBuffer` is given back).
    var orphanHeld = false
    var orphanSlot: UInt32 = 0
    var orphanGeneration: UInt32 = 0
    var orphanBuffer: Int32 = -1
}
