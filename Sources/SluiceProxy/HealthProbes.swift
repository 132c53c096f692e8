import SluiceHTTP

/// What an active check says on a freshly connected socket, and how it judges the answer. Pure: the checker
/// thread moves the bytes.
protocol HealthProbe {
    /// Bytes to send once connected.
    mutating func start() -> [UInt8]
    /// Feeds received bytes; the verdict once known, and bytes to send back meanwhile (HTTP/2 acknowledgements).
    mutating func receive(_ bytes: [UInt8]) -> (healthy: Bool?, reply: [UInt8])
}

/// `GET path` over HTTP/1.1: healthy when the status is one of `expected`.
struct HTTPHealthProbe: HealthProbe {
    let request: [UInt8]
    let expected: [ClosedRange<Int>]
    var received: [UInt8] = []

    init(path: String, host: String, expected: [ClosedRange<Int>]) {
        request = Array("GET \(path) HTTP/1.1\r\nHost: \(host)\r\nUser-Agent: sluice-health\r\nConnection: close\r\n\r\n".utf8)
        self.expected = expected
    }

    func start() -> [UInt8] { request }

    mutating func receive(_ bytes: [UInt8]) -> (healthy: Bool?, reply: [UInt8]) {
        received += bytes
        if let status = Self.statusCode(received) { return (expected.contains { $0.contains(status) }, []) }
        return (received.count > 1024 ? false : nil, [])
    }

    /// The status of a response whose status line has arrived (`HTTP/1.x NNN`), nil before that; 0 when the
    /// bytes are not an HTTP/1 status line.
    static func statusCode(_ b: [UInt8]) -> Int? {
        guard b.count >= 12, b.starts(with: Array("HTTP/1.".utf8)) else { return b.count >= 12 ? 0 : nil }
        let digits = b[9..<12]
        guard digits.allSatisfy({ $0 >= 0x30 && $0 <= 0x39 }) else { return 0 }
        return digits.reduce(0) { $0 * 10 + Int($1 - 0x30) }
    }
}

/// gRPC's health protocol (`grpc.health.v1.Health/Check`) over h2c, as Envoy's `grpc_health_check`: healthy when
/// the call ends with grpc-status 0 and the response says SERVING.
struct GRPCHealthProbe: HealthProbe {
    let session = H2Session(server: false)
    let service: String
    let authority: String
    var stream: Int32 = -1
    var message: [UInt8] = []

    init(service: String, authority: String) {
        self.service = service
        self.authority = authority
    }

    /// `HealthCheckRequest { string service = 1; }`, in a gRPC length-prefixed frame.
    static func requestFrame(service: String) -> [UInt8] {
        let name = Array(service.utf8)
        var proto: [UInt8] = []
        if !name.isEmpty {
            proto = [0x0A]
            var n = name.count
            while n >= 0x80 {
                proto.append(UInt8(n & 0x7F) | 0x80)
                n >>= 7
            }
            proto.append(UInt8(n))
            proto += name
        }
        let length = UInt32(proto.count)
        return [0, UInt8(length >> 24), UInt8((length >> 16) & 0xFF), UInt8((length >> 8) & 0xFF), UInt8(length & 0xFF)] + proto
    }

    mutating func start() -> [UInt8] {
        stream = session.request(H2Fields([(":method", "POST"), (":scheme", "http"), (":authority", authority),
                                           (":path", "/grpc.health.v1.Health/Check"), ("content-type", "application/grpc"),
                                           ("te", "trailers"), ("user-agent", "sluice-health")]), endStream: false)
        Self.requestFrame(service: service).withUnsafeBytes { session.send(stream: stream, $0) }
        session.finish(stream: stream)
        return session.takeOutput()
    }

    mutating func receive(_ bytes: [UInt8]) -> (healthy: Bool?, reply: [UInt8]) {
        guard bytes.withUnsafeBytes({ session.receive($0) }) else { return (false, []) }
        for event in session.takeEvents() {
            switch event {
            case .data(let s, let data) where s == stream:
                message += data
                session.consume(stream: s, bytes: data.count)
            case .headers(let s, let fields, true) where s == stream:
                // Trailers-only: the call failed before any message.
                return (fields.first("grpc-status") == "0" && Self.serving(message), [])
            case .trailers(let s, let fields) where s == stream:
                return (fields.first("grpc-status") == "0" && Self.serving(message), [])
            case .closed(let s, _) where s == stream:
                return (false, [])
            case .goaway:
                return (false, [])
            default:
                break
            }
        }
        return (message.count > 1024 ? false : nil, session.takeOutput())
    }

    /// Whether the framed `HealthCheckResponse` says `status = SERVING` (field 1, varint 1).
    static func serving(_ framed: [UInt8]) -> Bool {
        guard framed.count >= 5, framed[0] == 0 else { return false }
        let body = Array(framed[5...])
        var k = 0
        var status = 0  // UNKNOWN unless the field is present
        while k < body.count {
            let key = body[k]
            k += 1
            switch key & 0x07 {
            case 0:
                var v = 0, shift = 0
                while k < body.count {
                    let b = body[k]
                    k += 1
                    v |= Int(b & 0x7F) << shift
                    shift += 7
                    if b & 0x80 == 0 || shift > 56 { break }
                }
                if key >> 3 == 1 { status = v }
            case 2:
                guard k < body.count else { return false }
                k += Int(body[k]) + 1
            default:
                return false
            }
        }
        return status == 1
    }
}
