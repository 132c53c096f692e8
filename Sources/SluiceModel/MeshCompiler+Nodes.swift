/// What a node reaches: the namespaces of its workloads (for `exportTo`), and the gateways it runs with the hosts
/// their routes name.
struct NodeScope: Sendable, Hashable {
    var namespaces: Set<String> = []
    var gateways: Set<String> = []
    var gatewayHosts: Set<String> = []
    var isEmpty: Bool { namespaces.isEmpty && gateways.isEmpty }
}

/// The parts of a snapshot that belong to one node: workloads, gateway listeners, policies, and its scope.
struct NodeLocal {
    var items: [SnapshotItem] = []
    var scope = NodeScope()
}

/// One Gateway's compiled listeners (the same on every node it runs on).
struct GatewayProduct: Sendable, Hashable {
    /// The only node it runs on, when annotated.
    var node: String?
    var listeners: [NodeSnapshot.Listener]
    var hosts: Set<String>
    var problems: [Diagnostic]
}

extension MeshCompiler {
    func nodeLocal(_ node: String) -> NodeLocal {
        var local = NodeLocal()
        let runs = workloads.on(node: node)
        var policies: Set<ResourceKey> = []
        for w in runs {
            let ns = w.resource.namespace
            // The AuthorizationPolicies selecting the workload are named on it: its inbound tunnel streams are
            // checked against them.
            var authorization: [String] = [], authentication: [String] = []
            for k in policyKeys(for: ns) {
                guard let r = resources[k], policy(r, selects: ns, labels: w.entry.labels) else { continue }
                policies.insert(k)
                if case .authorizationPolicy = r.spec { authorization.append("\(k.namespace)/\(k.name)") }
                if case .requestAuthentication = r.spec { authentication.append("\(k.namespace)/\(k.name)") }
            }
            let (mode, portModes) = peerAuthentication(namespace: ns, labels: w.entry.labels)
            var item = NodeSnapshot.Workload(
                namespace: ns, name: w.resource.name, address: w.entry.address, labels: w.entry.labels,
                serviceAccount: w.entry.serviceAccount ?? "default",
                identity: identity(namespace: ns, serviceAccount: w.entry.serviceAccount), ports: w.entry.ports,
                cgroup: w.cgroup, unit: w.unit)
            item.authorizationPolicies = authorization.sorted()
            item.requestAuthentications = authentication.sorted()
            item.peerAuthentication = mode
            item.peerAuthenticationPorts = portModes
            local.items.append(.workload(item))
        }
        let running = gatewaysRunning(on: node)
        // Authorization and request authentication that select a gateway running here (by its selector's labels)
        // apply to its listeners, which name them.
        var gatewayPolicies: [ResourceKey: (authorization: [String], authentication: [String])] = [:]
        for (k, _) in running {
            guard let r = resources[k], case .gateway(let gw) = r.spec else { continue }
            var selected: (authorization: [String], authentication: [String]) = ([], [])
            for pk in policyKeys(for: k.namespace) {
                guard let p = resources[pk], policy(p, selects: k.namespace, labels: gw.selector) else { continue }
                switch p.spec {
                case .authorizationPolicy: selected.authorization.append("\(pk.namespace)/\(pk.name)")
                case .requestAuthentication: selected.authentication.append("\(pk.namespace)/\(pk.name)")
                default: continue
                }
                policies.insert(pk)
            }
            gatewayPolicies[k] = selected
        }
        for k in policies.sorted() {
            guard let r = resources[k] else { continue }
            switch r.spec {
            case .authorizationPolicy(let p): local.items.append(.authorizationPolicy(Named(namespace: k.namespace, name: k.name, spec: p)))
            case .peerAuthentication(let p): local.items.append(.peerAuthentication(Named(namespace: k.namespace, name: k.name, spec: p)))
            case .requestAuthentication(let p):
                local.items.append(.requestAuthentication(Named(namespace: k.namespace, name: k.name, spec: p)))
            default: break
            }
        }
        local.scope = Self.scope(namespaces: Set(runs.map(\.resource.namespace)), gateways: running)
        var bound: Set<EndpointAddress> = []
        for (k, product) in running {
            // Two gateways on one node cannot bind one address; the first in key order keeps it.
            for var l in product.listeners where bound.insert(l.address).inserted {
                l.authorizationPolicies = gatewayPolicies[k]?.authorization ?? []
                l.requestAuthentications = gatewayPolicies[k]?.authentication ?? []
                local.items.append(.listener(l))
            }
        }
        return local
    }

