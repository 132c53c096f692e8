import Foundation
import Logging
import SluiceModel

/// The config API's logic, without sockets: one request in, one response (or a watch to run) out. Follows the
/// Kubernetes REST conventions for custom resources, so kubectl and client libraries work unchanged:
/// discovery documents, `/apis/{group}/{version}/namespaces/{ns}/{plural}[/{name}]`, list and watch with
/// resourceVersion, `Status` errors, 409 on stale writes, merge and JSON patches, dry runs.
public final class ConfigAPI: Sendable {
    public struct Request: Sendable {
        public var method: String
        /// The path, without the query.
        public var path: String
        public var query: [String: String]
        public var headers: [String: String]
        public var body: Data
        /// The verified client certificate's URI SAN, if one was presented.
        public var peer: String?

        public init(method: String, target: String, headers: [String: String] = [:], body: Data = Data(), peer: String? = nil) {
            self.method = method
            let parts = target.split(separator: "?", maxSplits: 1, omittingEmptySubsequences: false)
            path = parts.first.map(String.init) ?? "/"
            query = parts.count > 1 ? Self.parseQuery(String(parts[1])) : [:]
            self.headers = Dictionary(headers.map { ($0.key.lowercased(), $0.value) }, uniquingKeysWith: { a, _ in a })
            self.body = body
            self.peer = peer
        }

        static func parseQuery(_ q: String) -> [String: String] {
            var out: [String: String] = [:]
            for pair in q.split(separator: "&") {
                let kv = pair.split(separator: "=", maxSplits: 1, omittingEmptySubsequences: false)
                let key = String(kv[0]).removingPercentEncoding ?? String(kv[0])
                let raw = kv.count > 1 ? String(kv[1]).replacingOccurrences(of: "+", with: " ") : ""
                out[key] = raw.removingPercentEncoding ?? raw
            }
            return out
        }
    }

    public struct Response: Sendable {
        public var status: Int
        public var contentType = "application/json"
        public var body: Data
        /// Kubernetes' `Warning: 299 - "..."` headers (kubectl prints them).
        public var warnings: [String] = []

        init(_ status: Int, _ json: JSONValue, warnings: [String] = []) {
            self.status = status
            body = json.data
            self.warnings = warnings
        }

        init(status: Int, contentType: String, body: Data) {
            self.status = status
            self.contentType = contentType
            self.body = body
        }
    }

    /// A watch the server should stream.
    public struct Watch: Sendable {
        public var resource: APIResource
        public var version: String
        public var namespace: String?
        public var start: MeshState.WatchStart
        public var selector: LabelSelector
        public var name: String?
        public var bookmarks: Bool
        public var table: Bool
        public var timeout: Duration?
    }

    public enum Outcome: Sendable {
        case response(Response)
        case watch(Watch)
        /// A response that waits on something else (an agent's answer): the server runs it off its event loop.
        case deferred(@Sendable () async -> Response)
    }

    /// Largest object accepted (etcd's default request limit, as the Kubernetes API server enforces it).
    public static let maxObjectBytes = 1_572_864

    public let mesh: MeshState
    let auth: APIAuthenticator
    let logger: Logger
    let openAPI: OpenAPIDocuments

    /// The connected agents, for `GET /sluice/v1/status` (`sluice status`).
    let nodeStatus: @Sendable () -> [AgentHub.NodeStatus]
    /// Asks a node's agent what it serves, for `GET /sluice/v1/nodes/{node}/configdump` (`sluice proxy-config`).
    let configDump: @Sendable (_ node: String) async -> AgentHub.ConfigDumpResult
    /// Deletes a node, for `DELETE /sluice/v1/nodes/{node}` (`sluice delete node`); nil when it is unknown.
    let deleteNode: @Sendable (_ node: String, _ requester: String) throws -> AgentHub.NodeDeletion?

