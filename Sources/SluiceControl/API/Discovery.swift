import Foundation
import SluiceModel

/// Kubernetes discovery documents for the kinds Sluice serves: how kubectl learns that `vs` means
/// `virtualservices.networking.istio.io` and that it is namespaced.
enum Discovery {
    static let verbs: JSONValue = .array(["create", "delete", "get", "list", "patch", "update", "watch"])

    static let coreVersions: JSONValue = .object([
        "kind": "APIVersions", "versions": .array(["v1"]),
        "serverAddressByClientCIDRs": .array([.object(["clientCIDR": "0.0.0.0/0", "serverAddress": ""])]),
    ])

    /// The core group holds only namespaces here, read-only: those the stored objects live in, and `default`.
    static let coreResources: JSONValue = .object([
        "kind": "APIResourceList", "groupVersion": "v1", "resources": .array([.object([
            "name": "namespaces", "singularName": "namespace", "namespaced": false, "kind": "Namespace",
            "verbs": .array(["get", "list"]), "shortNames": .array(["ns"]),
        ])]),
    ])

    static func namespace(_ name: String) -> JSONValue {
        .object(["apiVersion": "v1", "kind": "Namespace", "metadata": .object(["name": .string(name)]),
                 "status": .object(["phase": "Active"])])
    }

    static func namespaceList(_ names: [String], revision: Int64) -> JSONValue {
        .object(["apiVersion": "v1", "kind": "NamespaceList",
                 "metadata": .object(["resourceVersion": .string(String(revision))]), "items": .array(names.map(namespace))])
    }

    static func groupJSON(_ name: String) -> JSONValue {
        let versions = APIResource.all.first { $0.group == name }!.versions
        func gv(_ v: String) -> JSONValue { .object(["groupVersion": .string("\(name)/\(v)"), "version": .string(v)]) }
        return .object(["name": .string(name), "versions": .array(versions.map(gv)), "preferredVersion": gv(versions[0])])
    }

    static let groupList: JSONValue = .object([
        "kind": "APIGroupList", "apiVersion": "v1", "groups": .array(APIResource.groups.map(groupJSON)),
    ])

    static func group(_ name: String) -> JSONValue? {
        guard APIResource.groups.contains(name) else { return nil }
        var g = groupJSON(name)
        g["kind"] = "APIGroup"
        g["apiVersion"] = "v1"
        return g
    }

    static func resourceList(group: String, version: String) -> JSONValue? {
        let rs = APIResource.all.filter { $0.group == group && $0.versions.contains(version) }
        guard !rs.isEmpty else { return nil }
        return .object([
            "kind": "APIResourceList", "apiVersion": "v1", "groupVersion": .string("\(group)/\(version)"),
            "resources": .array(rs.map { r in
                .object([
                    "name": .string(r.plural), "singularName": .string(r.singular), "namespaced": .bool(true),
                    "kind": .string(r.kind), "verbs": verbs, "shortNames": .array(r.shortNames.map { .string($0) }),
                    "categories": .array(r.categories.map { .string($0) }),
                    "storageVersionHash": .string(String(r.plural.hashValueStable, radix: 36)),
                ])
            }),
        ])
    }
}

extension String {
    /// FNV-1a: a hash that stays the same across runs (Swift's `hashValue` is seeded per process).
    var hashValueStable: UInt64 {
        var h: UInt64 = 0xcbf2_9ce4_8422_2325
        for b in utf8 {
            h ^= UInt64(b)
            h = h &* 0x100_0000_01b3
        }
        return h
    }
}

/// `labelSelector`: `k=v`, `k==v`, `k!=v`, `k in (a,b)`, `k notin (a,b)`, `k`, `!k`, joined by commas.
public struct LabelSelector: Sendable {
    enum Requirement: Sendable {
        case equals(String, String), notEquals(String, String), isIn(String, Set<String>), notIn(String, Set<String>)
        case exists(String), absent(String)
    }

    var requirements: [Requirement] = []

    public init(_ text: String) throws(APIStatus) {
        var rest = Substring(text.trimmingCharacters(in: .whitespaces))
        while !rest.isEmpty {
            // A requirement ends at a comma outside parentheses.
            var depth = 0, end = rest.endIndex
            for i in rest.indices {
                if rest[i] == "(" { depth += 1 } else if rest[i] == ")" { depth -= 1 } else if rest[i] == ",", depth == 0 {
                    end = i
                    break
                }
            }
            requirements.append(try Self.requirement(rest[..<end].trimmingCharacters(in: .whitespaces), text))
            rest = end == rest.endIndex ? "" : rest[rest.index(after: end)...]
        }
    }

