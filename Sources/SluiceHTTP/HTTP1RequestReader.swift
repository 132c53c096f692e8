/// Reads HTTP/1.1 requests off one client connection, whatever the receive buffers' boundaries: accumulates a
/// head (bounded by the limits), then delimits its body, then stops at the request's end so that a pipelined
/// next request waits until this one is answered. No I/O: the worker feeds received bytes and acts on events.
///
/// Only head bytes are copied (into one bounded buffer per connection); body bytes are reported as ranges of
/// the buffer being fed, to be forwarded from it.
public struct HTTP1RequestReader: Sendable {
    public enum Event {
        /// A complete head; its ranges index `headBytes`.
        case head(HTTP1RequestHead, headBytes: [UInt8])
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

    public init(limits: HTTP1Limits = HTTP1Limits()) {
        self.limits = limits
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
                let result = headBuffer.withUnsafeBytes { HTTP1Parser.parseRequestHead($0, limits: limits) }
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
                    let n = try decoder.feed(rest) { r in emit(.body((base + r.lowerBound)..<(base + r.upperBound))) }
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
