import Glibc
import SluiceHTTP
import SluiceModel

/// Response heads the proxy writes to clients: upstream heads passed on (hop-by-hop fields dropped, the route's
/// response header operations applied), and the proxy's own answers (errors, redirects, direct responses).
enum HTTPResponses {
    static func reason(_ status: Int) -> String {
        switch status {
        case 100: "Continue"
        case 101: "Switching Protocols"
        case 200: "OK"
        case 201: "Created"
        case 204: "No Content"
        case 301: "Moved Permanently"
        case 302: "Found"
        case 303: "See Other"
        case 307: "Temporary Redirect"
        case 308: "Permanent Redirect"
        case 400: "Bad Request"
        case 403: "Forbidden"
        case 404: "Not Found"
        case 408: "Request Timeout"
        case 413: "Content Too Large"
        case 414: "URI Too Long"
        case 429: "Too Many Requests"
        case 431: "Request Header Fields Too Large"
        case 500: "Internal Server Error"
        case 501: "Not Implemented"
        case 502: "Bad Gateway"
        case 503: "Service Unavailable"
        case 504: "Gateway Timeout"
        default: "Status \(status)"
        }
    }

    /// An answer of the proxy's own, with a plain-text body (none for HEAD requests).
    static func local(status: Int, headers: [(String, String)] = [], body: String? = nil, close: Bool,
                      isHEAD: Bool = false) -> [UInt8] {
        let text = body ?? (status >= 400 ? reason(status).lowercased() : "")
        var out = "HTTP/1.1 \(status) \(reason(status))\r\n"
        for (n, v) in headers { out += "\(n): \(v)\r\n" }
        if !text.isEmpty { out += "content-type: text/plain\r\n" }
        out += "content-length: \(text.utf8.count)\r\n"
        if close { out += "connection: close\r\n" }
        out += "\r\n"
        if !isHEAD { out += text }
        return Array(out.utf8)
    }

    /// Whether a response head can go to the client byte for byte: HTTP/1.1, no field that describes only the
    /// upstream connection, nothing to add or remove.
    static func passesUnchanged(_ h: HTTP1ResponseHead, _ bytes: UnsafeRawBufferPointer) -> Bool {
        guard h.minorVersion == 1 else { return false }
        for (n, _) in h.headers {
            let len = n.count
            // connection (10), keep-alive (10), proxy-connection (16)
            if len == 10 || len == 16 {
                let first = bytes[n.lowerBound] | 0x20
                if first == 0x63 || first == 0x6B || first == 0x70 { return false }
            }
        }
        return true
    }

    /// The head sent to the client for an upstream's response head; nil when the upstream's bytes can go as they
    /// are.
    static func downstreamHead(_ h: HTTP1ResponseHead, _ bytes: [UInt8], ops: [HeaderOperations.Ops],
                               close: Bool, upgrade: Bool) -> Segment? {
        bytes.withUnsafeBytes { raw in
            if ops.isEmpty && !close && !upgrade && passesUnchanged(h, raw) { return nil }
            if ops.isEmpty && !upgrade, let fast = fastDownstreamHead(h, bytes, close: close) { return fast }
            func text(_ r: Range<Int>) -> String { String(decoding: UnsafeRawBufferPointer(rebasing: raw[r]), as: UTF8.self) }
            var fields: [(String, String)] = []
            var drop: Set<String> = ["connection", "keep-alive", "proxy-connection"]
            for (n, v) in h.headers {
                let name = text(n).lowercased()
                if name == "connection" {
                    for t in text(v).split(separator: ",") { drop.insert(t.trimmingSpaces.lowercased()) }
                }
                fields.append((name, text(v)))
            }
            if upgrade { drop.remove("upgrade") }
            fields.removeAll { drop.contains($0.0) && !(upgrade && $0.0 == "upgrade") }
            for o in ops { o.apply(to: &fields) }
            var out = "HTTP/1.1 \(h.status) \(text(h.reason))\r\n"
            for (n, v) in fields { out += "\(n): \(v)\r\n" }
            if upgrade { out += "connection: upgrade\r\n" } else if close { out += "connection: close\r\n" }
            out += "\r\n"
            return Segment.copy(Array(out.utf8))
        }
    }

    /// ``downstreamHead(_:_:ops:close:upgrade:)`` without header operations, written byte for byte: the status
    /// line and every field but the upstream's hop-by-hop ones, then `connection: close` when closing. Nil when
    /// the upstream's `Connection` field names other fields to drop (the general path handles that).
    ///
    /// Hand-written because nearly every upstream sends `Connection: keep-alive`, so this runs per response.
    static func fastDownstreamHead(_ h: HTTP1ResponseHead, _ bytes: [UInt8], close: Bool) -> Segment? {
        bytes.withUnsafeBytes { b -> Segment? in
            let out = malloc(h.length + 32)!.assumingMemoryBound(to: UInt8.self)
            var n = 0
            var lineEnd = 0
            while lineEnd + 1 < h.length && !(b[lineEnd] == 0x0D && b[lineEnd + 1] == 0x0A) { lineEnd += 1 }
            // HTTP/1.0 upstreams: the client hears HTTP/1.1 from the proxy.
            for k in 0..<lineEnd { out[n] = b[k]; n += 1 }
            if h.minorVersion == 0 { out[7] = 0x31 }
            out[n] = 0x0D; out[n + 1] = 0x0A; n += 2
            for (name, value) in h.headers {
                let len = name.count
                if len == 10 && HTTP1Parser.fieldName(b, name, is: "connection") {
                    var other = false
                    HTTP1Parser.forEachToken(b, value) { t in
                        other = other || !(HTTP1Parser.fieldName(b, t, is: "keep-alive") || HTTP1Parser.fieldName(b, t, is: "close"))
                    }
                    if other { free(out); return nil }
                    continue
                }
                if (len == 10 && HTTP1Parser.fieldName(b, name, is: "keep-alive"))
                    || (len == 16 && HTTP1Parser.fieldName(b, name, is: "proxy-connection")) { continue }
                // name ": " value CRLF, copied from the line as received (value trimmed by the parser).
                for k in name { out[n] = b[k]; n += 1 }
                out[n] = 0x3A; out[n + 1] = 0x20; n += 2
                for k in value { out[n] = b[k]; n += 1 }
                out[n] = 0x0D; out[n + 1] = 0x0A; n += 2
            }
            if close {
                let text: StaticString = "connection: close\r\n"
                for k in 0..<text.utf8CodeUnitCount { out[n] = text.utf8Start[k]; n += 1 }
            }
            out[n] = 0x0D; out[n + 1] = 0x0A; n += 2
            return Segment(buffer: -1, owned: UnsafeMutableRawPointer(out), offset: 0, length: Int32(n), frees: true)
        }
    }

    /// Istio's redirect: the request's scheme, authority and path unless the route replaces them.
    static func redirectLocation(_ r: HTTPRedirect, scheme: String, authority: String, path: String) -> String {
        var host = r.authority ?? authority
        if let port = r.port {
            if let colon = host.lastIndex(of: ":"), !host.hasSuffix("]") { host = String(host[..<colon]) }
            host += ":\(port)"
        }
        return "\(r.scheme ?? scheme)://\(host)\(r.uri ?? path)"
    }
}

extension StringProtocol {
    var trimmingSpaces: String {
        String(drop { $0 == " " || $0 == "\t" }.reversed().drop { $0 == " " || $0 == "\t" }.reversed())
    }
}
