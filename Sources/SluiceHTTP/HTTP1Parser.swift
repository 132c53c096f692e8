/// A strict HTTP/1.1 request-head parser (RFC 9110/9112). Hand-written: it runs on the data-plane workers for
/// every request, over the connection's own head buffer, allocating only the header index array.
///
/// Strict where leniency enables request smuggling: Content-Length together with Transfer-Encoding, duplicate or
/// malformed Content-Length, transfer codings other than a final `chunked`, obs-fold, bare CR or LF, NUL, and
/// whitespace before a header's colon are all refused.
public enum HTTP1Parser {
    public enum Result: Sendable {
        /// The head is complete.
        case head(HTTP1RequestHead)
        /// More bytes are needed (the head is not terminated yet, and within the limits so far).
        case incomplete
        case error(HTTP1Error)
    }

    /// Parses the request head at the start of `bytes`.
    public static func parseRequestHead(_ bytes: UnsafeRawBufferPointer, limits: HTTP1Limits = HTTP1Limits()) -> Result {
        guard let end = headEnd(bytes, limit: limits.maxHeadBytes) else {
            // No terminator yet: refuse now if it can no longer fit, or if the target alone is already too long.
            if bytes.count >= limits.maxHeadBytes { return .error(.headersTooLarge) }
            if let sp = bytes.firstIndex(of: 0x20), bytes[(sp + 1)...].firstIndex(of: 0x20) == nil,
                bytes.count - sp - 1 > limits.maxURIBytes
            {
                return .error(.uriTooLong)
            }
            return .incomplete
        }
        do {
            return .head(try parse(bytes, headLength: end, limits: limits))
        } catch let e as HTTP1Error {
            return .error(e)
        } catch {
            return .error(.badRequest("unexpected"))
        }
    }

    /// Index just past the first CRLFCRLF, if within `limit` bytes.
    static func headEnd(_ b: UnsafeRawBufferPointer, limit: Int) -> Int? {
        let n = min(b.count, limit)
        var i = 3
        while i < n {
            if b[i] == 0x0A && b[i - 1] == 0x0D && b[i - 2] == 0x0A && b[i - 3] == 0x0D { return i + 1 }
            i += 1
        }
        return nil
    }

    /// The head's lines, without their CRLF. Every line must end in CRLF; a CR or LF anywhere else, or a NUL, is
    /// refused.
    static func lines(_ b: UnsafeRawBufferPointer, headLength: Int) throws -> [Range<Int>] {
        var lines: [Range<Int>] = []
        // One allocation of the right size instead of doubling as lines are found.
        var count = 0
        for i in 0..<headLength where b[i] == 0x0A { count += 1 }
        lines.reserveCapacity(count)
        var start = 0
        var i = 0
        let end = headLength - 2  // the final empty line
        while i < end {
            let c = b[i]
            if c == 0x0D {
                guard i + 1 < headLength, b[i + 1] == 0x0A else { throw HTTP1Error.badRequest("bare CR") }
                lines.append(start..<i)
                i += 2
                start = i
                continue
            }
            if c == 0x0A { throw HTTP1Error.badRequest("bare LF") }
            if c == 0 { throw HTTP1Error.badRequest("NUL byte") }
            i += 1
        }
        guard !lines.isEmpty else { throw HTTP1Error.badRequest("empty head") }
        return lines
    }

    /// What the header fields say about framing and the connection.
    struct Fields {
        var headers: [(name: Range<Int>, value: Range<Int>)] = []
        var contentLength: UInt64?
        var transferEncoding = false
        var connectionClose = false, connectionKeepAlive = false, expectContinue = false, upgrade = false
        var hostCount = 0
    }

