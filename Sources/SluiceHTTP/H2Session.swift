import CSluiceLinux

/// The fields of one HEADERS block in one byte buffer: no String per field on the request path. Names are
/// lower-case (HTTP/2 requires it), pseudo-fields first.
public struct H2Fields: Sendable {
    public var bytes: [UInt8] = []
    var spans: [(name: Range<Int32>, value: Range<Int32>)] = []

    public init() {}

    public init(_ pairs: [(String, String)]) {
        for (n, v) in pairs { append(n, v) }
    }

    public var count: Int { spans.count }

    public mutating func append(_ name: UnsafeRawBufferPointer, _ value: UnsafeRawBufferPointer) {
        if spans.isEmpty {
            // One allocation each for a typical header block instead of doubling from one field.
            spans.reserveCapacity(16)
            bytes.reserveCapacity(512)
        }
        let n0 = Int32(bytes.count)
        bytes.append(contentsOf: name)
        let v0 = Int32(bytes.count)
        bytes.append(contentsOf: value)
        spans.append((n0..<v0, v0..<Int32(bytes.count)))
    }

    public mutating func append(_ name: String, _ value: String) {
        var n = name, v = value
        n.withUTF8 { nb in v.withUTF8 { vb in append(UnsafeRawBufferPointer(nb), UnsafeRawBufferPointer(vb)) } }
    }

    /// Copies field `i` of `other`.
    public mutating func append(from other: H2Fields, _ i: Int) {
        let (n, v) = other.spans[i]
        other.bytes.withUnsafeBytes { b in
            append(UnsafeRawBufferPointer(rebasing: b[Int(n.lowerBound)..<Int(n.upperBound)]),
                   UnsafeRawBufferPointer(rebasing: b[Int(v.lowerBound)..<Int(v.upperBound)]))
        }
    }

    public func name(_ i: Int) -> String {
        String(decoding: bytes[Int(spans[i].name.lowerBound)..<Int(spans[i].name.upperBound)], as: UTF8.self)
    }

    public func value(_ i: Int) -> String {
        String(decoding: bytes[Int(spans[i].value.lowerBound)..<Int(spans[i].value.upperBound)], as: UTF8.self)
    }

    /// Whether field `i`'s name is `lower`.
    public func nameIs(_ i: Int, _ lower: StaticString) -> Bool {
        let r = spans[i].name
        guard r.count == lower.utf8CodeUnitCount else { return false }
        let p = lower.utf8Start
        var k = 0
        for j in Int(r.lowerBound)..<Int(r.upperBound) {
            if bytes[j] != p[k] { return false }
            k += 1
        }
        return true
    }

    /// The value of the first field named `lower`.
    public func first(_ lower: StaticString) -> String? {
        for i in 0..<count where nameIs(i, lower) { return value(i) }
        return nil
    }

    /// Every field as strings (tests, slow paths).
    public var pairs: [(name: String, value: String)] { (0..<count).map { (name($0), value($0)) } }
}

/// One HTTP/2 connection's protocol state, server or client side, on libnghttp2 (frames, HPACK, stream states,
/// flow control). No I/O: the owner feeds received bytes with ``receive(_:)``, takes the bytes to send with
/// ``takeOutput()``, and acts on ``events``.
///
/// Flow control is explicit: received DATA is acknowledged (WINDOW_UPDATE) only when the owner calls
/// ``consume(stream:bytes:)``, i.e. once the bytes went on; a slow peer on the other side therefore stops this
/// one at its stream window instead of making the proxy buffer without bound.
public final class H2Session {
    public enum Event {
        /// A request (server) or response (client) head; `endStream` when no body follows.
        case headers(stream: Int32, fields: H2Fields, endStream: Bool)
        /// Trailing fields (gRPC's `grpc-status`); the stream's end.
        case trailers(stream: Int32, fields: H2Fields)
        case data(stream: Int32, bytes: [UInt8])
        /// The peer ended its side of the stream (after headers or data).
        case end(stream: Int32)
        /// The stream is gone; `error` is the HTTP/2 error code (0: closed normally).
        case closed(stream: Int32, error: UInt32)
        /// `bytes` of what this side queued for `stream` left in DATA frames (the owner may acknowledge as much on
        /// the session the bytes came from).
        case drained(stream: Int32, bytes: Int)
        /// The peer sent GOAWAY.
        case goaway(lastStream: Int32)
    }

