/// The byte relay between a downstream (client) and an upstream socket, as a synchronous state machine.
///
/// It does no I/O: each event returns the actions to take. Back-pressure is built in: a side is read again only
/// while at most one received chunk waits for the other side's send, so a slow reader stops the proxy from
/// reading its peer and memory stays at two buffers per direction.
public struct TCPRelay: Sendable {
    public enum Side: UInt8, Sendable {
        case downstream = 0, upstream = 1
        @inline(__always) public var other: Side { self == .downstream ? .upstream : .downstream }
    }

    /// Part of a provided buffer still to be sent.
    public struct Chunk: Sendable, Equatable {
        public var buffer: UInt16
        public var offset: Int32
        public var length: Int32
        public init(buffer: UInt16, offset: Int32 = 0, length: Int32) {
            self.buffer = buffer
            self.offset = offset
            self.length = length
        }
    }

    public enum Action: Sendable, Equatable {
        /// Post a receive on this side.
        case receive(Side)
        /// Send the chunk to this side.
        case send(Side, Chunk)
        /// Half-close: shut down writing on this side (its peer sent FIN and everything was delivered).
        case shutdownWrite(Side)
        /// Give the buffer back to the pool.
        case release(UInt16)
        /// Tear the connection down; `reset` when a peer reset and the other side should see a reset too.
        case close(reset: Bool)
    }

    /// Up to six actions, stored inline: no allocation per event.
    public struct Actions: Sendable, Sequence, IteratorProtocol {
        var items: (Action?, Action?, Action?, Action?, Action?, Action?) = (nil, nil, nil, nil, nil, nil)
        var count = 0
        var position = 0

        @inline(__always)
        mutating func append(_ a: Action) {
            switch count {
            case 0: items.0 = a
            case 1: items.1 = a
            case 2: items.2 = a
            case 3: items.3 = a
            case 4: items.4 = a
            default: items.5 = a
            }
            count += 1
        }

        @inline(__always)
        public mutating func next() -> Action? {
            defer { position += 1 }
            switch position {
            case 0 where count > 0: return items.0
            case 1 where count > 1: return items.1
            case 2 where count > 2: return items.2
            case 3 where count > 3: return items.3
            case 4 where count > 4: return items.4
            case 5 where count > 5: return items.5
            default: return nil
            }
        }

        public var array: [Action] { var copy = self; copy.position = 0; return Array(IteratorSequence(copy)) }
    }

    /// One direction: bytes read from `source` are written to `source.other`.
    struct Flow: Sendable {
        var receiving = false
        var eof = false
        var sending: Chunk?
        var queued: Chunk?
        var shutDown = false
    }

    var flows = (Flow(), Flow())
    public private(set) var closed = false

    public init() {}

    @inline(__always)
    func flow(_ s: Side) -> Flow { s == .downstream ? flows.0 : flows.1 }

    @inline(__always)
    mutating func withFlow<R>(_ s: Side, _ body: (inout Flow) -> R) -> R {
        s == .downstream ? body(&flows.0) : body(&flows.1)
    }

    /// Both sockets are connected: start reading both sides.
    public mutating func start() -> Actions {
        var out = Actions()
        flows.0.receiving = true
        flows.1.receiving = true
        out.append(.receive(.downstream))
        out.append(.receive(.upstream))
        return out
    }

    /// `side` delivered `chunk` (length > 0).
    public mutating func received(from side: Side, _ chunk: Chunk) -> Actions {
        var out = Actions()
        if closed {
            out.append(.release(chunk.buffer))
            return out
        }
        withFlow(side) { f in
            f.receiving = false
            if f.sending == nil {
                f.sending = chunk
                out.append(.send(side.other, chunk))
            } else {
                f.queued = chunk
            }
            if f.queued == nil && !f.eof {
                f.receiving = true
                out.append(.receive(side))
            }
        }
        return out
    }

    /// The pool had no free buffer for a receive on `side`; the caller retries with ``resumeReceive(_:)``.
    public mutating func receiveStalled(_ side: Side) {
        withFlow(side) { $0.receiving = false }
    }

    /// A buffer is free again: re-post a stalled receive if this side may read.
    public mutating func resumeReceive(_ side: Side) -> Actions {
        var out = Actions()
        guard !closed else { return out }
        withFlow(side) { f in
            if !f.receiving && !f.eof && f.queued == nil {
                f.receiving = true
                out.append(.receive(side))
            }
        }
        return out
    }

    /// `side` sent FIN.
    public mutating func receivedEOF(from side: Side) -> Actions {
        var out = Actions()
        guard !closed else { return out }
        withFlow(side) { f in
            f.receiving = false
            f.eof = true
            if f.sending == nil && !f.shutDown {
                f.shutDown = true
                out.append(.shutdownWrite(side.other))
            }
        }
        finishIfDone(&out)
        return out
    }

    /// A send to `side` completed with `bytes` written.
    public mutating func sent(to side: Side, bytes: Int32) -> Actions {
        var out = Actions()
        let source = side.other
        if closed { return out }
        withFlow(source) { f in
            guard var chunk = f.sending else { return }
            if bytes < chunk.length {
                chunk.offset += bytes
                chunk.length -= bytes
                f.sending = chunk
                out.append(.send(side, chunk))
                return
            }
            out.append(.release(chunk.buffer))
            f.sending = f.queued
            f.queued = nil
            if let next = f.sending { out.append(.send(side, next)) }
            if !f.receiving && !f.eof {
                f.receiving = true
                out.append(.receive(source))
            }
            if f.sending == nil && f.eof && !f.shutDown {
                f.shutDown = true
                out.append(.shutdownWrite(side))
            }
        }
        finishIfDone(&out)
        return out
    }

    /// A receive or send failed (reset, timeout, broken pipe), or the proxy gives up on the connection.
    public mutating func failed(reset: Bool) -> Actions {
        var out = Actions()
        guard !closed else { return out }
        closed = true
        for f in [flows.0, flows.1] {
            if let c = f.sending { out.append(.release(c.buffer)) }
            if let c = f.queued { out.append(.release(c.buffer)) }
        }
        flows.0.sending = nil; flows.0.queued = nil
        flows.1.sending = nil; flows.1.queued = nil
        out.append(.close(reset: reset))
        return out
    }

    private mutating func finishIfDone(_ out: inout Actions) {
        if !closed && flows.0.shutDown && flows.1.shutDown {
            closed = true
            out.append(.close(reset: false))
        }
    }

    /// Buffers this relay currently holds (for accounting and tests).
    public var buffersHeld: Int {
        [flows.0.sending, flows.0.queued, flows.1.sending, flows.1.queued].reduce(0) { $0 + ($1 == nil ? 0 : 1) }
    }
}
