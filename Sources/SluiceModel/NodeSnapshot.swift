/// Everything one agent needs to serve, compiled from the mesh configuration. Immutable; an agent swaps a
/// whole snapshot at once.
public struct NodeSnapshot: Sendable, Hashable {
    public var listeners: [Listener]
    /// Clusters referenced by index from ``Listener/routes``.
    public var clusters: [Cluster]

    public init(listeners: [Listener], clusters: [Cluster]) {
        self.listeners = listeners
        self.clusters = clusters
    }

    public struct Listener: Sendable, Hashable {
        public var name: String
        public var address: EndpointAddress
        public var `protocol`: PortProtocol
        /// Weighted destinations of the first matching TCP route.
        public var routes: [WeightedCluster]
    }

    public struct WeightedCluster: Sendable, Hashable {
        public var cluster: Int
        public var weight: Int
    }

    public struct Cluster: Sendable, Hashable {
        /// Istio's naming: `outbound|PORT|SUBSET|HOST`.
        public var name: String
        public var serviceHost: String
        public var servicePort: UInt16
        public var endpoints: [Endpoint]
        public var loadBalancer: LoadBalancerSettings
        public var outlierDetection: OutlierDetection?
        public var connectTimeout: Duration
        /// Close a connection with no traffic in either direction for this long (Istio's default: 1 hour).
        public var idleTimeout: Duration
        public var maxConnections: Int?
        public var healthCheck: HealthCheck?
    }

    public struct Endpoint: Sendable, Hashable {
        public var address: EndpointAddress
        public var weight: UInt32
        public var labels: [String: String]
    }
}
