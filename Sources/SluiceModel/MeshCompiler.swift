/// Names one resource of the mesh.
public struct ResourceKey: Sendable, Hashable, Comparable, CustomStringConvertible {
    public var kind: ResourceKind
    public var namespace: String
    public var name: String

    public init(kind: ResourceKind, namespace: String, name: String) {
        self.kind = kind
        self.namespace = namespace
        self.name = name
    }

    public static func < (a: ResourceKey, b: ResourceKey) -> Bool {
        (a.kind.rawValue, a.namespace, a.name) < (b.kind.rawValue, b.namespace, b.name)
    }
    public var description: String { "\(kind.rawValue) \(namespace)/\(name)" }
}

extension Resource {
    public var key: ResourceKey { ResourceKey(kind: kind, namespace: metadata.namespace, name: metadata.name) }
}

/// One edit of the mesh configuration.
public enum ResourceChange: Sendable {
    /// Adds the resource, or replaces the one with the same kind, namespace and name.
    case upsert(Resource)
    case delete(ResourceKey)

    var key: ResourceKey {
        switch self {
        case .upsert(let r): r.key
        case .delete(let k): k
        }
    }
}

/// Annotations Sluice reads where Istio has no field (see DESIGN.md, Configuration).
public enum SluiceAnnotation {
    /// The host that runs a WorkloadEntry, or the only node a Gateway runs on.
    public static let node = "sluice.dev/node"
    /// How the agent recognises a workload's processes.
    public static let cgroup = "sluice.dev/cgroup"
    public static let unit = "sluice.dev/unit"
}

/// Compiles the whole mesh configuration into per-node snapshots (Pilot's job), and keeps what it compiled so
/// that a change recompiles only what it touches.
///
/// Work is split in two:
/// - **per service host** (a ``ServiceUnit``): the service, its clusters with endpoints and policy, its BPF map
///   entries and rate limits. The same for every node that sees the host, so it is compiled once.
/// - **per node**: the node's workloads and their identities, the listeners of gateways that run there, the
///   policies that select its workloads, and its *scope*: which hosts and VirtualServices it sees.
///
/// A node sees a service when the service is exported (`exportTo`, default all namespaces) to a namespace of a
/// workload on the node, or when a gateway on the node routes to it. A node with no workloads and no gateways
/// gets an empty snapshot. (Istio's Sidecar egress scoping, applied automatically from where workloads run.)
///
/// Deterministic: snapshots list items in key order and do not depend on the order resources arrive in.
public struct MeshCompiler: Sendable {
    public internal(set) var mesh = MeshConfig.defaults
    var meshConfigKey: ResourceKey?
    var resources: [ResourceKey: Resource] = [:]

    // Indexes over `resources`.
    var serviceEntriesByHost: [String: Set<ResourceKey>] = [:]
    /// ServiceEntries with a workloadSelector, by namespace: the ones a WorkloadEntry there may join.
    var selectingServiceEntries: [String: Set<ResourceKey>] = [:]
    var destinationRulesByHost: [String: Set<ResourceKey>] = [:]
    var healthChecksByHost: [String: Set<ResourceKey>] = [:]
    var rateLimitsByHost: [String: Set<ResourceKey>] = [:]
    var workloads = WorkloadTable()
    /// Mesh-bound VirtualServices by the hosts they route.
    var virtualServicesByHost: [String: Set<ResourceKey>] = [:]
    /// VirtualServices by the hosts their destinations name.
    var virtualServicesByDestination: [String: Set<ResourceKey>] = [:]
    var virtualServicesByGateway: [String: Set<ResourceKey>] = [:]
    var virtualServiceKeys: Set<ResourceKey> = []
    var gatewayKeys: Set<ResourceKey> = []
    /// AuthorizationPolicy, PeerAuthentication and RequestAuthentication keys by namespace.
    var policiesByNamespace: [String: Set<ResourceKey>] = [:]
    var registeredNodes: Set<String> = []

