/// A label of a workload in a namespace: the key of the index that finds the workloads a selector picks.
struct LabelKey: Hashable {
    var namespace: String
    var key: String
    var value: String
}

/// A WorkloadEntry as the compiler keeps it.
struct WorkloadInfo: Sendable, Hashable {
    var resource: ResourceKey
    var entry: WorkloadEntry
    var node: String?
    var cgroup: String?
    var unit: String?
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
            if let other = healthChecksByHost[hc.host], other != key {
                problems.append(Self.error(r, "spec.host", "\(hc.host) already has a HealthCheck (\(other))",
                                           hint: "keep one HealthCheck per host"))
            }
            healthChecksByHost[hc.host] = key
        case .rateLimitPolicy(let rl): rateLimitsByHost[rl.host, default: []].insert(key)
        case .workloadEntry(let we):
            let a = r.metadata.annotations
            let info = WorkloadInfo(resource: key, entry: we, node: a[SluiceAnnotation.node],
                                    cgroup: a[SluiceAnnotation.cgroup], unit: a[SluiceAnnotation.unit])
            workloads[key] = info
            for (k, v) in we.labels { workloadsByLabel[LabelKey(namespace: ns, key: k, value: v), default: []].insert(key) }
            workloadsByNamespace[ns, default: []].insert(key)
            if let node = info.node { workloadsByNode[node, default: []].insert(key) }
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
                                           hint: "keep one MeshConfig for the mesh"))
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
        case .healthCheck(let hc): if healthChecksByHost[hc.host] == key { healthChecksByHost[hc.host] = nil }
        case .rateLimitPolicy(let rl): Self.drop(key, from: &rateLimitsByHost, at: rl.host)
        case .workloadEntry(let we):
            let info = workloads.removeValue(forKey: key)
            for (k, v) in we.labels { Self.drop(key, from: &workloadsByLabel, at: LabelKey(namespace: ns, key: k, value: v)) }
            Self.drop(key, from: &workloadsByNamespace, at: ns)
            if let node = info?.node { Self.drop(key, from: &workloadsByNode, at: node) }
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

    /// WorkloadEntries in `namespace` whose labels include all of `selector`, in key order.
    func workloads(in namespace: String, matching selector: [String: String]) -> [WorkloadInfo] {
        var smallest: Set<ResourceKey>?
        for (k, v) in selector {
            let set = workloadsByLabel[LabelKey(namespace: namespace, key: k, value: v)] ?? []
            if smallest == nil || set.count < smallest!.count { smallest = set }
        }
        let candidates = smallest ?? workloadsByNamespace[namespace] ?? []
        return candidates.compactMap { workloads[$0] }
            .filter { w in selector.allSatisfy { w.entry.labels[$0.key] == $0.value } }
            .sorted { $0.resource < $1.resource }
    }

    /// The SPIFFE identity of a workload.
    func identity(namespace: String, serviceAccount: String?) -> String {
        "spiffe://\(mesh.trustDomain)/ns/\(namespace)/sa/\(serviceAccount ?? "default")"
    }
}
