/// Everything one agent needs to serve, compiled from the mesh configuration for one node. Immutable; an agent
/// swaps a whole snapshot at once.
///
/// Every list is sorted by its items' ``SnapshotItem/Key``, so equal inputs give equal snapshots and
/// ``canonicalJSON()`` gives byte-identical output.
public struct NodeSnapshot: Sendable, Hashable, Codable {
    public var node: String
    public var mesh: MeshConfig
    /// The workloads this node runs, with their SPIFFE identities.
    public var workloads: [Workload] = []
    /// Listeners of the gateways that run on this node.
    public var listeners: [Listener] = []
    /// Services the node's workloads (or gateways) can reach.
    public var services: [Service] = []
    /// Clusters of those services: one per port, and one per port and subset.
    public var clusters: [Cluster] = []
    /// Entries for the BPF services map: which service addresses the kernel balances, which go to the agent.
    public var bpfServices: [BPFService] = []
    /// VirtualServices that apply to traffic from this node (mesh-bound, exported to a namespace of its workloads).
    public var virtualServices: [Named<VirtualService>] = []
    /// Policies that select a workload on this node.
    public var authorizationPolicies: [Named<AuthorizationPolicy>] = []
    public var peerAuthentications: [Named<PeerAuthentication>] = []
    public var requestAuthentications: [Named<RequestAuthentication>] = []
    /// Rate limits of the services the node can reach.
    public var rateLimits: [Named<RateLimitPolicy>] = []

    public init(node: String, mesh: MeshConfig = .defaults) {
        self.node = node
        self.mesh = mesh
    }

    public init(listeners: [Listener], clusters: [Cluster]) {
        self.init(node: "")
        self.listeners = listeners
        self.clusters = clusters
    }

    public struct Listener: Sendable, Hashable, Codable {
        public var name: String
        public var address: EndpointAddress
        public var `protocol`: PortProtocol
        /// Weighted destinations of the first matching TCP route; empty on HTTP listeners, which route each
        /// request with the VirtualServices bound to ``gateway``.
        public var routes: [WeightedCluster]
        /// `namespace/name` of the Gateway that declares the listener.
        public var gateway: String?
        /// TLS terminated here (HTTPS servers): one entry per server sharing the address, chosen by the client's
        /// SNI among its hosts. Empty: plaintext.
        public var tls: [ServerCertificate]
        /// Every request gets a 301 to its `https://` URL (an HTTP server's `tls.httpsRedirect`).
        public var httpsRedirect: Bool
        /// The gateway workload's labels (its Gateway's `selector`, as Istio's gateway deployments carry them):
        /// what AuthorizationPolicy selectors are matched against for this listener.
        public var workloadLabels: [String: String] = [:]
        /// `namespace/name` of the AuthorizationPolicies and RequestAuthentications (in the snapshot) that select
        /// this listener's gateway.
        public var authorizationPolicies: [String] = []
        public var requestAuthentications: [String] = []

        public init(name: String, address: EndpointAddress, protocol: PortProtocol, routes: [WeightedCluster],
                    gateway: String? = nil, tls: [ServerCertificate] = [], httpsRedirect: Bool = false) {
            self.name = name
            self.address = address
            self.protocol = `protocol`
            self.routes = routes
            self.gateway = gateway
            self.tls = tls
            self.httpsRedirect = httpsRedirect
        }

        /// Requests are parsed and routed one by one (HTTP/1.1, HTTP/2, gRPC), not relayed as a byte stream.
        public var isHTTP: Bool { !`protocol`.isL4 }
    }

    /// What a TLS-terminating gateway server presents and expects.
    public struct ServerCertificate: Sendable, Hashable, Codable {
        /// The server's `hosts`, without namespace prefixes: the SNI names this certificate answers.
        public var hosts: [String]
        public var mode: ServerTLSSettings.Mode
        /// Either a `credentialName` (files `<credentials dir>/<name>/tls.crt`, `tls.key`, `ca.crt`, as Istio's
        /// gateway reads a Secret) or the three files named directly.
        public var credentialName: String?
        public var certificateChain: String?
        public var privateKey: String?
        public var caCertificates: String?
        public var minProtocolVersion: ServerTLSSettings.ProtocolVersion?
        public var maxProtocolVersion: ServerTLSSettings.ProtocolVersion?
        public var cipherSuites: [String]
    }

    public struct WeightedCluster: Sendable, Hashable, Codable {
        /// A ``Cluster/name`` of the same snapshot.
        public var cluster: String
        public var weight: Int
    }

    public struct Cluster: Sendable, Hashable, Codable {
        /// Istio's naming: `outbound|PORT|SUBSET|HOST`.
        public var name: String
        public var serviceHost: String
        public var servicePort: UInt16
        public var subset: String?
        public var `protocol`: PortProtocol
        public var endpoints: [Endpoint]
        public var loadBalancer: LoadBalancerSettings
        public var outlierDetection: OutlierDetection?
        public var connectTimeout: Duration
        /// Close a connection with no traffic in either direction for this long (Istio's default: 1 hour).
        public var idleTimeout: Duration
        public var maxConnections: Int?
        /// The L7 circuit-breaker limits (`connectionPool.http`).
        public var httpPool: ConnectionPoolSettings.HTTP?
        /// How connections to the endpoints are secured (`trafficPolicy.tls`).
        public var tls: ClientTLSSettings?
        public var healthCheck: HealthCheck?

