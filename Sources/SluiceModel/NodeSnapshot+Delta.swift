import Foundation

/// One named part of a ``NodeSnapshot``: the unit a ``NodeDelta`` adds, replaces or removes (like one resource
/// of a delta xDS response).
public enum SnapshotItem: Sendable, Hashable, Codable {
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

    public enum Kind: Int, Sendable, Hashable, Comparable, Codable {
        case workload, listener, service, cluster, bpfService, virtualService, authorizationPolicy
        case peerAuthentication, requestAuthentication, rateLimit
        public static func < (a: Kind, b: Kind) -> Bool { a.rawValue < b.rawValue }
    }

    public struct Key: Sendable, Hashable, Comparable, Codable, CustomStringConvertible {
        public var kind: Kind
        public var name: String
        public init(kind: Kind, name: String) {
            self.kind = kind
            self.name = name
        }
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
public struct NodeDelta: Sendable, Hashable, Codable {
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

extension IPAddress: Codable {
    public func encode(to encoder: any Encoder) throws {
        var c = encoder.singleValueContainer()
        try c.encode(description)
    }

    public init(from decoder: any Decoder) throws {
        let c = try decoder.singleValueContainer()
        let text = try c.decode(String.self)
        guard let ip = IPAddress(text) else {
            throw DecodingError.dataCorruptedError(in: c, debugDescription: "'\(text)' is not an IP address")
        }
        self = ip
    }
}

extension EndpointAddress: Codable {
    public func encode(to encoder: any Encoder) throws {
        var c = encoder.singleValueContainer()
        try c.encode(description)
    }