    /// The PeerAuthentication in effect for a workload, by Istio's precedence: the first (in key order) selecting
    /// it, else its namespace's, else the mesh's (root namespace, no selector); UNSET defers to the next; PERMISSIVE
    /// when none sets one. Its ports' own modes come from the selecting policy's `portLevelMtls`.
    func peerAuthentication(namespace ns: String, labels: [String: String]) -> (PeerAuthentication.Mode, [UInt16: PeerAuthentication.Mode]) {
        var own: PeerAuthentication?
        var namespaceMode = PeerAuthentication.Mode.unset, meshMode = PeerAuthentication.Mode.unset
        for k in policyKeys(for: ns) {
            guard let r = resources[k], case .peerAuthentication(let p) = r.spec, policy(r, selects: ns, labels: labels) else { continue }
            if p.selector != nil {
                if own == nil { own = p }
            } else if k.namespace == ns && ns != mesh.rootNamespace {
                if namespaceMode == .unset { namespaceMode = p.mode }
            } else if meshMode == .unset {
                meshMode = p.mode
            }
        }
        let mode = [own?.mode ?? .unset, namespaceMode, meshMode].first { $0 != .unset } ?? .permissive
        return (mode, (own?.portLevel ?? [:]).mapValues { $0 == .unset ? mode : $0 })
    }

    /// The SPIFFE identities of the workloads that run on `node` (what the CA may sign for it), without
    /// compiling the node's snapshot.
    public func workloadIdentities(on node: String) -> Set<String> {
        Set(workloads.on(node: node).map { identity(namespace: $0.resource.namespace, serviceAccount: $0.entry.serviceAccount) })
    }

    /// Just the scope of `node` (what ``nodeLocal(_:)`` computes, without building the items).
    func nodeScope(_ node: String) -> NodeScope {
        Self.scope(namespaces: workloads.namespaces(on: node), gateways: gatewaysRunning(on: node))
    }

    /// The gateways that run on `node`, in key order, with their compiled listeners.
    func gatewaysRunning(on node: String) -> [(ResourceKey, GatewayProduct)] {
        gatewayKeys.sorted().compactMap { k in
            guard let gw = resources[k], gatewayRuns(gw, on: node), let product = gatewayProducts[k] else { return nil }
            return (k, product)
        }
    }

    static func scope(namespaces: Set<String>, gateways: [(ResourceKey, GatewayProduct)]) -> NodeScope {
        var scope = NodeScope(namespaces: namespaces)
        for (k, product) in gateways {
            scope.gateways.insert("\(k.namespace)/\(k.name)")
            scope.gatewayHosts.formUnion(product.hosts)
        }
        return scope
    }

    /// A Gateway runs on the node its `sluice.dev/node` annotation names; else on nodes running a workload its
    /// selector matches; a Gateway with neither runs on every node.
    func gatewayRuns(_ r: Resource, on node: String) -> Bool {
        if let only = r.metadata.annotations[SluiceAnnotation.node] { return only == node }
        guard case .gateway(let gw) = r.spec else { return false }
        if gw.selector.isEmpty { return true }
        return workloads.on(node: node).contains { w in gw.selector.allSatisfy { w.entry.labels[$0.key] == $0.value } }
    }

