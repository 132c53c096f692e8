import Foundation
import Glibc

/// A small blocking HTTPS/1.1 client over Sluice's TLS layer: one request per connection, on the caller's thread
/// (sockets with timeouts). For the control path only — the agent's CA calls and JWKS fetches, the `sluice` CLI's
/// API calls — never a data-plane worker. Hand-written because those callers are threads, not event loops, and it
/// reuses the OpenSSL contexts the rest of Sluice already builds.
public struct HTTPSClient: Sendable {
    /// HOST:PORT to connect to.
    public let address: String
    /// The name the server's certificate must carry (verified) and the SNI sent.
    public let serverName: String
    /// PEM file of the roots the server's certificate must chain to.
    public var rootCA: String
    /// More roots to trust besides `rootCA`.
    public var alsoTrusting: [String] = []
    public var timeout: TimeInterval = 5
    /// Largest response accepted.
    public var maxResponseBytes = 4 << 20

    public init(address: String, serverName: String, rootCA: String) {
        self.address = address
        self.serverName = serverName
        self.rootCA = rootCA
    }

    public struct Failure: Error, CustomStringConvertible {
        public let description: String
        public init(description: String) { self.description = description }
    }

    public struct Response: Sendable {
        public var status: Int
        /// Header fields, names lower-cased, in order.
        public var headers: [(String, String)]
        public var body: [UInt8]
        public func header(_ name: String) -> [String] { headers.filter { $0.0 == name }.map(\.1) }
    }

    /// Sends one request (`path` with its query) and reads the whole response. `headers` are sent as given, after
    /// `host`; a body gets its `content-length`.
    public func request(_ method: String, _ path: String, headers: [(String, String)] = [], body: [UInt8] = [],
                        clientCertificate: (String, String)? = nil) throws -> Response {
        var head = "\(method) \(path) HTTP/1.1\r\nhost: \(serverName)\r\n"
        for (k, v) in headers { head += "\(k): \(v)\r\n" }
        if !body.isEmpty || ["POST", "PUT", "PATCH"].contains(method) { head += "content-length: \(body.count)\r\n" }
        head += "connection: close\r\n\r\n"
        let bytes = try exchange(Array(head.utf8) + body, clientCertificate: clientCertificate)
        let (status, fields, content) = try Self.parse(bytes)
        return Response(status: status, headers: fields, body: content)
    }

    /// GETs an `https://HOST[:PORT]/PATH` URL (JWKS), trusting the system's CAs and `extraTrust` (PEM file); returns
    /// the status and body (length-delimited, chunked or read to the end).
    public static func get(_ url: String, extraTrust: String? = nil, timeout: TimeInterval = 5) throws -> (Int, String) {
        guard url.hasPrefix("https://") else { throw Failure(description: "'\(url)' is not an https URL") }
        let rest = url.dropFirst("https://".count)
        let authority = String(rest.prefix { $0 != "/" })
        let path = rest.dropFirst(authority.count).isEmpty ? "/" : String(rest.dropFirst(authority.count))
        let host = authority.hasPrefix("[") ? String(authority.prefix { $0 != "]" }.dropFirst())
            : String(authority.prefix { $0 != ":" })
        let address = authority.contains(":") && !authority.hasSuffix("]") ? authority : "\(authority):443"
        var client = HTTPSClient(address: address, serverName: host, rootCA: "/etc/ssl/certs/ca-certificates.crt")
        client.alsoTrusting = extraTrust.map { [$0] } ?? []
        client.timeout = timeout
        let head = "GET \(path) HTTP/1.1\r\nhost: \(authority)\r\naccept: application/json\r\nconnection: close\r\n\r\n"
        let (status, _, body) = try parse(try client.exchange(Array(head.utf8), clientCertificate: nil, minVersion: .v1_2))
        return (status, String(decoding: body, as: UTF8.self))
    }

    /// Sends `request` over a new TLS connection and reads the whole response (until the peer closes, or a
    /// `content-length` body is complete).
    public func exchange(_ request: [UInt8], clientCertificate: (String, String)?, minVersion: TLSVersion = .v1_3) throws -> [UInt8] {
        let context: TLSContext
        do {
            context = try TLSContext(clientTrusting: rootCA, alsoTrusting: alsoTrusting, certificateChain: clientCertificate?.0,
                                     privateKey: clientCertificate?.1, minVersion: minVersion)
        } catch {
            throw Failure(description: "TLS setup: \(error)")
        }
        let fd = try connect()
        defer { close(fd) }
        let tls: TLSStream
        do { tls = try TLSStream(client: context, serverName: serverName) } catch { throw Failure(description: "\(error)") }
        var progress = tls.handshake()
        while progress == .needInput {
            try flush(tls, fd)
            // A control plane that goes away mid-handshake (a restart) closes the connection: give up this attempt
            // (receiving again would return end of stream at once, forever).
            guard try receive(tls, fd) else { throw Failure(description: "\(address) closed the connection during the TLS handshake") }
            progress = tls.handshake()
        }
        if case .failed(let why) = progress { throw Failure(description: "TLS handshake with \(address): \(why)") }
        _ = request.withUnsafeBytes { tls.write($0) }
        try flush(tls, fd)
        var response: [UInt8] = []
        var plain = [UInt8](repeating: 0, count: 16 << 10)
        reading: while !Self.isComplete(response) {
            switch plain.withUnsafeMutableBytes({ tls.read(into: $0) }) {
            case .bytes(let n): response += plain[0..<n]
            case .closed: break reading
            case .failed(let why): throw Failure(description: "TLS: \(why)")
            case .needInput:
                try flush(tls, fd)
                if try !receive(tls, fd) { break reading }
            }
            guard response.count <= maxResponseBytes else {
                throw Failure(description: "response from \(address) over \(maxResponseBytes >> 20) MiB")
            }
        }
        return response
    }

