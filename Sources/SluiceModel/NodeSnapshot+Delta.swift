import Foundation

/// One named part of a ``NodeSnapshot``: the unit a ``NodeDelta`` adds, replaces or removes (like one resource
/// of a delta xDS response).
public enum SnapshotItem: Sendable, Hashable, Encodable {
    case workload(NodeSnapshot.Workload)
    case listener(NodeSnapshot.Listener)
    case service(NodeSnapshot.Service)
    case cluster(NodeSnapshot.Cluster)
    case bpfService(NodeSnapshot.BPFService)
    case virtualService(Named<VirtualService>)
    case authorizationPolicy(Named<AuthorizationPolicy>)
    case peerAuthentication(Named<PeerAuthentication>)
    case requestAuthentication(Named<RequestAuthentication>)
    case rateLimit(Named<RateLimitPolicy>)

    public enum Kind: Int, Sendable, Hashable, Comparable, Encodable {
        case workload, listener, service, cluster, bpfService, virtualService, authorizationPolicy
        case peerAuthentication, requestAuthentication, rateLimit
        public static func < (a: Kind, b: Kind) -> Bool { a.rawValue < b.rawValue }
    }

    public struct Key: Sendable, Hashable, Comparable, Encodable, CustomStringConvertible {
        public var kind: Kind
        public var name: String
        public static func < (a: Key, b: Key) -> Bool { (a.kind, a.name) < (b.kind, b.name) }
        public var description: String { "\(kind):\(name)" }
    }

    public var key: Key {
        switch self {
        case .workload(let w): Key(kind: .workload, name: "\(w.namespace)/\(w.name)")
        case .listener(let l): Key(kind: .listener, name: l.name)
        case .service(let s): Key(kind: .service, name: s.host)
        case .cluster(let c): Key(kind: .cluster, name: c.name)
        case .bpfService(let b): Key(kind: .bpfService, name: "\(b.address)/\(b.protocol.rawValue)")
        case .virtualService(let v): Key(kind: .virtualService, name: v.qualifiedName)
        case .authorizationPolicy(let p): Key(kind: .authorizationPolicy, name: p.qualifiedName)
        case .peerAuthentication(let p): Key(kind: .peerAuthentication, name: p.qualifiedName)
        case .requestAuthentication(let p): Key(kind: .requestAuthentication, name: p.qualifiedName)
        case .rateLimit(let p): Key(kind: .rateLimit, name: p.qualifiedName)
        }
    }
}

/// What changes in one node's snapshot: items to add or replace, and keys to remove.
public struct NodeDelta: Sendable, Hashable, Encodable {
    public var node: String
    public var upserted: [SnapshotItem]
    public var removed: [SnapshotItem.Key]
    /// Set when mesh-wide settings changed; the node takes the whole value.
    public var mesh: MeshConfig?

    public var isEmpty: Bool { upserted.isEmpty && removed.isEmpty && mesh == nil }
}

/// The result of applying changes to a ``MeshCompiler``: the nodes whose snapshots change, and how.
public struct MeshDelta: Sendable {
    /// Only nodes whose snapshot changes, sorted by node name.
    public var nodes: [NodeDelta]
    /// Service hosts whose compiled output was rebuilt.
    public var recompiledServices: Int
    /// Nodes whose node-local parts (workloads, listeners, policies, scope) were rebuilt.
    public var recompiledNodes: Int
}

extension NodeSnapshot {
    /// Every item, in key order.
    public var items: [SnapshotItem] {
        var out: [SnapshotItem] = []
        out += workloads.map { .workload($0) }
        out += listeners.map { .listener($0) }
        out += services.map { .service($0) }
        out += clusters.map { .cluster($0) }
        out += bpfServices.map { .bpfService($0) }
        out += virtualServices.map { .virtualService($0) }
        out += authorizationPolicies.map { .authorizationPolicy($0) }
        out += peerAuthentications.map { .peerAuthentication($0) }
        out += requestAuthentications.map { .requestAuthentication($0) }
        out += rateLimits.map { .rateLimit($0) }
        return out
    }

    /// Builds a snapshot from items in any order; lists come out sorted by key.
    public init<S: Sequence>(node: String, mesh: MeshConfig, items: S) where S.Element == SnapshotItem {
        let all = Array(items)
        self.init(node: node, mesh: mesh, items: all, keys: all.map(\.key))
    }

    /// Builds a snapshot from items and their keys (`keys[i]` is `items[i].key`), in any order.
    init(node: String, mesh: MeshConfig, items all: [SnapshotItem], keys: [SnapshotItem.Key]) {
        self.init(node: node, mesh: mesh)
        // An index permutation is sorted rather than the items themselves, which are large.
        for i in keys.indices.sorted(by: { keys[$0] < keys[$1] }) {
            switch all[i] {
            case .workload(let w): workloads.append(w)
            case .listener(let l): listeners.append(l)
            case .service(let s): services.append(s)
            case .cluster(let c): clusters.append(c)
            case .bpfService(let b): bpfServices.append(b)
            case .virtualService(let v): virtualServices.append(v)
            case .authorizationPolicy(let p): authorizationPolicies.append(p)
            case .peerAuthentication(let p): peerAuthentications.append(p)
            case .requestAuthentication(let p): requestAuthentications.append(p)
            case .rateLimit(let p): rateLimits.append(p)
            }
        }
    }