    static func fields(_ b: UnsafeRawBufferPointer, _ lines: ArraySlice<Range<Int>>, limits: HTTP1Limits) throws -> Fields {
        var f = Fields()
        f.headers.reserveCapacity(lines.count)
        for line in lines {
            if f.headers.count >= limits.maxHeaderCount { throw HTTP1Error.headersTooLarge }
            guard let first = b[safe: line.lowerBound] else { throw HTTP1Error.badRequest("empty header line") }
            if first == 0x20 || first == 0x09 { throw HTTP1Error.badRequest("obs-fold (line folding)") }
            guard let colon = line.first(where: { b[$0] == 0x3A }) else { throw HTTP1Error.badRequest("header without colon") }
            let name = line.lowerBound..<colon
            // No whitespace between the field name and the colon (RFC 9112 5.1): a smuggling vector.
            guard !name.isEmpty, name.allSatisfy({ isToken(b[$0]) }) else { throw HTTP1Error.badRequest("bad header name") }
            var vs = colon + 1, ve = line.upperBound
            while vs < ve, b[vs] == 0x20 || b[vs] == 0x09 { vs += 1 }
            while ve > vs, b[ve - 1] == 0x20 || b[ve - 1] == 0x09 { ve -= 1 }
            let value = vs..<ve
            for j in value where b[j] < 0x20 && b[j] != 0x09 || b[j] == 0x7F {
                throw HTTP1Error.badRequest("control character in a header value")
            }
            f.headers.append((name, value))
            if nameEquals(b, name, "content-length") {
                guard f.contentLength == nil else { throw HTTP1Error.badRequest("duplicate Content-Length") }
                guard !value.isEmpty, value.count <= 19, value.allSatisfy({ b[$0] >= 0x30 && b[$0] <= 0x39 }) else {
                    throw HTTP1Error.badRequest("malformed Content-Length")
                }
                f.contentLength = value.reduce(0) { $0 * 10 + UInt64(b[$1] - 0x30) }
            } else if nameEquals(b, name, "transfer-encoding") {
                guard !f.transferEncoding else { throw HTTP1Error.badRequest("duplicate Transfer-Encoding") }
                f.transferEncoding = true
                // Only `chunked`, alone: anything else (gzip, chunked twice, chunked not last) is refused.
                guard valueEquals(b, value, "chunked") else {
                    throw HTTP1Error.notImplemented("transfer coding other than chunked")
                }
            } else if nameEquals(b, name, "connection") {
                forEachToken(b, value) { token in
                    if valueEquals(b, token, "close") { f.connectionClose = true }
                    if valueEquals(b, token, "keep-alive") { f.connectionKeepAlive = true }
                    if valueEquals(b, token, "upgrade") { f.upgrade = true }
                }
            } else if nameEquals(b, name, "expect") {
                f.expectContinue = valueEquals(b, value, "100-continue")
            } else if nameEquals(b, name, "host") {
                f.hostCount += 1
            }
        }
        if f.transferEncoding && f.contentLength != nil {
            throw HTTP1Error.badRequest("both Content-Length and Transfer-Encoding")
        }
        return f
    }

    /// `HTTP/1.0` or `HTTP/1.1` at `r`: the minor version.
    static func version(_ b: UnsafeRawBufferPointer, _ r: Range<Int>) -> Int? {
        guard r.count == 8, equals(b, r.prefix(7), "HTTP/1."), b[r.lowerBound + 7] == 0x30 || b[r.lowerBound + 7] == 0x31
        else { return nil }
        return Int(b[r.lowerBound + 7] - 0x30)
    }

    private static func parse(_ b: UnsafeRawBufferPointer, headLength: Int, limits: HTTP1Limits) throws
        -> HTTP1RequestHead
    {
        let lines = try lines(b, headLength: headLength)
        // request-line = method SP request-target SP HTTP-version
        let rl = lines[0]
        guard let sp1 = (rl.lowerBound..<rl.upperBound).first(where: { b[$0] == 0x20 }) else {
            throw HTTP1Error.badRequest("malformed request line")
        }
        let method = rl.lowerBound..<sp1
        guard !method.isEmpty, method.allSatisfy({ isToken(b[$0]) }) else { throw HTTP1Error.badRequest("bad method") }
        guard let sp2 = ((sp1 + 1)..<rl.upperBound).first(where: { b[$0] == 0x20 }) else {
            throw HTTP1Error.badRequest("malformed request line")
        }
        let target = (sp1 + 1)..<sp2
        if target.count > limits.maxURIBytes { throw HTTP1Error.uriTooLong }
        guard !target.isEmpty, target.allSatisfy({ b[$0] > 0x20 && b[$0] < 0x7F }) else {
            throw HTTP1Error.badRequest("bad request target")
        }
        guard let minor = version(b, (sp2 + 1)..<rl.upperBound) else {
            throw HTTP1Error.badRequest("unsupported HTTP version")
        }
        let f = try fields(b, lines.dropFirst(), limits: limits)
        if minor == 1 && f.hostCount != 1 { throw HTTP1Error.badRequest(f.hostCount == 0 ? "missing Host" : "duplicate Host") }
        if f.transferEncoding && minor == 0 { throw HTTP1Error.badRequest("Transfer-Encoding in an HTTP/1.0 request") }
        let framing: BodyFraming = f.transferEncoding ? .chunked
            : f.contentLength.map { $0 == 0 ? .none : .contentLength($0) } ?? .none
        return HTTP1RequestHead(
            method: method, target: target, minorVersion: minor, headers: f.headers, framing: framing,
            keepAlive: minor == 1 ? !f.connectionClose : f.connectionKeepAlive && !f.connectionClose,
            expectContinue: f.expectContinue, upgrade: f.upgrade, length: headLength)
    }

