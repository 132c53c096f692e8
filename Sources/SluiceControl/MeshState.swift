import Foundation
import Synchronization
import SluiceModel

/// The mesh as the control plane holds it: every stored object, the compiler over them, the recent change log,
/// and the watches that follow it. Reads are served from memory; writes are validated against the compiled mesh,
/// committed to the ``ConfigStore`` and only then made visible, one at a time (the store's revision is one
/// counter for everything, as etcd's).
public final class MeshState: Sendable {
    struct State {
        var objects: [StoreKey: StoredObject] = [:]
        var revision: Int64 = 0
        /// Recent changes, oldest first, at most `keep`.
        var history: [StoreChange] = []
        var historyStart = 0
        var compiler: MeshCompiler
        var watchers: [Int: Watcher] = [:]
        var nextWatcher = 0
    }

    /// A watch: which changes it wants and where they go. `deliver` must not block (it queues); it returns false
    /// when the watch is gone or fell too far behind, which ends it.
    struct Watcher {
        var resource: APIResource?
        var namespace: String?
        var deliver: @Sendable ([StoreChange]) -> Bool
    }

    let store: any ConfigStore
    let state: Mutex<State>
    let keep: Int
    /// Called after every accepted write with its revision and what it changes per node (for the push).
    let onChange: Mutex<[@Sendable (Int64, MeshDelta, MeshCompiler) -> Void]> = Mutex([])

    /// Opens the mesh kept in `store`. Throws when what is stored does not compile (it names every problem).
    public init(store: any ConfigStore, keepHistory: Int = 10_000) throws {
        self.store = store
        keep = keepHistory
        let contents = try store.load()
        var resources: [Resource] = []
        for o in contents.objects {
            guard let r = APIResource.find(group: o.key.group, plural: o.key.resource) else {
                throw StoreError("the store holds \(o.key), a kind this version does not know")
            }
            if r.model == nil { continue }
            let (decoded, problems) = Self.decode(o.object, as: r)
            guard let decoded else {
                throw StoreError("stored \(o.key) no longer decodes: "
                                 + problems.filter { $0.severity == .error }.map(\.description).joined(separator: "; "))
            }
            resources.append(decoded)
        }
        let compiler: MeshCompiler
        do { compiler = try MeshCompiler(resources) } catch {
            throw StoreError("the stored mesh does not compile:\n" + error.description)
        }
        var s = State(compiler: compiler)
        s.revision = contents.revision
        s.objects = Dictionary(uniqueKeysWithValues: contents.objects.map { ($0.key, $0) })
        s.history = Array(contents.changes.suffix(keepHistory))
        state = Mutex(s)
    }

    public var revision: Int64 { state.withLock { $0.revision } }
    public var count: Int { state.withLock { $0.objects.count } }
    public var compiler: MeshCompiler { state.withLock { $0.compiler } }
    /// Namespaces that hold objects, and `default`, sorted.
    public var namespaces: [String] { state.withLock { Set($0.objects.keys.map(\.namespace) + ["default"]).sorted() } }

    /// Registers `body` to run after every accepted write, in revision order. It runs while writes are held, so it
    /// must be quick (queue the work, do not do it).
    /// `body` gets the compiler as it is after the write (it must not call back into this object: writes are held).
    public func observe(_ body: @escaping @Sendable (Int64, MeshDelta, MeshCompiler) -> Void) {
        onChange.withLock { $0.append(body) }
    }

    private func notify(_ revision: Int64, _ delta: MeshDelta, _ compiler: MeshCompiler) {
        for body in onChange.withLock({ $0 }) { body(revision, delta, compiler) }
    }

    /// Runs `body` with the compiler and the revision it is at, while writes are held: what `body` reads is exactly
    /// the mesh at that revision, and every later delta reaches the observers after it returns. (An agent's session
    /// takes its node's snapshot here, so no change falls between the snapshot and the deltas that follow it.)
    public func withCompiler<T>(_ body: (inout MeshCompiler, Int64) throws -> T) rethrows -> T {
        try state.withLock { s in try body(&s.compiler, s.revision) }
    }