    /// This snapshot with `delta` applied: what an agent that receives deltas computes.
    public func applying(_ delta: NodeDelta) -> NodeSnapshot {
        var byKey: [SnapshotItem.Key: SnapshotItem] = [:]
        for item in items { byKey[item.key] = item }
        for key in delta.removed { byKey[key] = nil }
        for item in delta.upserted { byKey[item.key] = item }
        return NodeSnapshot(node: node, mesh: delta.mesh ?? mesh, items: byKey.values)
    }

    /// Looks up a cluster by name (lists are sorted by name).
    public func cluster(named name: String) -> Cluster? {
        var lo = 0, hi = clusters.count
        while lo < hi {
            let mid = (lo + hi) / 2
            if clusters[mid].name < name { lo = mid + 1 } else { hi = mid }
        }
        return lo < clusters.count && clusters[lo].name == name ? clusters[lo] : nil
    }

    /// JSON with sorted keys: the same snapshot always gives the same bytes.
    public func canonicalJSON(pretty: Bool = false) -> Data {
        let encoder = JSONEncoder()
        encoder.outputFormatting = pretty ? [.sortedKeys, .prettyPrinted, .withoutEscapingSlashes]
            : [.sortedKeys, .withoutEscapingSlashes]
        // Every member is a plain value type; encoding cannot fail.
        return (try? encoder.encode(self)) ?? Data()
    }
}

extension IPAddress: Encodable {
    public func encode(to encoder: any Encoder) throws {
        var c = encoder.singleValueContainer()
        try c.encode(description)
    }
}

extension EndpointAddress: Encodable {
    public func encode(to encoder: any Encoder) throws {
        var c = encoder.singleValueContainer()
        try c.encode(description)
    }
}

// MARK: - Istio-shaped JSON for enums with payloads (synthesized Codable would write `{"exact":{"_0":...}}`)

/// A coding key made from a string, for the hand-written encodings below.
struct NamedKey: CodingKey {
    var stringValue: String
    var intValue: Int? { nil }
    init(_ s: String) { stringValue = s }
    init?(stringValue: String) { self.stringValue = stringValue }
    init?(intValue: Int) { nil }
}

extension StringMatch {
    /// `{"exact": "v"}`, `{"prefix": "v"}` or `{"regex": "v"}`, as Istio writes a StringMatch.
    public func encode(to encoder: any Encoder) throws {
        var c = encoder.container(keyedBy: NamedKey.self)
        switch self {
        case .exact(let s): try c.encode(s, forKey: NamedKey("exact"))
        case .prefix(let s): try c.encode(s, forKey: NamedKey("prefix"))
        case .regex(let s): try c.encode(s, forKey: NamedKey("regex"))
        }
    }
}

extension LoadBalancerSettings {
    /// `{"simple": "ROUND_ROBIN"}` or `{"consistentHash": {"useSourceIp": true, "maglev": {"tableSize": n}}}`.
    public func encode(to encoder: any Encoder) throws {
        var c = encoder.container(keyedBy: NamedKey.self)
        switch self {
        case .simple(let s): try c.encode(s, forKey: NamedKey("simple"))
        case .consistentHash(_, let size):
            var h = c.nestedContainer(keyedBy: NamedKey.self, forKey: NamedKey("consistentHash"))
            try h.encode(true, forKey: NamedKey("useSourceIp"))
            if let size {
                var m = h.nestedContainer(keyedBy: NamedKey.self, forKey: NamedKey("maglev"))
                try m.encode(size, forKey: NamedKey("tableSize"))
            }
        }
    }
}

extension HTTPFault.Abort.Kind {
    /// `{"httpStatus": 500}` or `{"grpcStatus": "UNAVAILABLE"}`.
    public func encode(to encoder: any Encoder) throws {
        var c = encoder.container(keyedBy: NamedKey.self)
        switch self {
        case .httpStatus(let s): try c.encode(s, forKey: NamedKey("httpStatus"))
        case .grpcStatus(let s): try c.encode(s, forKey: NamedKey("grpcStatus"))
        }
    }
}

extension RateLimitPolicy.Key {
    /// `"none"`, `"sourceIp"`, `"sourcePrincipal"` or `{"header": "name"}`.
    public func encode(to encoder: any Encoder) throws {
        switch self {
        case .header(let h):
            var c = encoder.container(keyedBy: NamedKey.self)
            try c.encode(h, forKey: NamedKey("header"))
        case .none:
            var c = encoder.singleValueContainer()
            try c.encode("none")
        case .sourceIP:
            var c = encoder.singleValueContainer()
            try c.encode("sourceIp")
        case .sourcePrincipal:
            var c = encoder.singleValueContainer()
            try c.encode("sourcePrincipal")
        }
    }
}
