import Foundation

/// A JSON document as the config API stores and edits it: Kubernetes objects are kept as the client wrote them
/// (unknown fields included), with only the server-managed metadata changed. Objects encode with sorted keys, as
/// the Kubernetes API server writes custom resources (Go's `map[string]interface{}`), so the same object always
/// gives the same bytes.
public enum JSONValue: Sendable, Hashable {
    case null
    case bool(Bool)
    case int(Int64)
    case double(Double)
    case string(String)
    case array([JSONValue])
    case object([String: JSONValue])

    /// Parses JSON text. Throws ``JSONValue/SyntaxError`` with the decoder's reason.
    public init(parsing data: Data) throws(SyntaxError) {
        do {
            self = try JSONDecoder().decode(JSONValue.self, from: data)
        } catch let DecodingError.dataCorrupted(context) {
            throw SyntaxError(message: (context.underlyingError.map { "\($0)" }) ?? context.debugDescription)
        } catch {
            throw SyntaxError(message: "\(error)")
        }
    }

    public struct SyntaxError: Error, CustomStringConvertible {
        public var message: String
        public var description: String { message }
    }

    /// Compact JSON with sorted keys: byte for byte what `JSONEncoder` with `[.sortedKeys, .withoutEscapingSlashes]`
    /// writes. Hand-written because every API answer, stored row and watch event is one of these, and the Codable
    /// path cost several times as much per object (`make bench-control`, API reads).
    public var data: Data {
        var out: [UInt8] = []
        out.reserveCapacity(512)
        Self.write(self, into: &out)
        return Data(out)
    }

    private static func write(_ v: JSONValue, into out: inout [UInt8]) {
        switch v {
        case .null: out.append(contentsOf: "null".utf8)
        case .bool(let b): out.append(contentsOf: (b ? "true" : "false").utf8)
        case .int(let i): out.append(contentsOf: String(i).utf8)
        case .double(let d):
            // JSONEncoder's form: Swift's shortest round-trip digits, without a trailing ".0". A non-finite double
            // cannot be parsed in, so it is not written out.
            guard d.isFinite else { return out.append(contentsOf: "null".utf8) }
            let text = d.description
            out.append(contentsOf: text.hasSuffix(".0") ? text.utf8.dropLast(2) : text.utf8[...])
        case .string(let s): writeString(s, into: &out)
        case .array(let a):
            out.append(UInt8(ascii: "["))
            for (i, e) in a.enumerated() {
                if i > 0 { out.append(UInt8(ascii: ",")) }
                write(e, into: &out)
            }
            out.append(UInt8(ascii: "]"))
        case .object(let o):
            out.append(UInt8(ascii: "{"))
            // By UTF-8 bytes, as JSONEncoder sorts (String's `<` compares canonical equivalents, which orders
            // decomposed characters differently).
            for (i, k) in o.keys.sorted(by: { $0.utf8.lexicographicallyPrecedes($1.utf8) }).enumerated() {
                if i > 0 { out.append(UInt8(ascii: ",")) }
                writeString(k, into: &out)
                out.append(UInt8(ascii: ":"))
                write(o[k]!, into: &out)
            }
            out.append(UInt8(ascii: "}"))
        }
    }

    private static let hex = Array("0123456789abcdef".utf8)

    private static func writeString(_ s: String, into out: inout [UInt8]) {
        out.append(UInt8(ascii: "\""))
        for b in s.utf8 {
            // JSON's two-character escapes, then \u00XX for the other control characters; everything else as is.
            let short: UInt8? = switch b {
            case UInt8(ascii: "\""), UInt8(ascii: "\\"): b
            case 0x0A: UInt8(ascii: "n")
            case 0x0D: UInt8(ascii: "r")
            case 0x09: UInt8(ascii: "t")
            case 0x08: UInt8(ascii: "b")
            case 0x0C: UInt8(ascii: "f")
            default: nil
            }
            if let short {
                out.append(UInt8(ascii: "\\"))
                out.append(short)
            } else if b < 0x20 {
                out.append(contentsOf: "\\u00".utf8)
                out.append(hex[Int(b >> 4)])
                out.append(hex[Int(b & 15)])
            } else {
                out.append(b)
            }
        }
        out.append(UInt8(ascii: "\""))
    }

