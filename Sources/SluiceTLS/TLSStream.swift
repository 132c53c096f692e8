import CSluiceLinux
import Glibc

/// One TLS connection over memory BIOs: the caller moves bytes between the socket and the session (on its own
/// io_uring), the session never touches a file descriptor.
///
/// Ciphertext from the peer goes in with ``receive(_:)``; plaintext comes out of ``read(into:)``. Plaintext to
/// send goes in with ``write(_:)``; the records to put on the wire come out of ``takeOutput(into:)``. After any
/// call, ``pendingOutput`` may be non-zero (handshake messages, session tickets, alerts) and should be sent.
///
/// Not thread-safe: one worker owns a stream.
public final class TLSStream {
    private let ssl: OpaquePointer
    private let rbio: OpaquePointer
    private let wbio: OpaquePointer
    /// Keeps the SNI callback's certificates alive for as long as the handshake may consult them.
    private let names: TLSServerNames?
    /// Client: the context and key its session is remembered under (resumption).
    private var resumption: (context: TLSContext, key: String)?
    public private(set) var handshakeDone = false

    public enum Progress: Equatable {
        /// The handshake finished.
        case done
        /// More bytes from the peer are needed.
        case needInput
        case failed(String)
    }

    public enum ReadResult: Equatable {
        case bytes(Int)
        /// No whole record is buffered: receive more.
        case needInput
        /// The peer sent close_notify.
        case closed
        case failed(String)
    }

    /// A server's end, picking its certificate from `names` by the client's SNI.
    public convenience init(serving names: TLSServerNames) throws(TLSError) {
        try self.init(context: names.entries[0].context, names: names)
        SSL_set_ex_data(ssl, 0, Unmanaged.passUnretained(names).toOpaque())
        SSL_set_accept_state(ssl)
    }

    /// A client's end.
    /// - Parameters:
    ///   - serverName: sent as SNI, and (when the context verifies and `checkHostName`) checked against the
    ///     certificate's DNS names. Mesh peers are checked by their SPIFFE URI instead (``peerURIs``), so HBONE
    ///     sends the name without the DNS check.
    ///   - sessionKey: when set, a session remembered under this key (``rememberSession()``) is offered for
    ///     resumption, so a later connection to the same peer skips the full handshake.
    public convenience init(client context: TLSContext, serverName: String?, checkHostName: Bool = true,
                            sessionKey: String? = nil) throws(TLSError) {
        try self.init(context: context, names: nil)
        if let sessionKey {
            resumption = (context, sessionKey)
            if let session = context.session(for: sessionKey) {
                SSL_set_session(ssl, session)
                SSL_SESSION_free(session)
            }
        }
        if let serverName {
            // The session is freed with the object (deinit) when this throws.
            guard sl_tls_set_host_name(ssl, serverName) == 1, !checkHostName || SSL_set1_host(ssl, serverName) == 1 else {
                throw .openSSL("server name \(serverName)")
            }
        }
        SSL_set_connect_state(ssl)
    }

    /// A session of `context` wired to two memory BIOs.
    private init(context: TLSContext, names: TLSServerNames?) throws(TLSError) {
        ERR_clear_error()
        guard let ssl = SSL_new(context.ctx) else { throw .openSSL("SSL_new") }
        guard let r = BIO_new(BIO_s_mem()), let w = BIO_new(BIO_s_mem()) else {
            SSL_free(ssl)
            throw .openSSL("BIO_new")
        }
        self.ssl = ssl
        self.names = names
        rbio = r
        wbio = w
        sl_tls_mem_bio_retry_when_empty(r)
        SSL_set_bio(ssl, r, w)
    }

    deinit { SSL_free(ssl) }  // frees both BIOs

    /// Hands the session ciphertext received from the peer (copied; the caller may reuse its buffer at once).
    public func receive(_ bytes: UnsafeRawBufferPointer) {
        guard let base = bytes.baseAddress, bytes.count > 0 else { return }
        BIO_write(rbio, base, Int32(bytes.count))
    }

    /// Advances the handshake with what was received.
    public func handshake() -> Progress {
        if handshakeDone { return .done }
        ERR_clear_error()
        let r = SSL_do_handshake(ssl)
        if r == 1 {
            handshakeDone = true
            return .done
        }
        switch SSL_get_error(ssl, r) {
        case SSL_ERROR_WANT_READ, SSL_ERROR_WANT_WRITE: return .needInput
        default: return .failed(failure("handshake"))
        }
    }

    /// Decrypts as many whole records as fit into `buffer`.
    public func read(into buffer: UnsafeMutableRawBufferPointer) -> ReadResult {
        guard let base = buffer.baseAddress else { return .needInput }
        var total = 0
        ERR_clear_error()
        while total < buffer.count {
            var n = 0
            let r = SSL_read_ex(ssl, base + total, buffer.count - total, &n)
            if r == 1 {
                total += n
                continue
            }
            if total > 0 { return .bytes(total) }
            switch SSL_get_error(ssl, 0) {
            case SSL_ERROR_WANT_READ, SSL_ERROR_WANT_WRITE: return .needInput
            case SSL_ERROR_ZERO_RETURN: return .closed
            default: return .failed(failure("read"))
            }
        }
        return .bytes(total)
    }