    public init(mesh: MeshState, auth: APIAuthenticator, logger: Logger,
                nodeStatus: @escaping @Sendable () -> [AgentHub.NodeStatus] = { [] },
                configDump: @escaping @Sendable (_ node: String) async -> AgentHub.ConfigDumpResult = { _ in .notConnected },
                deleteNode: @escaping @Sendable (_ node: String, _ requester: String) throws -> AgentHub.NodeDeletion? = { _, _ in nil }) {
        self.mesh = mesh
        self.auth = auth
        self.logger = logger
        self.nodeStatus = nodeStatus
        self.configDump = configDump
        self.deleteNode = deleteNode
        openAPI = OpenAPIDocuments()
    }

    /// `{"kind": "NodeStatusList", "revision": N, "items": [...]}`: one item per connected agent.
    func statusList() -> JSONValue {
        let encoder = JSONEncoder()
        encoder.dateEncodingStrategy = .iso8601
        encoder.outputFormatting = [.sortedKeys]
        let items = (try? encoder.encode(nodeStatus())).flatMap { try? JSONDecoder().decode(JSONValue.self, from: $0) }
        return .object(["kind": "NodeStatusList", "apiVersion": "sluice.dev/v1", "revision": .int(mesh.revision),
                        "items": items ?? .array([])])
    }

    public func handle(_ request: Request) -> Outcome {
        do {
            return try route(request)
        } catch {
            return .response(Response(error.code, error.json))
        }
    }

