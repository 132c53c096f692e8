/// Tells HTTP from other TCP by a connection's first bytes, for ports of no declared protocol (Istio's protocol
/// sniffing; Envoy's `http_inspector`): an HTTP/2 connection preface, or an HTTP/1 request line's method and the
/// space after it. Anything else is TCP. Pure: the caller peeks at the socket and asks again with more bytes.
public enum ProtocolDetector {
    public enum Verdict: Equatable, Sendable {
        case http1, http2, tcp
        /// The bytes so far could still be either: wait for more (or for the detection timeout).
        case needMore
    }

    /// Bytes worth peeking at: the HTTP/2 preface is the longest thing compared.
    public static let peekLength = 24

    static let preface = Array("PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".utf8)
    /// Methods of RFC 9110 and the common WebDAV ones, each followed by the space that ends it.
    static let methods: [[UInt8]] = ["GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH",
                                     "PROPFIND", "PROPPATCH", "MKCOL", "COPY", "MOVE", "LOCK", "UNLOCK"]
        .map { Array(($0 + " ").utf8) }

    public static func classify(_ bytes: UnsafeRawBufferPointer) -> Verdict {
        guard !bytes.isEmpty else { return .needMore }
        if isPrefix(bytes, of: preface) { return bytes.count >= preface.count ? .http2 : .needMore }
        var couldBe = false
        for m in methods {
            if bytes.count >= m.count {
                if isPrefix(UnsafeRawBufferPointer(rebasing: bytes[0..<m.count]), of: m) { return .http1 }
            } else if isPrefix(bytes, of: m) {
                couldBe = true
            }
        }
        return couldBe ? .needMore : .tcp
    }

    /// Whether `bytes` (no longer than `pattern`) equals the start of `pattern`.
    private static func isPrefix(_ bytes: UnsafeRawBufferPointer, of pattern: [UInt8]) -> Bool {
        let n = min(bytes.count, pattern.count)
        for k in 0..<n where bytes[k] != pattern[k] { return false }
        return true
    }

    public static func classify(_ bytes: [UInt8]) -> Verdict { bytes.withUnsafeBytes { classify($0) } }
}
