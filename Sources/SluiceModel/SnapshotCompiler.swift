/// Compiles the mesh configuration into the snapshot one node serves (Pilot's job).
///
/// Deterministic: resources are taken in a canonical order, so the same input gives the same snapshot.
public struct SnapshotCompiler: Sendable {

    public init() {}

    public func compile(_ resources: [Resource]) throws(ConfigErrors) -> NodeSnapshot {
        var problems: [Diagnostic] = []
        let sorted = resources.sorted { ($0.kind.rawValue, $0.metadata.namespace, $0.metadata.name) <
            ($1.kind.rawValue, $1.metadata.namespace, $1.metadata.name) }

        var serviceEntries: [String: (Resource, ServiceEntry)] = [:]
        var destinationRules: [String: DestinationRule] = [:]
        var healthChecks: [String: HealthCheck] = [:]
        var workloadEntries: [(Resource, WorkloadEntry)] = []
        var meshConfigResource: Resource?
        for r in sorted {
            switch r.spec {
            case .serviceEntry(let se):
                for h in se.hosts {
                    if serviceEntries[h] != nil {
                        problems.append(err(r, "spec.hosts", "host '\(h)' is already defined by another ServiceEntry"))
                    }
                    serviceEntries[h] = (r, se)
                }
            case .destinationRule(let dr): destinationRules[dr.host] = dr
            case .healthCheck(let hc): healthChecks[hc.host] = hc
            case .workloadEntry(let we): workloadEntries.append((r, we))
            case .meshConfig:
                if let first = meshConfigResource {
                    problems.append(err(r, "", "a second MeshConfig (the first is \(first.reference) in \(first.source.file))",
                                        hint: "keep one MeshConfig for the mesh"))
                }
                meshConfigResource = r
            default: break
            }
        }

        var mesh = MeshConfig.defaults
        if case .meshConfig(let m)? = meshConfigResource?.spec { mesh = m }
        var clusters: [NodeSnapshot.Cluster] = []
        var clusterIndex: [String: Int] = [:]
        func cluster(for dest: VirtualService.Destination, from r: Resource, path: String) -> Int? {
            guard let (seResource, se) = serviceEntries[dest.host] else {
                problems.append(err(r, "\(path).destination.host", "no ServiceEntry defines host '\(dest.host)'",
                                    hint: "add a ServiceEntry with hosts: [\(dest.host)] and its endpoints"))
                return nil
            }
            let port: ServicePort
            if let n = dest.port {
                guard let p = se.ports.first(where: { $0.number == n }) else {
                    problems.append(err(r, "\(path).destination.port", "\(dest.host) has no port \(n)",
                                        hint: "ports of \(dest.host): \(se.ports.map { String($0.number) }.joined(separator: ", "))"))
                    return nil
                }
                port = p
            } else {
                guard se.ports.count == 1 else {
                    problems.append(err(r, "\(path).destination.port", "\(dest.host) has several ports; name one",
                                        hint: "set destination.port.number"))
                    return nil
                }
                port = se.ports[0]
            }
            let dr = destinationRules[dest.host]
            var policy = dr?.trafficPolicy ?? TrafficPolicy()
            var subsetLabels: [String: String] = [:]
            if let subsetName = dest.subset {
                guard let subset = dr?.subsets.first(where: { $0.name == subsetName }) else {
                    problems.append(err(r, "\(path).destination.subset",
                                        "subset '\(subsetName)' of \(dest.host) is not defined by any DestinationRule",
                                        hint: "add it under spec.subsets of the DestinationRule for \(dest.host)"))
                    return nil
                }
                subsetLabels = subset.labels
                policy = policy.overlaid(by: subset.trafficPolicy)
            }
            let name = "outbound|\(port.number)|\(dest.subset ?? "")|\(dest.host)"
            if let i = clusterIndex[name] { return i }

            var candidates = se.endpoints
            if let selector = se.workloadSelector {
                candidates += workloadEntries.filter { e in
                    e.0.metadata.namespace == seResource.metadata.namespace
                        && selector.allSatisfy { e.1.labels[$0.key] == $0.value }
                }.map(\.1)
            }
            var endpoints: [NodeSnapshot.Endpoint] = []
            for e in candidates where subsetLabels.allSatisfy({ e.labels[$0.key] == $0.value }) {
                guard let ip = IPAddress(e.address) else {
                    problems.append(err(seResource, "spec.endpoints", "endpoint address '\(e.address)' is not an IP",
                                        hint: "name endpoints by IP address"))
                    continue
                }
                let targetPort = e.ports[port.name] ?? port.targetPort ?? port.number
                endpoints.append(.init(address: EndpointAddress(ip: ip, port: targetPort),
                                       weight: UInt32(e.weight ?? 1), labels: e.labels))
            }
            endpoints.sort { ($0.address.description, $0.weight) < ($1.address.description, $1.weight) }
            let c = NodeSnapshot.Cluster(
                name: name, serviceHost: dest.host, servicePort: port.number, endpoints: endpoints,
                loadBalancer: policy.loadBalancer ?? .simple(.roundRobin),
                outlierDetection: policy.outlierDetection,
                connectTimeout: policy.connectionPool?.connectTimeout ?? mesh.connectTimeout,
                idleTimeout: policy.connectionPool?.idleTimeout ?? mesh.tcpIdleTimeout,
                maxConnections: policy.connectionPool?.maxConnections,
                healthCheck: healthChecks[dest.host])
            clusters.append(c)
            clusterIndex[name] = clusters.count - 1
            return clusters.count - 1
        }

        var listeners: [NodeSnapshot.Listener] = []
        var boundPorts: Set<EndpointAddress> = []
        for gwResource in sorted {
            guard case .gateway(let gw) = gwResource.spec else { continue }
            let gwNames: Set<String> = [gwResource.metadata.name,
                                        "\(gwResource.metadata.namespace)/\(gwResource.metadata.name)"]
            for (si, server) in gw.servers.enumerated() where server.port.protocol.isL4 {
                let addr = EndpointAddress(ip: IPAddress(server.bind ?? "0.0.0.0")!, port: server.port.number)
                if !boundPorts.insert(addr).inserted {
                    problems.append(err(gwResource, "spec.servers[\(si)].port", "\(addr) is declared by two servers"))
                    continue
                }
                var chosen: [WeightedCluster]?
                search: for vsResource in sorted {
                    guard case .virtualService(let vs) = vsResource.spec,
                        vs.gateways.contains(where: { gwNames.contains($0) || gwNames.contains("\(vsResource.metadata.namespace)/\($0)") })
                    else { continue }
                    for (ti, route) in vs.tcp.enumerated() {
                        let matches = route.match.isEmpty || route.match.contains { m in
                            (m.port == nil || m.port == server.port.number)
                                && (m.gateways.isEmpty || m.gateways.contains { gwNames.contains($0) })
                        }
                        guard matches else { continue }
                        var picks: [WeightedCluster] = []
                        for (di, d) in route.route.enumerated() {
                            if let c = cluster(for: d.destination, from: vsResource, path: "spec.tcp[\(ti)].route[\(di)]") {
                                picks.append(WeightedCluster(cluster: c, weight: d.weight ?? 100))
                            }
                        }
                        chosen = picks
                        break search
                    }
                }
                guard let routes = chosen else {
                    problems.append(Diagnostic(.warning, file: gwResource.source.file, line: gwResource.source.line,
                                               resource: gwResource.reference, path: "spec.servers[\(si)]",
                                               message: "no VirtualService tcp route serves port \(server.port.number); no listener is opened",
                                               hint: "bind a VirtualService to this gateway with a tcp route"))
                    continue
                }
                if routes.isEmpty { continue }
                listeners.append(.init(name: "\(gwResource.metadata.namespace)/\(gwResource.metadata.name):\(server.port.number)",
                                       address: addr, protocol: server.port.protocol, routes: routes))
            }
        }
        checkHTTPDestinations(sorted, destinationRules: destinationRules, serviceEntries: Set(serviceEntries.keys),
                              into: &problems)
        if problems.contains(where: { $0.severity == .error }) { throw ConfigErrors(problems) }
        return NodeSnapshot(listeners: listeners, clusters: clusters)
    }