    // Compiled products and what each reported.
    var units: [String: ServiceUnit] = [:]
    var unitsByEndpointNamespace: [String: Set<String>] = [:]
    /// Unit hosts by the namespace they are exported to (`*`: every namespace).
    var unitsByExport: [String: Set<String>] = [:]
    var gatewayProducts: [ResourceKey: GatewayProduct] = [:]
    var virtualServiceProblems: [ResourceKey: [Diagnostic]] = [:]
    /// Scope of every node that has one; nodes not listed see nothing. Changed only through ``setScope(_:_:)``.
    private(set) var scopes: [String: NodeScope] = [:]
    /// Scoped nodes by the namespaces of their scope, and those that run a gateway: which nodes a change can reach,
    /// found without visiting every node of the mesh.
    private(set) var nodesByScopeNamespace: [String: Set<String>] = [:]
    private(set) var gatewayScopedNodes: Set<String> = []

    /// Compiles `resources`. Throws every error found; warnings are in ``warnings``.
    public init(_ resources: [Resource]) throws(ConfigErrors) {
        var problems: [Diagnostic] = []
        self.resources.reserveCapacity(resources.count)
        workloads.reserveCapacity(resources.count)
        for r in resources {
            if self.resources[r.key] != nil {
                problems.append(Self.error(r, "metadata.name", "\(r.reference) is defined twice",
                                           hint: "give each resource of a kind a unique namespace/name",
                                           code: .conflictingResource))
                continue
            }
            insert(r, problems: &problems)
        }
        rebuildAll()
        problems += allProblems
        if problems.contains(where: { $0.severity == .error }) { throw ConfigErrors(problems) }
    }

    /// Problems of the current compiled state (warnings only: errors are never accepted).
    public var warnings: [Diagnostic] { allProblems.filter { $0.severity == .warning } }

    var allProblems: [Diagnostic] {
        var out: [Diagnostic] = []
        for h in units.keys.sorted() { out += units[h]!.problems }
        for k in gatewayProducts.keys.sorted() { out += gatewayProducts[k]!.problems }
        for k in virtualServiceProblems.keys.sorted() { out += virtualServiceProblems[k]! }
        return out
    }

    /// Nodes known to the mesh: those that run a workload, those a gateway names, and registered ones.
    public var nodes: [String] {
        var all = registeredNodes
        for node in workloads.byNode.keys { all.insert(node) }
        for p in gatewayProducts.values { if let n = p.node { all.insert(n) } }
        return all.sorted()
    }

    /// Makes `node` known (an agent connected), so that deltas include it even if it runs no workload.
    public mutating func register(node: String) {
        registeredNodes.insert(node)
        if scopes[node] == nil { setScope(node, nodeScope(node)) }
    }

    /// Whether the mesh knows `node` (see `nodes`), without listing them all.
    public func knows(node: String) -> Bool {
        registeredNodes.contains(node) || workloads.byNode[node] != nil || gatewayProducts.values.contains { $0.node == node }
    }

    /// Forgets a registered node (it was deleted); what the stored mesh places on it stays.
    public mutating func unregister(node: String) {
        registeredNodes.remove(node)
        if scopes[node]?.isEmpty == true { setScope(node, nil) }
    }

    /// The snapshot `node` serves.
    public func snapshot(for node: String) -> NodeSnapshot {
        let local = nodeLocal(node)
        var items = local.items
        var keys = items.map(\.key)
        for host in visibleUnitHosts(to: local.scope) {
            guard let unit = units[host] else { continue }
            items += unit.items
            keys += unit.keys
        }
        for key in virtualServicesVisible(to: local.scope) {
            if let item = virtualServiceItem(key) {
                items.append(item)
                keys.append(item.key)
            }
        }
        return NodeSnapshot(node: node, mesh: mesh, items: items, keys: keys)
    }

    // MARK: - Incremental

