import SluiceModel

/// A failed API call, answered as a Kubernetes `Status` object so kubectl and client libraries print it as they
/// print the API server's own errors.
public struct APIStatus: Error, Sendable, CustomStringConvertible {
    public struct Cause: Sendable {
        public var reason: String
        public var message: String
        public var field: String
    }

    public var code: Int
    public var reason: String
    public var message: String
    public var name: String?
    public var group: String?
    public var kind: String?
    public var causes: [Cause] = []

    public init(code: Int, reason: String, message: String, resource: APIResource? = nil, name: String? = nil) {
        self.code = code
        self.reason = reason
        self.message = message
        self.name = name
        group = resource?.group
        kind = resource?.plural
    }

    public var description: String { message }

    public var json: JSONValue {
        var details: [String: JSONValue] = [:]
        if let name { details["name"] = .string(name) }
        if let group { details["group"] = .string(group) }
        if let kind { details["kind"] = .string(kind) }
        if !causes.isEmpty {
            details["causes"] = .array(causes.map {
                .object(["reason": .string($0.reason), "message": .string($0.message), "field": .string($0.field)])
            })
        }
        var o: [String: JSONValue] = [
            "kind": "Status", "apiVersion": "v1", "metadata": .object([:]), "status": "Failure",
            "message": .string(message), "reason": .string(reason), "code": .int(Int64(code)),
        ]
        if !details.isEmpty { o["details"] = .object(details) }
        return .object(o)
    }

    static func notFound(_ r: APIResource, _ name: String) -> APIStatus {
        APIStatus(code: 404, reason: "NotFound", message: "\(r.plural).\(r.group) \"\(name)\" not found", resource: r,
                  name: name)
    }

    static func alreadyExists(_ r: APIResource, _ name: String) -> APIStatus {
        APIStatus(code: 409, reason: "AlreadyExists", message: "\(r.plural).\(r.group) \"\(name)\" already exists",
                  resource: r, name: name)
    }

    static func conflict(_ r: APIResource, _ name: String, _ why: String) -> APIStatus {
        APIStatus(code: 409, reason: "Conflict",
                  message: "Operation cannot be fulfilled on \(r.plural).\(r.group) \"\(name)\": \(why)", resource: r,
                  name: name)
    }

    static func badRequest(_ message: String) -> APIStatus {
        APIStatus(code: 400, reason: "BadRequest", message: message)
    }

    /// 422 with one cause per problem, each naming its field.
    static func invalid(_ r: APIResource, _ name: String, _ problems: [Diagnostic]) -> APIStatus {
        var s = APIStatus(code: 422, reason: "Invalid",
                          message: "\(r.kind).\(r.group) \"\(name)\" is invalid: "
                            + problems.map(Self.describe).joined(separator: ", "),
                          resource: r, name: name)
        s.kind = r.kind
        s.causes = problems.map { Cause(reason: "FieldValueInvalid", message: Self.describe($0, field: false), field: $0.path) }
        return s
    }

    /// A diagnostic as one line: `field: message (fix: ...)`, naming the other resource when it is not the one written.
    static func describe(_ d: Diagnostic) -> String { describe(d, field: true) }

    static func describe(_ d: Diagnostic, field: Bool) -> String {
        var s = ""
        if field, !d.path.isEmpty { s += d.path + ": " }
        if let r = d.resource, d.file != APIRequestSource.file { s += "\(r): " }
        s += d.message
        if let hint = d.hint { s += " (fix: \(hint))" }
        return s
    }
}

/// The file name diagnostics carry for the object of the request being served (other resources' diagnostics name
/// the store).
enum APIRequestSource {
    static let file = "<request>"
}
