import CSluiceLinux
import Glibc

/// Socket helpers for the data plane. Plain syscalls, done off the hot path or once per connection.
public enum Socket {
    /// Storage for an IPv4 or IPv6 socket address.
    public struct Address: @unchecked Sendable {
        public var storage = sockaddr_storage()
        public var length: socklen_t = 0

        public init() {}

        public init?(ip: String, port: UInt16) {
            var a4 = sockaddr_in()
            if inet_pton(AF_INET, ip, &a4.sin_addr) == 1 {
                a4.sin_family = sa_family_t(AF_INET)
                a4.sin_port = port.bigEndian
                withUnsafeBytes(of: a4) { src in
                    withUnsafeMutableBytes(of: &storage) { $0.copyMemory(from: src) }
                }
                length = socklen_t(MemoryLayout<sockaddr_in>.size)
                return
            }
            var a6 = sockaddr_in6()
            if inet_pton(AF_INET6, ip, &a6.sin6_addr) == 1 {
                a6.sin6_family = sa_family_t(AF_INET6)
                a6.sin6_port = port.bigEndian
                withUnsafeBytes(of: a6) { src in
                    withUnsafeMutableBytes(of: &storage) { $0.copyMemory(from: src) }
                }
                length = socklen_t(MemoryLayout<sockaddr_in6>.size)
                return
            }
            return nil
        }

        public var family: Int32 { Int32(storage.ss_family) }

        /// A hash of the IP address only (not the port), for consistent hashing by source.
        public var ipHash: UInt64 {
            withUnsafeBytes(of: storage) { raw in
                if family == AF_INET {
                    let ip = raw.loadUnaligned(fromByteOffset: 4, as: UInt32.self)
                    return mix64(UInt64(ip))
                }
                let a = raw.loadUnaligned(fromByteOffset: 8, as: UInt64.self)
                let b = raw.loadUnaligned(fromByteOffset: 16, as: UInt64.self)
                return mix64(a ^ mix64(b))
            }
        }

        public var description: String {
            var buf = [CChar](repeating: 0, count: 64)
            return withUnsafeBytes(of: storage) { raw -> String in
                if family == AF_INET {
                    var a = raw.loadUnaligned(fromByteOffset: 4, as: in_addr.self)
                    inet_ntop(AF_INET, &a, &buf, 64)
                    let port = UInt16(bigEndian: raw.loadUnaligned(fromByteOffset: 2, as: UInt16.self))
                    return cString(buf) + ":\(port)"
                }
                var a = raw.loadUnaligned(fromByteOffset: 8, as: in6_addr.self)
                inet_ntop(AF_INET6, &a, &buf, 64)
                let port = UInt16(bigEndian: raw.loadUnaligned(fromByteOffset: 2, as: UInt16.self))
                return "[" + cString(buf) + "]:\(port)"
            }
        }
    }

    public struct BindError: Error, CustomStringConvertible, Sendable {
        public var address: String
        public var errno: Int32
        public var description: String {
            switch errno {
            case EADDRINUSE:
                return "cannot listen on \(address): address already in use; stop the process that holds it "
                    + "(ss -ltnp) or change the port in the Gateway"
            case EACCES, EPERM:
                return "cannot listen on \(address): permission denied; run as root or grant CAP_NET_BIND_SERVICE "
                    + "(AmbientCapabilities= in the unit)"
            case EADDRNOTAVAIL:
                return "cannot listen on \(address): no such local address; fix the Gateway server's bind"
            default:
                return "cannot listen on \(address): \(String(cString: strerror(errno)))"
            }
        }
    }

    /// A listening TCP socket with SO_REUSEPORT, so each worker can hold its own.
    public static func listen(ip: String, port: UInt16, backlog: Int32 = 4096) throws(BindError) -> Int32 {
        guard var addr = Address(ip: ip, port: port) else { throw BindError(address: "\(ip):\(port)", errno: EINVAL) }
        let fd = socket(addr.family, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { throw BindError(address: "\(ip):\(port)", errno: errno) }
        var one: Int32 = 1
        setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, 4)
        setsockopt(fd, SOL_SOCKET, SO_REUSEPORT, &one, 4)
        let rc = withUnsafePointer(to: &addr.storage) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, addr.length) }
        }
        if rc != 0 {
            let e = errno
            close(fd)
            throw BindError(address: "\(ip):\(port)", errno: e)
        }
        if Glibc.listen(fd, backlog) != 0 {
            let e = errno
            close(fd)
            throw BindError(address: "\(ip):\(port)", errno: e)
        }
        return fd
    }

    /// The port a socket is bound to (for listeners opened on port 0).
    public static func localPort(_ fd: Int32) -> UInt16 {
        var ss = sockaddr_storage()
        var len = socklen_t(MemoryLayout<sockaddr_storage>.size)
        _ = withUnsafeMutablePointer(to: &ss) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(fd, $0, &len) }
        }
        return withUnsafeBytes(of: ss) { UInt16(bigEndian: $0.loadUnaligned(fromByteOffset: 2, as: UInt16.self)) }
    }

    public static func peerAddress(_ fd: Int32) -> Address {
        var a = Address()
        a.length = socklen_t(MemoryLayout<sockaddr_storage>.size)
        _ = withUnsafeMutablePointer(to: &a.storage) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getpeername(fd, $0, &a.length) }
        }
        return a
    }

    /// A non-blocking TCP socket for an upstream connection.
    @inline(__always)
    public static func stream(family: Int32) -> Int32 {
        socket(family, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_NONBLOCK.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
    }

    @inline(__always)
    public static func setNoDelay(_ fd: Int32) {
        var one: Int32 = 1
        setsockopt(fd, Int32(IPPROTO_TCP), TCP_NODELAY, &one, 4)
    }

    /// Close with RST instead of FIN: used to pass a peer's reset on.
    public static func setLingerZero(_ fd: Int32) {
        var l = linger(l_onoff: 1, l_linger: 0)
        setsockopt(fd, SOL_SOCKET, SO_LINGER, &l, socklen_t(MemoryLayout<linger>.size))
    }
}

/// SplitMix64 finaliser: a fast, well-mixed 64-bit hash of a 64-bit key.
@inline(__always)
public func mix64(_ x: UInt64) -> UInt64 {
    var z = x &+ 0x9E37_79B9_7F4A_7C15
    z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
    z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
    return z ^ (z >> 31)
}

func cString(_ buf: [CChar]) -> String {
    String(decoding: buf.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
}
