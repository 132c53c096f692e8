import Foundation

/// An endpoint before it is placed in clusters.
struct Candidate {
    var entry: WorkloadEntry
    var ip: IPAddress
    var workload: WorkloadInfo?
    var identity: String?
}

/// Everything compiled for one service host; the same for every node that sees the host.
struct ServiceUnit: Sendable, Hashable {
    var host: String
    var namespace: String
    var exportTo: [String]
    /// The service, its clusters, BPF map entries and rate limits.
    var items: [SnapshotItem]
    /// Their keys, built once here rather than in every node's snapshot (some format addresses).
    var keys: [SnapshotItem.Key]
    /// Namespaces of the workloads behind it: a policy there may change how the kernel may treat it.
    var endpointNamespaces: Set<String>
    var problems: [Diagnostic]
}

extension MeshCompiler {
    /// More backends than this and the service is balanced by the agent (the BPF map value has a fixed size).
    public static let maxKernelBackends = 256

    mutating func recompileUnit(_ host: String) {
        if let old = units[host] {
            for ns in old.endpointNamespaces {
                unitsByEndpointNamespace[ns]?.remove(host)
                if unitsByEndpointNamespace[ns]?.isEmpty == true { unitsByEndpointNamespace[ns] = nil }
            }
            for ns in Self.exportKeys(old) {
                unitsByExport[ns]?.remove(host)
                if unitsByExport[ns]?.isEmpty == true { unitsByExport[ns] = nil }
            }
        }
        units[host] = compileUnit(host)
        if let unit = units[host] { index(unit) }
    }

    /// Files a unit under the namespaces of its endpoints and those it is exported to.
    mutating func index(_ unit: ServiceUnit) {
        for ns in unit.endpointNamespaces { unitsByEndpointNamespace[ns, default: []].insert(unit.host) }
        for ns in Self.exportKeys(unit) { unitsByExport[ns, default: []].insert(unit.host) }
    }

    /// The namespaces a unit is exported to (`.` resolved), or `*` for every namespace.
    static func exportKeys(_ unit: ServiceUnit) -> [String] {
        if unit.exportTo.isEmpty || unit.exportTo.contains("*") { return ["*"] }
        return unit.exportTo.map { $0 == "." ? unit.namespace : $0 }
    }

    /// Hosts of the units a node of `scope` sees (as ``isVisible(_:to:)``), from the indexes rather than every unit.
    func visibleUnitHosts(to scope: NodeScope) -> Set<String> {
        var hosts = Set(scope.gatewayHosts.filter { units[$0] != nil })
        guard !scope.namespaces.isEmpty else { return hosts }
        hosts.formUnion(unitsByExport["*"] ?? [])
        for ns in scope.namespaces { hosts.formUnion(unitsByExport[ns] ?? []) }
        return hosts
    }

    /// Compiles many units on all cores: each unit reads the shared indexes and nothing else.
    func compileUnits(_ hosts: [String]) -> [ServiceUnit?] {
        let workers = min(ProcessInfo.processInfo.activeProcessorCount, hosts.count / 512)
        if workers <= 1 { return hosts.map(compileUnit) }
        var out = [ServiceUnit?](repeating: nil, count: hosts.count)
        out.withUnsafeMutableBufferPointer { buffer in
            // Each worker writes its own contiguous slice; no two touch the same element.
            nonisolated(unsafe) let slots = buffer
            DispatchQueue.concurrentPerform(iterations: workers) { w in
                let chunk = (hosts.count + workers - 1) / workers
                for i in (w * chunk)..<min(hosts.count, (w + 1) * chunk) { slots[i] = compileUnit(hosts[i]) }
            }
        }
        return out
    }

    func isVisible(_ unit: ServiceUnit, to scope: NodeScope) -> Bool {
        scope.gatewayHosts.contains(unit.host)
            || Self.isExported(unit.exportTo, from: unit.namespace, toAnyOf: scope.namespaces)
    }

    /// Istio's `exportTo`: empty or `*` is every namespace, `.` the resource's own.
    static func isExported(_ exportTo: [String], from namespace: String, toAnyOf namespaces: Set<String>) -> Bool {
        if namespaces.isEmpty { return false }
        if exportTo.isEmpty || exportTo.contains("*") { return true }
        return exportTo.contains { namespaces.contains($0 == "." ? namespace : $0) }
    }