    // MARK: - reads

    public func get(_ key: StoreKey) -> StoredObject? { state.withLock { $0.objects[key] } }

    /// Objects of `resource` (in `namespace`, or all), sorted by namespace and name, and the revision they are at.
    public func list(_ resource: APIResource, namespace: String?) -> ([StoredObject], Int64) {
        state.withLock { s in
            let items = s.objects.values.filter {
                $0.key.group == resource.group && $0.key.resource == resource.plural
                    && (namespace == nil || $0.key.namespace == namespace)
            }
            return (items.sorted { $0.key < $1.key }, s.revision)
        }
    }

    // MARK: - writes

    /// What a write did.
    public struct WriteResult: Sendable {
        public var object: StoredObject
        /// The revision before the write (the object's, or 0 when it did not exist).
        public var previousRevision: Int64
        public var kind: StoreChange.Kind
        /// False when the object was written unchanged (no new revision).
        public var changed: Bool
        public var warnings: [String]
    }

    /// How unknown fields are treated (Kubernetes' `fieldValidation`).
    public enum FieldValidation: String, Sendable { case strict = "Strict", warn = "Warn", ignore = "Ignore" }

    /// Writes one object. `update` gets the current object (nil when there is none) and returns the new one, or nil to
    /// delete it; it throws to refuse. The new object's server-managed metadata (`uid`, `resourceVersion`,
    /// `generation`, `creationTimestamp`) is set here. The mesh with the change must compile; nothing changes when it
    /// does not, or when `dryRun`.
    public func write(_ key: StoreKey, _ resource: APIResource, version: String, dryRun: Bool = false,
                      fieldValidation: FieldValidation = .warn,
                      _ update: (StoredObject?) throws(APIStatus) -> JSONValue?) throws(APIStatus) -> WriteResult
    {
        var result: WriteResult?
        var delta: MeshDelta?
        let outcome: Result<Void, APIStatus> = state.withLock { s in
            do throws(APIStatus) {
                let current = s.objects[key]
                let proposed = try update(current)
                var warnings: [String] = []
                guard var object = proposed else {
                    guard let current else { throw APIStatus.notFound(resource, key.name) }
                    let revision = s.revision + 1
                    var gone = current
                    gone.revision = revision
                    gone.object = Self.setResourceVersion(gone.object, revision)
                    if let model = resource.model {
                        delta = try Self.compile(&s.compiler, resource, key.name, dryRun: dryRun,
                                                 .delete(ResourceKey(kind: model, namespace: key.namespace, name: key.name)))
                    }
                    let change = StoreChange(kind: .deleted, object: gone)
                    if !dryRun {
                        try commit(change, &s)
                        if let delta { notify(revision, delta, s.compiler) }
                    }
                    result = WriteResult(object: gone, previousRevision: current.revision, kind: .deleted, changed: true,
                                         warnings: [])
                    return .success(())
                }
                object = Self.withServerMetadata(object, current: current, key: key, version: resource.group + "/" + version)
                if let current, Self.sameContent(current.object, object) {
                    result = WriteResult(object: current, previousRevision: current.revision, kind: .modified,
                                         changed: false, warnings: [])
                    return .success(())
                }
                let revision = s.revision + 1
                object = Self.setResourceVersion(object, revision)
                if resource.model != nil {
                    let (decoded, problems) = Self.decode(object, as: resource)
                    var errors = problems.filter { $0.severity == .error }
                    for w in problems where w.severity == .warning {
                        if w.message.hasPrefix("unknown field") {
                            switch fieldValidation {
                            case .strict: errors.append(Diagnostic(.error, file: w.file, line: w.line, resource: w.resource,
                                                                   path: w.path, message: "unknown field \"\(w.path)\""))
                            case .warn: warnings.append("unknown field \"\(w.path)\"")
                            case .ignore: break
                            }
                        } else {
                            warnings.append(APIStatus.describe(w))
                        }
                    }
                    guard let decoded, errors.isEmpty else { throw APIStatus.invalid(resource, key.name, errors) }
                    delta = try Self.compile(&s.compiler, resource, key.name, dryRun: dryRun, .upsert(decoded))
                } else {
                    warnings.append("\(resource.kind) is stored but not enforced by this version of Sluice")
                }
                let stored = StoredObject(key: key, object: object, revision: revision)
                let change = StoreChange(kind: current == nil ? .added : .modified, object: stored)
                if !dryRun {
                    try commit(change, &s)
                    if let delta { notify(revision, delta, s.compiler) }
                }
                result = WriteResult(object: stored, previousRevision: current?.revision ?? 0, kind: change.kind,
                                     changed: true, warnings: warnings)
            } catch {
                return .failure(error)
            }
            return .success(())
        }
        if case .failure(let e) = outcome { throw e }
        return result!
    }