    /// What this side sends on one stream: queued body bytes, whether the body is complete, trailers to send at
    /// its end.
    struct Outgoing {
        var buffer: [UInt8] = []
        var offset = 0
        var ended = false
        var trailers: H2Fields?
        var deferred = false
    }

    public private(set) var events: [Event] = []
    let session: OpaquePointer
    public let isServer: Bool
    var pendingHeaders = StreamMap<H2Fields>()
    var outgoing = StreamMap<Outgoing>()
    /// Set when nghttp2 reports a fatal error: the connection must close.
    public private(set) var failed = false

    /// - Parameters:
    ///   - maxConcurrentStreams: advertised to the peer (SETTINGS_MAX_CONCURRENT_STREAMS).
    ///   - window: when set, the receive window of each stream (SETTINGS_INITIAL_WINDOW_SIZE) and of the whole
    ///     connection, instead of HTTP/2's 64 KiB (tunnels carrying bulk streams need more in flight).
    public init(server: Bool, maxConcurrentStreams: UInt32 = 1000, window: Int32? = nil) {
        isServer = server
        var callbacks: OpaquePointer?
        nghttp2_session_callbacks_new(&callbacks)
        nghttp2_session_callbacks_set_on_begin_headers_callback(callbacks, { _, frame, user in
            let me = Unmanaged<H2Session>.fromOpaque(user!).takeUnretainedValue()
            me.pendingHeaders[frame!.pointee.hd.stream_id] = H2Fields()
            return 0
        })
        nghttp2_session_callbacks_set_on_header_callback(callbacks, { _, frame, name, nameLength, value, valueLength, _, user in
            let me = Unmanaged<H2Session>.fromOpaque(user!).takeUnretainedValue()
            let id = frame!.pointee.hd.stream_id
            if me.pendingHeaders[id] == nil { me.pendingHeaders[id] = H2Fields() }
            me.pendingHeaders[id]!
                .append(UnsafeRawBufferPointer(start: name, count: nameLength), UnsafeRawBufferPointer(start: value, count: valueLength))
            return 0
        })
        nghttp2_session_callbacks_set_on_frame_recv_callback(callbacks, { _, frame, user in
            let me = Unmanaged<H2Session>.fromOpaque(user!).takeUnretainedValue()
            me.frameReceived(frame!)
            return 0
        })
        nghttp2_session_callbacks_set_on_data_chunk_recv_callback(callbacks, { _, _, stream, data, length, user in
            let me = Unmanaged<H2Session>.fromOpaque(user!).takeUnretainedValue()
            me.events.append(.data(stream: stream, bytes: Array(UnsafeBufferPointer(start: data, count: length))))
            return 0
        })
        nghttp2_session_callbacks_set_on_stream_close_callback(callbacks, { _, stream, code, user in
            let me = Unmanaged<H2Session>.fromOpaque(user!).takeUnretainedValue()
            me.outgoing[stream] = nil
            me.pendingHeaders[stream] = nil
            me.events.append(.closed(stream: stream, error: code))
            return 0
        })
        var option: OpaquePointer?
        nghttp2_option_new(&option)
        nghttp2_option_set_no_auto_window_update(option, 1)
        var s: OpaquePointer?
        // `self` is not yet available as user data before init completes: set it right after.
        if server {
            nghttp2_session_server_new2(&s, callbacks, nil, option)
        } else {
            nghttp2_session_client_new2(&s, callbacks, nil, option)
        }
        nghttp2_option_del(option)
        nghttp2_session_callbacks_del(callbacks)
        session = s!
        nghttp2_session_set_user_data(session, Unmanaged.passUnretained(self).toOpaque())
        var settings = [nghttp2_settings_entry(settings_id: Int32(NGHTTP2_SETTINGS_MAX_CONCURRENT_STREAMS.rawValue),
                                               value: maxConcurrentStreams)]
        if let window {
            settings.append(nghttp2_settings_entry(settings_id: Int32(NGHTTP2_SETTINGS_INITIAL_WINDOW_SIZE.rawValue),
                                                   value: UInt32(window)))
        }
        nghttp2_submit_settings(session, UInt8(NGHTTP2_FLAG_NONE.rawValue), &settings, settings.count)
        if let window { nghttp2_session_set_local_window_size(session, UInt8(NGHTTP2_FLAG_NONE.rawValue), 0, window) }
    }