    private func route(_ rq: Request) throws(APIStatus) -> Outcome {
        let parts = rq.path.split(separator: "/").map(String.init)
        if ["healthz", "readyz", "livez"].contains(parts.first ?? ""), parts.count == 1 {
            return .response(Response(status: 200, contentType: "text/plain", body: Data("ok".utf8)))
        }
        guard let user = auth.authenticate(authorization: rq.headers["authorization"], peer: rq.peer) else {
            throw APIStatus(code: 401, reason: "Unauthorized", message: "Unauthorized")
        }
        let write = !["GET", "HEAD"].contains(rq.method)
        guard let role = user.role else {
            throw APIStatus(code: 403, reason: "Forbidden",
                            message: "User \"\(user.name)\" is not granted a role: add it to the --tokens file")
        }
        switch (parts.first, parts.count) {
        case ("version", 1): return .response(Response(200, Self.version))
        case ("sluice", 3) where parts[1] == "v1" && parts[2] == "status" && !write:
            return .response(Response(200, statusList()))
        case ("sluice", 5) where parts[1] == "v1" && parts[2] == "nodes" && parts[4] == "configdump" && !write:
            let node = parts[3], ask = configDump
            return .deferred {
                switch await ask(node) {
                case .dump(let data) where (try? JSONSerialization.jsonObject(with: data)) != nil:
                    return Response(status: 200, contentType: "application/json", body: data)
                case .dump:
                    let e = APIStatus(code: 500, reason: "InternalError", message: "node \(node)'s agent answered with something that is not JSON")
                    return Response(e.code, e.json)
                case .notConnected:
                    let e = APIStatus(code: 404, reason: "NotFound", message: "node \"\(node)\" has no agent connected", name: node)
                    return Response(e.code, e.json)
                case .timedOut:
                    let e = APIStatus(code: 504, reason: "Timeout", message: "node \(node)'s agent did not answer in time")
                    return Response(e.code, e.json)
                }
            }
        case ("sluice", 4) where parts[1] == "v1" && parts[2] == "nodes":
            return .response(try nodeRequest(rq, node: parts[3], user: user.name, role: role))
        case ("api", 1): return .response(Response(200, Discovery.coreVersions))
        case ("api", 2) where parts[1] == "v1": return .response(Response(200, Discovery.coreResources))
        case ("api", 3) where parts[1] == "v1" && parts[2] == "namespaces" && !write:
            return .response(Response(200, Discovery.namespaceList(mesh.namespaces, revision: mesh.revision)))
        case ("api", 4) where parts[1] == "v1" && parts[2] == "namespaces" && !write:
            guard mesh.namespaces.contains(parts[3]) else {
                throw APIStatus(code: 404, reason: "NotFound", message: "namespaces \"\(parts[3])\" not found", name: parts[3])
            }
            return .response(Response(200, Discovery.namespace(parts[3])))
        case ("apis", 1): return .response(Response(200, Discovery.groupList))
        case ("apis", 2):
            guard let g = Discovery.group(parts[1]) else { throw Self.pageNotFound }
            return .response(Response(200, g))
        case ("apis", 3):
            guard let l = Discovery.resourceList(group: parts[1], version: parts[2]) else { throw Self.pageNotFound }
            return .response(Response(200, l))
        case ("openapi", _):
            guard let r = openAPI.serve(Array(parts.dropFirst()), accept: rq.headers["accept"] ?? "") else {
                throw Self.pageNotFound
            }
            return .response(r)
        case ("apis", _): break
        default: throw Self.pageNotFound
        }
        // /apis/{group}/{version}[/namespaces/{ns}]/{plural}[/{name}]
        let group = parts[1], version = parts[2]
        var rest = parts[3...]
        var namespace: String?
        if rest.first == "namespaces", rest.count >= 3 {
            namespace = rest[rest.startIndex + 1]
            rest = rest.dropFirst(2)
        }
        guard let plural = rest.first, rest.count <= 2,
              let resource = APIResource.find(group: group, plural: plural), resource.versions.contains(version)
        else { throw Self.pageNotFound }
        let name = rest.count == 2 ? rest.last : nil
        if write && role != .admin {
            throw APIStatus(code: 403, reason: "Forbidden",
                            message: "\(resource.plural).\(resource.group) is forbidden: User \"\(user.name)\" cannot "
                                + "\(rq.method.lowercased()) it (role view)", resource: resource, name: name)
        }
        if let ns = namespace, !isDNSLabel(ns) {
            throw APIStatus.badRequest("namespace \"\(ns)\" is not a valid DNS label")
        }
        let ctx = Context(request: rq, resource: resource, version: version, namespace: namespace, name: name,
                          user: user.name)
        switch (rq.method, name) {
        case ("GET", nil), ("HEAD", nil):
            if ["true", "1"].contains(rq.query["watch"] ?? "") { return .watch(try watch(ctx)) }
            return .response(try list(ctx))
        case ("GET", let name?), ("HEAD", let name?):
            if ["true", "1"].contains(rq.query["watch"] ?? "") {
                var w = try watch(ctx)
                w.name = name
                return .watch(w)
            }
            guard let ns = namespace else { throw Self.pageNotFound }
            guard let o = mesh.get(key(resource, ns, name)) else { throw APIStatus.notFound(resource, name) }
            return .response(Response(200, present(o.object, ctx)))
        case ("POST", nil):
            guard namespace != nil else { throw Self.methodNotAllowed(rq.method) }
            return .response(try create(ctx))
        case ("PUT", _?):
            return .response(try replace(ctx))
        case ("PATCH", _?):
            return .response(try patch(ctx))
        case ("DELETE", _?):
            return .response(try delete(ctx))
        default:
            throw Self.methodNotAllowed(rq.method)
        }
    }

    struct Context {
        var request: Request
        var resource: APIResource
        var version: String
        var namespace: String?
        var name: String?
        var user: String
        var apiVersion: String { resource.group + "/" + version }
        var dryRun: Bool { request.query["dryRun"] == "All" }
    }

    func key(_ r: APIResource, _ ns: String, _ name: String) -> StoreKey {
        StoreKey(group: r.group, resource: r.plural, namespace: ns, name: name)
    }

    /// The object as served at the version the request names.
    func present(_ object: JSONValue, _ ctx: Context) -> JSONValue {
        var o = object
        o["apiVersion"] = .string(ctx.apiVersion)
        return o
    }

    // MARK: - reads

