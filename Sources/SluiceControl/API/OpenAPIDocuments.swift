import Foundation
import SluiceModel

/// The API's OpenAPI documents, as the Kubernetes API server publishes them: `/openapi/v3` (an index of one
/// document per group-version) and `/openapi/v2` (one Swagger 2.0 document, JSON or gnostic protobuf). kubectl reads
/// them before it applies (to know the kinds and that the server takes `fieldValidation`); schemathesis tests the
/// API from them.
///
/// Each kind's `spec` is declared an open object: the server checks it with Sluice's own decoder (the one
/// `sluice validate` runs), which names the field of every problem in the `Status` it answers.
struct OpenAPIDocuments: Sendable {
    /// Documents by group-version path (`apis/networking.istio.io/v1`), encoded once.
    let v3: [String: Data]
    let v3Index: Data
    let v2JSON: Data
    let v2Protobuf: Data

    init() {
        var docs: [String: Data] = [:]
        var index: [String: JSONValue] = [:]
        var v2Paths: [String: JSONValue] = [:], v2Definitions: [String: JSONValue] = [:]
        for group in APIResource.groups {
            let versions = APIResource.all.first { $0.group == group }!.versions
            for version in versions {
                let resources = APIResource.all.filter { $0.group == group && $0.versions.contains(version) }
                let (paths, schemas) = Self.document(resources, version: version)
                let doc: JSONValue = .object([
                    "openapi": "3.0.0",
                    "info": .object(["title": "Sluice config API", "version": .string("\(group)/\(version)")]),
                    "paths": .object(paths),
                    "components": .object(["schemas": .object(schemas.merging(Self.metaSchemas) { a, _ in a })]),
                ])
                let data = doc.data
                let key = "apis/\(group)/\(version)"
                docs[key] = data
                index[key] = .object(["serverRelativeURL": .string("/openapi/v3/\(key)?hash=\(Self.hash(data))")])
                for (p, item) in paths { v2Paths[p] = Self.swagger(item) }
                for (n, s) in schemas { v2Definitions[n] = Self.swagger(s) }
            }
        }
        v3 = docs
        v3Index = JSONValue.object(["paths": .object(index)]).data
        for (n, s) in Self.metaSchemas { v2Definitions[n] = Self.swagger(s) }
        let v2: JSONValue = .object([
            "swagger": "2.0", "info": .object(["title": "Sluice config API", "version": "v1"]),
            "paths": .object(v2Paths), "definitions": .object(v2Definitions),
        ])
        v2JSON = v2.data
        v2Protobuf = GnosticV2.encode(title: "Sluice config API", version: "v1", resources: APIResource.all)
    }

    static func hash(_ d: Data) -> String {
        String(String(decoding: d, as: UTF8.self).hashValueStable, radix: 16, uppercase: true)
    }

    func serve(_ parts: [String], accept: String) -> ConfigAPI.Response? {
        switch parts.first {
        case "v3":
            if parts.count == 1 { return ConfigAPI.Response(status: 200, contentType: "application/json", body: v3Index) }
            guard let d = v3[parts.dropFirst().joined(separator: "/")] else { return nil }
            return ConfigAPI.Response(status: 200, contentType: "application/json", body: d)
        case "v2" where parts.count == 1:
            if accept.contains("protobuf") {
                return ConfigAPI.Response(status: 200, contentType: "application/com.github.proto-openapi.spec.v2.v1.0+protobuf",
                                          body: v2Protobuf)
            }
            return ConfigAPI.Response(status: 200, contentType: "application/json", body: v2JSON)
        default:
            return nil
        }
    }

    // MARK: - building

    static func schemaName(_ r: APIResource, _ version: String) -> String {
        let reversed = r.group.split(separator: ".").reversed().joined(separator: ".")
        return "\(reversed).\(version).\(r.kind)"
    }

    static func ref(_ name: String) -> JSONValue { .object(["$ref": .string("#/components/schemas/\(name)")]) }

    static func gvk(_ r: APIResource, _ version: String) -> JSONValue {
        .array([.object(["group": .string(r.group), "kind": .string(r.kind), "version": .string(version)])])
    }

