/// Where a request head is refused, and the status the proxy answers with before closing.
public enum HTTP1Error: Error, Equatable, Sendable {
    /// Malformed or ambiguous (request smuggling shapes included): 400, then close.
    case badRequest(String)
    /// Request target longer than the limit: 414.
    case uriTooLong
    /// Head larger than the limit, or too many header fields: 431.
    case headersTooLarge
    /// A transfer coding other than chunked: 501.
    case notImplemented(String)
    /// An upstream's response head that cannot be relayed safely: the client gets 502.
    case badResponse(String)

    public var status: Int {
        switch self {
        case .badResponse: 502
        case .badRequest: 400
        case .uriTooLong: 414
        case .headersTooLarge: 431
        case .notImplemented: 501
        }
    }
}

/// Limits on what one request head may hold; configurable per listener.
public struct HTTP1Limits: Sendable, Equatable {
    public var maxHeadBytes = 16 << 10
    public var maxHeaderCount = 100
    public var maxURIBytes = 8 << 10
    public init() {}

    /// For heads the proxy wrote itself (re-read when translating): only the sanity bounds.
    public static let lenient: HTTP1Limits = {
        var l = HTTP1Limits()
        l.maxHeadBytes = 1 << 20
        l.maxHeaderCount = 10_000
        l.maxURIBytes = 1 << 19
        return l
    }()
}

/// How the message body is delimited (RFC 9112 section 6).
public enum BodyFraming: Equatable, Sendable {
    case none
    case contentLength(UInt64)
    case chunked
    /// A response without length: the body ends when the upstream closes.
    case untilClose
}

/// A parsed request head. Zero-copy: every field is a range into the head's bytes, which the caller keeps
/// (the connection's head buffer); nothing is allocated per header.
public struct HTTP1RequestHead: Sendable {
    public var method: Range<Int>
    public var target: Range<Int>
    /// 0 for HTTP/1.0, 1 for HTTP/1.1.
    public var minorVersion: Int
    public var headers: [(name: Range<Int>, value: Range<Int>)]
    public var framing: BodyFraming
    /// The connection may carry another request after this one.
    public var keepAlive: Bool
    public var expectContinue: Bool
    /// `Upgrade` requested (WebSocket and others): after the response, bytes are relayed opaquely.
    public var upgrade: Bool
    /// Bytes of the head, CRLFCRLF included: where the body starts in the buffer.
    public var length: Int
}

/// A parsed response head (from an upstream), zero-copy like ``HTTP1RequestHead``.
public struct HTTP1ResponseHead: Sendable {
    public var status: Int
    public var reason: Range<Int>
    public var minorVersion: Int
    public var headers: [(name: Range<Int>, value: Range<Int>)]
    public var framing: BodyFraming
    /// The upstream connection may be reused for another request.
    public var keepAlive: Bool
    public var length: Int
}
