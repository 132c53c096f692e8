import SluiceModel

/// Names one stored object: its API group and resource (plural), namespace and name. The version is not part of
/// it: as in Kubernetes, one object is served at every version of its group.
public struct StoreKey: Sendable, Hashable, Comparable, CustomStringConvertible {
    public var group: String
    public var resource: String
    public var namespace: String
    public var name: String

    public init(group: String, resource: String, namespace: String, name: String) {
        self.group = group
        self.resource = resource
        self.namespace = namespace
        self.name = name
    }

    public static func < (a: StoreKey, b: StoreKey) -> Bool {
        (a.group, a.resource, a.namespace, a.name) < (b.group, b.resource, b.namespace, b.name)
    }

    public var description: String { "\(resource).\(group) \(namespace)/\(name)" }
}

/// One object as stored: the whole Kubernetes object (server-managed metadata included) and the store revision
/// that last wrote it (its `resourceVersion`).
public struct StoredObject: Sendable, Hashable {
    public var key: StoreKey
    public var object: JSONValue
    public var revision: Int64

    public init(key: StoreKey, object: JSONValue, revision: Int64) {
        self.key = key
        self.object = object
        self.revision = revision
    }
}

/// One entry of the change log: what a write did, at which revision. A deletion carries the object as it was
/// last, with the deleting revision as its `resourceVersion` (what a watch's DELETED event shows).
public struct StoreChange: Sendable, Hashable {
    public enum Kind: String, Sendable { case added = "ADDED", modified = "MODIFIED", deleted = "DELETED" }
    public var kind: Kind
    public var object: StoredObject
    public var revision: Int64 { object.revision }

    public init(kind: Kind, object: StoredObject) {
        self.kind = kind
        self.object = object
    }
}

/// What a store holds when it opens.
public struct StoreContents: Sendable {
    public var objects: [StoredObject]
    /// The revision of the last write (0 for a new store).
    public var revision: Int64
    /// The change log still kept, oldest first: watches and agents may resume from any revision in it.
    public var changes: [StoreChange]
}

/// Where the control plane keeps the mesh: the embedded SQLite store by default; an etcd store (for replicas)
/// implements the same protocol.
///
/// The control plane assigns revisions (one store-wide counter, as etcd's) and serialises its writes; a store makes
/// each commit durable before it returns, atomically (the object and its change-log entry together, or neither).
public protocol ConfigStore: AnyObject, Sendable {
    /// Reads everything back (at start).
    func load() throws -> StoreContents
    /// Makes `change` durable: the object row written (or removed) and the change logged, in one transaction.
    /// `change.revision` is one more than the last committed revision.
    func commit(_ change: StoreChange) throws
    /// What `--store` names, for logs.
    var location: String { get }
}

public struct StoreError: Error, CustomStringConvertible {
    public var description: String
    public init(_ description: String) { self.description = description }
}