    /// Whether decrypted bytes or received ciphertext are waiting inside the session.
    public var hasBufferedInput: Bool { SSL_pending(ssl) > 0 || BIO_ctrl_pending(rbio) > 0 }

    /// Encrypts all of `bytes` into records waiting in ``pendingOutput``.
    @discardableResult
    public func write(_ bytes: UnsafeRawBufferPointer) -> Bool {
        guard let base = bytes.baseAddress, bytes.count > 0 else { return true }
        ERR_clear_error()
        var n = 0
        return SSL_write_ex(ssl, base, bytes.count, &n) == 1 && n == bytes.count
    }

    /// Bytes waiting to be sent to the peer.
    public var pendingOutput: Int { Int(BIO_ctrl_pending(wbio)) }

    /// Moves up to `buffer.count` bytes of pending output into `buffer`; returns how many.
    public func takeOutput(into buffer: UnsafeMutableRawBufferPointer) -> Int {
        guard let base = buffer.baseAddress, buffer.count > 0 else { return 0 }
        return max(0, Int(BIO_read(wbio, base, Int32(min(buffer.count, Int(Int32.max))))))
    }

    /// Queues close_notify (sent with the pending output).
    public func close() {
        ERR_clear_error()
        _ = SSL_shutdown(ssl)
        ERR_clear_error()
    }

    /// The protocol ALPN settled on, if any.
    public var alpn: String? {
        var p: UnsafePointer<UInt8>?
        var n: UInt32 = 0
        SSL_get0_alpn_selected(ssl, &p, &n)
        guard let p, n > 0 else { return nil }
        return String(decoding: UnsafeBufferPointer(start: p, count: Int(n)), as: UTF8.self)
    }

    /// The name the client asked for (SNI).
    public var serverName: String? {
        SSL_get_servername(ssl, sl_tls_nametype_host_name()).map { String(cString: $0) }
    }

    /// The URI SANs of the certificate the peer presented (verified by the handshake when the context verifies):
    /// its SPIFFE identity. Empty when it presented none.
    public var peerURIs: [String] {
        var buf = [CChar](repeating: 0, count: 2048)
        guard sl_tls_peer_uris(ssl, &buf, buf.count) > 0 else { return [] }
        let text = buf.withUnsafeBufferPointer { String(cString: $0.baseAddress!) }
        return text.split(separator: "\n").map(String.init)
    }

    /// The negotiated version, e.g. `TLSv1.3`.
    public var version: String { String(cString: SSL_get_version(ssl)) }

    public var resumed: Bool { SSL_session_reused(ssl) == 1 }

    /// Client: keeps this connection's session (once the server's ticket has arrived, i.e. after the first read
    /// past the handshake in TLS 1.3) for the next connection with the same session key. Returns whether one was
    /// kept.
    @discardableResult
    public func rememberSession() -> Bool {
        guard let (context, key) = resumption, let session = SSL_get1_session(ssl) else { return false }
        guard SSL_SESSION_is_resumable(session) == 1 else {
            SSL_SESSION_free(session)
            return false
        }
        context.keep(session, for: key)
        resumption = nil
        return true
    }

    /// Why the peer's certificate was refused, as a metric label: `certificate_expired`,
    /// `certificate_not_yet_valid`, `certificate_untrusted` (self-signed, or from a CA not trusted here),
    /// `certificate_invalid` (anything else verification refused); nil when verification found nothing wrong (the
    /// handshake failed for another reason: see ``Progress/failed(_:)``'s text).
    public var certificateProblem: String? {
        let verify = Int32(SSL_get_verify_result(ssl))
        switch verify {
        case X509_V_OK: return nil
        case X509_V_ERR_CERT_HAS_EXPIRED: return "certificate_expired"
        case X509_V_ERR_CERT_NOT_YET_VALID: return "certificate_not_yet_valid"
        case X509_V_ERR_DEPTH_ZERO_SELF_SIGNED_CERT, X509_V_ERR_SELF_SIGNED_CERT_IN_CHAIN,
             X509_V_ERR_UNABLE_TO_GET_ISSUER_CERT_LOCALLY, X509_V_ERR_UNABLE_TO_VERIFY_LEAF_SIGNATURE,
             X509_V_ERR_UNABLE_TO_GET_ISSUER_CERT:
            return "certificate_untrusted"
        default: return "certificate_invalid"
        }
    }

    private func failure(_ what: String) -> String {
        let reasons = TLSError.drainErrors()
        let verify = SSL_get_verify_result(ssl)
        if verify != X509_V_OK, let s = X509_verify_cert_error_string(verify) {
            return "\(what): certificate: \(String(cString: s))"
        }
        return reasons.isEmpty ? "\(what) failed" : "\(what): \(reasons)"
    }
}