    public init(from decoder: any Decoder) throws {
        let c = try decoder.singleValueContainer()
        let text = try c.decode(String.self)
        guard let a = EndpointAddress(parsing: text) else {
            throw DecodingError.dataCorruptedError(in: c, debugDescription: "'\(text)' is not an address with a port")
        }
        self = a
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

extension KeyedDecodingContainer where Key == NamedKey {
    /// The one key of a one-of object (`{"exact": "v"}`), which must be one of `allowed`.
    func oneOf(_ allowed: [String]) throws -> String {
        let present = allKeys.map(\.stringValue).filter(allowed.contains)
        guard present.count == 1 else {
            throw DecodingError.dataCorrupted(.init(codingPath: codingPath,
                                                    debugDescription: "expected exactly one of \(allowed)"))
        }
        return present[0]
    }
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

    public init(from decoder: any Decoder) throws {
        let c = try decoder.container(keyedBy: NamedKey.self)
        let key = try c.oneOf(["exact", "prefix", "regex"])
        let value = try c.decode(String.self, forKey: NamedKey(key))
        self = key == "exact" ? .exact(value) : key == "prefix" ? .prefix(value) : .regex(value)
    }
}

extension LoadBalancerSettings {
    /// `{"simple": "ROUND_ROBIN"}` or `{"consistentHash": {KEY, "maglev": {"tableSize": n}}}` where KEY is Istio's
    /// `"useSourceIp": true`, `"httpHeaderName": h`, `"httpCookie": {"name": c}` or `"httpQueryParameterName": q`.
    public func encode(to encoder: any Encoder) throws {
        var c = encoder.container(keyedBy: NamedKey.self)
        switch self {
        case .simple(let s): try c.encode(s, forKey: NamedKey("simple"))
        case .consistentHash(let key, let size):
            var h = c.nestedContainer(keyedBy: NamedKey.self, forKey: NamedKey("consistentHash"))
            switch key {
            case .sourceIP: try h.encode(true, forKey: NamedKey("useSourceIp"))
            case .header(let name): try h.encode(name, forKey: NamedKey("httpHeaderName"))
            case .cookie(let name):
                var cookie = h.nestedContainer(keyedBy: NamedKey.self, forKey: NamedKey("httpCookie"))
                try cookie.encode(name, forKey: NamedKey("name"))
            case .queryParameter(let name): try h.encode(name, forKey: NamedKey("httpQueryParameterName"))
            }
            if let size {
                var m = h.nestedContainer(keyedBy: NamedKey.self, forKey: NamedKey("maglev"))
                try m.encode(size, forKey: NamedKey("tableSize"))
            }
        }
    }

    public init(from decoder: any Decoder) throws {
        let c = try decoder.container(keyedBy: NamedKey.self)
        if try c.oneOf(["simple", "consistentHash"]) == "simple" {
            self = .simple(try c.decode(Simple.self, forKey: NamedKey("simple")))
            return
        }
        let h = try c.nestedContainer(keyedBy: NamedKey.self, forKey: NamedKey("consistentHash"))
        let key: HashKey = switch try h.oneOf(["useSourceIp", "httpHeaderName", "httpCookie", "httpQueryParameterName"]) {
        case "useSourceIp": .sourceIP
        case "httpHeaderName": .header(try h.decode(String.self, forKey: NamedKey("httpHeaderName")))
        case "httpCookie":
            .cookie(try h.nestedContainer(keyedBy: NamedKey.self, forKey: NamedKey("httpCookie"))
                .decode(String.self, forKey: NamedKey("name")))
        default: .queryParameter(try h.decode(String.self, forKey: NamedKey("httpQueryParameterName")))
        }
        let size = h.contains(NamedKey("maglev"))
            ? try h.nestedContainer(keyedBy: NamedKey.self, forKey: NamedKey("maglev"))
                .decodeIfPresent(Int.self, forKey: NamedKey("tableSize")) : nil
        self = .consistentHash(key: key, tableSize: size)
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

    public init(from decoder: any Decoder) throws {
        let c = try decoder.container(keyedBy: NamedKey.self)
        self = try c.oneOf(["httpStatus", "grpcStatus"]) == "httpStatus"
            ? .httpStatus(try c.decode(Int.self, forKey: NamedKey("httpStatus")))
            : .grpcStatus(try c.decode(String.self, forKey: NamedKey("grpcStatus")))
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

    public init(from decoder: any Decoder) throws {
        if let c = try? decoder.container(keyedBy: NamedKey.self) {
            self = .header(try c.decode(String.self, forKey: NamedKey("header")))
            return
        }
        let c = try decoder.singleValueContainer()
        switch try c.decode(String.self) {
        case "none": self = .none
        case "sourceIp": self = .sourceIP
        case "sourcePrincipal": self = .sourcePrincipal
        case let other: throw DecodingError.dataCorruptedError(in: c, debugDescription: "unknown rate-limit key '\(other)'")
        }
    }
}

// MARK: - items on the wire and on disk

extension SnapshotItem.Kind {
    /// The kind's name on the agent stream (stable across versions; the raw value only orders).
    public var wireName: String {
        switch self {
        case .workload: "workload"
        case .listener: "listener"
        case .service: "service"
        case .cluster: "cluster"
        case .bpfService: "bpf-service"
        case .virtualService: "virtual-service"
        case .authorizationPolicy: "authorization-policy"
        case .peerAuthentication: "peer-authentication"
        case .requestAuthentication: "request-authentication"
        case .rateLimit: "rate-limit"
        }
    }

    public init?(wireName: String) {
        guard let k = Self.byWireName[wireName] else { return nil }
        self = k
    }

    static let all: [SnapshotItem.Kind] = [.workload, .listener, .service, .cluster, .bpfService, .virtualService,
                                           .authorizationPolicy, .peerAuthentication, .requestAuthentication, .rateLimit]
    static let byWireName = Dictionary(uniqueKeysWithValues: all.map { ($0.wireName, $0) })
}

extension SnapshotItem {
    /// The item's own JSON, without the kind (which travels beside it). Sorted keys: equal items, equal bytes.
    public func payload() -> Data {
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.sortedKeys, .withoutEscapingSlashes]
        // Plain value types: encoding cannot fail.
        return switch self {
        case .workload(let v): (try? encoder.encode(v)) ?? Data()
        case .listener(let v): (try? encoder.encode(v)) ?? Data()
        case .service(let v): (try? encoder.encode(v)) ?? Data()
        case .cluster(let v): (try? encoder.encode(v)) ?? Data()
        case .bpfService(let v): (try? encoder.encode(v)) ?? Data()
        case .virtualService(let v): (try? encoder.encode(v)) ?? Data()
        case .authorizationPolicy(let v): (try? encoder.encode(v)) ?? Data()
        case .peerAuthentication(let v): (try? encoder.encode(v)) ?? Data()
        case .requestAuthentication(let v): (try? encoder.encode(v)) ?? Data()
        case .rateLimit(let v): (try? encoder.encode(v)) ?? Data()
        }
    }

    /// Decodes what ``payload()`` wrote for an item of `kind`. Throws `DecodingError` on anything else.
    public init(kind: Kind, payload: Data) throws {
        let d = JSONDecoder()
        switch kind {
        case .workload: self = .workload(try d.decode(NodeSnapshot.Workload.self, from: payload))
        case .listener: self = .listener(try d.decode(NodeSnapshot.Listener.self, from: payload))
        case .service: self = .service(try d.decode(NodeSnapshot.Service.self, from: payload))
        case .cluster: self = .cluster(try d.decode(NodeSnapshot.Cluster.self, from: payload))
        case .bpfService: self = .bpfService(try d.decode(NodeSnapshot.BPFService.self, from: payload))
        case .virtualService: self = .virtualService(try d.decode(Named<VirtualService>.self, from: payload))
        case .authorizationPolicy: self = .authorizationPolicy(try d.decode(Named<AuthorizationPolicy>.self, from: payload))
        case .peerAuthentication: self = .peerAuthentication(try d.decode(Named<PeerAuthentication>.self, from: payload))
        case .requestAuthentication:
            self = .requestAuthentication(try d.decode(Named<RequestAuthentication>.self, from: payload))
        case .rateLimit: self = .rateLimit(try d.decode(Named<RateLimitPolicy>.self, from: payload))
        }
    }
}