    private func list(_ ctx: Context) throws(APIStatus) -> Response {
        let selector = try LabelSelector(ctx.request.query["labelSelector"] ?? "")
        let field = try FieldSelector(ctx.request.query["fieldSelector"] ?? "")
        if let c = ctx.request.query["continue"], !c.isEmpty {
            throw APIStatus(code: 410, reason: "Expired", message: "the continue token is not valid: this server "
                            + "answers every list whole (it ignores limit) and issues no continue tokens")
        }
        let (objects, revision) = mesh.list(ctx.resource, namespace: ctx.namespace)
        let items = objects.filter { selector.matches($0.object["metadata"]?["labels"]?.stringMap ?? [:]) && field.matches($0.key) }
        if Self.wantsTable(ctx.request) {
            return Response(200, Table.list(ctx.resource, items.map { present($0.object, ctx) }, revision: revision))
        }
        return Response(200, .object([
            "apiVersion": .string(ctx.apiVersion), "kind": .string(ctx.resource.listKind),
            "metadata": .object(["resourceVersion": .string(String(revision))]),
            "items": .array(items.map { present($0.object, ctx) }),
        ]))
    }

    private func watch(_ ctx: Context) throws(APIStatus) -> Watch {
        let selector = try LabelSelector(ctx.request.query["labelSelector"] ?? "")
        let field = try FieldSelector(ctx.request.query["fieldSelector"] ?? "")
        let start: MeshState.WatchStart
        switch ctx.request.query["resourceVersion"] ?? "" {
        case "", "0": start = .now
        case let rv:
            guard let n = Int64(rv), n >= 0 else {
                throw APIStatus.badRequest("resourceVersion \"\(rv)\" is not a number this server issued")
            }
            start = .after(n)
        }
        var timeout: Duration?
        if let t = ctx.request.query["timeoutSeconds"] {
            guard let s = Int(t), s >= 0 else { throw APIStatus.badRequest("timeoutSeconds \"\(t)\" is not a number") }
            if s > 0 { timeout = .seconds(s) }
        }
        return Watch(resource: ctx.resource, version: ctx.version, namespace: ctx.namespace, start: start,
                     selector: selector, name: field.name, bookmarks: ctx.request.query["allowWatchBookmarks"] == "true",
                     table: Self.wantsTable(ctx.request), timeout: timeout)
    }

    static func wantsTable(_ rq: Request) -> Bool {
        (rq.headers["accept"] ?? "").contains("as=Table")
    }

    // MARK: - writes

    /// The request's body as one object (JSON, or YAML as the API server also takes).
    private func body(_ ctx: Context) throws(APIStatus) -> JSONValue {
        let rq = ctx.request
        guard rq.body.count <= Self.maxObjectBytes else {
            throw APIStatus(code: 413, reason: "RequestEntityTooLarge",
                            message: "the request body is \(rq.body.count) bytes; objects may be at most "
                                + "\(Self.maxObjectBytes) bytes (1.5 MiB)")
        }
        let type = (rq.headers["content-type"] ?? "application/json").split(separator: ";").first.map {
            $0.trimmingCharacters(in: .whitespaces).lowercased()
        } ?? ""
        let value: JSONValue
        switch type {
        case "application/yaml", "application/x-yaml", "text/yaml":
            let docs: [JSONValue]
            do { docs = try JSONValue.documents(yaml: String(decoding: rq.body, as: UTF8.self)) } catch {
                throw APIStatus.badRequest("the body is not valid YAML: \(error.message)")
            }
            guard docs.count == 1 else { throw APIStatus.badRequest("the body must hold exactly one object") }
            value = docs[0]
        case "application/json", "application/merge-patch+json", "application/json-patch+json", "":
            do { value = try JSONValue(parsing: rq.body) } catch {
                throw APIStatus.badRequest("the body is not valid JSON: \(error.message)")
            }
        default:
            throw Self.unsupportedMediaType(type)
        }
        return value
    }

