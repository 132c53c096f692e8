/// A label of a workload in a namespace: the key of the index that finds the workloads a selector picks.
struct LabelKey: Hashable {
    var namespace: String
    var key: String
    var value: String
}

/// A WorkloadEntry as the compiler keeps it. A class: indexes and candidate lists pass it around by the
/// thousand, and a reference costs one retain where the struct cost a dozen.
final class WorkloadInfo: Sendable {
    let resource: ResourceKey
    let entry: WorkloadEntry
    let node: String?
    let cgroup: String?
    let unit: String?

    init(resource: ResourceKey, entry: WorkloadEntry, node: String?, cgroup: String?, unit: String?) {
        self.resource = resource
        self.entry = entry
        self.node = node
        self.cgroup = cgroup
        self.unit = unit
    }
}

/// Workloads by slot number, with the indexes selectors and nodes need. Indexes hold `Int` slots rather than
/// resource keys: a mesh has ~10 workloads per service, and hashing three strings per index entry was most of
/// the cost of loading 100,000 of them.
struct WorkloadTable: Sendable {
    private var slots: [WorkloadInfo?] = []
    private var free: [Int] = []
    private var ids: [ResourceKey: Int] = [:]
    private var byLabel: [LabelKey: Set<Int>] = [:]
    private(set) var byNode: [String: Set<Int>] = [:]

    subscript(id: Int) -> WorkloadInfo { slots[id]! }

    mutating func reserveCapacity(_ n: Int) {
        slots.reserveCapacity(n)
        ids.reserveCapacity(n)
    }

    mutating func insert(_ w: WorkloadInfo) {
        let id: Int
        if let reused = free.popLast() {
            id = reused
            slots[id] = w
        } else {
            id = slots.count
            slots.append(w)
        }
        ids[w.resource] = id
        let ns = w.resource.namespace
        for (k, v) in w.entry.labels { byLabel[LabelKey(namespace: ns, key: k, value: v), default: []].insert(id) }
        if let node = w.node { byNode[node, default: []].insert(id) }
    }

    mutating func remove(_ key: ResourceKey) {
        guard let id = ids.removeValue(forKey: key), let w = slots[id] else { return }
        slots[id] = nil
        free.append(id)
        let ns = key.namespace
        for (k, v) in w.entry.labels { Self.drop(id, from: &byLabel, at: LabelKey(namespace: ns, key: k, value: v)) }
        if let node = w.node { Self.drop(id, from: &byNode, at: node) }
    }

    private static func drop<K: Hashable>(_ id: Int, from index: inout [K: Set<Int>], at k: K) {
        guard var set = index[k] else { return }
        set.remove(id)
        index[k] = set.isEmpty ? nil : set
    }

    /// Workloads in `namespace` whose labels include all of `selector`, in resource key order.
    func matching(_ selector: [String: String], in namespace: String) -> [WorkloadInfo] {
        var smallest: Set<Int>?
        for (k, v) in selector {
            let set = byLabel[LabelKey(namespace: namespace, key: k, value: v)] ?? []
            if smallest == nil || set.count < smallest!.count { smallest = set }
        }
        var out: [WorkloadInfo] = []
        // An empty selector (rare) scans the table: no per-namespace index is kept just for it.
        for id in smallest ?? Set(slots.indices) {
            guard let w = slots[id], w.resource.namespace == namespace,
                selector.allSatisfy({ w.entry.labels[$0.key] == $0.value })
            else { continue }
            out.append(w)
        }
        out.sort { $0.resource < $1.resource }
        return out
    }

    func on(node: String) -> [WorkloadInfo] {
        (byNode[node] ?? []).map { slots[$0]! }.sorted { $0.resource < $1.resource }
    }

    func namespaces(on node: String) -> Set<String> {
        Set((byNode[node] ?? []).map { slots[$0]!.resource.namespace })
    }

    func nodes(in namespace: String) -> Set<String> {
        Set(slots.compactMap { w in w?.resource.namespace == namespace ? w?.node : nil })
    }
}