    static func query(_ name: String, _ description: String, type: String = "string") -> JSONValue {
        .object(["name": .string(name), "in": "query", "description": .string(description), "schema": .object(["type": .string(type)]),
                 "required": false, "uniqueItems": true])
    }

    static func pathParameter(_ name: String) -> JSONValue {
        .object(["name": .string(name), "in": "path", "required": true, "description": .string("the object's \(name)"),
                 "schema": .object(["type": "string"]), "uniqueItems": true])
    }

    static let writeParameters: [JSONValue] = [
        query("dryRun", "All: validate and answer, but store nothing."),
        query("fieldManager", "The name of the actor making the change (recorded in the audit log)."),
        query("fieldValidation", "Strict (unknown fields are errors), Warn (warnings, the default) or Ignore."),
    ]

    static let listParameters: [JSONValue] = [
        query("labelSelector", "Only objects whose labels match."),
        query("fieldSelector", "metadata.name or metadata.namespace."),
        query("resourceVersion", "With watch: changes after this version."),
        query("watch", "Stream ADDED, MODIFIED and DELETED events instead of answering a list.", type: "boolean"),
        query("allowWatchBookmarks", "With watch: send BOOKMARK events.", type: "boolean"),
        query("timeoutSeconds", "With watch: end the stream after this many seconds.", type: "integer"),
        query("limit", "Accepted; the whole list is always answered.", type: "integer"),
    ]

    static func response(_ schema: JSONValue, _ description: String) -> JSONValue {
        .object(["description": .string(description), "content": .object([
            "application/json": .object(["schema": schema]), "application/yaml": .object(["schema": schema]),
        ])])
    }

    static var errors: [String: JSONValue] {
        ["401": response(ref(statusName), "Unauthorized"), "403": response(ref(statusName), "Forbidden"),
         "404": response(ref(statusName), "NotFound")]
    }

    static func operation(_ id: String, _ r: APIResource, _ version: String, action: String, parameters: [JSONValue],
                          body: JSONValue? = nil, responses: [String: JSONValue]) -> JSONValue
    {
        var o: [String: JSONValue] = [
            "operationId": .string(id), "description": .string("\(action) \(r.kind)"),
            "tags": .array([.string("\(r.group)_\(version)")]),
            "parameters": .array(parameters), "responses": .object(responses.merging(errors) { a, _ in a }),
            "x-kubernetes-action": .string(action),
            "x-kubernetes-group-version-kind": gvk(r, version).arrayValue![0],
        ]
        if let body { o["requestBody"] = .object(["required": true, "content": body]) }
        return .object(o)
    }