    typealias WeightedCluster = NodeSnapshot.WeightedCluster

    /// HTTP destinations (routes and mirrors) must name subsets their DestinationRule defines (istioctl analyze's
    /// IST0101). A host no ServiceEntry defines is only a warning: on Kubernetes it may be a Service.
    private func checkHTTPDestinations(_ resources: [Resource], destinationRules: [String: DestinationRule],
                                       serviceEntries: Set<String>, into problems: inout [Diagnostic]) {
        for r in resources {
            guard case .virtualService(let vs) = r.spec else { continue }
            for (hi, route) in vs.http.enumerated() {
                var dests = route.route.enumerated().map { ("spec.http[\(hi)].route[\($0.offset)].destination", $0.element.destination) }
                if let m = route.mirror { dests.append(("spec.http[\(hi)].mirror", m)) }
                for (path, d) in dests {
                    if let subset = d.subset, !(destinationRules[d.host]?.subsets.contains { $0.name == subset } ?? false) {
                        problems.append(err(r, "\(path).subset",
                                            "subset '\(subset)' of \(d.host) is not defined by any DestinationRule",
                                            hint: "add it under spec.subsets of the DestinationRule for \(d.host)"))
                    }
                    if !serviceEntries.contains(d.host) && !d.host.hasSuffix(".svc.cluster.local") {
                        problems.append(Diagnostic(.warning, file: r.source.file, line: r.source.line, resource: r.reference,
                                                   path: "\(path).host", message: "no ServiceEntry defines host '\(d.host)'",
                                                   hint: "add a ServiceEntry, or check the host name"))
                    }
                }
            }
        }
    }

    private func err(_ r: Resource, _ path: String, _ message: String, hint: String? = nil) -> Diagnostic {
        Diagnostic(.error, file: r.source.file, line: r.source.line, resource: r.reference, path: path,
                   message: message, hint: hint)
    }
}
