import Foundation
import SluiceModel

/// `sluice apply|get|delete|diff|status`: kubectl's and istioctl's verbs on the config API. Each returns the exit
/// status (kubectl's: 0 done, 1 failed; `diff`: 0 same, 1 different, 2 error).
public struct CLI: Sendable {
    public let client: APIClient
    /// `-n`: the namespace for objects that name none (else the kubeconfig context's).
    public var namespace: String?
    let out: @Sendable (String) -> Void
    let err: @Sendable (String) -> Void

    public init(client: APIClient, namespace: String?,
                out: @escaping @Sendable (String) -> Void = { print($0) },
                err: @escaping @Sendable (String) -> Void = { FileHandle.standardError.write(Data(($0 + "\n").utf8)) }) {
        self.client = client
        self.namespace = namespace
        self.out = out
        self.err = err
    }

    var defaultNamespace: String { namespace ?? client.endpoint.namespace }

    // MARK: - reading -f

    /// The objects of `-f FILE|DIR|-`, each with the file it came from. YAML or JSON; `List` objects are unpacked.
    public static func objects(from path: String) throws -> [(object: JSONValue, file: String)] {
        var out: [(JSONValue, String)] = []
        let files: [String]
        if path == "-" {
            files = ["-"]
        } else {
            guard let found = ConfigLoader.files(at: path) else { throw CLIError("the path \"\(path)\" does not exist") }
            files = found
        }
        for file in files {
            let data = file == "-" ? FileHandle.standardInput.readDataToEndOfFile() : FileManager.default.contents(atPath: file)
            guard let data else { throw CLIError("cannot read \(file)") }
            let docs: [JSONValue]
            do { docs = try JSONValue.documents(yaml: String(decoding: data, as: UTF8.self)) } catch {
                throw CLIError("error parsing \(file): \(error.message)")
            }
            for d in docs where d != .null {
                if d["kind"]?.stringValue == "List", let items = d["items"]?.arrayValue {
                    out += items.map { ($0, file) }
                } else {
                    out.append((d, file))
                }
            }
        }
        return out
    }

    struct Target {
        var resource: APIResource
        var version: String
        var namespace: String
        var name: String
        var collection: String { "/apis/\(resource.group)/\(version)/namespaces/\(namespace)/\(resource.plural)" }
        var path: String { collection + "/" + name }
        /// `virtualservice.networking.istio.io/reviews`, as kubectl names what it changed.
        var display: String { "\(resource.singular).\(resource.group)/\(name)" }
    }

    func target(_ o: JSONValue, _ file: String) throws -> (Target, JSONValue) {
        guard let (resource, version) = APIObjects.resource(of: o) else {
            let kind = o["kind"]?.stringValue ?? "?", api = o["apiVersion"]?.stringValue ?? "?"
            throw CLIError("error: resource mapping not found for kind \"\(kind)\" in version \"\(api)\" (\(file))")
        }
        guard let name = o["metadata"]?["name"]?.stringValue, !name.isEmpty else {
            throw CLIError("error: \(resource.kind) in \(file) has no metadata.name")
        }
        let ns = o["metadata"]?["namespace"]?.stringValue ?? defaultNamespace
        var object = o
        var meta = object["metadata"]?.objectValue ?? [:]
        meta["namespace"] = .string(ns)
        object["metadata"] = .object(meta)
        return (Target(resource: resource, version: version, namespace: ns, name: name), object)
    }

    func warn(_ reply: APIClient.Reply) {
        for w in reply.warnings { err("Warning: \(w)") }
    }

    func serverError(_ reply: APIClient.Reply) -> String { "Error from server (\(reply.reason)): \(reply.message)" }

    // MARK: - apply