    /// Whether `bytes` hold a whole response (head and `content-length` bytes of body).
    static func isComplete(_ bytes: [UInt8]) -> Bool {
        let text = String(decoding: bytes, as: UTF8.self)
        guard let split = text.range(of: "\r\n\r\n") else { return false }
        let head = text[..<split.lowerBound].lowercased()
        guard let line = head.split(separator: "\r\n").first(where: { $0.hasPrefix("content-length:") }),
            let length = Int(line.dropFirst("content-length:".count).trimmingCharacters(in: .whitespaces))
        else { return false }
        return text[split.upperBound...].utf8.count >= length
    }

    /// Status, header fields and body of an HTTP/1.1 response read to the end (a chunked body is decoded).
    static func parse(_ bytes: [UInt8]) throws -> (Int, [(String, String)], [UInt8]) {
        let text = String(decoding: bytes, as: UTF8.self)
        guard let split = text.range(of: "\r\n\r\n"), text.hasPrefix("HTTP/1."),
            let status = Int(text.dropFirst(9).prefix(3))
        else { throw Failure(description: "not an HTTP/1.1 response") }
        let fields: [(String, String)] = text[..<split.lowerBound].components(separatedBy: "\r\n").dropFirst().compactMap {
            guard let colon = $0.firstIndex(of: ":") else { return nil }
            return ($0[..<colon].lowercased(), $0[$0.index(after: colon)...].trimmingCharacters(in: .whitespaces))
        }
        let body = Array(text[split.upperBound...].utf8)
        guard fields.contains(where: { $0.0 == "transfer-encoding" && $0.1.lowercased().contains("chunked") }) else {
            return (status, fields, body)
        }
        var out: [UInt8] = [], i = 0
        while i < body.count {
            guard let lineEnd = (i..<body.count - 1).first(where: { body[$0] == 13 && body[$0 + 1] == 10 }),
                let size = Int(String(decoding: body[i..<lineEnd], as: UTF8.self).split(separator: ";").first ?? "", radix: 16)
            else { throw Failure(description: "bad chunked body") }
            if size == 0 { break }
            let start = lineEnd + 2
            guard start + size <= body.count else { throw Failure(description: "truncated chunked body") }
            out += body[start..<start + size]
            i = start + size + 2
        }
        return (status, fields, out)
    }

    private func connect() throws -> Int32 {
        guard let colon = address.lastIndex(of: ":"), let port = UInt16(address[address.index(after: colon)...]) else {
            throw Failure(description: "'\(address)' is not HOST:PORT")
        }
        var hints = addrinfo()
        hints.ai_socktype = Int32(SOCK_STREAM.rawValue)
        var result: UnsafeMutablePointer<addrinfo>?
        let host = String(address[..<colon]).trimmingCharacters(in: CharacterSet(charactersIn: "[]"))
        guard getaddrinfo(host, String(port), &hints, &result) == 0, let info = result else {
            throw Failure(description: "cannot resolve \(host)")
        }
        defer { freeaddrinfo(result) }
        let fd = socket(info.pointee.ai_family, Int32(SOCK_STREAM.rawValue), 0)
        guard fd >= 0 else { throw Failure(description: "socket: errno \(errno)") }
        var tv = timeval(tv_sec: Int(timeout), tv_usec: 0)
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
        setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
        guard Glibc.connect(fd, info.pointee.ai_addr, info.pointee.ai_addrlen) == 0 else {
            let e = errno
            close(fd)
            throw Failure(description: "cannot connect to the control plane at \(address): \(String(cString: strerror(e)))")
        }
        return fd
    }

    private func flush(_ tls: TLSStream, _ fd: Int32) throws {
        var buf = [UInt8](repeating: 0, count: 16 << 10)
        while tls.pendingOutput > 0 {
            let n = buf.withUnsafeMutableBytes { tls.takeOutput(into: $0) }
            var sent = 0
            while sent < n {
                let k = buf[sent..<n].withUnsafeBytes { send(fd, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL)) }
                guard k > 0 else { throw Failure(description: "send to \(address) failed") }
                sent += k
            }
        }
    }

    /// Reads what arrived into the session; false at end of stream.
    @discardableResult
    private func receive(_ tls: TLSStream, _ fd: Int32) throws -> Bool {
        var buf = [UInt8](repeating: 0, count: 16 << 10)
        let n = buf.withUnsafeMutableBytes { recv(fd, $0.baseAddress, $0.count, 0) }
        if n < 0 { throw Failure(description: "receive from \(address) failed or timed out") }
        if n == 0 { return false }
        buf.withUnsafeBytes { tls.receive(UnsafeRawBufferPointer(rebasing: $0[0..<n])) }
        return true
    }
}

