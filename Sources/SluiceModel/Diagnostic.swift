/// What kind of problem a diagnostic reports: a stable code (`sluice analyze` prints it, as istioctl analyze prints
/// its IST codes; scripts may match on it) and a name. Codes are never reused for another meaning.
public enum DiagnosticCode: String, Sendable, Hashable, CaseIterable, Codable {
    /// A destination names a subset no DestinationRule defines, or a host nothing defines.
    case referencedResourceNotFound = "SLC0101"
    /// Two resources claim the same thing and one of them is ignored.
    case conflictingResource = "SLC0102"
    /// A gateway server no VirtualService routes: it answers nothing.
    case unroutedGatewayServer = "SLC0103"
    /// An endpoint this version cannot reach (a DNS name it does not resolve).
    case unreachableEndpoint = "SLC0104"
    /// The resource does not parse or breaks a rule of its kind's schema.
    case schemaValidation = "SLC0106"
    /// A field or kind Sluice does not know; it is ignored.
    case unknownField = "SLC0107"
    /// A VirtualService rule no request can reach: an earlier rule matches everything it would.
    case virtualServiceUnreachableRule = "SLC0130"
    /// A setting with no effect where it is.
    case ineffectiveSetting = "SLC0200"
    /// A field this version reads but does not enforce (warned where Istio treats the field as advisory).
    case notEnforced = "SLC0201"
    /// A field this version does not enforce and would leave the user less protected than asked: refused.
    case refusedNotEnforced = "SLC0202"

    public var code: String { rawValue }

    /// The analyzer's name, as istioctl names its messages (`ReferencedResourceNotFound`).
    public var name: String {
        switch self {
        case .referencedResourceNotFound: "ReferencedResourceNotFound"
        case .conflictingResource: "ConflictingResource"
        case .unroutedGatewayServer: "UnroutedGatewayServer"
        case .unreachableEndpoint: "UnreachableEndpoint"
        case .schemaValidation: "SchemaValidationError"
        case .unknownField: "UnknownField"
        case .virtualServiceUnreachableRule: "VirtualServiceUnreachableRule"
        case .ineffectiveSetting: "IneffectiveSetting"
        case .notEnforced: "NotEnforced"
        case .refusedNotEnforced: "RefusedNotEnforced"
        }
    }
}

/// One problem found in the mesh configuration, located precisely enough to fix without guessing.
public struct Diagnostic: Error, Sendable, Hashable, CustomStringConvertible {
    public enum Severity: String, Sendable { case error, warning }

    public var severity: Severity
    public var code: DiagnosticCode
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
        hint: String? = nil, code: DiagnosticCode? = nil
    ) {
        self.severity = severity
        self.code = code ?? (severity == .error ? .schemaValidation : .ineffectiveSetting)
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