    static func document(_ resources: [APIResource], version: String) -> ([String: JSONValue], [String: JSONValue]) {
        var paths: [String: JSONValue] = [:], schemas: [String: JSONValue] = [:]
        for r in resources {
            let name = schemaName(r, version), list = name + "List"
            let op = "\(r.kind)\(version.capitalized)"
            let objectBody: JSONValue = .object(["application/json": .object(["schema": ref(name)]),
                                                 "application/yaml": .object(["schema": ref(name)])])
            let patchBody: JSONValue = .object([
                "application/merge-patch+json": .object(["schema": .object(["type": "object"])]),
                "application/json-patch+json": .object(["schema": .object(["type": "array", "items": .object(["type": "object"])])]),
            ])
            let ok = response(ref(name), "OK")
            let collection = "/apis/\(r.group)/\(version)/namespaces/{namespace}/\(r.plural)"
            paths[collection] = .object([
                "parameters": .array([pathParameter("namespace")]),
                "get": operation("list\(op)", r, version, action: "list", parameters: listParameters,
                                 responses: ["200": response(ref(list), "OK")]),
                "post": operation("create\(op)", r, version, action: "post", parameters: writeParameters, body: objectBody,
                                  responses: ["201": response(ref(name), "Created"), "200": ok,
                                              "409": response(ref(statusName), "AlreadyExists"),
                                              "422": response(ref(statusName), "Invalid")]),
            ])
            paths[collection + "/{name}"] = .object([
                "parameters": .array([pathParameter("namespace"), pathParameter("name")]),
                "get": operation("read\(op)", r, version, action: "get", parameters: [], responses: ["200": ok]),
                "put": operation("replace\(op)", r, version, action: "put", parameters: writeParameters, body: objectBody,
                                 responses: ["200": ok, "409": response(ref(statusName), "Conflict"),
                                             "422": response(ref(statusName), "Invalid")]),
                "patch": operation("patch\(op)", r, version, action: "patch", parameters: writeParameters, body: patchBody,
                                   responses: ["200": ok, "409": response(ref(statusName), "Conflict"),
                                               "422": response(ref(statusName), "Invalid")]),
                "delete": operation("delete\(op)", r, version, action: "delete", parameters: [query("dryRun", "All: store nothing.")],
                                    responses: ["200": ok]),
            ])
            paths["/apis/\(r.group)/\(version)/\(r.plural)"] = .object([
                "get": operation("list\(op)ForAllNamespaces", r, version, action: "list", parameters: listParameters,
                                 responses: ["200": response(ref(list), "OK")]),
            ])
            schemas[name] = .object([
                "type": "object", "description": .string("\(r.kind) (\(r.group)); spec is checked by Sluice's decoder"),
                "required": .array(["spec"]),
                "properties": .object([
                    "apiVersion": .object(["type": "string", "enum": .array([.string("\(r.group)/\(version)")])]),
                    "kind": .object(["type": "string", "enum": .array([.string(r.kind)])]),
                    "metadata": ref(objectMetaName),
                    "spec": .object(["type": "object", "x-kubernetes-preserve-unknown-fields": true]),
                    "status": .object(["type": "object", "x-kubernetes-preserve-unknown-fields": true]),
                ]),
                "x-kubernetes-group-version-kind": gvk(r, version),
            ])
            schemas[list] = .object([
                "type": "object", "required": .array(["items"]),
                "properties": .object([
                    "apiVersion": .object(["type": "string"]), "kind": .object(["type": "string"]),
                    "metadata": ref(listMetaName), "items": .object(["type": "array", "items": ref(name)]),
                ]),
                "x-kubernetes-group-version-kind": .array([.object(["group": .string(r.group), "kind": .string(r.listKind),
                                                                    "version": .string(version)])]),
            ])
        }
        return (paths, schemas)
    }

    static let objectMetaName = "io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"
    static let listMetaName = "io.k8s.apimachinery.pkg.apis.meta.v1.ListMeta"
    static let statusName = "io.k8s.apimachinery.pkg.apis.meta.v1.Status"

    static let metaSchemas: [String: JSONValue] = {
        let strings: JSONValue = .object(["type": "object", "additionalProperties": .object(["type": "string"])])
        let str: JSONValue = .object(["type": "string"])
        return [
            objectMetaName: .object(["type": "object", "properties": .object([
                "name": .object(["type": "string", "maxLength": .int(253), "pattern": "^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"]),
                "generateName": str,
                "namespace": .object(["type": "string", "maxLength": .int(63), "pattern": "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"]),
                "labels": strings, "annotations": strings, "uid": str, "resourceVersion": str,
                "generation": .object(["type": "integer", "format": "int64"]),
                "creationTimestamp": .object(["type": "string", "format": "date-time"]),
            ])]),
            listMetaName: .object(["type": "object", "properties": .object(["resourceVersion": str, "continue": str])]),
            statusName: .object(["type": "object", "properties": .object([
                "kind": str, "apiVersion": str, "status": str, "message": str, "reason": str,
                "code": .object(["type": "integer", "format": "int32"]),
                "details": .object(["type": "object", "x-kubernetes-preserve-unknown-fields": true]),
            ]), "x-kubernetes-group-version-kind": .array([.object(["group": "", "kind": "Status", "version": "v1"])])]),
        ]
    }()