    /// Runs the compiler over the change; on a dry run, over a copy that is dropped.
    private static func compile(_ compiler: inout MeshCompiler, _ r: APIResource, _ name: String, dryRun: Bool,
                                _ change: ResourceChange) throws(APIStatus) -> MeshDelta
    {
        do {
            if dryRun {
                var copy = compiler
                return try copy.apply([change])
            }
            return try compiler.apply([change])
        } catch {
            throw APIStatus.invalid(r, name, error.diagnostics.filter { $0.severity == .error })
        }
    }

    /// Commits to the store, then updates memory and tells the watches. A store failure changes nothing (the
    /// compiler is put back by the caller's undo).
    private func commit(_ change: StoreChange, _ s: inout State) throws(APIStatus) {
        do { try store.commit(change) } catch {
            // The compiler already took the change: undo it so memory matches the store.
            let k = change.object.key
            if let r = APIResource.find(group: k.group, plural: k.resource), let model = r.model {
                let undo: ResourceChange
                if let old = s.objects[k], let decoded = Self.decode(old.object, as: r).0 {
                    undo = .upsert(decoded)
                } else {
                    undo = .delete(ResourceKey(kind: model, namespace: k.namespace, name: k.name))
                }
                _ = try? s.compiler.apply([undo])
            }
            throw APIStatus(code: 500, reason: "InternalError", message: "the store refused the write: \(error)")
        }
        s.revision = change.revision
        if change.kind == .deleted { s.objects[change.object.key] = nil } else { s.objects[change.object.key] = change.object }
        s.history.append(change)
        if s.history.count > keep + keep / 4 { s.history.removeFirst(s.history.count - keep) }
        var gone: [Int] = []
        for (id, w) in s.watchers where Self.matches(w, change) {
            if !w.deliver([change]) { gone.append(id) }
        }
        for id in gone { s.watchers[id] = nil }
    }

    // MARK: - watches

    public enum WatchStart: Sendable {
        /// Current objects first, as ADDED events (a watch without a resourceVersion, or with "0").
        case now
        /// Changes after this revision.
        case after(Int64)
    }

    /// Starts a watch: the changes it has missed go to `deliver` first (under the same lock as later writes, so none
    /// is lost or repeated). Returns an id for ``unwatch(_:)``, or nil when the revision is older than the kept
    /// history (410 Expired).
    func watch(_ resource: APIResource?, namespace: String?, from start: WatchStart,
               deliver: @escaping @Sendable ([StoreChange]) -> Bool) -> Int?
    {
        state.withLock { s in
            let w = Watcher(resource: resource, namespace: namespace, deliver: deliver)
            var backlog: [StoreChange]
            switch start {
            case .now:
                backlog = s.objects.values.filter { Self.matches(w, StoreChange(kind: .added, object: $0)) }
                    .sorted { $0.key < $1.key }.map { StoreChange(kind: .added, object: $0) }
            case .after(let rv):
                let floor = (s.history.first?.revision).map { $0 - 1 } ?? s.revision
                if rv < floor { return nil }
                backlog = s.history.filter { $0.revision > rv && Self.matches(w, $0) }
            }
            if !backlog.isEmpty, !deliver(backlog) { return -1 }
            let id = s.nextWatcher
            s.nextWatcher += 1
            s.watchers[id] = w
            return id
        }
    }