    /// Creates what is missing, replaces what differs, in dependency order (ServiceEntries before the rules that
    /// name their hosts). Prints `KIND.GROUP/NAME created|configured|unchanged` per object.
    public func apply(_ objects: [(object: JSONValue, file: String)], dryRun: Bool = false) -> Int32 {
        var failed = false
        let files = Dictionary(objects.map { ($0.object, $0.file) }, uniquingKeysWith: { a, _ in a })
        let suffix = dryRun ? " (server dry run)" : ""
        let query = dryRun ? "?dryRun=All" : ""
        for o in APIObjects.dependencyOrder(objects.map(\.object)) {
            do {
                let (t, object) = try target(o, files[o] ?? "?")
                let live = try client.call("GET", t.path)
                if live.status == 404 {
                    let r = try client.call("POST", t.collection + query, body: object)
                    warn(r)
                    guard r.status == 201 || r.status == 200 else { throw CLIError(serverError(r)) }
                    out("\(t.display) created\(suffix)")
                    continue
                }
                guard live.status == 200, let current = live.json else { throw CLIError(serverError(live)) }
                let before = current[path: ["metadata", "resourceVersion"]]
                var replacement = object
                var meta = replacement["metadata"]?.objectValue ?? [:]
                meta["resourceVersion"] = before
                replacement["metadata"] = .object(meta)
                let r = try client.call("PUT", t.path + query, body: replacement)
                warn(r)
                guard r.status == 200 else { throw CLIError(serverError(r)) }
                let changed = dryRun ? !Self.sameObject(current, r.json) : r.json?[path: ["metadata", "resourceVersion"]] != before
                out("\(t.display) \(changed ? "configured" : "unchanged")\(suffix)")
            } catch {
                err("\(error)")
                failed = true
            }
        }
        return failed ? 1 : 0
    }

    /// Equal apart from what the server stamps on each write.
    static func sameObject(_ a: JSONValue, _ b: JSONValue?) -> Bool { normalized(a) == b.map(normalized) }

    static func normalized(_ o: JSONValue) -> JSONValue {
        var x = o
        var meta = x["metadata"]?.objectValue ?? [:]
        for k in ["resourceVersion", "managedFields", "generation"] { meta[k] = nil }
        x["metadata"] = .object(meta)
        x["apiVersion"] = nil
        return x
    }

    // MARK: - delete

    /// Deletes the objects of `-f` (rules before the entries they name).
    public func delete(_ objects: [(object: JSONValue, file: String)], ignoreNotFound: Bool = false) -> Int32 {
        var failed = false
        let files = Dictionary(objects.map { ($0.object, $0.file) }, uniquingKeysWith: { a, _ in a })
        for o in APIObjects.dependencyOrder(objects.map(\.object), deleting: true) {
            do {
                let (t, _) = try target(o, files[o] ?? "?")
                if try !delete(t, ignoreNotFound: ignoreNotFound) { failed = true }
            } catch {
                err("\(error)")
                failed = true
            }
        }
        return failed ? 1 : 0
    }

    /// `sluice delete KIND NAME...`
    public func delete(kind: String, names: [String], ignoreNotFound: Bool = false) -> Int32 {
        if ["node", "nodes", "no"].contains(kind.lowercased()) { return deleteNodes(names, ignoreNotFound: ignoreNotFound) }
        guard let r = APIResource.named(kind) else {
            err("error: the server doesn't have a resource type \"\(kind)\"")
            return 1
        }
        var failed = false
        for name in names {
            let t = Target(resource: r, version: r.preferredVersion, namespace: defaultNamespace, name: name)
            do { if try !delete(t, ignoreNotFound: ignoreNotFound) { failed = true } } catch {
                err("\(error)")
                failed = true
            }
        }
        return failed ? 1 : 0
    }

    /// `sluice delete node NAME...`: the node's registered workloads go and its agent is refused until it joins again.
    private func deleteNodes(_ names: [String], ignoreNotFound: Bool) -> Int32 {
        var failed = false
        for name in names {
            do {
                let r = try client.call("DELETE", "/sluice/v1/nodes/\(name)")
                if r.status == 404 && ignoreNotFound { continue }
                guard r.status == 200 else {
                    err(serverError(r))
                    failed = true
                    continue
                }
                out("node \"\(name)\" deleted" + (r.json?["message"]?.stringValue.flatMap { m in
                    m.firstRange(of: ": ").map { " (" + m[$0.upperBound...] + ")" } } ?? ""))
            } catch {
                err("\(error)")
                failed = true
            }
        }
        return failed ? 1 : 0
    }

    private func delete(_ t: Target, ignoreNotFound: Bool) throws -> Bool {
        let r = try client.call("DELETE", t.path)
        if r.status == 404 && ignoreNotFound { return true }
        guard r.status == 200 || r.status == 202 else {
            err(serverError(r))
            return false
        }
        out("\(t.resource.singular).\(t.resource.group) \"\(t.name)\" deleted")
        return true
    }

    // MARK: - get

    public enum Output: String, Sendable { case table = "", wide, yaml, json, name }