    /// Compiles one Gateway's listeners: an HTTP server becomes an HTTP listener routed per request by the
    /// VirtualServices bound to the gateway; a TCP/TLS server takes the first tcp route (in VirtualService key
    /// order) bound to the gateway that matches its port.
    mutating func recompileGateway(_ key: ResourceKey) {
        guard let r = resources[key], case .gateway(let gw) = r.spec else {
            gatewayProducts[key] = nil
            return
        }
        var problems: [Diagnostic] = []
        var listeners: [NodeSnapshot.Listener] = []
        var hosts: Set<String> = []
        var bound: Set<EndpointAddress> = []
        let ref = "\(key.namespace)/\(key.name)"
        let bindings = (virtualServicesByGateway[ref] ?? []).sorted()
        for (si, server) in gw.servers.enumerated() {
            let addr = EndpointAddress(ip: IPAddress(server.bind ?? "0.0.0.0")!, port: server.port.number)
            let certificate = Self.terminatedTLS(server)
            if !bound.insert(addr).inserted {
                // HTTPS servers on one port share it: the client's SNI picks the certificate.
                if let certificate, let k = listeners.firstIndex(where: { $0.address == addr && !$0.tls.isEmpty }) {
                    listeners[k].tls.append(certificate)
                    continue
                }
                problems.append(Self.error(r, "spec.servers[\(si)].port", "\(addr) is declared by two servers",
                                           hint: "only HTTPS servers that terminate TLS can share a port (by SNI)",
                                           code: .conflictingResource))
                continue
            }
            let where_ = server.bind.map { "\($0):\(server.port.number)" } ?? "\(server.port.number)"
            if !server.port.protocol.isL4 {
                // HTTP servers route each request with the VirtualServices bound to the gateway.
                let httpHosts = httpDestinationHosts(bindings, port: server.port.number, gateway: ref)
                if httpHosts == nil {
                    problems.append(Self.warning(r, "spec.servers[\(si)]",
                                                 "no VirtualService http route is bound to this gateway; every request gets 404",
                                                 hint: "bind a VirtualService with gateways: [\(ref)] and http routes",
                                                 code: .unroutedGatewayServer))
                }
                hosts.formUnion(httpHosts ?? [])
                if server.port.protocol == .https && certificate == nil {
                    problems.append(Self.error(r, "spec.servers[\(si)].tls.mode",
                                               "an HTTPS server routes requests only once it terminates TLS",
                                               hint: "use mode SIMPLE or MUTUAL with a certificate, or protocol TLS for passthrough"))
                    continue
                }
                var listener = NodeSnapshot.Listener(name: "\(key.namespace)/\(key.name):\(where_)", address: addr,
                                                     protocol: server.port.protocol, routes: [], gateway: ref,
                                                     tls: certificate.map { [$0] } ?? [],
                                                     httpsRedirect: server.tls?.httpsRedirect == true && certificate == nil)
                listener.workloadLabels = gw.selector
                listeners.append(listener)
                continue
            }
            var chosen: [NodeSnapshot.WeightedCluster]?
            search: for vsKey in bindings {
                guard let vsResource = resources[vsKey], case .virtualService(let vs) = vsResource.spec else { continue }
                for (ti, route) in vs.tcp.enumerated() {
                    let matches = route.match.isEmpty || route.match.contains { m in
                        (m.port == nil || m.port == server.port.number)
                            && (m.gateways.isEmpty || Set(m.gateways.map {
                                $0.contains("/") ? $0 : "\(vsKey.namespace)/\($0)"
                            }).contains(ref))
                    }
                    guard matches else { continue }
                    var picks: [NodeSnapshot.WeightedCluster] = []
                    for (di, d) in route.route.enumerated() {
                        let path = "spec.tcp[\(ti)].route[\(di)].destination"
                        if let name = clusterName(for: d.destination, from: vsResource, path: path, problems: &problems) {
                            picks.append(.init(cluster: name, weight: d.weight ?? 100))
                            hosts.insert(d.destination.host)
                        }
                    }
                    chosen = picks
                    break search
                }
            }
            guard let routes = chosen else {
                problems.append(Self.warning(r, "spec.servers[\(si)]",
                                             "no VirtualService tcp route serves port \(server.port.number); no listener is opened",
                                             hint: "bind a VirtualService to this gateway with a tcp route",
                                             code: .unroutedGatewayServer))
                continue
            }
            if routes.isEmpty { continue }
            listeners.append(.init(name: "\(key.namespace)/\(key.name):\(where_)", address: addr,
                                   protocol: server.port.protocol, routes: routes, gateway: ref))
        }
        gatewayProducts[key] = GatewayProduct(node: r.metadata.annotations[SluiceAnnotation.node],
                                              listeners: listeners, hosts: hosts, problems: problems)
    }

    /// The certificate a server presents when it terminates TLS (modes SIMPLE, MUTUAL, OPTIONAL_MUTUAL).
    static func terminatedTLS(_ server: Gateway.Server) -> NodeSnapshot.ServerCertificate? {
        guard let t = server.tls, [.simple, .mutual, .optionalMutual].contains(t.mode) else { return nil }
        return .init(hosts: server.hosts.map { $0.split(separator: "/").last.map(String.init) ?? $0 }, mode: t.mode,
                     credentialName: t.credentialName, certificateChain: t.serverCertificate, privateKey: t.privateKey,
                     caCertificates: t.caCertificates, minProtocolVersion: t.minProtocolVersion,
                     maxProtocolVersion: t.maxProtocolVersion, cipherSuites: t.cipherSuites)
    }

