import Dispatch
import Glibc
import SluiceModel
import SluiceRing
import Synchronization

/// The agent's DNS listener (15053): the BPF programs send the workloads' DNS queries here. Mesh hosts are
/// answered with their service addresses; every other query is relayed to the host's resolver and its reply
/// returned as is. Control path: one thread reads queries; relays wait on a dispatch queue, never on that thread.
public final class DNSServer: @unchecked Sendable {
    public struct StartError: Error, CustomStringConvertible {
        public let description: String
    }

    private let hosts = Mutex<[String: [IPAddress]]>([:])
    private let running = Atomic<Bool>(false)
    private var fd: Int32 = -1
    private let upstream: EndpointAddress?
    private let relays = DispatchQueue(label: "sluice-dns-relay", attributes: .concurrent)
    /// Seconds a relayed query may wait for the upstream's reply.
    let relayTimeoutMilliseconds: Int32 = 2000
    public private(set) var port: UInt16 = 0

    /// - Parameter upstream: where other names are resolved; nil answers them with SERVFAIL.
    public init(upstream: EndpointAddress?) {
        self.upstream = upstream
    }

    /// The first `nameserver` of /etc/resolv.conf, the host's resolver.
    public static func systemResolver() -> EndpointAddress? {
        guard let f = fopen("/etc/resolv.conf", "r") else { return nil }
        defer { fclose(f) }
        var line = [CChar](repeating: 0, count: 512)
        while fgets(&line, Int32(line.count), f) != nil {
            let text = String(decoding: line.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
            let fields = text.split(whereSeparator: { $0 == " " || $0 == "\t" || $0 == "\n" })
            if fields.count >= 2, fields[0] == "nameserver", let ip = IPAddress(String(fields[1])) {
                return EndpointAddress(ip: ip, port: 53)
            }
        }
        return nil
    }

    /// Replaces the mesh hosts answered locally (lower-case names without the trailing dot).
    public func update(hosts table: [String: [IPAddress]]) {
        hosts.withLock { $0 = table }
    }

    /// Binds `address` (UDP) and starts answering.
    public func start(address: EndpointAddress) throws(StartError) {
        guard let sa = Socket.Address(ip: address.ip.description, port: address.port) else {
            throw StartError(description: "bad DNS listener address \(address)")
        }
        let s = socket(sa.family, Int32(SOCK_DGRAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        var bound = sa
        let rc = withUnsafePointer(to: &bound.storage) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(s, $0, sa.length) }
        }
        guard s >= 0, rc == 0 else {
            let e = errno
            if s >= 0 { close(s) }
            throw StartError(description: "cannot bind the DNS listener on \(address) (UDP): \(String(cString: strerror(e)))")
        }
        var local = Socket.Address()
        local.length = socklen_t(MemoryLayout<sockaddr_storage>.size)
        _ = withUnsafeMutablePointer(to: &local.storage) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(s, $0, &local.length) }
        }
        port = withUnsafeBytes(of: local.storage) { UInt16(bigEndian: $0.loadUnaligned(fromByteOffset: 2, as: UInt16.self)) }
        fd = s
        running.store(true, ordering: .relaxed)
        _ = startThread(name: "sluice-dns") { [self] in serve() }
    }

    public func stop() {
        running.store(false, ordering: .relaxed)
    }

    private func serve() {
        var buffer = [UInt8](repeating: 0, count: 4096)
        while running.load(ordering: .relaxed) {
            var p = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
            guard poll(&p, 1, 200) > 0 else { continue }
            var from = sockaddr_storage()
            var fromLength = socklen_t(MemoryLayout<sockaddr_storage>.size)
            let n = buffer.withUnsafeMutableBytes { b in
                withUnsafeMutablePointer(to: &from) {
                    $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { recvfrom(fd, b.baseAddress, b.count, 0, $0, &fromLength) }
                }
            }
            guard n > 0 else { continue }
            let query = Array(buffer[0..<n])
            // A mesh host is answered here for every type (NODATA but for A/AAAA): relaying it would get an
            // NXDOMAIN that tells resolvers the name does not exist.
            if let q = DNSQuery(query), q.qclass == DNSQuery.classIN, let addresses = hosts.withLock({ $0[q.name] }) {
                reply(q.answer(addresses), to: from, length: fromLength)
            } else {
                relay(query, to: from, length: fromLength)
            }
        }
        // Relays reply through this socket: wait for them before closing it.
        relays.sync(flags: .barrier) {}
        close(fd)
    }

    private func reply(_ bytes: [UInt8], to: sockaddr_storage, length: socklen_t) {
        var to = to
        _ = bytes.withUnsafeBytes { b in
            withUnsafePointer(to: &to) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { sendto(fd, b.baseAddress, b.count, 0, $0, length) } }
        }
    }

    /// Sends `query` to the upstream resolver and its reply back to the client; SERVFAIL if there is none.
    private func relay(_ query: [UInt8], to client: sockaddr_storage, length: socklen_t) {
        guard let upstream, let up = Socket.Address(ip: upstream.ip.description, port: upstream.port) else {
            if let q = DNSQuery(query) { reply(Self.servfail(q), to: client, length: length) }
            return
        }
        relays.async { [self] in
            let s = socket(up.family, Int32(SOCK_DGRAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
            guard s >= 0 else { return }
            defer { close(s) }
            // Connected: the kernel drops datagrams from anyone but the upstream.
            var dst = up
            let connected = withUnsafePointer(to: &dst.storage) {
                $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(s, $0, up.length) }
            }
            let sent = connected == 0 ? query.withUnsafeBytes { send(s, $0.baseAddress, $0.count, 0) } : -1
            var p = pollfd(fd: s, events: Int16(POLLIN), revents: 0)
            var answer = [UInt8](repeating: 0, count: 65535)
            guard sent == query.count, poll(&p, 1, relayTimeoutMilliseconds) > 0 else {
                if let q = DNSQuery(query) { reply(Self.servfail(q), to: client, length: length) }
                return
            }
            let n = answer.withUnsafeMutableBytes { recv(s, $0.baseAddress, $0.count, 0) }
            // Only the answer to this query (same id), as a resolver would check.
            if n >= 12, answer[0] == query[0], answer[1] == query[1] {
                reply(Array(answer[0..<n]), to: client, length: length)
            }
        }
    }

    static func servfail(_ q: DNSQuery) -> [UInt8] {
        var bytes = q.answer([])
        bytes[3] = (bytes[3] & 0xF0) | 2  // RCODE 2: SERVFAIL
        return bytes
    }
}