    /// Applies `changes` and returns which nodes' snapshots change, and how. On error nothing changes: the
    /// compiler keeps serving the configuration it had.
    public mutating func apply(_ changes: [ResourceChange]) throws(ConfigErrors) -> MeshDelta {
        var originals: [ResourceKey: Resource?] = [:]
        for c in changes where originals[c.key] == nil { originals[c.key] = .some(resources[c.key]) }
        do {
            return try applyInPlace(changes)
        } catch {
            // Put the previous resources back and recompile what they touch: the state is a function of the
            // resources, so this restores it exactly, and is cheaper than copying the whole state up front.
            // Deletes first, in key order, so a kind that allows one resource (MeshConfig) never sees two.
            let undo: [ResourceChange] = originals.filter { $0.value == nil }.keys.sorted().map { .delete($0) }
                + originals.values.compactMap { $0 }.sorted { $0.key < $1.key }.map { .upsert($0) }
            _ = try? applyInPlace(undo)
            throw error
        }
    }

    private mutating func applyInPlace(_ changes: [ResourceChange]) throws(ConfigErrors) -> MeshDelta {
        if changes.contains(where: { $0.key.kind == .meshConfig }) {
            return try rebuildEverything(changes, nodesBefore: Set(nodes))
        }
        var touched = Touched()
        for change in changes {
            let old = resources[change.key]
            if let old { touched.note(old, in: self) }
            if case .upsert(let r) = change { touched.note(r, in: self) }
        }
        // Node-local parts and unit items as they were, to diff against.
        var localBefore: [String: NodeLocal] = [:]
        for n in touched.nodes { localBefore[n] = nodeLocal(n) }
        var unitsBefore: [String: ServiceUnit] = [:]
        for h in touched.hosts { unitsBefore[h] = units[h] }
        var vsBefore: [ResourceKey: Resource] = [:]
        for k in touched.virtualServices { vsBefore[k] = resources[k] }
        var scopesBefore: [String: NodeScope] = [:]
        for n in touched.nodes { scopesBefore[n] = scopes[n] }

        var problems: [Diagnostic] = []
        for change in changes {
            if let old = resources[change.key] { remove(old) }
            if case .upsert(let r) = change { insert(r, problems: &problems) }
        }
        for h in touched.hosts { recompileUnit(h) }
        for k in touched.gateways { recompileGateway(k) }
        // Routes to a changed host may now name a subset or port that is gone.
        var revalidate = touched.virtualServices
        for h in touched.hosts { revalidate.formUnion(virtualServicesByDestination[h] ?? []) }
        for k in revalidate { revalidateVirtualService(k) }
        for h in touched.hosts { problems += units[h]?.problems ?? [] }
        for k in touched.gateways { problems += gatewayProducts[k]?.problems ?? [] }
        for k in revalidate { problems += virtualServiceProblems[k] ?? [] }
        if problems.contains(where: { $0.severity == .error }) { throw ConfigErrors(problems) }

        var localAfter: [String: NodeLocal] = [:]
        for n in touched.nodes {
            let l = nodeLocal(n)
            localAfter[n] = l
            setScope(n, l.scope.isEmpty && !registeredNodes.contains(n) ? nil : l.scope)
        }

        // What changed per host, computed once and then handed to every node that sees the host.
        let hostChanges = touched.hosts.sorted().map { h in
            ItemChange(old: unitsBefore[h]?.items ?? [], new: units[h]?.items ?? [])
        }
        let vsChanges = touched.virtualServices.sorted().map { k in
            (vsBefore[k], resources[k], ItemChange(old: vsBefore[k].flatMap(Self.item).map { [$0] } ?? [],
                                                   new: resources[k].flatMap(Self.item).map { [$0] } ?? []))
        }
        let sortedHosts = touched.hosts.sorted()

        // Only nodes the change can reach: those it rescoped, and those whose scope sees a changed host or
        // VirtualService before or after (the others' scopes did not move). Visiting every node would make each write
        // cost as much as the mesh has nodes.
        var reached = touched.nodes, everyNode = false
        func reach(_ exportTo: [String], _ namespace: String) {
            if let n = nodesReached(exportTo: exportTo, from: namespace) { reached.formUnion(n) } else { everyNode = true }
        }
        for h in sortedHosts {
            if let u = unitsBefore[h] { reach(u.exportTo, u.namespace) }
            if let u = units[h] { reach(u.exportTo, u.namespace) }
        }
        for (old, new, _) in vsChanges {
            for r in [old, new] {
                if let r, case .virtualService(let vs) = r.spec { reach(vs.exportTo, r.metadata.namespace) }
            }
        }
        if everyNode { reached.formUnion(scopes.keys) }

        var deltas: [NodeDelta] = []
        for node in reached.sorted() {
            let rescoped = touched.nodes.contains(node)
            let newScope = scopes[node] ?? NodeScope()
            let oldScope = rescoped ? scopesBefore[node] ?? NodeScope() : newScope
            var diff = ItemDiff()
            if let before = localBefore[node], let after = localAfter[node] {
                diff.add(ItemChange(old: before.items, new: after.items), was: true, now: true)
            }
            if rescoped && oldScope != newScope {
                // The node's reach moved: compare every host and VirtualService it saw or sees.
                for host in visibleUnitHosts(to: oldScope).union(visibleUnitHosts(to: newScope))
                    where !touched.hosts.contains(host)
                {
                    guard let unit = units[host] else { continue }
                    let was = isVisible(unit, to: oldScope), now = isVisible(unit, to: newScope)
                    if was != now { diff.add(ItemChange(old: unit.items, new: unit.items), was: was, now: now) }
                }
                let was = Set(virtualServicesVisible(to: oldScope))
                let now = Set(virtualServicesVisible(to: newScope))
                for k in was.symmetricDifference(now) where !touched.virtualServices.contains(k) {
                    guard let item = virtualServiceItem(k) else { continue }
                    diff.add(ItemChange(old: [item], new: [item]), was: was.contains(k), now: now.contains(k))
                }
            }
            for (h, change) in zip(sortedHosts, hostChanges) {
                diff.add(change, was: unitsBefore[h].map { isVisible($0, to: oldScope) } ?? false,
                         now: units[h].map { isVisible($0, to: newScope) } ?? false)
            }
            for (old, new, change) in vsChanges {
                diff.add(change, was: old.map { isVisible(virtualService: $0, to: oldScope) } ?? false,
                         now: new.map { isVisible(virtualService: $0, to: newScope) } ?? false)
            }
            let d = diff.delta(node: node)
            if !d.isEmpty { deltas.append(d) }
        }
        return MeshDelta(nodes: deltas, recompiledServices: touched.hosts.count, recompiledNodes: touched.nodes.count)
    }