    func unwatch(_ id: Int) { _ = state.withLock { $0.watchers.removeValue(forKey: id) } }

    private static func matches(_ w: Watcher, _ c: StoreChange) -> Bool {
        let k = c.object.key
        if let r = w.resource, r.group != k.group || r.plural != k.resource { return false }
        if let ns = w.namespace, ns != k.namespace { return false }
        return true
    }

    // MARK: - objects

    /// The object with the metadata the server manages: kept from the stored object (uid, creation time), counted
    /// (generation moves when anything but metadata and status changes), and the version asked for.
    static func withServerMetadata(_ proposed: JSONValue, current: StoredObject?, key: StoreKey, version: String) -> JSONValue {
        var o = proposed
        var meta = o["metadata"]?.objectValue ?? [:]
        meta["name"] = .string(key.name)
        meta["namespace"] = .string(key.namespace)
        let old = current?.object
        meta["uid"] = old?[path: ["metadata", "uid"]] ?? .string(UUID().uuidString.lowercased())
        meta["creationTimestamp"] = old?[path: ["metadata", "creationTimestamp"]] ?? .string(Self.timestamp(Date()))
        var generation = old?[path: ["metadata", "generation"]]?.intValue ?? 0
        if old == nil || !sameSpec(old!, o) { generation += 1 }
        meta["generation"] = .int(generation)
        meta["resourceVersion"] = old?[path: ["metadata", "resourceVersion"]] ?? nil
        meta["managedFields"] = nil
        if meta["labels"]?.objectValue?.isEmpty == true { meta["labels"] = nil }
        if meta["annotations"]?.objectValue?.isEmpty == true { meta["annotations"] = nil }
        o["metadata"] = .object(meta)
        o["apiVersion"] = .string(version)
        // The status subresource is the server's: a write to the object keeps what was there.
        o["status"] = old?["status"]
        return o
    }

    static func setResourceVersion(_ object: JSONValue, _ revision: Int64) -> JSONValue {
        var o = object
        var meta = o["metadata"]?.objectValue ?? [:]
        meta["resourceVersion"] = .string(String(revision))
        o["metadata"] = .object(meta)
        return o
    }

    /// Same object apart from its version stamp.
    static func sameContent(_ a: JSONValue, _ b: JSONValue) -> Bool {
        var x = a, y = b
        x["apiVersion"] = nil
        y["apiVersion"] = nil
        return x == y
    }

    static func sameSpec(_ a: JSONValue, _ b: JSONValue) -> Bool {
        var x = a.objectValue ?? [:], y = b.objectValue ?? [:]
        for k in ["metadata", "status", "apiVersion"] {
            x[k] = nil
            y[k] = nil
        }
        return x == y
    }

    /// RFC 3339 in UTC to the second (`2026-12-04T18:20:38Z`), as Kubernetes writes `creationTimestamp`, with
    /// Foundation's ISO 8601 format style (as the log handler): making an ISO8601DateFormatter (ICU) for each create
    /// was a sixth of a write's cost.
    static func timestamp(_ d: Date) -> String {
        Date(timeIntervalSince1970: d.timeIntervalSince1970.rounded(.down)).formatted(.iso8601)
    }

    /// Reads what ``timestamp(_:)`` writes (nil for anything else).
    static func date(_ text: String) -> Date? { try? Date(text, strategy: .iso8601) }

    /// Decodes a stored or proposed object with the same decoder as `sluice validate`. Metadata the server manages
    /// is read by the decoder as well, so only the fields a client may set reach it.
    static func decode(_ object: JSONValue, as r: APIResource) -> (Resource?, [Diagnostic]) {
        var o = object
        if var meta = o["metadata"]?.objectValue {
            meta["managedFields"] = nil
            o["metadata"] = .object(meta)
        }
        o["status"] = nil
        let (resources, diagnostics) = ResourceDecoder.decode(o.text, file: APIRequestSource.file)
        return (resources.first, diagnostics)
    }
}