    /// Checks the object's identity against the request: kind, apiVersion, namespace, name.
    private func checkIdentity(_ o: JSONValue, _ ctx: Context, name: String?) throws(APIStatus) -> String {
        guard case .object = o else { throw APIStatus.badRequest("the body must be a JSON object") }
        let r = ctx.resource
        if let k = o["kind"], k.stringValue != r.kind {
            throw APIStatus.badRequest("the kind in the body (\(k.text)) does not match the resource (\(r.kind))")
        }
        if let v = o["apiVersion"], v.stringValue != ctx.apiVersion {
            throw APIStatus.badRequest("the API version in the body (\(v.text)) does not match the expected API "
                                       + "version (\(ctx.apiVersion))")
        }
        guard let meta = o["metadata"], case .object = meta else {
            throw invalid(ctx, name ?? "", "metadata", "metadata is required")
        }
        if let ns = meta["namespace"], ns.stringValue != ctx.namespace {
            throw APIStatus.badRequest("the namespace of the provided object (\(ns.text)) does not match the namespace "
                                       + "sent on the request (\(ctx.namespace ?? ""))")
        }
        let bodyName = meta["name"]?.stringValue
        if let name {
            guard bodyName == nil || bodyName == name else {
                throw APIStatus.badRequest("the name of the object (\(bodyName!)) does not match the name on the URL (\(name))")
            }
            return name
        }
        if let bodyName, !bodyName.isEmpty { return bodyName }
        if let prefix = meta["generateName"]?.stringValue, !prefix.isEmpty {
            let chars = Array("bcdfghjklmnpqrstvwxz2456789")
            return prefix + String((0..<5).map { _ in chars.randomElement()! })
        }
        throw invalid(ctx, "", "metadata.name", "name or generateName is required")
    }

    func invalid(_ ctx: Context, _ name: String, _ field: String, _ message: String) -> APIStatus {
        APIStatus.invalid(ctx.resource, name, [Diagnostic(.error, file: APIRequestSource.file, line: nil, resource: nil,
                                                          path: field, message: message)])
    }

    private func fieldValidation(_ ctx: Context) throws(APIStatus) -> MeshState.FieldValidation {
        guard let v = ctx.request.query["fieldValidation"], !v.isEmpty else { return .warn }
        guard let f = MeshState.FieldValidation(rawValue: v) else {
            throw APIStatus.badRequest("fieldValidation must be Strict, Warn or Ignore, not \"\(v)\"")
        }
        return f
    }

    private func stripGenerateName(_ o: JSONValue) -> JSONValue {
        var o = o
        o["metadata"]?["generateName"] = nil
        return o
    }

    private func create(_ ctx: Context) throws(APIStatus) -> Response {
        var o = try body(ctx)
        let name = try checkIdentity(o, ctx, name: nil)
        o = stripGenerateName(o)
        if let rv = o["metadata"]?["resourceVersion"], rv != .string("") {
            throw invalid(ctx, name, "metadata.resourceVersion", "must not be set on create")
        }
        let result = try mesh.write(key(ctx.resource, ctx.namespace!, name), ctx.resource, version: ctx.version,
                                    dryRun: ctx.dryRun, fieldValidation: try fieldValidation(ctx)) { current throws(APIStatus) in
            if current != nil { throw APIStatus.alreadyExists(ctx.resource, name) }
            return o
        }
        audit(ctx, "create", name, result)
        return Response(201, present(result.object.object, ctx), warnings: result.warnings)
    }

    private func replace(_ ctx: Context) throws(APIStatus) -> Response {
        guard let ns = ctx.namespace, let name = ctx.name else { throw Self.methodNotAllowed("PUT") }
        let o = try body(ctx)
        _ = try checkIdentity(o, ctx, name: name)
        guard let rv = o["metadata"]?["resourceVersion"]?.stringValue, !rv.isEmpty else {
            throw invalid(ctx, name, "metadata.resourceVersion", "must be specified for an update")
        }
        let result = try mesh.write(key(ctx.resource, ns, name), ctx.resource, version: ctx.version, dryRun: ctx.dryRun,
                                    fieldValidation: try fieldValidation(ctx)) { current throws(APIStatus) in
            guard let current else { throw APIStatus.notFound(ctx.resource, name) }
            try Self.precondition(rv, current, ctx)
            return o
        }
        audit(ctx, "update", name, result)
        return Response(200, present(result.object.object, ctx), warnings: result.warnings)
    }

