import Glibc
import SluiceHTTP
import SluiceModel

/// Builds the request head sent upstream from the client's parsed head and the chosen route: the rewritten
/// path and authority, the route's and destination's header operations, hop-by-hop fields removed, and the
/// `x-forwarded-*` / `x-request-id` fields a mesh adds. The body follows unchanged with its framing
/// (`Content-Length` or `chunked` bytes as received), so it is forwarded without re-encoding.
public enum UpstreamRequest {
    /// Fields that describe one connection, never forwarded (RFC 9110 7.6.1), plus those named in `Connection`.
    static let hopByHop: Set<String> = ["connection", "keep-alive", "proxy-connection", "te", "trailer", "upgrade",
                                        "proxy-authenticate", "proxy-authorization"]

    public struct Context: Sendable {
        public var clientAddress: String
        public var scheme: String
        public var requestID: String
        /// Prefix the route matched (`match.uri.prefix`), which `rewrite.uri` replaces; nil: replace the whole path.
        public var matchedPrefix: String?
        public init(clientAddress: String, scheme: String = "http", requestID: String, matchedPrefix: String? = nil) {
            self.clientAddress = clientAddress
            self.scheme = scheme
            self.requestID = requestID
            self.matchedPrefix = matchedPrefix
        }
    }

    /// The upstream request head for `head` (parsed from `bytes`), routed by `route` to `destination`.
    /// - Parameter replacing: fields set last, replacing any of the same name (a mirror's `host`, `connection`).
    public static func head(_ head: HTTP1RequestHead, in bytes: UnsafeRawBufferPointer, route: HTTPRoute?,
                            destination: VirtualService.RouteDestination?, context: Context,
                            replacing: [(String, String)] = []) -> [UInt8] {
        func text(_ r: Range<Int>) -> String { String(decoding: UnsafeRawBufferPointer(rebasing: bytes[r]), as: UTF8.self) }
        var target = text(head.target)
        if let rewrite = route?.rewrite?.uri {
            let (path, _) = HTTPRequestFacts.split(target: target)
            let query = target.dropFirst(path.count)
            if let prefix = context.matchedPrefix, path.hasPrefix(prefix) {
                target = rewrite + path.dropFirst(prefix.count) + query
            } else {
                target = rewrite + query
            }
        }
        // Hop-by-hop fields, and any the client's Connection field names.
        var drop = hopByHop
        var fields: [(String, String)] = []
        for (n, v) in head.headers {
            let name = text(n).lowercased()
            if name == "connection" {
                for token in text(v).split(separator: ",") {
                    drop.insert(String(token.drop { $0 == " " || $0 == "\t" }.reversed().drop { $0 == " " || $0 == "\t" }
                        .reversed()).lowercased())
                }
            }
            fields.append((name, text(v)))
        }
        if head.upgrade { drop.remove("upgrade") }
        fields.removeAll { drop.contains($0.0) }
        if let authority = route?.rewrite?.authority {
            fields.removeAll { $0.0 == "host" }
            fields.append(("host", authority))
        }
        // x-forwarded-for grows by the client; the request keeps one id across the mesh.
        if let i = fields.firstIndex(where: { $0.0 == "x-forwarded-for" }) {
            fields[i].1 += ", " + context.clientAddress
        } else {
            fields.append(("x-forwarded-for", context.clientAddress))
        }
        fields.removeAll { $0.0 == "x-forwarded-proto" }
        fields.append(("x-forwarded-proto", context.scheme))
        if !fields.contains(where: { $0.0 == "x-request-id" }) { fields.append(("x-request-id", context.requestID)) }
        // Istio applies the route's operations, then the destination's.
        for ops in [route?.headers?.request, destination?.headers?.request].compactMap({ $0 }) { ops.apply(to: &fields) }
        if head.upgrade { fields.append(("connection", "upgrade")) }
        for (name, value) in replacing {
            fields.removeAll { $0.0 == name }
            fields.append((name, value))
        }

        var out: [UInt8] = []
        out.reserveCapacity(head.length + 128)
        out += bytes[head.method]
        out.append(0x20)
        out += Array(target.utf8)
        out += Array(" HTTP/1.1\r\n".utf8)
        for (n, v) in fields {
            out += Array(n.utf8)
            out += [0x3A, 0x20]
            out += Array(v.utf8)
            out += [0x0D, 0x0A]
        }
        out += [0x0D, 0x0A]
        return out
    }
}