    private func compileUnit(_ host: String) -> ServiceUnit? {
        guard let seKeys = serviceEntriesByHost[host]?.sorted(), let seResource = resources[seKeys[0]],
            case .serviceEntry(let se) = seResource.spec
        else { return nil }
        var problems: [Diagnostic] = []
        for extra in seKeys.dropFirst() {
            guard let r = resources[extra] else { continue }
            problems.append(Self.error(r, "spec.hosts", "host '\(host)' is already defined by \(seKeys[0])",
                                       hint: "define each host in one ServiceEntry", code: .conflictingResource))
        }
        let drKeys = destinationRulesByHost[host]?.sorted() ?? []
        var dr: DestinationRule?
        if let first = drKeys.first, case .destinationRule(let d)? = resources[first]?.spec { dr = d }
        for extra in drKeys.dropFirst() {
            guard let r = resources[extra] else { continue }
            problems.append(Self.warning(r, "spec.host", "ignored: \(host) already has \(drKeys[0])",
                                         hint: "merge the two DestinationRules into one", code: .conflictingResource))
        }
        var healthCheck: HealthCheck?
        if let k = healthChecksByHost[host]?.min(), case .healthCheck(let hc)? = resources[k]?.spec { healthCheck = hc }
        let namespace = seResource.metadata.namespace

        // Candidate endpoints: inline ones, then the WorkloadEntries the selector picks.
        var candidates: [Candidate] = []
        for (i, e) in se.endpoints.enumerated() {
            guard let ip = IPAddress(e.address) else {
                if se.resolution == .dns || se.resolution == .dnsRoundRobin {
                    problems.append(Self.warning(seResource, "spec.endpoints[\(i)].address",
                                                 "'\(e.address)' is a DNS name; this version does not resolve endpoint names, so it gets no traffic",
                                                 hint: "list the endpoint's IP address", code: .unreachableEndpoint))
                } else {
                    problems.append(Self.error(seResource, "spec.endpoints[\(i)].address",
                                               "endpoint address '\(e.address)' is not an IP", hint: "name endpoints by IP address"))
                }
                continue
            }
            candidates.append(Candidate(entry: e, ip: ip, workload: nil, identity: nil))
        }
        var endpointNamespaces: Set<String> = []
        var selected: [WorkloadInfo] = []
        if let selector = se.workloadSelector {
            endpointNamespaces.insert(namespace)
            selected = workloads.matching(selector, in: namespace)
            for w in selected {
                guard let ip = IPAddress(w.entry.address) else {
                    if let r = resources[w.resource] {
                        problems.append(Self.error(r, "spec.address", "'\(w.entry.address)' is not an IP address",
                                                   hint: "a WorkloadEntry needs the workload's IP address"))
                    }
                    continue
                }
                candidates.append(Candidate(entry: w.entry, ip: ip, workload: w,
                                            identity: identity(namespace: namespace, serviceAccount: w.entry.serviceAccount)))
            }
        }

        var items: [SnapshotItem] = [.service(.init(host: host, namespace: namespace, addresses: se.addresses,
                                                    ports: se.ports, location: se.location, resolution: se.resolution))]
        let topPolicy = dr?.trafficPolicy ?? TrafficPolicy()
        for port in se.ports {
            // Every endpoint of the port once; subsets pick from these by label.
            var allEndpoints = candidates.map { c in
                let target = c.entry.ports[port.name] ?? port.targetPort ?? port.number
                var e = NodeSnapshot.Endpoint(
                    address: EndpointAddress(ip: c.ip, port: target),
                    weight: UInt32(c.entry.weight ?? 1), labels: c.entry.labels, node: c.workload?.node,
                    identity: c.identity)
                // A workload whose PeerAuthentication is DISABLE on the port takes plaintext (Istio's auto mTLS).
                if let w = c.workload {
                    let (mode, ports) = peerAuthentication(namespace: w.resource.namespace, labels: w.entry.labels)
                    if (ports[target] ?? mode) == .disable { e.plaintext = true }
                }
                return e
            }
            allEndpoints.sort { ($0.address, $0.weight) < ($1.address, $1.weight) }
            let subsets = dr?.subsets ?? []
            for si in -1..<subsets.count {
                let subset = si < 0 ? nil : subsets[si]
                let policy = topPolicy.overlaid(by: subset?.trafficPolicy)
                let endpoints = subset.map { s in
                    allEndpoints.filter { e in s.labels.allSatisfy { e.labels[$0.key] == $0.value } }
                } ?? allEndpoints
                items.append(.cluster(.init(
                    name: NodeSnapshot.Cluster.name(port: port.number, subset: subset?.name, host: host), serviceHost: host,
                    servicePort: port.number, subset: subset?.name, protocol: port.protocol, endpoints: endpoints,
                    loadBalancer: policy.loadBalancer ?? .simple(.roundRobin), outlierDetection: policy.outlierDetection,
                    connectTimeout: policy.connectionPool?.connectTimeout ?? mesh.connectTimeout,
                    idleTimeout: policy.connectionPool?.idleTimeout ?? mesh.tcpIdleTimeout,
                    maxConnections: policy.connectionPool?.maxConnections, httpPool: policy.connectionPool?.http,
                    tls: policy.tls, healthCheck: healthCheck)))
            }
            // The addresses belong to the ServiceEntry, not to each of its hosts: one map entry, from its first host.
            for vip in se.hosts.first == host ? se.addresses : [] {
                guard let ip = IPAddress(vip) else { continue }  // a CIDR range: matched by the agent, not the map
                let action = kernelAction(host: host, port: port, entry: se, rule: dr, policy: topPolicy,
                                          healthCheck: healthCheck, endpoints: allEndpoints,
                                          workloads: selected)
                items.append(.bpfService(.init(address: EndpointAddress(ip: ip, port: port.number),
                                               protocol: port.protocol == .udp ? .udp : .tcp, host: host,
                                               action: action)))
            }
        }
        for k in rateLimitsByHost[host]?.sorted() ?? [] {
            guard let r = resources[k], case .rateLimitPolicy(let rl) = r.spec else { continue }
            items.append(.rateLimit(Named(namespace: k.namespace, name: k.name, spec: rl)))
        }
        return ServiceUnit(host: host, namespace: namespace, exportTo: se.exportTo, items: items, keys: items.map(\.key),
                           endpointNamespaces: endpointNamespaces, problems: problems)
    }

