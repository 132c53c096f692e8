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

    /// The head sent to the client for an upstream's response head.
    static func downstreamHead(_ h: HTTP1ResponseHead, _ bytes: [UInt8], ops: [HeaderOperations.Ops],
                               close: Bool, upgrade: Bool) -> Segment {
        bytes.withUnsafeBytes { raw in
            if ops.isEmpty && !close && passesUnchanged(h, raw) { return Segment.copy(raw) }
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
            for o in ops { apply(o, to: &fields) }
            var out = "HTTP/1.1 \(h.status) \(text(h.reason))\r\n"
            for (n, v) in fields { out += "\(n): \(v)\r\n" }
            if upgrade { out += "connection: upgrade\r\n" } else if close { out += "connection: close\r\n" }
            out += "\r\n"
            return Segment.copy(Array(out.utf8))
        }
    }

    /// Istio's order: remove, then set (replacing), then add.
    static func apply(_ ops: HeaderOperations.Ops, to fields: inout [(String, String)]) {
        let removed = Set(ops.remove.map { $0.lowercased() })
        fields.removeAll { removed.contains($0.0) }
        for (k, v) in ops.set.sorted(by: { $0.key < $1.key }) {
            let name = k.lowercased()
            fields.removeAll { $0.0 == name }
            fields.append((name, v))
        }
        for (k, v) in ops.add.sorted(by: { $0.key < $1.key }) { fields.append((k.lowercased(), v)) }
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