    static func requirement(_ r: String, _ whole: String) throws(APIStatus) -> Requirement {
        func bad() -> APIStatus { APIStatus.badRequest("unable to parse requirement \"\(r)\" of labelSelector \"\(whole)\"") }
        func set(_ s: Substring) throws(APIStatus) -> Set<String> {
            let t = s.trimmingCharacters(in: .whitespaces)
            guard t.hasPrefix("("), t.hasSuffix(")") else { throw bad() }
            return Set(t.dropFirst().dropLast().split(separator: ",").map { $0.trimmingCharacters(in: .whitespaces) })
        }
        if let range = r.range(of: " notin ") {
            return .notIn(r[..<range.lowerBound].trimmingCharacters(in: .whitespaces), try set(r[range.upperBound...]))
        }
        if let range = r.range(of: " in ") {
            return .isIn(r[..<range.lowerBound].trimmingCharacters(in: .whitespaces), try set(r[range.upperBound...]))
        }
        for (op, make) in [("!=", Requirement.notEquals), ("==", Requirement.equals), ("=", Requirement.equals)] {
            if let range = r.range(of: op) {
                let k = r[..<range.lowerBound].trimmingCharacters(in: .whitespaces)
                let v = r[range.upperBound...].trimmingCharacters(in: .whitespaces)
                guard !k.isEmpty else { throw bad() }
                return make(k, v)
            }
        }
        if r.hasPrefix("!") { return .absent(r.dropFirst().trimmingCharacters(in: .whitespaces)) }
        guard !r.isEmpty, !r.contains(" ") else { throw bad() }
        return .exists(r)
    }

    public func matches(_ labels: [String: String]) -> Bool {
        requirements.allSatisfy { req in
            switch req {
            case .equals(let k, let v): labels[k] == v
            case .notEquals(let k, let v): labels[k] != v
            case .isIn(let k, let vs): labels[k].map(vs.contains) ?? false
            case .notIn(let k, let vs): !(labels[k].map(vs.contains) ?? false)
            case .exists(let k): labels[k] != nil
            case .absent(let k): labels[k] == nil
            }
        }
    }
}

/// `fieldSelector`: `metadata.name` and `metadata.namespace`, with `=`, `==` or `!=` (what custom resources take).
struct FieldSelector {
    var terms: [(field: String, value: String, equal: Bool)] = []

    init(_ text: String) throws(APIStatus) {
        for part in text.split(separator: ",") {
            let p = String(part)
            let (op, equal) = p.contains("!=") ? ("!=", false) : p.contains("==") ? ("==", true) : ("=", true)
            guard let r = p.range(of: op) else { throw APIStatus.badRequest("invalid fieldSelector \"\(text)\"") }
            let field = p[..<r.lowerBound].trimmingCharacters(in: .whitespaces)
            guard field == "metadata.name" || field == "metadata.namespace" else {
                throw APIStatus.badRequest("field label not supported: \(field) (metadata.name and metadata.namespace are)")
            }
            terms.append((field, p[r.upperBound...].trimmingCharacters(in: .whitespaces), equal))
        }
    }

    /// The one name an equality term pins (what a watch of a single object asks).
    var name: String? { terms.first { $0.field == "metadata.name" && $0.equal }?.value }

    func matches(_ key: StoreKey) -> Bool {
        terms.allSatisfy { t in ((t.field == "metadata.name" ? key.name : key.namespace) == t.value) == t.equal }
    }
}

/// `kubectl get`'s server-side printing (`Accept: application/json;as=Table;v=v1;g=meta.k8s.io`): Name, the kind's
/// columns (as Istio's CRDs declare them) and Age.
enum Table {
    static func columns(_ r: APIResource) -> JSONValue {
        var cols: [JSONValue] = [column("Name", "name", "Name must be unique within a namespace.")]
        for c in r.columns { cols.append(column(c.name, "", "")) }
        cols.append(column("Age", "", "CreationTimestamp is when the object was created."))
        return .array(cols)
    }

    static func column(_ name: String, _ format: String, _ description: String) -> JSONValue {
        .object(["name": .string(name), "type": "string", "format": .string(format), "description": .string(description),
                 "priority": .int(0)])
    }

    static func row(_ r: APIResource, _ object: JSONValue, now: Date = Date()) -> JSONValue {
        var cells: [JSONValue] = [object["metadata"]?["name"] ?? ""]
        for c in r.columns {
            switch object[path: c.path] {
            case .array(let a)?: cells.append(.string(a.map { $0.stringValue ?? $0.text }.joined(separator: ",")))
            case .string(let s)?: cells.append(.string(s))
            case nil, .null?: cells.append("")
            case let v?: cells.append(.string(v.text))
            }
        }
        cells.append(.string(age(object["metadata"]?["creationTimestamp"]?.stringValue, now: now)))
        var meta = object["metadata"] ?? .object([:])
        meta["managedFields"] = nil
        let partial: JSONValue = .object(["kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1", "metadata": meta])
        return .object(["cells": .array(cells), "object": partial])
    }

    static func list(_ r: APIResource, _ objects: [JSONValue], revision: Int64) -> JSONValue {
        .object(["kind": "Table", "apiVersion": "meta.k8s.io/v1",
                 "metadata": .object(["resourceVersion": .string(String(revision))]),
                 "columnDefinitions": columns(r), "rows": .array(objects.map { row(r, $0) })])
    }

    /// kubectl's short ages: 45s, 12m, 5h, 3d.
    static func age(_ timestamp: String?, now: Date) -> String {
        guard let t = timestamp, let d = MeshState.date(t) else { return "<unknown>" }
        let s = max(0, Int(now.timeIntervalSince(d)))
        if s < 120 { return "\(s)s" }
        if s < 3600 { return "\(s / 60)m" }
        if s < 48 * 3600 { return "\(s / 3600)h" }
        return "\(s / 86400)d"
    }
}
