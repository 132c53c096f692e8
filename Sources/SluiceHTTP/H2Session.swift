import CSluiceLinux

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
        case headers(stream: Int32, fields: [(name: String, value: String)], endStream: Bool)
        /// Trailing fields (gRPC's `grpc-status`); the stream's end.
        case trailers(stream: Int32, fields: [(name: String, value: String)])
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
        var trailers: [(name: String, value: String)]?
        var deferred = false
    }

    public private(set) var events: [Event] = []
    let session: OpaquePointer
    public let isServer: Bool
    var pendingHeaders: [Int32: [(name: String, value: String)]] = [:]
    var outgoing: [Int32: Outgoing] = [:]
    /// Set when nghttp2 reports a fatal error: the connection must close.
    public private(set) var failed = false

    /// - Parameter maxConcurrentStreams: advertised to the peer (SETTINGS_MAX_CONCURRENT_STREAMS).
    public init(server: Bool, maxConcurrentStreams: UInt32 = 1000) {
        isServer = server
        var callbacks: OpaquePointer?
        nghttp2_session_callbacks_new(&callbacks)
        nghttp2_session_callbacks_set_on_begin_headers_callback(callbacks, { _, frame, user in
            let me = Unmanaged<H2Session>.fromOpaque(user!).takeUnretainedValue()
            me.pendingHeaders[frame!.pointee.hd.stream_id] = []
            return 0
        })
        nghttp2_session_callbacks_set_on_header_callback(callbacks, { _, frame, name, nameLength, value, valueLength, _, user in
            let me = Unmanaged<H2Session>.fromOpaque(user!).takeUnretainedValue()
            let n = String(decoding: UnsafeBufferPointer(start: name, count: nameLength), as: UTF8.self)
            let v = String(decoding: UnsafeBufferPointer(start: value, count: valueLength), as: UTF8.self)
            me.pendingHeaders[frame!.pointee.hd.stream_id, default: []].append((n, v))
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
        nghttp2_submit_settings(session, UInt8(NGHTTP2_FLAG_NONE.rawValue), &settings, 1)
    }

    deinit { nghttp2_session_del(session) }

    private func frameReceived(_ frame: UnsafePointer<nghttp2_frame>) {
        let stream = frame.pointee.hd.stream_id
        let endStream = frame.pointee.hd.flags & UInt8(NGHTTP2_FLAG_END_STREAM.rawValue) != 0
        switch Int(frame.pointee.hd.type) {
        case Int(NGHTTP2_HEADERS.rawValue):
            let fields = pendingHeaders.removeValue(forKey: stream) ?? []
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
    public func request(_ fields: [(name: String, value: String)], endStream: Bool) -> Int32 {
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
    public func respond(stream: Int32, _ fields: [(name: String, value: String)], endStream: Bool) {
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
    public func finish(stream: Int32, trailers: [(name: String, value: String)]? = nil) {
        guard outgoing[stream] != nil else { return }
        outgoing[stream]!.ended = true
        if let trailers { outgoing[stream]!.trailers = trailers }
        resume(stream)
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

    private func withHeaders(_ fields: [(name: String, value: String)],
                             _ body: (UnsafePointer<nghttp2_nv>, Int) -> Int32) -> Int32 {
        // nghttp2 copies the pairs during the submit call, so they only live for its duration.
        var storage: [[UInt8]] = []
        storage.reserveCapacity(fields.count * 2)
        for (n, v) in fields {
            storage.append(Array(n.utf8))
            storage.append(Array(v.utf8))
        }
        var nva: [nghttp2_nv] = []
        nva.reserveCapacity(fields.count)
        return withExtendedLifetime(storage) {
            for k in 0..<fields.count {
                let name = storage[2 * k].withUnsafeBufferPointer { UnsafeMutablePointer(mutating: $0.baseAddress) }
                let value = storage[2 * k + 1].withUnsafeBufferPointer { UnsafeMutablePointer(mutating: $0.baseAddress) }
                nva.append(nghttp2_nv(name: name ?? Self.empty, value: value ?? Self.empty, namelen: storage[2 * k].count,
                                      valuelen: storage[2 * k + 1].count, flags: UInt8(NGHTTP2_NV_FLAG_NONE.rawValue)))
            }
            return nva.withUnsafeBufferPointer { body($0.baseAddress!, $0.count) }
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
