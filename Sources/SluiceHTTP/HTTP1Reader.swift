/// A parsed message head: what ``HTTP1Reader`` needs of it.
public protocol HTTP1MessageHead: Sendable {
    var length: Int { get }
    var framing: BodyFraming { get }
}

extension HTTP1RequestHead: HTTP1MessageHead {}
extension HTTP1ResponseHead: HTTP1MessageHead {}

/// Reads requests off a client connection.
public typealias HTTP1RequestReader = HTTP1Reader<HTTP1RequestHead>
/// Reads responses off an upstream connection.
public typealias HTTP1ResponseReader = HTTP1Reader<HTTP1ResponseHead>

/// Reads HTTP/1.1 messages off one connection, whatever the receive buffers' boundaries: accumulates a head
/// (bounded by the limits), then delimits its body, then stops at the message's end so that a pipelined next
/// message waits until this one is dealt with. No I/O: the worker feeds received bytes and acts on events.
///
/// Only head bytes are copied (into one bounded buffer per connection); body bytes are reported as ranges of
/// the buffer being fed, to be forwarded from it.
public struct HTTP1Reader<Head: HTTP1MessageHead>: Sendable {
    public enum Event {
        /// A complete head; its ranges index `headBytes`.
        case head(Head, headBytes: [UInt8])
        /// Body bytes: a range of the buffer passed to ``feed(_:_:)``.
        case body(Range<Int>)
        /// The request (head and body) is complete; the connection may carry the next one.
        case end
        /// Answer with `error.status` and close the connection.
        case error(HTTP1Error)
    }

    enum State: Sendable {
        case head
        case body(BodyDecoder)
        /// Between `end` and ``next()``: the response is being sent; bytes wait.
        case done
        case failed
    }

    public let limits: HTTP1Limits
    var state = State.head
    var headBuffer: [UInt8] = []
    /// Responses only: the request being answered was a HEAD (no body, whatever the headers say).
    public var answeringHEAD = false
    /// Report body bytes as received, with their chunked framing (size lines, trailers), instead of only the data:
    /// what a proxy forwards unchanged.
    public var framedBody = false
    private let parse: @Sendable (UnsafeRawBufferPointer, HTTP1Limits, Bool) -> ParseResult

    enum ParseResult {
        case head(Head)
        case incomplete
        case error(HTTP1Error)
    }

    /// Feeds received bytes. Returns how many were used: fewer than given when a request ended (the rest is the
    /// next, pipelined request: feed it again after ``next()``) or an error stopped the connection.
    public mutating func feed(_ bytes: UnsafeRawBufferPointer, _ emit: (Event) -> Void) -> Int {
        var used = 0
        while used < bytes.count {
            switch state {
            case .done, .failed:
                return used
            case .head:
                let room = limits.maxHeadBytes - headBuffer.count
                let take = min(room, bytes.count - used)
                headBuffer.append(contentsOf: bytes[used..<(used + take)])
                let result = headBuffer.withUnsafeBytes { parse($0, limits, answeringHEAD) }
                switch result {
                case .incomplete:
                    used += take
                    if take == 0 {  // the buffer is full and the head is not over
                        state = .failed
                        emit(.error(.headersTooLarge))
                        return used
                    }
                case .error(let e):
                    state = .failed
                    emit(.error(e))
                    return used + take
                case .head(let h):
                    // Bytes past the head in this buffer are the body (or the next request).
                    let extra = headBuffer.count - h.length
                    used += take - extra
                    headBuffer.removeLast(extra)
                    let head = headBuffer
                    headBuffer = []
                    emit(.head(h, headBytes: head))
                    let decoder = BodyDecoder(h.framing)
                    if decoder.isDone {
                        state = .done
                        emit(.end)
                        return used
                    }
                    state = .body(decoder)
                }
            case .body(var decoder):
                let rest = UnsafeRawBufferPointer(rebasing: bytes[used...])
                let base = used
                do {
                    let framed = framedBody
                    let n = try decoder.feed(rest) { r in
                        if !framed { emit(.body((base + r.lowerBound)..<(base + r.upperBound))) }
                    }
                    if framed && n > 0 { emit(.body(base..<(base + n))) }
                    used += n
                } catch {
                    state = .failed
                    emit(.error(error))
                    return used
                }
                if decoder.isDone {
                    state = .done
                    emit(.end)
                    return used
                }
                state = .body(decoder)
            }
        }
        return used
    }

    /// After the response to the last request: read the next one.
    public mutating func next() {
        if case .done = state { state = .head }
    }

    /// True while a head is partly received: the worker's header timeout (slowloris) applies then.
    public var isInsideHead: Bool {
        if case .head = state { return !headBuffer.isEmpty }
        return false
    }
}

extension HTTP1Reader where Head == HTTP1RequestHead {
    public init(limits: HTTP1Limits = HTTP1Limits()) {
        self.limits = limits
        parse = { b, l, _ in
            switch HTTP1Parser.parseRequestHead(b, limits: l) {
            case .head(let h): .head(h)
            case .incomplete: .incomplete
            case .error(let e): .error(e)
            }
        }
    }
}

extension HTTP1Reader where Head == HTTP1ResponseHead {
    /// A response with `untilClose` framing ends when the upstream closes: the worker ends it then.
    public init(limits: HTTP1Limits = HTTP1Limits()) {
        self.limits = limits
        parse = { b, l, head in
            switch HTTP1Parser.parseResponseHead(b, requestMethodIsHEAD: head, limits: l) {
            case .head(let h): .head(h)
            case .incomplete: .incomplete
            case .error(let e): .error(e)
            }
        }
    }
}
