/// Collects diagnostics while one resource is decoded.
final class DiagnosticSink {
    let file: String
    var resource: String?
    private(set) var diagnostics: [Diagnostic] = []

    init(file: String) { self.file = file }

    func error(_ path: String, _ line: Int?, _ message: String, hint: String? = nil,
               code: DiagnosticCode = .schemaValidation) {
        diagnostics.append(Diagnostic(.error, file: file, line: line, resource: resource, path: path, message: message,
                                      hint: hint, code: code))
    }

    func warning(_ path: String, _ line: Int?, _ message: String, hint: String? = nil, code: DiagnosticCode) {
        diagnostics.append(Diagnostic(.warning, file: file, line: line, resource: resource, path: path,
                                      message: message, hint: hint, code: code))
    }

    var hasErrors: Bool { diagnostics.contains { $0.severity == .error } }
}

/// A cursor into a YAML node that knows its field path and line, and reports type errors and unknown fields
/// instead of throwing on the first one.
struct YAMLReader {
    let node: YAMLNode
    let path: String
    let sink: DiagnosticSink

    init(node: YAMLNode, path: String, sink: DiagnosticSink) {
        self.node = node
        self.path = path
        self.sink = sink
    }

    var line: Int? { node.line }

    /// The mapping's pairs (empty for other nodes).
    var pairs: [YAMLPair] { if case .mapping(let p, _) = node { p } else { [] } }

    func child(_ key: String) -> YAMLReader? {
        // Resource mappings have a handful of keys: a scan beats building an index per mapping.
        guard case .mapping(let pairs, _) = node, let v = pairs.first(where: { $0.key == key }) else { return nil }
        return YAMLReader(node: v.value, path: path.isEmpty ? key : "\(path).\(key)", sink: sink)
    }

    /// Reports every key of this mapping not in `known` as a warning (Istio ignores nothing silently here).
    func checkKeys(_ known: Set<String>) {
        for p in pairs {
            let name = p.key
            if !known.contains(name) {
                sink.warning(path.isEmpty ? name : "\(path).\(name)", p.keyLine,
                             "unknown field '\(name)' is ignored",
                             hint: "check the spelling; known fields here: \(known.sorted().joined(separator: ", "))",
                             code: .unknownField)
            }
        }
    }

    /// Warns, naming the field, for each of `keys` present here: Sluice reads it but does not act on it yet, and the
    /// user must not believe it does.
    func notEnforced(_ keys: [String], hint: String? = nil) {
        for k in keys {
            guard let c = child(k) else { continue }
            sink.warning(c.path, c.line, "'\(k)' is not enforced by this version of Sluice; it has no effect", hint: hint,
                         code: .notEnforced)
        }
    }

    /// Refuses each of `keys` present here: a restriction or a protection Sluice does not apply yet, which would
    /// leave the user with less than asked for if it were accepted.
    func refuseUnenforced(_ keys: [String], hint: String? = nil) {
        for k in keys {
            guard let c = child(k) else { continue }
            sink.error(c.path, c.line, "'\(k)' is not enforced by this version of Sluice, so it is refused", hint: hint,
                       code: .refusedNotEnforced)
        }
    }

    /// True when this node is a mapping; reports an error naming the expectation otherwise.
    func expectMapping() -> Bool {
        if case .mapping = node { return true }
        if let s = node.scalar, s == "" || s == "~" || s == "null" { return false }
        sink.error(path, line, "expected a mapping")
        return false
    }

    func string(_ key: String) -> String? {
        guard let c = child(key) else { return nil }
        return c.asString()
    }

    func asString() -> String? {
        guard let s = node.scalar else {
            sink.error(path, line, "expected a string")
            return nil
        }
        return s
    }

    func requiredString(_ key: String, hint: String? = nil) -> String? {
        guard let v = string(key), !v.isEmpty else {
            sink.error(path.isEmpty ? key : "\(path).\(key)", line, "required field '\(key)' is missing", hint: hint)
            return nil
        }
        return v
    }

    func int(_ key: String, in range: ClosedRange<Int>) -> Int? {
        guard let c = child(key) else { return nil }
        return c.asInt(in: range)
    }

    func asInt(in range: ClosedRange<Int>) -> Int? {
        guard let s = node.scalar, let v = Int(s) else {
            sink.error(path, line, "expected an integer")
            return nil
        }
        guard range.contains(v) else {
            sink.error(path, line, "\(v) is out of range \(range.lowerBound)...\(range.upperBound)")
            return nil
        }
        return v
    }

    func double(_ key: String, in range: ClosedRange<Double>) -> Double? {
        guard let c = child(key) else { return nil }
        guard let s = c.node.scalar, let v = Double(s), v.isFinite else {
            sink.error(c.path, c.line, "expected a number")
            return nil
        }
        guard range.contains(v) else {
            sink.error(c.path, c.line, "\(v) is out of range \(range.lowerBound)...\(range.upperBound)")
            return nil
        }
        return v
    }

    func port(_ key: String) -> UInt16? {
        guard let c = child(key) else { return nil }
        return c.asPort()
    }

    func asPort() -> UInt16? { asInt(in: 1...65535).map { UInt16($0) } }

    func bool(_ key: String) -> Bool? {
        guard let c = child(key) else { return nil }
        guard let s = c.node.scalar else {
            sink.error(c.path, c.line, "expected true or false")
            return nil
        }
        switch s.lowercased() {
        case "true", "yes", "on": return true
        case "false", "no", "off": return false
        default:
            sink.error(c.path, c.line, "expected true or false, got '\(s)'")
            return nil
        }
    }

    func duration(_ key: String) -> Duration? {
        guard let c = child(key), let text = c.asString() else { return nil }
        guard let d = parseIstioDuration(text) else {
            sink.error(c.path, c.line, "'\(text)' is not a duration", hint: "write it like 1s, 250ms or 1m30s")
            return nil
        }
        return d
    }

    func array(_ key: String) -> [YAMLReader] {
        guard let c = child(key) else { return [] }
        switch c.node {
        case .sequence(let seq, _):
            return seq.enumerated().map { i, n in YAMLReader(node: n, path: "\(c.path)[\(i)]", sink: sink) }
        case .scalar(let s, _, _) where s.isEmpty || s == "null" || s == "~":
            return []
        default:
            sink.error(c.path, c.line, "expected a list")
            return []
        }
    }

    func strings(_ key: String) -> [String] { array(key).compactMap { $0.asString() } }

    func stringMap(_ key: String) -> [String: String] {
        guard let c = child(key), c.expectMapping() else { return [:] }
        var out: [String: String] = [:]
        for p in c.pairs {
            guard let v = p.value.scalar else {
                sink.error("\(c.path).\(p.key)", p.keyLine, "expected a string value")
                continue
            }
            out[p.key] = v
        }
        return out
    }

    func enumValue<E: RawRepresentable>(_ key: String, _ type: E.Type) -> E? where E.RawValue == String {
        guard let c = child(key), let text = c.asString() else { return nil }
        guard let v = E(rawValue: text) else {
            sink.error(c.path, c.line, "'\(text)' is not a valid value")
            return nil
        }
        return v
    }
}