    /// Hosts the http routes of `bindings` send to through `gateway`'s server on `port`; nil when no http route
    /// applies there.
    func httpDestinationHosts(_ bindings: [ResourceKey], port: UInt16, gateway: String) -> Set<String>? {
        var hosts: Set<String>?
        for k in bindings {
            guard let vsr = resources[k], case .virtualService(let vs) = vsr.spec else { continue }
            for route in vs.http {
                let applies = route.match.isEmpty || route.match.contains { m in
                    (m.port == nil || m.port == port)
                        && (m.gateways.isEmpty || m.gateways.contains { ($0.contains("/") ? $0 : "\(k.namespace)/\($0)") == gateway })
                }
                guard applies else { continue }
                hosts = hosts ?? []
                for d in route.route { hosts!.insert(d.destination.host) }
                if let m = route.mirror { hosts!.insert(m.host) }
            }
        }
        return hosts
    }

    /// The cluster a route destination names, or nil with an error that says which part is missing.
    func clusterName(for dest: VirtualService.Destination, from r: Resource, path: String,
                     problems: inout [Diagnostic]) -> String? {
        guard let seKey = serviceEntriesByHost[dest.host]?.min(), case .serviceEntry(let se)? = resources[seKey]?.spec
        else {
            problems.append(Self.error(r, "\(path).host", "no ServiceEntry defines host '\(dest.host)'",
                                       hint: "add a ServiceEntry with hosts: [\(dest.host)] and its endpoints",
                                       code: .referencedResourceNotFound))
            return nil
        }
        let port: UInt16
        if let n = dest.port {
            guard se.ports.contains(where: { $0.number == n }) else {
                problems.append(Self.error(r, "\(path).port", "\(dest.host) has no port \(n)",
                                           hint: "ports of \(dest.host): \(se.ports.map { String($0.number) }.joined(separator: ", "))",
                                           code: .referencedResourceNotFound))
                return nil
            }
            port = n
        } else {
            guard se.ports.count == 1 else {
                problems.append(Self.error(r, "\(path).port", "\(dest.host) has several ports; name one",
                                           hint: "set destination.port.number"))
                return nil
            }
            port = se.ports[0].number
        }
        if let subset = dest.subset, !hasSubset(subset, host: dest.host) {
            problems.append(Self.undefinedSubset(subset, host: dest.host, r: r, path: path))
            return nil
        }
        return NodeSnapshot.Cluster.name(port: port, subset: dest.subset, host: dest.host)
    }

    func hasSubset(_ name: String, host: String) -> Bool {
        guard let k = destinationRulesByHost[host]?.min(), case .destinationRule(let dr)? = resources[k]?.spec else {
            return false
        }
        return dr.subsets.contains { $0.name == name }
    }

    static func undefinedSubset(_ subset: String, host: String, r: Resource, path: String) -> Diagnostic {
        error(r, "\(path).subset", "Referenced subset \(subset) of \(host) not found",
              hint: "define it under spec.subsets of the DestinationRule for \(host)", code: .referencedResourceNotFound)
    }

    /// Destinations must name subsets their DestinationRule defines (istioctl analyze's IST0101). A host no
    /// ServiceEntry defines is only a warning: on Kubernetes it may be a Service.
    mutating func revalidateVirtualService(_ key: ResourceKey) {
        guard let r = resources[key], case .virtualService(let vs) = r.spec else {
            virtualServiceProblems[key] = nil
            return
        }
        var dests: [(String, VirtualService.Destination)] = []
        for (hi, route) in vs.http.enumerated() {
            dests += route.route.enumerated().map { ("spec.http[\(hi)].route[\($0.offset)].destination", $0.element.destination) }
            if let m = route.mirror { dests.append(("spec.http[\(hi)].mirror", m)) }
        }
        for (ti, route) in vs.tls.enumerated() {
            dests += route.route.enumerated().map { ("spec.tls[\(ti)].route[\($0.offset)].destination", $0.element.destination) }
        }
        let meshBound = vs.gateways.isEmpty || vs.gateways.contains("mesh")
        if meshBound {
            for (ti, route) in vs.tcp.enumerated() {
                dests += route.route.enumerated().map { ("spec.tcp[\(ti)].route[\($0.offset)].destination", $0.element.destination) }
            }
        }
        var problems: [Diagnostic] = []
        for (path, d) in dests {
            if let subset = d.subset, !hasSubset(subset, host: d.host) {
                problems.append(Self.undefinedSubset(subset, host: d.host, r: r, path: path))
            }
            if serviceEntriesByHost[d.host] == nil && !d.host.hasSuffix(".svc.cluster.local") {
                problems.append(Self.warning(r, "\(path).host", "Referenced host \(d.host) not found: no ServiceEntry defines it",
                                             hint: "add a ServiceEntry, or check the host name",
                                             code: .referencedResourceNotFound))
            }
        }
        problems += Self.unreachableRules(vs, r)
        virtualServiceProblems[key] = problems.isEmpty ? nil : problems
    }