    /// Parses an upstream's response head at the start of `bytes`. `requestMethodIsHEAD`: the response has no
    /// body whatever its headers say (RFC 9112 6.3). Problems are ``HTTP1Error/badResponse(_:)`` (502).
    public static func parseResponseHead(_ bytes: UnsafeRawBufferPointer, requestMethodIsHEAD: Bool = false,
                                         limits: HTTP1Limits = HTTP1Limits()) -> ResponseResult {
        guard let end = headEnd(bytes, limit: limits.maxHeadBytes) else {
            return bytes.count >= limits.maxHeadBytes ? .error(.badResponse("response head too large")) : .incomplete
        }
        do {
            let lines = try lines(bytes, headLength: end)
            let sl = lines[0]
            // status-line = HTTP-version SP 3DIGIT SP [reason-phrase]
            guard sl.count >= 12, let minor = version(bytes, sl.lowerBound..<(sl.lowerBound + 8)),
                bytes[sl.lowerBound + 8] == 0x20,
                (9..<12).allSatisfy({ bytes[sl.lowerBound + $0] >= 0x30 && bytes[sl.lowerBound + $0] <= 0x39 }),
                sl.count == 12 || bytes[sl.lowerBound + 12] == 0x20
            else { return .error(.badResponse("malformed status line")) }
            let status = (9..<12).reduce(0) { $0 * 10 + Int(bytes[sl.lowerBound + $1] - 0x30) }
            guard status >= 100 else { return .error(.badResponse("malformed status line")) }
            let f = try fields(bytes, lines.dropFirst(), limits: limits)
            let framing: BodyFraming
            if requestMethodIsHEAD || status < 200 || status == 204 || status == 304 {
                framing = .none
            } else if f.transferEncoding {
                framing = .chunked
            } else if let n = f.contentLength {
                framing = n == 0 ? .none : .contentLength(n)
            } else {
                framing = .untilClose
            }
            let keepAlive = framing != .untilClose
                && (minor == 1 ? !f.connectionClose : f.connectionKeepAlive && !f.connectionClose)
            return .head(HTTP1ResponseHead(
                status: status, reason: min(sl.lowerBound + 13, sl.upperBound)..<sl.upperBound, minorVersion: minor,
                headers: f.headers, framing: framing, keepAlive: keepAlive, length: end))
        } catch let e as HTTP1Error {
            switch e {
            case .badRequest(let why), .notImplemented(let why): return .error(.badResponse(why))
            case .headersTooLarge: return .error(.badResponse("too many response header fields"))
            default: return .error(e)
            }
        } catch {
            return .error(.badResponse("unexpected"))
        }
    }

    public enum ResponseResult: Sendable {
        case head(HTTP1ResponseHead)
        case incomplete
        case error(HTTP1Error)
    }

    /// tchar (RFC 9110 5.6.2).
    @inline(__always) static func isToken(_ c: UInt8) -> Bool {
        switch c {
        case 0x30...0x39, 0x41...0x5A, 0x61...0x7A: true
        case 0x21, 0x23, 0x24, 0x25, 0x26, 0x27, 0x2A, 0x2B, 0x2D, 0x2E, 0x5E, 0x5F, 0x60, 0x7C, 0x7E: true
        default: false
        }
    }

    static func equals(_ b: UnsafeRawBufferPointer, _ r: Range<Int>, _ s: StaticString) -> Bool {
        guard r.count == s.utf8CodeUnitCount else { return false }
        let p = s.utf8Start
        for (k, i) in r.enumerated() where b[i] != p[k] { return false }
        return true
    }

    /// Whether field name `r` of `b` is `lower` (a lower-case literal), ignoring ASCII case.
    @inline(__always)
    public static func fieldName(_ b: UnsafeRawBufferPointer, _ r: Range<Int>, is lower: StaticString) -> Bool {
        nameEquals(b, r, lower)
    }

    /// ASCII case-insensitive comparison with a lower-case literal.
    static func nameEquals(_ b: UnsafeRawBufferPointer, _ r: Range<Int>, _ lower: StaticString) -> Bool {
        guard r.count == lower.utf8CodeUnitCount else { return false }
        let p = lower.utf8Start
        for (k, i) in r.enumerated() {
            var c = b[i]
            if c >= 0x41 && c <= 0x5A { c |= 0x20 }
            if c != p[k] { return false }
        }
        return true
    }

    static func valueEquals(_ b: UnsafeRawBufferPointer, _ r: Range<Int>, _ lower: StaticString) -> Bool {
        nameEquals(b, r, lower)
    }


    /// Calls `body` with each comma-separated, trimmed element of a field value (no allocation).
    @inline(__always)
    public static func forEachToken(_ b: UnsafeRawBufferPointer, _ r: Range<Int>, _ body: (Range<Int>) -> Void) {
        var s = r.lowerBound
        for i in r.lowerBound...r.upperBound where i == r.upperBound || b[i] == 0x2C {
            var a = s, z = i
            while a < z, b[a] == 0x20 || b[a] == 0x09 { a += 1 }
            while z > a, b[z - 1] == 0x20 || b[z - 1] == 0x09 { z -= 1 }
            if a < z { body(a..<z) }
            s = i + 1
        }
    }
}

extension UnsafeRawBufferPointer {
    subscript(safe i: Int) -> UInt8? { i >= 0 && i < count ? self[i] : nil }
}