    static func precondition(_ rv: String, _ current: StoredObject, _ ctx: Context) throws(APIStatus) {
        guard rv == String(current.revision) else {
            throw APIStatus.conflict(ctx.resource, current.key.name,
                                     "the object has been modified; please apply your changes to the latest version and "
                                        + "try again (resourceVersion \(rv) is not the current \(current.revision))")
        }
    }

    private func patch(_ ctx: Context) throws(APIStatus) -> Response {
        guard let ns = ctx.namespace, let name = ctx.name else { throw Self.methodNotAllowed("PATCH") }
        let type = (ctx.request.headers["content-type"] ?? "").split(separator: ";").first.map {
            $0.trimmingCharacters(in: .whitespaces).lowercased()
        } ?? ""
        guard type == "application/merge-patch+json" || type == "application/json-patch+json" else {
            throw Self.unsupportedMediaType(type)
        }
        let p = try body(ctx)
        let result = try mesh.write(key(ctx.resource, ns, name), ctx.resource, version: ctx.version, dryRun: ctx.dryRun,
                                    fieldValidation: try fieldValidation(ctx)) { current throws(APIStatus) in
            guard let current else { throw APIStatus.notFound(ctx.resource, name) }
            var patched: JSONValue
            if type == "application/merge-patch+json" {
                guard case .object = p else { throw APIStatus.badRequest("a merge patch must be a JSON object") }
                patched = JSONPatch.merge(current.object, p)
            } else {
                do throws(JSONPatch.Failure) { patched = try JSONPatch.apply(current.object, p) } catch {
                    throw APIStatus(code: 422, reason: "Invalid", message: "the JSON patch does not apply: \(error.message)",
                                    resource: ctx.resource, name: name)
                }
            }
            // A patch may carry a resourceVersion: then it is a precondition, as for a replace.
            if let rv = patched["metadata"]?["resourceVersion"]?.stringValue, rv != String(current.revision) {
                try Self.precondition(rv, current, ctx)
            }
            _ = try checkIdentity(patched, ctx, name: name)
            return patched
        }
        audit(ctx, "patch", name, result)
        return Response(200, present(result.object.object, ctx), warnings: result.warnings)
    }

    private func delete(_ ctx: Context) throws(APIStatus) -> Response {
        guard let ns = ctx.namespace, let name = ctx.name else { throw Self.methodNotAllowed("DELETE") }
        var rvPrecondition: String?, uidPrecondition: String?
        if !ctx.request.body.isEmpty {
            let options: JSONValue
            do { options = try JSONValue(parsing: ctx.request.body) } catch {
                throw APIStatus.badRequest("the DeleteOptions body is not valid JSON: \(error.message)")
            }
            rvPrecondition = options["preconditions"]?["resourceVersion"]?.stringValue
            uidPrecondition = options["preconditions"]?["uid"]?.stringValue
            if options["dryRun"]?.arrayValue?.contains("All") == true {
                var c = ctx
                c.request.query["dryRun"] = "All"
                return try delete(c, ns, name, rvPrecondition, uidPrecondition)
            }
        }
        return try delete(ctx, ns, name, rvPrecondition, uidPrecondition)
    }

    private func delete(_ ctx: Context, _ ns: String, _ name: String, _ rv: String?, _ uid: String?) throws(APIStatus) -> Response {
        let result = try mesh.write(key(ctx.resource, ns, name), ctx.resource, version: ctx.version,
                                    dryRun: ctx.dryRun) { current throws(APIStatus) in
            guard let current else { throw APIStatus.notFound(ctx.resource, name) }
            if let rv { try Self.precondition(rv, current, ctx) }
            if let uid, current.object["metadata"]?["uid"]?.stringValue != uid {
                throw APIStatus.conflict(ctx.resource, name, "the UID in the precondition (\(uid)) does not match the object's")
            }
            return nil
        }
        audit(ctx, "delete", name, result)
        return Response(200, present(result.object.object, ctx))
    }