    public var text: String { String(decoding: data, as: UTF8.self) }

    public var objectValue: [String: JSONValue]? { if case .object(let o) = self { o } else { nil } }
    public var arrayValue: [JSONValue]? { if case .array(let a) = self { a } else { nil } }
    public var stringValue: String? { if case .string(let s) = self { s } else { nil } }
    public var intValue: Int64? {
        switch self {
        case .int(let i): i
        case .double(let d) where d.rounded() == d && abs(d) < 9e15: Int64(d)
        default: nil
        }
    }

    /// The member `key` of an object (nil for other values or a missing key).
    public subscript(key: String) -> JSONValue? {
        get { objectValue?[key] }
        set {
            guard case .object(var o) = self else { return }
            o[key] = newValue
            self = .object(o)
        }
    }

    /// The value at a dotted path of object members, e.g. `metadata.name`.
    public subscript(path path: [String]) -> JSONValue? {
        var v: JSONValue? = self
        for p in path { v = v?[p] }
        return v
    }

    /// A string map (`metadata.labels`): members whose values are strings.
    public var stringMap: [String: String] {
        var out: [String: String] = [:]
        for (k, v) in objectValue ?? [:] { if let s = v.stringValue { out[k] = s } }
        return out
    }
}

extension JSONValue: ExpressibleByStringLiteral {
    public init(stringLiteral value: String) { self = .string(value) }
}

extension JSONValue: ExpressibleByBooleanLiteral {
    public init(booleanLiteral value: Bool) { self = .bool(value) }
}

extension JSONValue: Codable {
    public init(from decoder: any Decoder) throws {
        let c = try decoder.singleValueContainer()
        if c.decodeNil() {
            self = .null
        } else if let s = try? c.decode(String.self) {
            self = .string(s)
        } else if let b = try? c.decode(Bool.self) {
            self = .bool(b)
        } else if let i = try? c.decode(Int64.self) {
            self = .int(i)
        } else if let d = try? c.decode(Double.self) {
            self = .double(d)
        } else if let a = try? c.decode([JSONValue].self) {
            self = .array(a)
        } else {
            self = .object(try c.decode([String: JSONValue].self))
        }
    }

    public func encode(to encoder: any Encoder) throws {
        var c = encoder.singleValueContainer()
        switch self {
        case .null: try c.encodeNil()
        case .bool(let b): try c.encode(b)
        case .int(let i): try c.encode(i)
        case .double(let d): try c.encode(d)
        case .string(let s): try c.encode(s)
        case .array(let a): try c.encode(a)
        case .object(let o): try c.encode(o)
        }
    }
}

extension JSONValue {
    /// Every document of a YAML (or JSON) text as JSON values, scalars typed as YAML 1.2's core schema types them
    /// (plain `true`, `10`, `1.5`, `null`, `~`; quoted scalars stay strings), as `kubectl` turns YAML into the JSON
    /// it sends. Empty documents are skipped.
    public static func documents(yaml text: String) throws(SyntaxError) -> [JSONValue] {
        var out: [JSONValue] = []
        do {
            try YAMLTree.documents(text) { node in
                if case .scalar(let s, _, true) = node, s.isEmpty || s == "null" || s == "~" { return }
                out.append(JSONValue(yaml: node))
            }
        } catch {
            throw SyntaxError(message: "line \(error.line.map(String.init) ?? "?"): \(error.message)")
        }
        return out
    }

    init(yaml node: YAMLNode) {
        switch node {
        case .scalar(let s, _, let plain):
            self = plain ? Self.resolve(plain: s) : .string(s)
        case .sequence(let items, _):
            self = .array(items.map(JSONValue.init(yaml:)))
        case .mapping(let pairs, _):
            var o: [String: JSONValue] = [:]
            for p in pairs { o[p.key] = JSONValue(yaml: p.value) }
            self = .object(o)
        }
    }

