import Foundation
import Logging
import SluiceModel
import Synchronization

/// Workload auto-registration (Istio's WorkloadGroup registration for VMs): each agent reports the WorkloadEntries of
/// its host over its stream; they are stored as WorkloadEntries owned by that node, and go away when the node is
/// deleted or has been offline for the cleanup grace period (Istio's `cleanupGracePeriod`).
///
/// A node may register workloads only on itself: the control plane sets `sluice.dev/node` to the stream's node and
/// refuses an entry that names another, or that would replace an entry it does not own.
final class Registrar: Sendable {
    /// The most workloads one node may register.
    static let maxEntries = 1_000

    /// Marks an entry as registered by a node's agent (and so removed with it).
    static let ownerAnnotation = "sluice.dev/registered-by"

    let mesh: MeshState
    let grace: Duration
    let logger: Logger
    /// Nodes offline with registered entries, and the cleanup that runs when their grace is over.
    let pending = Mutex<[String: Task<Void, Never>]>([:])
    /// Nodes that own registered entries (one scan of the store at start, then kept up to date): closing a stream
    /// must not scan the whole mesh.
    let registered: Mutex<Set<String>>
    /// Nodes an operator deleted: they register nothing.
    let deleted: DeletedNodes
    /// A registration and a deletion of the same node never interleave (else a deleted node's entries could outlive
    /// it); registrations are rare, so one lock for all nodes costs nothing.
    private let serial = Mutex(())

    init(mesh: MeshState, grace: Duration, deleted: DeletedNodes, logger: Logger) {
        self.mesh = mesh
        self.deleted = deleted
        self.grace = grace
        self.logger = logger
        let (all, _) = mesh.list(Self.resource, namespace: nil)
        registered = Mutex(Set(all.compactMap { $0.object[path: ["metadata", "annotations", Self.ownerAnnotation]]?.stringValue }))
    }

    func hasRegistered(_ node: String) -> Bool { registered.withLock { $0.contains(node) } }

    static let resource = APIResource.find(group: "networking.istio.io", plural: "workloadentries")!

    /// The entries `node` owns, by namespace/name.
    func owned(by node: String) -> [StoreKey: StoredObject] {
        let (all, _) = mesh.list(Self.resource, namespace: nil)
        var out: [StoreKey: StoredObject] = [:]
        for o in all where o.object[path: ["metadata", "annotations", Self.ownerAnnotation]]?.stringValue == node {
            out[o.key] = o
        }
        return out
    }

    /// Nodes that own registered entries.
    var owners: Set<String> { registered.withLock { $0 } }

    /// Stores `entries` (JSON WorkloadEntries) as the whole set `node` runs: new ones created, changed ones
    /// replaced, the node's others deleted. Returns why each refused entry was refused.
    func register(node: String, entries: [Data]) -> [String] {
        serial.withLock { _ in
            guard !deleted.contains(node) else { return ["node \(node) was deleted: it registers nothing until it joins again"] }
            return store(node: node, entries: entries)
        }
    }

    private func store(node: String, entries: [Data]) -> [String] {
        connected(node)
        var errors: [String] = []
        var wanted: Set<StoreKey> = []
        for data in entries {
            guard var o = try? JSONValue(parsing: data), o["kind"]?.stringValue == "WorkloadEntry" else {
                errors.append("an entry that is not a WorkloadEntry (JSON) was ignored")
                continue
            }
            let ns = o[path: ["metadata", "namespace"]]?.stringValue ?? "default"
            let name = o[path: ["metadata", "name"]]?.stringValue ?? ""
            let where_ = "WorkloadEntry \(ns)/\(name)"
            var meta = o["metadata"]?.objectValue ?? [:]
            var annotations = meta["annotations"]?.objectValue ?? [:]
            if let other = annotations[SluiceAnnotation.node]?.stringValue, other != node {
                errors.append("\(where_): node \(node) cannot register a workload on node \(other)")
                continue
            }
            annotations[SluiceAnnotation.node] = .string(node)
            annotations[Self.ownerAnnotation] = .string(node)
            meta["annotations"] = .object(annotations)
            meta["namespace"] = .string(ns)
            for k in ["resourceVersion", "uid", "generation", "creationTimestamp"] { meta[k] = nil }
            o["metadata"] = .object(meta)
            o["apiVersion"] = .string("networking.istio.io/v1")
            let key = StoreKey(group: Self.resource.group, resource: Self.resource.plural, namespace: ns, name: name)
            wanted.insert(key)
            do {
                let r = try mesh.write(key, Self.resource, version: "v1") { current throws(APIStatus) in
                    if let current, current.object[path: ["metadata", "annotations", Self.ownerAnnotation]]?.stringValue != node {
                        throw APIStatus(code: 409, reason: "Conflict",
                                        message: "\(where_) exists and was not registered by node \(node)")
                    }
                    return o
                }
                if r.changed {
                    logger.info("audit", metadata: ["requester": "node:\(node)", "verb": "register", "object": "\(where_)",
                                                    "before": "\(r.previousRevision)", "after": "\(r.object.revision)"])
                }
            } catch {
                wanted.remove(key)
                errors.append("\(where_): \(error.message)")
            }
        }
        for (key, _) in owned(by: node) where !wanted.contains(key) {
            remove(key, requester: "node:\(node)", why: "deregister")
        }
        registered.withLock { if wanted.isEmpty { $0.remove(node) } else { $0.insert(node) } }
        return errors
    }

    private func remove(_ key: StoreKey, requester: String, why: String) {
        do {
            let r = try mesh.write(key, Self.resource, version: "v1") { _ throws(APIStatus) in nil }
            logger.info("audit", metadata: ["requester": "\(requester)", "verb": "\(why)",
                                            "object": "WorkloadEntry \(key.namespace)/\(key.name)",
                                            "before": "\(r.previousRevision)", "after": "\(r.object.revision)"])
        } catch {
            logger.warning("cannot remove a registered workload", metadata: ["object": "\(key)", "error": "\(error.message)"])
        }
    }

    /// The node was deleted (`sluice delete node`): its entries go now, not after the grace. Returns how many.
    func remove(node: String, requester: String) -> Int {
        serial.withLock { _ in
            pending.withLock { $0.removeValue(forKey: node) }?.cancel()
            let owned = owned(by: node)
            for (key, _) in owned.sorted(by: { $0.key < $1.key }) { remove(key, requester: requester, why: "delete-node") }
            registered.withLock { _ = $0.remove(node) }
            return owned.count
        }
    }

    /// The node is back: its cleanup, if one was waiting, is called off.
    func connected(_ node: String) {
        pending.withLock { $0.removeValue(forKey: node) }?.cancel()
    }

    /// The node went offline: its entries go when it has not come back within the grace period.
    func disconnected(_ node: String) {
        let task = Task { [grace] in
            do { try await Task.sleep(for: grace) } catch { return }
            guard pending.withLock({ $0.removeValue(forKey: node) }) != nil else { return }
            for (key, _) in owned(by: node) { remove(key, requester: "node:\(node)", why: "cleanup") }
            registered.withLock { _ = $0.remove(node) }
            logger.info("removed the workloads of an offline node", metadata: ["node": "\(node)", "grace": "\(grace)"])
        }
        pending.withLock { p in
            p[node]?.cancel()
            p[node] = task
        }
    }
}