    deinit { nghttp2_session_del(session) }

    private func frameReceived(_ frame: UnsafePointer<nghttp2_frame>) {
        let stream = frame.pointee.hd.stream_id
        let endStream = frame.pointee.hd.flags & UInt8(NGHTTP2_FLAG_END_STREAM.rawValue) != 0
        switch Int(frame.pointee.hd.type) {
        case Int(NGHTTP2_HEADERS.rawValue):
            let fields = pendingHeaders.removeValue(forKey: stream) ?? H2Fields()
            if frame.pointee.headers.cat == NGHTTP2_HCAT_HEADERS && endStream {
                events.append(.trailers(stream: stream, fields: fields))
            } else if frame.pointee.headers.cat != NGHTTP2_HCAT_HEADERS {
                events.append(.headers(stream: stream, fields: fields, endStream: endStream))
            }
            if endStream { events.append(.end(stream: stream)) }
        case Int(NGHTTP2_DATA.rawValue):
            if endStream { events.append(.end(stream: stream)) }
        case Int(NGHTTP2_GOAWAY.rawValue):
            events.append(.goaway(lastStream: frame.pointee.goaway.last_stream_id))
        default:
            break
        }
    }

    /// Feeds received bytes; returns false on a protocol error (the connection must close after the output,
    /// which then holds a GOAWAY).
    @discardableResult
    public func receive(_ bytes: UnsafeRawBufferPointer) -> Bool {
        guard let base = bytes.baseAddress, !bytes.isEmpty else { return true }
        let n = nghttp2_session_mem_recv(session, base.assumingMemoryBound(to: UInt8.self), bytes.count)
        if n < 0 { failed = true }
        return n >= 0
    }

    /// Takes the events produced since the last call.
    public func takeEvents() -> [Event] {
        defer { events.removeAll(keepingCapacity: true) }
        return events
    }

    /// Everything nghttp2 wants to send now (frames, settings, window updates, DATA from queued bodies).
    public func takeOutput() -> [UInt8] {
        var out: [UInt8] = []
        while true {
            var p: UnsafePointer<UInt8>?
            let n = nghttp2_session_mem_send(session, &p)
            if n < 0 { failed = true; break }
            if n == 0 { break }
            out.append(contentsOf: UnsafeBufferPointer(start: p, count: n))
        }
        return out
    }

    /// Whether the session has nothing more to do (both sides done; the connection can close).
    public var isFinished: Bool {
        nghttp2_session_want_read(session) == 0 && nghttp2_session_want_write(session) == 0
    }

    public var wantsWrite: Bool { nghttp2_session_want_write(session) != 0 }

    // MARK: - submitting

    /// Sends a request (client) and returns its stream id, or -1 when the session refuses (e.g. stream ids run
    /// out). `endStream`: no body.
    public func request(_ fields: H2Fields, endStream: Bool) -> Int32 {
        let id = withHeaders(fields) { nva, count in
            if endStream {
                return nghttp2_submit_request(session, nil, nva, count, nil, nil)
            }
            var provider = Self.provider()
            return nghttp2_submit_request(session, nil, nva, count, &provider, nil)
        }
        if id > 0 && !endStream { outgoing[id] = Outgoing() }
        return id
    }

    /// Sends a response head (server). `endStream`: no body.
    public func respond(stream: Int32, _ fields: H2Fields, endStream: Bool) {
        _ = withHeaders(fields) { nva, count in
            if endStream { return nghttp2_submit_response(session, stream, nva, count, nil) }
            outgoing[stream] = Outgoing()
            var provider = Self.provider()
            return nghttp2_submit_response(session, stream, nva, count, &provider)
        }
    }

    /// Queues body bytes on a stream this side is sending a body on.
    public func send(stream: Int32, _ bytes: UnsafeRawBufferPointer) {
        guard outgoing[stream] != nil else { return }
        outgoing[stream]!.buffer.append(contentsOf: bytes)
        resume(stream)
    }

    /// Ends this side's body, with trailers if any (trailers given earlier are kept).
    public func finish(stream: Int32, trailers: H2Fields? = nil) {
        guard outgoing[stream] != nil else { return }
        outgoing[stream]!.ended = true
        if let trailers { outgoing[stream]!.trailers = trailers }
        resume(stream)
    }