extension MeshCompiler {
    /// Adds `r` to the store and every index. Problems that need only `r` itself are reported here.
    mutating func insert(_ r: Resource, problems: inout [Diagnostic]) {
        let key = r.key
        resources[key] = r
        let ns = r.metadata.namespace
        switch r.spec {
        case .serviceEntry(let se):
            for h in se.hosts { serviceEntriesByHost[h, default: []].insert(key) }
            if se.workloadSelector != nil { selectingServiceEntries[ns, default: []].insert(key) }
        case .destinationRule(let dr): destinationRulesByHost[dr.host, default: []].insert(key)
        case .healthCheck(let hc):
            if let other = healthChecksByHost[hc.host]?.first(where: { $0 != key }) {
                problems.append(Self.error(r, "spec.host", "\(hc.host) already has a HealthCheck (\(other))",
                                           hint: "keep one HealthCheck per host", code: .conflictingResource))
            }
            healthChecksByHost[hc.host, default: []].insert(key)
        case .rateLimitPolicy(let rl): rateLimitsByHost[rl.host, default: []].insert(key)
        case .workloadEntry(let we):
            let a = r.metadata.annotations
            let info = WorkloadInfo(resource: key, entry: we, node: a[SluiceAnnotation.node],
                                    cgroup: a[SluiceAnnotation.cgroup], unit: a[SluiceAnnotation.unit])
            workloads.insert(info)
        case .virtualService(let vs):
            if vs.gateways.isEmpty || vs.gateways.contains("mesh") {
                for h in vs.hosts { virtualServicesByHost[h, default: []].insert(key) }
            }
            for h in Self.destinationHosts(vs) { virtualServicesByDestination[h, default: []].insert(key) }
            virtualServiceKeys.insert(key)
            for g in Self.gatewayRefs(vs, namespace: ns) { virtualServicesByGateway[g, default: []].insert(key) }
        case .gateway: gatewayKeys.insert(key)
        case .authorizationPolicy, .peerAuthentication, .requestAuthentication:
            policiesByNamespace[ns, default: []].insert(key)
        case .meshConfig(let m):
            if let first = meshConfigKey, first != key, let firstResource = resources[first] {
                problems.append(Self.error(r, "", "a second MeshConfig (the first is \(first) in \(firstResource.source.file))",
                                           hint: "keep one MeshConfig for the mesh", code: .conflictingResource))
                return
            }
            meshConfigKey = key
            mesh = m
        }
    }

    /// Removes `r` from the store and every index.
    mutating func remove(_ r: Resource) {
        let key = r.key
        resources[key] = nil
        let ns = r.metadata.namespace
        switch r.spec {
        case .serviceEntry(let se):
            for h in se.hosts { Self.drop(key, from: &serviceEntriesByHost, at: h) }
            Self.drop(key, from: &selectingServiceEntries, at: ns)
        case .destinationRule(let dr): Self.drop(key, from: &destinationRulesByHost, at: dr.host)
        case .healthCheck(let hc): Self.drop(key, from: &healthChecksByHost, at: hc.host)
        case .rateLimitPolicy(let rl): Self.drop(key, from: &rateLimitsByHost, at: rl.host)
        case .workloadEntry: workloads.remove(key)
        case .virtualService(let vs):
            for h in vs.hosts { Self.drop(key, from: &virtualServicesByHost, at: h) }
            for h in Self.destinationHosts(vs) { Self.drop(key, from: &virtualServicesByDestination, at: h) }
            virtualServiceProblems[key] = nil
            virtualServiceKeys.remove(key)
            for g in Self.gatewayRefs(vs, namespace: ns) { Self.drop(key, from: &virtualServicesByGateway, at: g) }
        case .gateway:
            gatewayKeys.remove(key)
            gatewayProducts[key] = nil
        case .authorizationPolicy, .peerAuthentication, .requestAuthentication:
            Self.drop(key, from: &policiesByNamespace, at: ns)
        case .meshConfig:
            if meshConfigKey == key {
                meshConfigKey = nil
                mesh = .defaults
            }
        }
    }

    private static func drop<K: Hashable>(_ key: ResourceKey, from index: inout [K: Set<ResourceKey>], at k: K) {
        guard var set = index[k] else { return }
        set.remove(key)
        index[k] = set.isEmpty ? nil : set
    }

    /// The gateways a VirtualService binds to, as `namespace/name` (a bare name is in the VirtualService's
    /// namespace, as in Istio); `mesh` is left out.
    static func gatewayRefs(_ vs: VirtualService, namespace: String) -> Set<String> {
        Set(vs.gateways.filter { $0 != "mesh" }.map { $0.contains("/") ? $0 : "\(namespace)/\($0)" })
    }

    static func destinationHosts(_ vs: VirtualService) -> Set<String> {
        var hosts: Set<String> = []
        for r in vs.http {
            for d in r.route { hosts.insert(d.destination.host) }
            if let m = r.mirror { hosts.insert(m.host) }
        }
        for r in vs.tcp { for d in r.route { hosts.insert(d.destination.host) } }
        for r in vs.tls { for d in r.route { hosts.insert(d.destination.host) } }
        return hosts
    }

    /// The SPIFFE identity of a workload.
    func identity(namespace: String, serviceAccount: String?) -> String {
        "spiffe://\(mesh.trustDomain)/ns/\(namespace)/sa/\(serviceAccount ?? "default")"
    }
}
