import CSluiceLinux
import Glibc
import Synchronization

/// A TLS failure, with OpenSSL's reason where it gave one.
public struct TLSError: Error, CustomStringConvertible, Sendable {
    public let description: String

    public init(_ what: String) { description = what }

    /// `what`, followed by the reasons on this thread's OpenSSL error queue (which it empties).
    static func openSSL(_ what: String) -> TLSError {
        let reasons = drainErrors()
        return TLSError(reasons.isEmpty ? what : "\(what): \(reasons)")
    }

    /// Empties this thread's OpenSSL error queue and returns its reasons, `; `-separated.
    static func drainErrors() -> String {
        var reasons: [String] = []
        while true {
            let code = ERR_get_error()
            if code == 0 { break }
            if let r = ERR_reason_error_string(code) {
                reasons.append(String(cString: r))
            } else {
                reasons.append("error \(code)")
            }
        }
        return reasons.joined(separator: "; ")
    }
}

public enum TLSVersion: Sendable, Hashable {
    case v1_2, v1_3

    var wire: Int32 { self == .v1_2 ? 0x0303 : 0x0304 }
}

/// One certificate and the settings that go with it: an `SSL_CTX`. Immutable once made; its connections may
/// live on any worker (OpenSSL makes connections from a context thread-safely).
///
/// Only this module sees private keys: they are read from files straight into OpenSSL.
public final class TLSContext: @unchecked Sendable {
    let ctx: OpaquePointer
    /// Client contexts: the last resumable session per peer (see ``TLSStream/rememberSession()``), for
    /// resumption (TLS 1.3 PSK from the server's ticket) on the next connection to it.
    private let sessions = Mutex<[String: KeptSession]>([:])
    /// Protocols offered (client) or accepted in the peer's order of preference (server), e.g. `["h2", "http/1.1"]`.
    public let alpn: [String]
    let alpnWire: [UInt8]

    /// A server's context.
    /// - Parameters:
    ///   - certificateChain: PEM file: the certificate first, then its intermediates.
    ///   - privateKey: PEM file of the certificate's key.
    ///   - clientCA: PEM file of the CAs a client certificate must chain to; with it, clients must present one
    ///     (mutual TLS) unless `clientCertificateOptional`.
    ///   - cipherSuites: OpenSSL names; TLS 1.3 suites (`TLS_...`) and TLS 1.2 ciphers may be mixed.
    public init(certificateChain: String, privateKey: String, clientCA: String? = nil,
                clientCertificateOptional: Bool = false, minVersion: TLSVersion? = nil, maxVersion: TLSVersion? = nil,
                cipherSuites: [String] = [], alpn: [String] = []) throws(TLSError) {
        ERR_clear_error()
        guard let ctx = SSL_CTX_new(TLS_server_method()) else { throw .openSSL("SSL_CTX_new") }
        self.ctx = ctx
        self.alpn = alpn
        alpnWire = Self.wire(alpn)
        // TLS 1.2 is the floor unless configured otherwise (Istio's gateway default).
        guard sl_tls_configure(ctx, (minVersion ?? .v1_2).wire, maxVersion?.wire ?? 0, 1) == 1 else {
            throw .openSSL("TLS versions \(String(describing: minVersion))...\(String(describing: maxVersion))")
        }
        guard SSL_CTX_use_certificate_chain_file(ctx, certificateChain) == 1 else {
            throw .openSSL("certificate chain \(certificateChain)")
        }
        guard SSL_CTX_use_PrivateKey_file(ctx, privateKey, SSL_FILETYPE_PEM) == 1 else {
            throw .openSSL("private key \(privateKey)")
        }
        guard SSL_CTX_check_private_key(ctx) == 1 else {
            throw .openSSL("private key \(privateKey) does not match the certificate in \(certificateChain)")
        }
        try Self.setCiphers(ctx, cipherSuites)
        if let clientCA {
            guard SSL_CTX_load_verify_locations(ctx, clientCA, nil) == 1, let names = SSL_load_client_CA_file(clientCA)
            else { throw .openSSL("client CA \(clientCA)") }
            SSL_CTX_set_client_CA_list(ctx, names)
            let mode = SSL_VERIFY_PEER | (clientCertificateOptional ? 0 : SSL_VERIFY_FAIL_IF_NO_PEER_CERT)
            SSL_CTX_set_verify(ctx, mode, nil)
            // Resumed sessions must come from this context's verified clients.
            let id: [UInt8] = Array("sluice".utf8)
            SSL_CTX_set_session_id_context(ctx, id, UInt32(id.count))
        }
        if !alpn.isEmpty {
            SSL_CTX_set_alpn_select_cb(ctx, selectALPN, nil)
        }
        sl_tls_set_servername_callback(ctx, selectServerName)
    }