    /// A MeshConfig change moves defaults of every cluster and identity: recompile everything and diff.
    private mutating func rebuildEverything(_ changes: [ResourceChange], nodesBefore: Set<String>)
        throws(ConfigErrors) -> MeshDelta
    {
        let before = Dictionary(uniqueKeysWithValues: nodesBefore.map { ($0, snapshot(for: $0)) })
        var problems: [Diagnostic] = []
        for change in changes {
            if let old = resources[change.key] { remove(old) }
            if case .upsert(let r) = change { insert(r, problems: &problems) }
        }
        rebuildAll()
        problems += allProblems
        if problems.contains(where: { $0.severity == .error }) { throw ConfigErrors(problems) }
        var deltas: [NodeDelta] = []
        for node in nodesBefore.union(nodes).sorted() {
            let after = snapshot(for: node)
            let old = before[node] ?? NodeSnapshot(node: node, mesh: mesh)
            var diff = ItemDiff()
            diff.add(ItemChange(old: old.items, new: after.items), was: true, now: true)
            var d = diff.delta(node: node)
            if old.mesh != after.mesh { d.mesh = after.mesh }
            if !d.isEmpty { deltas.append(d) }
        }
        return MeshDelta(nodes: deltas, recompiledServices: units.count, recompiledNodes: scopes.count)
    }