    /// Decides whether the kernel may balance connections to one service port on its own (DESIGN.md, step 2),
    /// and if not, says why.
    private func kernelAction(host: String, port: ServicePort, entry se: ServiceEntry, rule: DestinationRule?,
                              policy: TrafficPolicy, healthCheck: HealthCheck?, endpoints: [NodeSnapshot.Endpoint],
                              workloads: [WorkloadInfo]) -> NodeSnapshot.BPFService.Action {
        switch port.protocol {
        case .http, .http2, .grpc:
            return .proxy(reason: "port \(port.number) speaks \(port.protocol.rawValue); the L7 proxy serves it")
        default: break
        }
        if let vs = virtualServicesByHost[host]?.min() {
            return .proxy(reason: "\(vs) routes \(host)")
        }
        if let rule {
            if !rule.subsets.isEmpty { return .proxy(reason: "its DestinationRule defines subsets") }
            if policy.outlierDetection != nil { return .proxy(reason: "its DestinationRule sets outlierDetection") }
            if policy.connectionPool?.maxConnections != nil {
                return .proxy(reason: "its DestinationRule limits connections")
            }
            if let mode = policy.tls?.mode, mode != .disable {
                return .proxy(reason: "its DestinationRule originates TLS (\(mode.rawValue))")
            }
        }
        if healthCheck != nil { return .proxy(reason: "it has active health checks") }
        if se.resolution == .dns || se.resolution == .dnsRoundRobin {
            return .proxy(reason: "resolution \(se.resolution.rawValue) needs the agent to resolve names")
        }
        if endpoints.isEmpty { return .proxy(reason: "it has no endpoints; the agent answers with a reset and a metric") }
        if endpoints.count > Self.maxKernelBackends {
            return .proxy(reason: "\(endpoints.count) endpoints exceed the map's \(Self.maxKernelBackends)")
        }
        // A selector picks workloads of the ServiceEntry's own namespace: one policy list serves them all.
        if let ns = workloads.first?.resource.namespace {
            let keys = policyKeys(for: ns)
            for w in workloads where !keys.isEmpty {
                if let reason = policyNeedingAgent(keys, namespace: ns, labels: w.entry.labels, port: port) {
                    return .proxy(reason: reason)
                }
            }
        }
        let lb: NodeSnapshot.BPFService.LoadBalancing
        if case .consistentHash? = policy.loadBalancer { lb = .maglev } else { lb = .random }
        return .balance(loadBalancing: lb, backends: endpoints.map { .init(address: $0.address, weight: $0.weight) })
    }

    /// The first policy that makes traffic to this workload need the agent: authorization, JWT, or strict mTLS.
    private func policyNeedingAgent(_ keys: [ResourceKey], namespace: String, labels: [String: String],
                                    port: ServicePort) -> String? {
        for k in keys {
            guard let r = resources[k], policy(r, selects: namespace, labels: labels) else { continue }
            switch r.spec {
            case .authorizationPolicy(let p):
                // Rules on connection attributes are checked by the kernel at connect() (the agent writes the
                // decisions for the node's callers); rules on the request need the proxy.
                if p.needsRequest { return "\(k) authorizes its workloads' requests" }
            case .requestAuthentication: return "\(k) checks JWTs for its workloads"
            case .peerAuthentication(let pa):
                if (pa.portLevel[port.number] ?? pa.mode) == .strict { return "\(k) requires mutual TLS" }
            default: break
            }
        }
        return nil
    }

    /// Policy keys that may apply in `namespace`: its own and the root namespace's, in key order.
    func policyKeys(for namespace: String) -> [ResourceKey] {
        var keys = policiesByNamespace[namespace] ?? []
        if namespace != mesh.rootNamespace { keys.formUnion(policiesByNamespace[mesh.rootNamespace] ?? []) }
        return keys.sorted()
    }

    /// Istio's selection: a policy without selector covers its namespace (the root namespace's: the mesh); one
    /// with a selector covers matching workloads of its namespace (the root namespace's: of every namespace).
    func policy(_ r: Resource, selects namespace: String, labels: [String: String]) -> Bool {
        let selector: [String: String]?
        switch r.spec {
        case .authorizationPolicy(let p): selector = p.selector
        case .peerAuthentication(let p): selector = p.selector
        case .requestAuthentication(let p): selector = p.selector
        default: return false
        }
        let inRoot = r.metadata.namespace == mesh.rootNamespace
        guard inRoot || r.metadata.namespace == namespace else { return false }
        guard let selector else { return true }
        return selector.allSatisfy { labels[$0.key] == $0.value }
    }
}