    /// Body bytes queued on `stream` and not yet framed.
    public func queuedBytes(stream: Int32) -> Int {
        guard let o = outgoing[stream] else { return 0 }
        return o.buffer.count - o.offset
    }

    public func reset(stream: Int32, error: UInt32 = UInt32(NGHTTP2_CANCEL.rawValue)) {
        nghttp2_submit_rst_stream(session, UInt8(NGHTTP2_FLAG_NONE.rawValue), stream, error)
    }

    /// Acknowledges `bytes` of the stream's received DATA (sends WINDOW_UPDATE as nghttp2 sees fit).
    public func consume(stream: Int32, bytes: Int) {
        if bytes > 0 { nghttp2_session_consume(session, stream, bytes) }
    }

    /// GOAWAY: no new streams; those in flight finish.
    public func goAway() {
        nghttp2_submit_goaway(session, UInt8(NGHTTP2_FLAG_NONE.rawValue),
                              nghttp2_session_get_last_proc_stream_id(session), UInt32(NGHTTP2_NO_ERROR.rawValue), nil, 0)
    }

    private func resume(_ stream: Int32) {
        if outgoing[stream]?.deferred == true {
            outgoing[stream]!.deferred = false
            nghttp2_session_resume_data(session, stream)
        }
    }

    private func withHeaders(_ fields: H2Fields, _ body: (UnsafePointer<nghttp2_nv>, Int) -> Int32) -> Int32 {
        // nghttp2 copies the pairs during the submit call, so pointers into the block only live for its duration.
        fields.bytes.withUnsafeBufferPointer { b in
            let base = UnsafeMutablePointer(mutating: b.baseAddress) ?? Self.empty
            return withUnsafeTemporaryAllocation(of: nghttp2_nv.self, capacity: max(1, fields.count)) { nva in
                for (k, (n, v)) in fields.spans.enumerated() {
                    nva[k] = nghttp2_nv(name: base + Int(n.lowerBound), value: base + Int(v.lowerBound), namelen: n.count,
                                        valuelen: v.count, flags: UInt8(NGHTTP2_NV_FLAG_NONE.rawValue))
                }
                return body(nva.baseAddress!, fields.count)
            }
        }
    }

    /// Where an empty name or value points (nghttp2 wants a pointer even for length 0); never written.
    nonisolated(unsafe) private static let empty: UnsafeMutablePointer<UInt8> = {
        let p = UnsafeMutablePointer<UInt8>.allocate(capacity: 1)
        p.initialize(to: 0)
        return p
    }()

    /// The data provider all bodies use: it reads the stream's ``Outgoing`` queue.
    private static func provider() -> nghttp2_data_provider {
        var p = nghttp2_data_provider()
        p.read_callback = { _, stream, buf, length, flags, _, user in
            let me = Unmanaged<H2Session>.fromOpaque(user!).takeUnretainedValue()
            return me.read(stream, buf!, length, flags!)
        }
        return p
    }

    private func read(_ stream: Int32, _ buf: UnsafeMutablePointer<UInt8>, _ length: Int,
                      _ flags: UnsafeMutablePointer<UInt32>) -> Int {
        guard var o = outgoing[stream] else { return Int(NGHTTP2_ERR_TEMPORAL_CALLBACK_FAILURE.rawValue) }
        let available = o.buffer.count - o.offset
        if available == 0 && !o.ended {
            o.deferred = true
            outgoing[stream] = o
            return Int(NGHTTP2_ERR_DEFERRED.rawValue)
        }
        let n = min(available, length)
        if n > 0 {
            o.buffer.withUnsafeBytes { src in
                buf.update(from: src.baseAddress!.assumingMemoryBound(to: UInt8.self) + o.offset, count: n)
            }
            o.offset += n
            events.append(.drained(stream: stream, bytes: n))
        }
        if o.offset == o.buffer.count {
            o.buffer.removeAll(keepingCapacity: true)
            o.offset = 0
            if o.ended {
                flags.pointee |= UInt32(NGHTTP2_DATA_FLAG_EOF.rawValue)
                if let t = o.trailers {
                    flags.pointee |= UInt32(NGHTTP2_DATA_FLAG_NO_END_STREAM.rawValue)
                    _ = withHeaders(t) { nva, count in nghttp2_submit_trailer(session, stream, nva, count) }
                }
            }
        }
        outgoing[stream] = o
        return n
    }
}
