import SluiceModel

extension ProxyRuntime {
    /// A caller on this node, as the kernel knows it at connect(): its cgroup (0: a caller that is no workload),
    /// and the workload identity and address it stands for.
    public struct LocalCaller: Sendable, Hashable {
        public var cgroup: UInt64
        public var identity: String?
        public var address: IPAddress?
        public init(cgroup: UInt64, identity: String?, address: IPAddress?) {
            self.cgroup = cgroup
            self.identity = identity
            self.address = address
        }
    }

    /// One decision of a workload's AuthorizationPolicies on a connection from `caller` to `address`:`port`
    /// (0: any port not listed).
    public struct LocalDecision: Sendable, Hashable {
        public var cgroup: UInt64
        public var address: IPAddress
        public var port: UInt16
        public var allow: Bool
    }

    /// What the kernel checks for calls between workloads of this node (Istio's L4 authorization, with no proxy
    /// hop): the addresses of workloads that AuthorizationPolicies guard, and, for each with each caller, the
    /// decision on each of its ports (those it declares, those its services reach it on, and 0 for the rest) —
    /// evaluated once here as the agent would evaluate the connection.
    public func localAuthorization(callers: [LocalCaller]) -> (guarded: [IPAddress], decisions: [LocalDecision]) {
        var guarded: [IPAddress] = []
        var decisions: [LocalDecision] = []
        var portsByAddress: [String: Set<UInt16>] = [:]
        for c in snapshot.clusters {
            for e in c.endpoints { portsByAddress[e.address.ip.description, default: []].insert(e.address.port) }
        }
        for (address, w) in localWorkloads.sorted(by: { $0.key < $1.key }) where !w.authorization.isEmpty {
            guard let ip = IPAddress(address) else { continue }
            guarded.append(ip)
            let ports = Set(w.workload.ports.values).union(portsByAddress[address] ?? []).union([0])
            for caller in callers {
                for port in ports.sorted() {
                    var r = AuthorizationRequest(sourceIP: caller.address, principal: caller.identity, port: port)
                    r.destinationIP = ip
                    r.layer4 = true
                    let allow = if case .allow = w.authorization.evaluate(r) { true } else { false }
                    decisions.append(LocalDecision(cgroup: caller.cgroup, address: ip, port: port, allow: allow))
                }
            }
        }
        return (guarded, decisions)
    }
}