    /// A client's context.
    /// - Parameters:
    ///   - trusted: PEM file of the CAs the server must chain to; nil skips verification (tests only).
    ///   - alsoTrusting: more PEM files of CAs to trust along with `trusted` (e.g. a private root besides the
    ///     system's).
    ///   - certificateChain, privateKey: presented when the server asks (mutual TLS).
    public init(clientTrusting trusted: String?, alsoTrusting: [String] = [], certificateChain: String? = nil,
                privateKey: String? = nil, minVersion: TLSVersion? = nil, maxVersion: TLSVersion? = nil,
                alpn: [String] = []) throws(TLSError) {
        ERR_clear_error()
        guard let ctx = SSL_CTX_new(TLS_client_method()) else { throw .openSSL("SSL_CTX_new") }
        self.ctx = ctx
        self.alpn = alpn
        alpnWire = Self.wire(alpn)
        guard sl_tls_configure(ctx, (minVersion ?? .v1_2).wire, maxVersion?.wire ?? 0, 0) == 1 else {
            throw .openSSL("TLS versions")
        }
        if let trusted {
            for file in [trusted] + alsoTrusting {
                guard SSL_CTX_load_verify_locations(ctx, file, nil) == 1 else { throw .openSSL("trusted CAs \(file)") }
            }
            SSL_CTX_set_verify(ctx, SSL_VERIFY_PEER, nil)
        }
        if let certificateChain, let privateKey {
            guard SSL_CTX_use_certificate_chain_file(ctx, certificateChain) == 1,
                SSL_CTX_use_PrivateKey_file(ctx, privateKey, SSL_FILETYPE_PEM) == 1,
                SSL_CTX_check_private_key(ctx) == 1
            else { throw .openSSL("client certificate \(certificateChain)") }
        }
        if !alpnWire.isEmpty {
            guard SSL_CTX_set_alpn_protos(ctx, alpnWire, UInt32(alpnWire.count)) == 0 else { throw .openSSL("ALPN") }
        }
    }

    deinit { SSL_CTX_free(ctx) }

    /// A session reference the context owns (freed with it).
    final class KeptSession: @unchecked Sendable {
        let session: OpaquePointer
        init(_ session: OpaquePointer) { self.session = session }
        deinit { SSL_SESSION_free(session) }
    }

    /// A new reference to the session kept for `key` (the caller frees it), if any.
    func session(for key: String) -> OpaquePointer? {
        let kept = sessions.withLock { $0[key] }
        guard let kept else { return nil }
        SSL_SESSION_up_ref(kept.session)
        return kept.session
    }

    /// Keeps `session` (a reference the context now owns) for `key`, replacing the one before.
    func keep(_ session: OpaquePointer, for key: String) {
        let box = KeptSession(session)
        sessions.withLock { $0[key] = box }
    }

    /// ALPN's wire form: each name prefixed by its length.
    static func wire(_ names: [String]) -> [UInt8] {
        var out: [UInt8] = []
        for n in names where !n.isEmpty && n.utf8.count < 256 {
            out.append(UInt8(n.utf8.count))
            out.append(contentsOf: n.utf8)
        }
        return out
    }

    private static func setCiphers(_ ctx: OpaquePointer, _ suites: [String]) throws(TLSError) {
        guard !suites.isEmpty else { return }
        let v13 = suites.filter { $0.hasPrefix("TLS_") }
        let v12 = suites.filter { !$0.hasPrefix("TLS_") }
        if !v13.isEmpty, SSL_CTX_set_ciphersuites(ctx, v13.joined(separator: ":")) != 1 {
            throw .openSSL("cipher suites \(v13)")
        }
        if !v12.isEmpty, SSL_CTX_set_cipher_list(ctx, v12.joined(separator: ":")) != 1 {
            throw .openSSL("ciphers \(v12)")
        }
    }
}