    /// `sluice get KIND [NAME...]`: a table like kubectl's (the kind's printer columns and AGE), or the objects.
    public func get(kind: String, names: [String], allNamespaces: Bool, labelSelector: String?, output: Output) -> Int32 {
        guard let r = APIResource.named(kind) else {
            err("error: the server doesn't have a resource type \"\(kind)\"")
            return 1
        }
        let base = allNamespaces && names.isEmpty ? "/apis/\(r.group)/\(r.preferredVersion)/\(r.plural)"
            : "/apis/\(r.group)/\(r.preferredVersion)/namespaces/\(defaultNamespace)/\(r.plural)"
        let selector = labelSelector.map { "?labelSelector=" + ($0.addingPercentEncoding(withAllowedCharacters: .alphanumerics) ?? $0) } ?? ""
        do {
            if output == .table || output == .wide {
                let accept = "application/json;as=Table;v=v1;g=meta.k8s.io"
                var rows: [[String]] = []
                var header: [String] = []
                for path in names.isEmpty ? [base + selector] : names.map({ base + "/" + $0 }) {
                    let reply = try client.call("GET", path, accept: accept)
                    guard reply.status == 200, let table = reply.json else {
                        err(serverError(reply))
                        return 1
                    }
                    header = (table["columnDefinitions"]?.arrayValue ?? []).map { ($0["name"]?.stringValue ?? "").uppercased() }
                    for row in table["rows"]?.arrayValue ?? [] {
                        var cells = (row["cells"]?.arrayValue ?? []).map(Self.cell)
                        if allNamespaces {
                            cells.insert(row[path: ["object", "metadata", "namespace"]]?.stringValue ?? "", at: 0)
                        }
                        rows.append(cells)
                    }
                }
                if allNamespaces { header.insert("NAMESPACE", at: 0) }
                if rows.isEmpty {
                    err(allNamespaces ? "No resources found" : "No resources found in \(defaultNamespace) namespace.")
                    return 0
                }
                out(Self.columns([header] + rows))
                return 0
            }
            var items: [JSONValue] = []
            for path in names.isEmpty ? [base + selector] : names.map({ base + "/" + $0 }) {
                let reply = try client.call("GET", path)
                guard reply.status == 200, let json = reply.json else {
                    err(serverError(reply))
                    return 1
                }
                items += names.isEmpty ? json["items"]?.arrayValue ?? [] : [json]
            }
            if items.isEmpty && output == .name {
                err(allNamespaces ? "No resources found" : "No resources found in \(defaultNamespace) namespace.")
                return 0
            }
            switch output {
            case .name: for i in items { out("\(r.singular).\(r.group)/\(i[path: ["metadata", "name"]]?.stringValue ?? "")") }
            default:
                let value: JSONValue = names.count == 1 ? items[0]
                    : .object(["apiVersion": "v1", "kind": "List", "items": .array(items), "metadata": .object([:])])
                if output == .json {
                    out(String(decoding: try JSONSerialization.data(
                        withJSONObject: try JSONSerialization.jsonObject(with: value.data),
                        options: [.prettyPrinted, .sortedKeys, .withoutEscapingSlashes]), as: UTF8.self))
                } else {
                    out(value.yaml.hasSuffix("\n") ? String(value.yaml.dropLast()) : value.yaml)
                }
            }
            return 0
        } catch {
            err("\(error)")
            return 1
        }
    }

    static func cell(_ v: JSONValue) -> String {
        switch v {
        case .string(let s): s
        case .null: "<none>"
        case .array(let a): "[" + a.map(cell).joined(separator: ",") + "]"
        default: v.text
        }
    }

    /// Left-aligned columns three spaces apart (kubectl's tabwriter).
    static func columns(_ rows: [[String]]) -> String {
        let n = rows.map(\.count).max() ?? 0
        var widths = [Int](repeating: 0, count: n)
        for r in rows { for (i, c) in r.enumerated() { widths[i] = max(widths[i], c.count) } }
        return rows.map { r in
            r.enumerated().map { i, c in i == r.count - 1 ? c : c.padding(toLength: widths[i] + 3, withPad: " ", startingAt: 0) }
                .joined()
        }.joined(separator: "\n")
    }

    // MARK: - diff