    /// Sets (nil: drops) a node's scope and keeps the indexes of scopes in step.
    mutating func setScope(_ node: String, _ scope: NodeScope?) {
        if let old = scopes[node] {
            for ns in old.namespaces {
                nodesByScopeNamespace[ns]?.remove(node)
                if nodesByScopeNamespace[ns]?.isEmpty == true { nodesByScopeNamespace[ns] = nil }
            }
            gatewayScopedNodes.remove(node)
        }
        scopes[node] = scope
        guard let scope else { return }
        for ns in scope.namespaces { nodesByScopeNamespace[ns, default: []].insert(node) }
        if !scope.gateways.isEmpty || !scope.gatewayHosts.isEmpty { gatewayScopedNodes.insert(node) }
    }

    /// Scoped nodes that may see what `namespace` exports to `exportTo` (a superset: every gateway node is in it);
    /// nil when that is any node.
    func nodesReached(exportTo: [String], from namespace: String) -> Set<String>? {
        if exportTo.isEmpty || exportTo.contains("*") { return nil }
        var out = gatewayScopedNodes
        for e in exportTo { out.formUnion(nodesByScopeNamespace[e == "." ? namespace : e] ?? []) }
        return out
    }

    /// Compiles every unit, gateway and node scope from the indexes.
    mutating func rebuildAll() {
        units = [:]
        unitsByEndpointNamespace = [:]
        unitsByExport = [:]
        let hosts = Array(serviceEntriesByHost.keys)
        units.reserveCapacity(hosts.count)
        for (host, unit) in zip(hosts, compileUnits(hosts)) {
            guard let unit else { continue }
            units[host] = unit
            index(unit)
        }
        gatewayProducts = [:]
        for k in gatewayKeys { recompileGateway(k) }
        virtualServiceProblems = [:]
        for k in virtualServiceKeys { revalidateVirtualService(k) }
        scopes = [:]
        nodesByScopeNamespace = [:]
        gatewayScopedNodes = []
        for node in nodes {
            let scope = nodeScope(node)
            if !scope.isEmpty || registeredNodes.contains(node) { setScope(node, scope) }
        }
    }

    static func error(_ r: Resource, _ path: String, _ message: String, hint: String? = nil,
                      code: DiagnosticCode = .schemaValidation) -> Diagnostic {
        Diagnostic(.error, file: r.source.file, line: r.source.line, resource: r.reference, path: path,
                   message: message, hint: hint, code: code)
    }

    static func warning(_ r: Resource, _ path: String, _ message: String, hint: String? = nil,
                        code: DiagnosticCode) -> Diagnostic {
        Diagnostic(.warning, file: r.source.file, line: r.source.line, resource: r.reference, path: path,
                   message: message, hint: hint, code: code)
    }
}

/// What a set of changes reaches: the hosts to recompile, gateways, VirtualServices and nodes.
struct Touched {
    var hosts: Set<String> = []
    var gateways: Set<ResourceKey> = []
    var virtualServices: Set<ResourceKey> = []
    var nodes: Set<String> = []

    /// Gateway listeners name clusters by port: recompile them, and the node-local parts of every node (which
    /// listeners a node keeps depends on the others it runs). Free when the mesh has no gateway.
    mutating func touchGateways(_ m: MeshCompiler) {
        guard !m.gatewayKeys.isEmpty else { return }
        gateways.formUnion(m.gatewayKeys)
        nodes.formUnion(m.nodes)
    }

