#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// An IPv4 or IPv6 address in network byte order. Parsing only; no sockets here.
public enum IPAddress: Sendable, Hashable, CustomStringConvertible {
    case v4(UInt32)  // network byte order as stored in in_addr.s_addr
    case v6(UInt64, UInt64)  // raw 16 bytes, first half and second half in memory order

    public init?(_ text: String) {
        var a4 = in_addr()
        if inet_pton(AF_INET, text, &a4) == 1 {
            self = .v4(a4.s_addr)
            return
        }
        var a6 = in6_addr()
        if inet_pton(AF_INET6, text, &a6) == 1 {
            let halves = withUnsafeBytes(of: &a6) { raw in
                (raw.loadUnaligned(fromByteOffset: 0, as: UInt64.self), raw.loadUnaligned(fromByteOffset: 8, as: UInt64.self))
            }
            self = .v6(halves.0, halves.1)
            return
        }
        return nil
    }

    public var description: String {
        var buf = [CChar](repeating: 0, count: 64)
        switch self {
        case .v4(let raw):
            var a = in_addr(s_addr: raw)
            inet_ntop(AF_INET, &a, &buf, socklen_t(buf.count))
        case .v6(let hi, let lo):
            var words = (hi, lo)
            withUnsafeBytes(of: &words) { raw in _ = inet_ntop(AF_INET6, raw.baseAddress, &buf, socklen_t(buf.count)) }
        }
        return String(decoding: buf.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
    }

    public var isIPv4: Bool { if case .v4 = self { return true } else { return false } }
}

/// An address and port: where a listener binds or an endpoint listens.
public struct EndpointAddress: Sendable, Hashable, CustomStringConvertible {
    public var ip: IPAddress
    public var port: UInt16
    public init(ip: IPAddress, port: UInt16) {
        self.ip = ip
        self.port = port
    }
    public var description: String {
        ip.isIPv4 ? "\(ip):\(port)" : "[\(ip)]:\(port)"
    }

    /// Parses `HOST:PORT` or `[V6]:PORT`.
    public init?(parsing text: String) {
        guard let colon = text.lastIndex(of: ":"), let port = UInt16(text[text.index(after: colon)...]) else {
            return nil
        }
        var host = String(text[..<colon])
        if host.hasPrefix("["), host.hasSuffix("]") { host = String(host.dropFirst().dropLast()) }
        if host == "localhost" { host = "127.0.0.1" }
        guard let ip = IPAddress(host) else { return nil }
        self.init(ip: ip, port: port)
    }
}

/// Numeric order, IPv4 before IPv6: the order endpoints are listed in.
extension IPAddress: Comparable {
    public static func < (a: IPAddress, b: IPAddress) -> Bool {
        switch (a, b) {
        case (.v4(let x), .v4(let y)): UInt32(bigEndian: x) < UInt32(bigEndian: y)
        case (.v6(let xh, let xl), .v6(let yh, let yl)):
            (UInt64(bigEndian: xh), UInt64(bigEndian: xl)) < (UInt64(bigEndian: yh), UInt64(bigEndian: yl))
        case (.v4, .v6): true
        case (.v6, .v4): false
        }
    }
}

extension EndpointAddress: Comparable {
    public static func < (a: EndpointAddress, b: EndpointAddress) -> Bool { (a.ip, a.port) < (b.ip, b.port) }
}