    /// `DELETE /sluice/v1/nodes/{node}`: the node's registered workloads go, and it is refused until it joins again.
    private func nodeRequest(_ rq: Request, node: String, user: String, role: APIAuthenticator.Role) throws(APIStatus) -> Response {
        guard rq.method == "DELETE" else { throw Self.methodNotAllowed(rq.method) }
        guard role == .admin else {
            throw APIStatus(code: 403, reason: "Forbidden", message: "nodes is forbidden: User \"\(user)\" cannot delete it (role view)",
                            name: node)
        }
        let before = mesh.revision
        let deletion: AgentHub.NodeDeletion?
        do { deletion = try deleteNode(node, user) } catch {
            throw APIStatus(code: 500, reason: "InternalError", message: "cannot delete node \(node): \(error)", name: node)
        }
        guard let deletion else {
            throw APIStatus(code: 404, reason: "NotFound", message: "nodes \"\(node)\" not found", name: node)
        }
        logger.info("audit", metadata: ["user": "\(user)", "verb": "delete", "resource": "nodes", "name": "\(node)",
                                        "before": "\(before)", "after": "\(mesh.revision)",
                                        "removed_workloads": "\(deletion.removedWorkloads)"])
        let message = "node \(node) deleted: \(deletion.removedWorkloads) registered workload(s) removed"
            + (deletion.wasConnected ? ", its agent's stream ended" : "")
        return Response(200, .object(["kind": "Status", "apiVersion": "v1", "metadata": .object([:]), "status": "Success",
                                      "message": .string(message),
                                      "details": .object(["name": .string(node), "kind": "nodes"])]))
    }

    /// One line per write: who, what, and the versions before and after.
    private func audit(_ ctx: Context, _ verb: String, _ name: String, _ r: MeshState.WriteResult) {
        logger.info("audit", metadata: [
            "user": "\(ctx.user)", "verb": "\(verb)", "resource": "\(ctx.resource.plural).\(ctx.resource.group)",
            "namespace": "\(ctx.namespace ?? "")", "name": "\(name)", "before": "\(r.previousRevision)",
            "after": "\(r.changed ? r.object.revision : r.previousRevision)", "dry_run": "\(ctx.dryRun)",
            "changed": "\(r.changed)", "field_manager": "\(ctx.request.query["fieldManager"] ?? "")",
        ])
    }

    // MARK: - errors

    static let pageNotFound = APIStatus(code: 404, reason: "NotFound", message: "the server could not find the requested resource")

    static func methodNotAllowed(_ m: String) -> APIStatus {
        APIStatus(code: 405, reason: "MethodNotAllowed", message: "the server does not allow this method on the requested resource (\(m))")
    }

    static func unsupportedMediaType(_ t: String) -> APIStatus {
        APIStatus(code: 415, reason: "UnsupportedMediaType",
                  message: "the body of the request was in an unknown format (\(t.isEmpty ? "none" : t)) - accepted media "
                    + "types include: application/json, application/yaml, application/json-patch+json, "
                    + "application/merge-patch+json (server-side apply is not supported yet)")
    }

    static let version: JSONValue = .object([
        "major": "1", "minor": "32", "gitVersion": "v1.32.0-sluice", "gitCommit": "", "gitTreeState": "clean",
        "buildDate": "", "goVersion": "", "compiler": "swift", "platform": "linux/amd64",
    ])
}

func isDNSLabel(_ s: String) -> Bool {
    guard !s.isEmpty, s.utf8.count <= 63 else { return false }
    for c in s.utf8 where !((c >= 97 && c <= 122) || (c >= 48 && c <= 57) || c == 45) { return false }
    return s.first != "-" && s.last != "-"
}