    mutating func note(_ r: Resource, in m: MeshCompiler) {
        switch r.spec {
        case .serviceEntry(let se):
            hosts.formUnion(se.hosts)
            // A gateway route to one of these hosts may now name another port, or one that is gone.
            touchGateways(m)
        case .destinationRule(let dr):
            hosts.insert(dr.host)
            touchGateways(m)
        case .healthCheck(let hc): hosts.insert(hc.host)
        case .rateLimitPolicy(let rl): hosts.insert(rl.host)
        case .workloadEntry(let we):
            if let node = r.metadata.annotations[SluiceAnnotation.node] { nodes.insert(node) }
            for k in m.selectingServiceEntries[r.metadata.namespace] ?? [] {
                guard case .serviceEntry(let se)? = m.resources[k]?.spec, let sel = se.workloadSelector,
                    sel.allSatisfy({ we.labels[$0.key] == $0.value })
                else { continue }
                hosts.formUnion(se.hosts)
            }
        case .virtualService(let vs):
            virtualServices.insert(r.key)
            if vs.gateways.isEmpty || vs.gateways.contains("mesh") { hosts.formUnion(vs.hosts) }
            if vs.gateways.contains(where: { $0 != "mesh" }) {
                gateways.formUnion(m.gatewayKeys)
                nodes.formUnion(m.nodes)
            }
        case .gateway:
            gateways.insert(r.key)
            nodes.formUnion(m.nodes)
            if let node = r.metadata.annotations[SluiceAnnotation.node] { nodes.insert(node) }
        case .authorizationPolicy, .peerAuthentication, .requestAuthentication:
            let ns = r.metadata.namespace
            if ns == m.mesh.rootNamespace {
                hosts.formUnion(m.units.keys)
                nodes.formUnion(m.nodes)
            } else {
                hosts.formUnion(m.unitsByEndpointNamespace[ns] ?? [])
                nodes.formUnion(m.workloads.nodes(in: ns))
                // Gateways of the namespace take its AuthorizationPolicies too.
                for k in m.gatewayKeys where k.namespace == ns {
                    guard let gw = m.resources[k] else { continue }
                    nodes.formUnion(m.nodes.filter { m.gatewayRuns(gw, on: $0) })
                }
            }
        case .meshConfig: break
        }
    }
}

/// How one unit's items changed (a host's, a gateway's, a VirtualService's), keyed once for all nodes.
struct ItemChange {
    var oldKeys: [SnapshotItem.Key]
    var new: [(SnapshotItem.Key, SnapshotItem)]
    /// Items to send to a node that saw the unit before and sees it now.
    var upserted: [(SnapshotItem.Key, SnapshotItem)]
    var removed: [SnapshotItem.Key]

    init(old: [SnapshotItem], new: [SnapshotItem]) {
        var before: [SnapshotItem.Key: SnapshotItem] = [:]
        for item in old { before[item.key] = item }
        oldKeys = Array(before.keys)
        self.new = new.map { ($0.key, $0) }
        upserted = self.new.filter { before[$0.0] != $0.1 }
        let kept = Set(self.new.map(\.0))
        removed = oldKeys.filter { !kept.contains($0) }
    }
}

/// Accumulates item changes for one node.
struct ItemDiff {
    var upserted: [SnapshotItem.Key: SnapshotItem] = [:]
    var removed: Set<SnapshotItem.Key> = []

    /// Adds `change` as this node sees it: `was`/`now` say whether the unit was and is visible to the node.
    mutating func add(_ change: ItemChange, was: Bool, now: Bool) {
        switch (was, now) {
        case (true, true):
            for (k, item) in change.upserted { upserted[k] = item; removed.remove(k) }
            for k in change.removed where upserted[k] == nil { removed.insert(k) }
        case (false, true):
            for (k, item) in change.new { upserted[k] = item; removed.remove(k) }
        case (true, false):
            for k in change.oldKeys where upserted[k] == nil { removed.insert(k) }
        case (false, false): break
        }
    }

    func delta(node: String) -> NodeDelta {
        NodeDelta(node: node, upserted: upserted.keys.sorted().map { upserted[$0]! }, removed: removed.sorted(),
                  mesh: nil)
    }
}
