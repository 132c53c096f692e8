/// One problem found in the mesh configuration, located precisely enough to fix without guessing.
public struct Diagnostic: Error, Sendable, Hashable, CustomStringConvertible {
    public enum Severity: String, Sendable { case error, warning }

    public var severity: Severity
    /// File the resource came from (or `<input>`).
    public var file: String
    /// 1-based line of the offending node, when known.
    public var line: Int?
    /// `Kind namespace/name` of the resource, when known.
    public var resource: String?
    /// Field path inside the resource, e.g. `spec.tcp[0].route[1].weight`.
    public var path: String
    public var message: String
    /// What to change to fix it.
    public var hint: String?

    public init(
        _ severity: Severity, file: String, line: Int?, resource: String?, path: String, message: String,
        hint: String? = nil
    ) {
        self.severity = severity
        self.file = file
        self.line = line
        self.resource = resource
        self.path = path
        self.message = message
        self.hint = hint
    }

    public var description: String {
        var s = "\(file)"
        if let line { s += ":\(line)" }
        s += ": \(severity.rawValue)"
        if let resource { s += ": \(resource)" }
        if !path.isEmpty { s += ": \(path)" }
        s += ": \(message)"
        if let hint { s += " (fix: \(hint))" }
        return s
    }
}

/// Thrown when a configuration has at least one error. Carries every problem found, not just the first.
public struct ConfigErrors: Error, Sendable, CustomStringConvertible {
    public var diagnostics: [Diagnostic]
    public init(_ diagnostics: [Diagnostic]) { self.diagnostics = diagnostics }
    public var description: String { diagnostics.map(\.description).joined(separator: "\n") }
}