    /// What `apply` would change, as `diff -u` of the live objects against the server's dry run of the new ones.
    /// 0: no difference; 1: differences; 2: an error.
    public func diff(_ objects: [(object: JSONValue, file: String)]) -> Int32 {
        let dir = NSTemporaryDirectory() + "sluice-diff-\(UUID().uuidString)"
        let fm = FileManager.default
        defer { try? fm.removeItem(atPath: dir) }
        do {
            try fm.createDirectory(atPath: "\(dir)/LIVE", withIntermediateDirectories: true)
            try fm.createDirectory(atPath: "\(dir)/MERGED", withIntermediateDirectories: true)
            for (o, file) in objects {
                let (t, object) = try target(o, file)
                let live = try client.call("GET", t.path)
                let merged: APIClient.Reply
                var liveText = ""
                if live.status == 404 {
                    merged = try client.call("POST", t.collection + "?dryRun=All", body: object)
                } else {
                    guard live.status == 200, let current = live.json else { throw CLIError(serverError(live)) }
                    liveText = Self.normalized(current).yaml
                    var replacement = object
                    var meta = replacement["metadata"]?.objectValue ?? [:]
                    meta["resourceVersion"] = current[path: ["metadata", "resourceVersion"]]
                    replacement["metadata"] = .object(meta)
                    merged = try client.call("PUT", t.path + "?dryRun=All", body: replacement)
                }
                warn(merged)
                guard merged.status == 200 || merged.status == 201, let m = merged.json else { throw CLIError(serverError(merged)) }
                let name = "\(t.resource.group).\(t.version).\(t.resource.kind).\(t.namespace).\(t.name)"
                try liveText.write(toFile: "\(dir)/LIVE/\(name)", atomically: true, encoding: .utf8)
                try Self.normalized(m).yaml.write(toFile: "\(dir)/MERGED/\(name)", atomically: true, encoding: .utf8)
            }
        } catch {
            err("\(error)")
            return 2
        }
        let p = Process()
        p.executableURL = URL(fileURLWithPath: "/usr/bin/diff")
        p.arguments = ["-u", "-N", "-r", "LIVE", "MERGED"]
        p.currentDirectoryURL = URL(fileURLWithPath: dir)
        let pipe = Pipe()
        p.standardOutput = pipe
        do { try p.run() } catch {
            err("error: cannot run diff: \(error)")
            return 2
        }
        let text = String(decoding: pipe.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
        p.waitUntilExit()
        if !text.isEmpty { out(text.hasSuffix("\n") ? String(text.dropLast()) : text) }
        return p.terminationStatus == 0 ? 0 : p.terminationStatus == 1 ? 1 : 2
    }

    // MARK: - status

    /// `sluice status`, as `istioctl proxy-status`: one row per connected agent.
    public func status(json: Bool) -> Int32 {
        do {
            let reply = try client.call("GET", "/sluice/v1/status")
            guard reply.status == 200, let body = reply.json else {
                err(serverError(reply))
                return 1
            }
            if json {
                out(body.text)
                return 0
            }
            let items = body["items"]?.arrayValue ?? []
            if items.isEmpty {
                err("No agents are connected (mesh revision \(body["revision"]?.intValue ?? 0)).")
                return 0
            }
            var rows = [["NODE", "STATUS", "ACKED", "SENT", "WORKLOADS", "CERTIFICATE EXPIRY", "CONNECTED", "AGENT", "ERROR"]]
            for i in items {
                rows.append([
                    i["node"]?.stringValue ?? "", i["sync"]?.stringValue ?? "", "\(i["acked"]?.intValue ?? 0)",
                    "\(i["sent"]?.intValue ?? 0)", "\(i["workloads"]?.intValue ?? 0)",
                    i["nearestCertificateExpiry"]?.stringValue.flatMap(Self.until) ?? "-",
                    i["connectedSince"]?.stringValue.flatMap(Self.age) ?? "-", i["agentVersion"]?.stringValue ?? "",
                    i["error"]?.stringValue ?? "",
                ])
            }
            out(Self.columns(rows))
            return 0
        } catch {
            err("\(error)")
            return 1
        }
    }

    static func date(_ iso: String) -> Date? { MeshState.date(iso) }

    static func duration(_ seconds: Double) -> String {
        let s = Int(max(0, seconds))
        return s < 120 ? "\(s)s" : s < 7200 ? "\(s / 60)m" : s < 172_800 ? "\(s / 3600)h" : "\(s / 86400)d"
    }

    static func age(_ iso: String) -> String? { date(iso).map { duration(Date().timeIntervalSince($0)) } }
    static func until(_ iso: String) -> String? { date(iso).map { "in " + duration($0.timeIntervalSinceNow) } }
}

public struct CLIError: Error, CustomStringConvertible {
    public let description: String
    public init(_ d: String) { description = d }
}