extension HeaderOperations.Ops {
    /// Istio's order on a head's fields (lower-case names): remove, then set (replacing), then add.
    func apply(to fields: inout [(String, String)]) {
        let removed = Set(remove.map { $0.lowercased() })
        fields.removeAll { removed.contains($0.0) }
        for (k, v) in set.sorted(by: { $0.key < $1.key }) {
            let name = k.lowercased()
            fields.removeAll { $0.0 == name }
            fields.append((name, v))
        }
        for (k, v) in add.sorted(by: { $0.key < $1.key }) { fields.append((k.lowercased(), v)) }
    }
}

extension UpstreamRequest {
    /// The common case of ``head(_:in:route:destination:context:)`` written straight into memory the caller frees:
    /// no rewrite and no header operations. Returns nil when the request needs the general path (the client's
    /// `Connection` field names other fields to drop).
    ///
    /// Hand-written because it runs for every request: it copies the client's fields byte for byte and appends
    /// the mesh's own, without building a string per field.
    public static func fastHead(_ head: HTTP1RequestHead, in b: UnsafeRawBufferPointer, clientAddress: String,
                                scheme: String, requestID: (UInt64, UInt64)) -> (UnsafeMutableRawPointer, Int)? {
        let capacity = head.length + 160 + clientAddress.utf8.count
        let out = malloc(capacity)!.assumingMemoryBound(to: UInt8.self)
        var n = 0
        @inline(__always) func put(_ r: Range<Int>) {
            for k in r { out[n] = b[k]; n += 1 }
        }
        @inline(__always) func put(_ s: StaticString) {
            let p = s.utf8Start
            for k in 0..<s.utf8CodeUnitCount { out[n] = p[k]; n += 1 }
        }
        put(head.method)
        out[n] = 0x20; n += 1
        put(head.target)
        put(" HTTP/1.1\r\n")
        var forwardedFor = false, hasID = false
        for (name, value) in head.headers {
            let len = name.count
            func named(_ s: StaticString) -> Bool { len == s.utf8CodeUnitCount && HTTP1Parser.fieldName(b, name, is: s) }
            if named("connection") {
                // Only "close"/"keep-alive"/"upgrade" tokens are understood here; anything else names fields to drop.
                var other = false
                HTTP1Parser.forEachToken(b, value) { t in
                    other = other || !(HTTP1Parser.fieldName(b, t, is: "close") || HTTP1Parser.fieldName(b, t, is: "keep-alive")
                        || HTTP1Parser.fieldName(b, t, is: "upgrade"))
                }
                if other { free(out); return nil }
                continue
            }
            if named("keep-alive") || named("proxy-connection") || named("te") || named("trailer")
                || named("proxy-authenticate") || named("proxy-authorization") || named("x-forwarded-proto")
                || (named("upgrade") && !head.upgrade) {
                continue
            }
            put(name)
            put(": ")
            put(value)
            if named("x-forwarded-for") {
                forwardedFor = true
                put(", ")
                for c in clientAddress.utf8 { out[n] = c; n += 1 }
            }
            if named("x-request-id") { hasID = true }
            put("\r\n")
        }
        if !forwardedFor {
            put("x-forwarded-for: ")
            for c in clientAddress.utf8 { out[n] = c; n += 1 }
            put("\r\n")
        }
        put(scheme == "https" ? "x-forwarded-proto: https\r\n" : "x-forwarded-proto: http\r\n")
        if !hasID {
            put("x-request-id: ")
            let digits: StaticString = "0123456789abcdef"
            for word in [requestID.0, requestID.1] {
                for shift in stride(from: 60, through: 0, by: -4) {
                    out[n] = digits.utf8Start[Int((word >> UInt64(shift)) & 0xF)]
                    n += 1
                }
            }
            put("\r\n")
        }
        if head.upgrade { put("connection: upgrade\r\n") }
        put("\r\n")
        return (UnsafeMutableRawPointer(out), n)
    }
}

/// Istio's fault injection for one request: whether to delay it, and whether to answer it with an error instead
/// of routing it. `random` draws uniformly in `0..<1` (one draw per fault kind).
public enum FaultInjection {
    public struct Decision: Sendable, Equatable {
        public var delay: Duration?
        public var abort: HTTPFault.Abort.Kind?
        public init(delay: Duration?, abort: HTTPFault.Abort.Kind?) {
            self.delay = delay
            self.abort = abort
        }
    }

    public static func decide(_ fault: HTTPFault?, random: () -> Double) -> Decision {
        guard let fault else { return Decision(delay: nil, abort: nil) }
        var d = Decision(delay: nil, abort: nil)
        if let delay = fault.delay, random() * 100 < delay.percentage { d.delay = delay.fixedDelay }
        if let abort = fault.abort, random() * 100 < abort.percentage { d.abort = abort.kind }
        return d
    }
}