    /// An OpenAPI 3 fragment as Swagger 2.0 says it: `#/definitions/` references, bodies and responses with a
    /// plain `schema`.
    static func swagger(_ v: JSONValue) -> JSONValue {
        switch v {
        case .string(let s) where s.hasPrefix("#/components/schemas/"):
            return .string("#/definitions/" + s.dropFirst("#/components/schemas/".count))
        case .array(let a):
            return .array(a.map(swagger))
        case .object(var o):
            if let content = o["content"]?.objectValue, let first = content["application/json"] ?? content.values.first {
                o["content"] = nil
                o["schema"] = first["schema"]
            }
            if let body = o["requestBody"] {
                o["requestBody"] = nil
                var ps = o["parameters"]?.arrayValue ?? []
                ps.append(.object(["name": "body", "in": "body", "required": true,
                                   "schema": body["content"]?.objectValue?.values.first?["schema"] ?? .object([:])]))
                o["parameters"] = .array(ps)
            }
            if let schema = o["schema"], o["in"] != nil, o["in"] != "body" {
                o["schema"] = nil
                o["type"] = schema["type"]
            }
            return .object(o.mapValues(swagger))
        default:
            return v
        }
    }
}

/// The `openapi_v2.Document` (gnostic's protobuf form of Swagger 2.0) that kubectl before 1.27 reads from
/// `/openapi/v2`: `swagger`, `info`, and per kind the PATCH operation of its object path with the
/// `x-kubernetes-group-version-kind` extension and the `dryRun` and `fieldManager` query parameters (kubectl 1.20's
/// `diff` looks for exactly that before it asks for a server-side dry run). No definitions: kubectl then finds no
/// schema for these kinds, skips its client-side checks and leaves validation to the server (which runs Sluice's
/// decoder on every write). Hand-written: these few messages do not justify generating the whole gnostic schema.
enum GnosticV2 {
    static func encode(title: String, version: String, resources: [APIResource]) -> Data {
        var info = Data()
        field(1, Array(title.utf8), into: &info)      // Info.title
        field(2, Array(version.utf8), into: &info)    // Info.version
        var paths = Data()
        for r in resources {
            for v in r.versions {
                var op = Data()
                for name in ["dryRun", "fieldManager"] {
                    var query = Data()
                    field(2, Array("query".utf8), into: &query)  // QueryParameterSubSchema.in
                    field(4, Array(name.utf8), into: &query)     // .name
                    field(6, Array("string".utf8), into: &query) // .type
                    var nonBody = Data()
                    field(3, Array(query), into: &nonBody)       // NonBodyParameter.query_parameter_sub_schema
                    var parameter = Data()
                    field(2, Array(nonBody), into: &parameter)   // Parameter.non_body_parameter
                    var item = Data()
                    field(1, Array(parameter), into: &item)      // ParametersItem.parameter
                    field(8, Array(item), into: &op)             // Operation.parameters
                }
                var any = Data()
                field(2, Array("group: \(r.group)\nkind: \(r.kind)\nversion: \(v)\n".utf8), into: &any)  // Any.yaml
                var named = Data()
                field(1, Array("x-kubernetes-group-version-kind".utf8), into: &named)  // NamedAny.name
                field(2, Array(any), into: &named)                                     // NamedAny.value
                field(13, Array(named), into: &op)                                     // Operation.vendor_extension
                var pathItem = Data()
                field(8, Array(op), into: &pathItem)             // PathItem.patch
                var namedPath = Data()
                field(1, Array("/apis/\(r.group)/\(v)/namespaces/{namespace}/\(r.plural)/{name}".utf8), into: &namedPath)
                field(2, Array(pathItem), into: &namedPath)      // NamedPathItem.value
                field(2, Array(namedPath), into: &paths)         // Paths.path
            }
        }
        var doc = Data()
        field(1, Array("2.0".utf8), into: &doc)       // Document.swagger
        field(2, Array(info), into: &doc)             // Document.info
        field(8, Array(paths), into: &doc)            // Document.paths
        return doc
    }

    /// A length-delimited field (wire type 2).
    static func field(_ number: Int, _ bytes: [UInt8], into out: inout Data) {
        varint(UInt64(number << 3 | 2), into: &out)
        varint(UInt64(bytes.count), into: &out)
        out.append(contentsOf: bytes)
    }

    static func varint(_ v: UInt64, into out: inout Data) {
        var v = v
        while v >= 0x80 {
            out.append(UInt8(v & 0x7f) | 0x80)
            v >>= 7
        }
        out.append(UInt8(v))
    }
}