        /// Istio's cluster naming, `outbound|PORT|SUBSET|HOST`.
        public static func name(port: UInt16, subset: String?, host: String) -> String {
            "outbound|\(port)|\(subset ?? "")|\(host)"
        }
    }

    public struct Endpoint: Sendable, Hashable, Codable {
        public var address: EndpointAddress
        public var weight: UInt32
        public var labels: [String: String]
        /// Set when the endpoint is a mesh workload: the node that runs it (same node: direct; another: HBONE)
        /// and the identity its certificate must carry.
        public var node: String?
        public var identity: String?
        /// Set when the workload's PeerAuthentication is DISABLE on this port: callers send plaintext, no tunnel.
        public var plaintext: Bool?
    }

    /// A workload that runs on this node.
    public struct Workload: Sendable, Hashable, Codable {
        public var namespace: String
        public var name: String
        public var address: String
        public var labels: [String: String]
        public var serviceAccount: String
        /// `spiffe://TRUST-DOMAIN/ns/NAMESPACE/sa/SERVICE-ACCOUNT`
        public var identity: String
        public var ports: [String: UInt16]
        /// How the agent recognises the workload's processes (`sluice.dev/cgroup`, `sluice.dev/unit`).
        public var cgroup: String?
        public var unit: String?
        /// `namespace/name` of the AuthorizationPolicies and RequestAuthentications (in the snapshot) that select
        /// this workload.
        public var authorizationPolicies: [String] = []
        public var requestAuthentications: [String] = []
        /// Its PeerAuthentication in effect (Istio's precedence: the workload's own policy, its namespace's, the
        /// mesh's; PERMISSIVE when none sets one), and its ports' own modes (`portLevelMtls`).
        public var peerAuthentication: PeerAuthentication.Mode = .permissive
        public var peerAuthenticationPorts: [UInt16: PeerAuthentication.Mode] = [:]
    }

    /// A service as the node's outbound side sees it.
    public struct Service: Sendable, Hashable, Codable {
        public var host: String
        public var namespace: String
        public var addresses: [String]
        public var ports: [ServicePort]
        public var location: ServiceEntry.Location
        public var resolution: ServiceEntry.Resolution
    }

    /// One entry of the BPF services map: connections to `address` are balanced in the kernel or sent to the
    /// agent.
    public struct BPFService: Sendable, Hashable, Codable {
        public enum Action: Sendable, Hashable, Codable {
            /// L4-only: the kernel picks a backend and rewrites the destination; the agent never sees the bytes.
            case balance(loadBalancing: LoadBalancing, backends: [Backend])
            /// The agent must see the connection; `reason` says why (for `config_dump` and the docs).
            case proxy(reason: String)
        }
        public enum LoadBalancing: String, Sendable, Hashable, Codable { case random, maglev }
        public struct Backend: Sendable, Hashable, Codable {
            public var address: EndpointAddress
            public var weight: UInt32
            public init(address: EndpointAddress, weight: UInt32) {
                self.address = address
                self.weight = weight
            }
        }
        public var address: EndpointAddress
        public var `protocol`: PortProtocol
        public var host: String
        public var action: Action

        public init(address: EndpointAddress, protocol: PortProtocol, host: String, action: Action) {
            self.address = address
            self.protocol = `protocol`
            self.host = host
            self.action = action
        }

        public var isL4Only: Bool { if case .balance = action { return true } else { return false } }
    }
}

/// A resource's spec with its namespace and name, as policy and route lists carry them.
public struct Named<Spec: Sendable & Hashable & Codable>: Sendable, Hashable, Codable {
    public var namespace: String
    public var name: String
    public var spec: Spec
    public init(namespace: String, name: String, spec: Spec) {
        self.namespace = namespace
        self.name = name
        self.spec = spec
    }
    public var qualifiedName: String { "\(namespace)/\(name)" }
}

extension NodeSnapshot {
    /// The snapshot as an agent serves it: with mesh certificates (`tunnels`), a service the kernel would balance by
    /// itself goes through the agent when one of its endpoints is a mesh workload on another node, so that its bytes
    /// cross the network inside a mutual-TLS tunnel rather than in plaintext. (Services with backends that an
    /// AuthorizationPolicy selects already go through the agent: the compiler decides that.)
    public func servedByAgent(tunnels: Bool) -> NodeSnapshot {
        guard tunnels else { return self }
        let clustersByName = Dictionary(clusters.map { ($0.name, $0) }, uniquingKeysWith: { a, _ in a })
        var copy = self
        for (i, b) in bpfServices.enumerated() where b.isL4Only {
            let endpoints = clustersByName[Cluster.name(port: b.address.port, subset: nil, host: b.host)]?.endpoints ?? []
            if endpoints.contains(where: { $0.identity != nil && $0.node != nil && $0.node != node && $0.plaintext != true }) {
                copy.bpfServices[i].action = .proxy(reason: "mutual TLS to workloads on other nodes (HBONE)")
            }
        }
        return copy
    }
}