/// The certificates of one listener, chosen by the name the client asks for (SNI), as Envoy picks a filter
/// chain by `server_names`: an exact name first, then the longest `*.suffix` wildcard, then `*`. A client that
/// sends no name gets the first certificate; one that sends a name no certificate serves is refused with the
/// `unrecognized_name` alert.
public final class TLSServerNames: @unchecked Sendable {
    public struct Entry: Sendable {
        public var hosts: [String]
        public var context: TLSContext
        public init(hosts: [String], context: TLSContext) {
            self.hosts = hosts
            self.context = context
        }
    }

    public let entries: [Entry]
    private let exact: [String: Int]
    /// `(suffix including the dot, entry)`, longest suffix first.
    private let wildcards: [(String, Int)]
    private let any: Int?

    public init(_ entries: [Entry]) {
        precondition(!entries.isEmpty)
        self.entries = entries
        var exact: [String: Int] = [:]
        var wildcards: [(String, Int)] = []
        var any: Int?
        for (i, e) in entries.enumerated() {
            for h in e.hosts.map({ $0.lowercased() }) {
                if h == "*" {
                    if any == nil { any = i }
                } else if h.hasPrefix("*.") {
                    wildcards.append((String(h.dropFirst()), i))
                } else if exact[h] == nil {
                    exact[h] = i
                }
            }
        }
        self.exact = exact
        self.wildcards = wildcards.sorted { $0.0.count > $1.0.count }
        self.any = any
    }

    /// The entry serving `name`; nil when a name was sent and nothing serves it.
    public func entry(for name: String?) -> Int? {
        guard let name = name?.lowercased() else { return 0 }
        if let i = exact[name] { return i }
        for (suffix, i) in wildcards where name.hasSuffix(suffix) && name.count > suffix.count { return i }
        return any
    }
}

/// ClientHello's server name -> the listener's certificate for it (runs inside `SSL_do_handshake`).
private func selectServerName(_ ssl: OpaquePointer?, _ alert: UnsafeMutablePointer<Int32>?,
                              _ arg: UnsafeMutableRawPointer?) -> Int32 {
    guard let ssl, let owner = SSL_get_ex_data(ssl, 0) else { return sl_tls_err_noack() }
    let names = Unmanaged<TLSServerNames>.fromOpaque(owner).takeUnretainedValue()
    let requested = SSL_get_servername(ssl, sl_tls_nametype_host_name()).map { String(cString: $0) }
    guard let i = names.entry(for: requested) else {
        alert?.pointee = sl_tls_alert_unrecognized_name()
        return sl_tls_err_alert_fatal()
    }
    let chosen = names.entries[i].context.ctx
    if i != 0 {
        SSL_set_SSL_CTX(ssl, chosen)
        // Client verification follows the chosen server's settings.
        SSL_set_verify(ssl, SSL_CTX_get_verify_mode(chosen), nil)
    }
    return sl_tls_err_ok()
}

/// The first of the server's protocols (in its order) that the client offers; none -> no ALPN (HTTP/1.1).
private func selectALPN(_ ssl: OpaquePointer?, _ out: UnsafeMutablePointer<UnsafePointer<UInt8>?>?,
                        _ outLength: UnsafeMutablePointer<UInt8>?, _ offered: UnsafePointer<UInt8>?, _ offeredLength: UInt32,
                        _ arg: UnsafeMutableRawPointer?) -> Int32 {
    guard let ssl, let offered, let out, let outLength, let ctx = SSL_get_SSL_CTX(ssl),
        let owner = SSL_get_ex_data(ssl, 0)
    else { return sl_tls_err_noack() }
    let names = Unmanaged<TLSServerNames>.fromOpaque(owner).takeUnretainedValue()
    guard let context = names.entries.first(where: { $0.context.ctx == ctx })?.context else { return sl_tls_err_noack() }
    return context.alpnWire.withUnsafeBufferPointer { ours -> Int32 in
        var k = 0
        while k < ours.count {
            let len = Int(ours[k])
            var j = 0
            while j < Int(offeredLength) {
                let olen = Int(offered[j])
                if olen == len, j + 1 + olen <= Int(offeredLength), memcmp(offered + j + 1, ours.baseAddress! + k + 1, len) == 0 {
                    out.pointee = offered + j + 1
                    outLength.pointee = UInt8(len)
                    return sl_tls_err_ok()
                }
                j += 1 + olen
            }
            k += 1 + len
        }
        return sl_tls_err_noack()
    }
}