    /// YAML 1.2 core schema resolution of a plain scalar.
    static func resolve(plain s: String) -> JSONValue {
        switch s {
        case "", "~", "null", "Null", "NULL": return .null
        case "true", "True", "TRUE": return .bool(true)
        case "false", "False", "FALSE": return .bool(false)
        default: break
        }
        if let first = s.utf8.first, first == UInt8(ascii: "-") || first == UInt8(ascii: "+")
            || (first >= UInt8(ascii: "0") && first <= UInt8(ascii: "9")) || first == UInt8(ascii: ".")
        {
            if let i = Int64(s) { return .int(i) }
            if s.hasPrefix("0x"), let i = Int64(s.dropFirst(2), radix: 16) { return .int(i) }
            if s.hasPrefix("0o"), let i = Int64(s.dropFirst(2), radix: 8) { return .int(i) }
            if s.contains(where: { $0.isNumber }), !s.contains(where: { $0.isLetter && $0 != "e" && $0 != "E" }),
                let d = Double(s), d.isFinite
            {
                return .double(d)
            }
        }
        // Anything else, YAML's `.inf` and `.nan` included (JSON has no such numbers), stays text.
        return .string(s)
    }

    /// YAML for people (`-o yaml`): block style, keys sorted, strings quoted only where YAML would read them as
    /// something else.
    public var yaml: String {
        var out = ""
        Self.writeYAML(self, indent: 0, into: &out, inline: false)
        return out
    }

    private static func writeYAML(_ v: JSONValue, indent: Int, into out: inout String, inline: Bool) {
        let pad = String(repeating: " ", count: indent)
        switch v {
        case .object(let o) where !o.isEmpty:
            var first = true
            for k in o.keys.sorted() {
                if !(first && inline) { out += pad }
                first = false
                out += scalarYAML(k) + ":"
                writeNested(o[k]!, indent: indent, into: &out)
            }
        case .array(let a) where !a.isEmpty:
            var first = true
            for item in a {
                if !(first && inline) { out += pad }
                first = false
                out += "- "
                switch item {
                case .object(let o) where !o.isEmpty: writeYAML(item, indent: indent + 2, into: &out, inline: true)
                case .array(let x) where !x.isEmpty:
                    out += "\n"
                    writeYAML(item, indent: indent + 2, into: &out, inline: false)
                default: out += flow(item) + "\n"
                }
            }
        default:
            out += flow(v) + "\n"
        }
    }

    private static func writeNested(_ v: JSONValue, indent: Int, into out: inout String) {
        switch v {
        case .object(let o) where !o.isEmpty:
            out += "\n"
            writeYAML(v, indent: indent + 2, into: &out, inline: false)
        case .array(let a) where !a.isEmpty:
            out += "\n"
            writeYAML(v, indent: indent, into: &out, inline: false)
        default:
            out += " " + flow(v) + "\n"
        }
    }

    private static func flow(_ v: JSONValue) -> String {
        switch v {
        case .string(let s): scalarYAML(s)
        case .object: "{}"
        case .array: "[]"
        default: v.text
        }
    }

    /// A string as a YAML scalar: plain when YAML reads it back as the same string, else JSON-quoted.
    static func scalarYAML(_ s: String) -> String {
        let special: Set<Character> = [":", "#", "{", "}", "[", "]", ",", "&", "*", "!", "|", ">", "'", "\"", "%", "@", "`"]
        let needsQuotes = s.isEmpty || s.first == " " || s.last == " " || s.first == "-" || s.first == "?"
            || s.contains(where: { special.contains($0) || $0.isNewline || $0 == "\t" })
            || resolve(plain: s) != .string(s) || s.hasPrefix(".")
        return needsQuotes ? JSONValue.string(s).text : s
    }
}