    /// Rules no request reaches (istioctl analyze's IST0130): rules are tried in order, so everything after one that
    /// matches every request, and a rule whose matches an earlier rule already has, are dead.
    static func unreachableRules(_ vs: VirtualService, _ r: Resource) -> [Diagnostic] {
        var problems: [Diagnostic] = []
        func check<M: Hashable>(_ field: String, _ rules: [[M]], matchesAll: (M) -> Bool) {
            var seen: [Set<M>: Int] = [:]
            var catchAll: Int?
            for (i, matches) in rules.enumerated() {
                if let c = catchAll {
                    problems.append(warning(r, "spec.\(field)[\(i)]",
                                            "VirtualService rule \(field)[\(i)] is never used: rule \(field)[\(c)] before it matches every request",
                                            hint: "move the rule without matches last, or give it a match",
                                            code: .virtualServiceUnreachableRule))
                    continue
                }
                if matches.isEmpty || matches.contains(where: matchesAll) {
                    catchAll = i
                    continue
                }
                let set = Set(matches)
                if let earlier = seen[set] {
                    problems.append(warning(r, "spec.\(field)[\(i)].match",
                                            "VirtualService rule \(field)[\(i)] is never used: rule \(field)[\(earlier)] has the same matches",
                                            hint: "merge the two rules, or change one's match",
                                            code: .virtualServiceUnreachableRule))
                } else {
                    seen[set] = i
                }
            }
        }
        // Names do not take part in matching.
        let httpRules: [[HTTPMatch]] = vs.http.map { rule in
            rule.match.map { m -> HTTPMatch in
                var m = m
                m.name = nil
                return m
            }
        }
        check("http", httpRules, matchesAll: Self.matchesEveryRequest)
        check("tcp", vs.tcp.map(\.match)) { m in
            m.port == nil && m.destinationSubnets.isEmpty && m.sourceLabels.isEmpty && m.gateways.isEmpty
        }
        return problems
    }

    static func matchesEveryRequest(_ m: HTTPMatch) -> Bool {
        var anyURI = true
        if let uri = m.uri, uri != .prefix("/") { anyURI = false }
        let noConditions = m.headers.isEmpty && m.withoutHeaders.isEmpty && m.queryParams.isEmpty && m.sourceLabels.isEmpty
        let noRequestFields = m.scheme == nil && m.method == nil && m.authority == nil && m.port == nil
        return anyURI && noConditions && noRequestFields && m.gateways.isEmpty
    }

    func virtualServicesVisible(to scope: NodeScope) -> [ResourceKey] {
        if scope.isEmpty { return [] }
        return virtualServiceKeys.filter { k in resources[k].map { isVisible(virtualService: $0, to: scope) } ?? false }
    }

    /// Mesh-bound VirtualServices exported to a namespace of the node's workloads, and those bound to a gateway on
    /// the node.
    func isVisible(virtualService r: Resource, to scope: NodeScope) -> Bool {
        guard case .virtualService(let vs) = r.spec else { return false }
        if (vs.gateways.isEmpty || vs.gateways.contains("mesh"))
            && Self.isExported(vs.exportTo, from: r.metadata.namespace, toAnyOf: scope.namespaces)
        {
            return true
        }
        return !Self.gatewayRefs(vs, namespace: r.metadata.namespace).isDisjoint(with: scope.gateways)
    }

    func virtualServiceItem(_ key: ResourceKey) -> SnapshotItem? { resources[key].flatMap(Self.item) }

    static func item(_ r: Resource) -> SnapshotItem? {
        guard case .virtualService(let vs) = r.spec else { return nil }
        return .virtualService(Named(namespace: r.metadata.namespace, name: r.metadata.name, spec: vs))
    }
}
