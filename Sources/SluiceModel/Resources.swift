/// Mesh configuration resources, as Istio users write them. Wire decoding lives in `*+Decoding.swift`.

public struct ObjectMeta: Sendable, Hashable {
    public var name: String
    public var namespace: String
    public var labels: [String: String]
    public var annotations: [String: String]

    public init(name: String, namespace: String = "default", labels: [String: String] = [:],
                annotations: [String: String] = [:]) {
        self.name = name
        self.namespace = namespace
        self.labels = labels
        self.annotations = annotations
    }
}

/// Where a resource was read from, for diagnostics.
public struct SourceLocation: Sendable, Hashable {
    public var file: String
    public var line: Int?
    public init(file: String, line: Int?) {
        self.file = file
        self.line = line
    }
}

public enum ResourceKind: String, Sendable, CaseIterable {
    case gateway = "Gateway"
    case virtualService = "VirtualService"
    case destinationRule = "DestinationRule"
    case serviceEntry = "ServiceEntry"
    case workloadEntry = "WorkloadEntry"
    case healthCheck = "HealthCheck"
    case authorizationPolicy = "AuthorizationPolicy"
    case peerAuthentication = "PeerAuthentication"
    case requestAuthentication = "RequestAuthentication"
    case rateLimitPolicy = "RateLimitPolicy"
    case meshConfig = "MeshConfig"
}

public struct Resource: Sendable, Hashable {
    /// Boxed: the largest spec is hundreds of bytes, and resources are copied into indexes by the hundred thousand.
    public indirect enum Spec: Sendable, Hashable {
        case gateway(Gateway)
        case virtualService(VirtualService)
        case destinationRule(DestinationRule)
        case serviceEntry(ServiceEntry)
        case workloadEntry(WorkloadEntry)
        case healthCheck(HealthCheck)
        case authorizationPolicy(AuthorizationPolicy)
        case peerAuthentication(PeerAuthentication)
        case requestAuthentication(RequestAuthentication)
        case rateLimitPolicy(RateLimitPolicy)
        case meshConfig(MeshConfig)
    }

    public var metadata: ObjectMeta
    public var spec: Spec
    public var source: SourceLocation

    public init(metadata: ObjectMeta, spec: Spec, source: SourceLocation) {
        self.metadata = metadata
        self.spec = spec
        self.source = source
    }

    public var kind: ResourceKind {
        switch spec {
        case .gateway: .gateway
        case .virtualService: .virtualService
        case .destinationRule: .destinationRule
        case .serviceEntry: .serviceEntry
        case .workloadEntry: .workloadEntry
        case .healthCheck: .healthCheck
        case .authorizationPolicy: .authorizationPolicy
        case .peerAuthentication: .peerAuthentication
        case .requestAuthentication: .requestAuthentication
        case .rateLimitPolicy: .rateLimitPolicy
        case .meshConfig: .meshConfig
        }
    }

    /// `Kind namespace/name`, as diagnostics print it.
    public var reference: String { "\(kind.rawValue) \(metadata.namespace)/\(metadata.name)" }
}

// MARK: - networking.istio.io/v1 Gateway

public struct Gateway: Sendable, Hashable, Codable {
    public var selector: [String: String]
    public var servers: [Server]

    public struct Server: Sendable, Hashable, Codable {
        public var port: Port
        /// Address to bind; Istio's `bind`. Default: all addresses.
        public var bind: String?
        public var hosts: [String]
        public var name: String?
        public var tls: ServerTLSSettings?
    }

    public struct Port: Sendable, Hashable, Codable {
        public var number: UInt16
        public var `protocol`: PortProtocol
        public var name: String
    }
}

public enum PortProtocol: String, Sendable, Hashable, CaseIterable, Codable {
    case http = "HTTP", https = "HTTPS", grpc = "GRPC", http2 = "HTTP2", mongo = "MONGO", tcp = "TCP", tls = "TLS"
    case udp = "UDP"
    /// Neither declared nor implied by the port's name: the agent detects it from the client's first bytes
    /// (HTTP/1 request line or HTTP/2 preface, else TCP), as Istio's protocol sniffing does.
    case unspecified = "UNSPECIFIED"

    /// Istio decides a port's protocol from its declared protocol, case-insensitively.
    public init?(istio text: String) {
        guard let p = PortProtocol(rawValue: text.uppercased()), p != .unspecified else { return nil }
        self = p
    }

    /// A port's protocol as Istio selects it: the declared one, else the name's prefix (`<protocol>[-<suffix>]`:
    /// `http-web`, `grpc`, `tcp-db`...), else ``unspecified``. Names Sluice has no L7 support for (`mysql`, `redis`)
    /// are TCP.
    public static func selected(declared: String?, name: String?) -> PortProtocol? {
        if let declared { return PortProtocol(istio: declared) }
        guard let name = name?.lowercased() else { return .unspecified }
        if name == "grpc-web" || name.hasPrefix("grpc-web-") { return .http }
        let prefix = name.split(separator: "-", maxSplits: 1).first.map(String.init) ?? ""
        switch prefix {
        case "http", "grpc", "http2", "https", "tcp", "tls", "mongo", "udp": return PortProtocol(istio: prefix)
        case "mysql", "redis": return .tcp
        default: return .unspecified
        }
    }

    /// Declared names, for error hints.
    public static var declarable: [String] { allCases.filter { $0 != .unspecified }.map(\.rawValue) }

    public var isL4: Bool { self == .tcp || self == .tls || self == .mongo }
}

// MARK: - VirtualService

public struct VirtualService: Sendable, Hashable, Codable {
    public var hosts: [String]
    public var gateways: [String]
    public var http: [HTTPRoute]
    public var tcp: [TCPRoute]
    public var tls: [TLSRoute]
    /// Namespaces that see this resource: `*` (all, the default), `.` (its own) or names.
    public var exportTo: [String]

    public struct TCPRoute: Sendable, Hashable, Codable {
        public var match: [L4Match]
        public var route: [RouteDestination]
    }

    /// Routes for TLS or HTTPS traffic that is passed through, matched by SNI.
    public struct TLSRoute: Sendable, Hashable, Codable {
        public var match: [TLSMatch]
        public var route: [RouteDestination]
    }

    public struct TLSMatch: Sendable, Hashable, Codable {
        public var sniHosts: [String]
        public var port: UInt16?
        public var destinationSubnets: [String]
        public var sourceLabels: [String: String]
        public var gateways: [String]
    }

    public struct L4Match: Sendable, Hashable, Codable {
        public var port: UInt16?
        public var destinationSubnets: [String]
        public var sourceLabels: [String: String]
        public var gateways: [String]
    }

    public struct RouteDestination: Sendable, Hashable, Codable {
        public var destination: Destination
        public var weight: Int?
        public var headers: HeaderOperations?
    }

    public struct Destination: Sendable, Hashable, Codable {
        public var host: String
        public var subset: String?
        public var port: UInt16?
    }
}

// MARK: - DestinationRule

public struct DestinationRule: Sendable, Hashable, Codable {
    public var host: String
    public var trafficPolicy: TrafficPolicy?
    public var subsets: [Subset]
    public var exportTo: [String]

    public struct Subset: Sendable, Hashable, Codable {
        public var name: String
        public var labels: [String: String]
        public var trafficPolicy: TrafficPolicy?
    }
}

public struct TrafficPolicy: Sendable, Hashable, Codable {
    public var loadBalancer: LoadBalancerSettings?
    public var connectionPool: ConnectionPoolSettings?
    public var outlierDetection: OutlierDetection?
    public var tls: ClientTLSSettings?

    public init(loadBalancer: LoadBalancerSettings? = nil, connectionPool: ConnectionPoolSettings? = nil,
                outlierDetection: OutlierDetection? = nil, tls: ClientTLSSettings? = nil) {
        self.loadBalancer = loadBalancer
        self.connectionPool = connectionPool
        self.outlierDetection = outlierDetection
        self.tls = tls
    }

    /// Field-wise merge: a subset's policy overrides the top-level one where it sets a field.
    public func overlaid(by other: TrafficPolicy?) -> TrafficPolicy {
        guard let other else { return self }
        return TrafficPolicy(
            loadBalancer: other.loadBalancer ?? loadBalancer,
            connectionPool: other.connectionPool ?? connectionPool,
            outlierDetection: other.outlierDetection ?? outlierDetection, tls: other.tls ?? tls)
    }
}

public enum LoadBalancerSettings: Sendable, Hashable, Codable {
    public enum Simple: String, Sendable, Hashable, Codable {
        case unspecified = "UNSPECIFIED", roundRobin = "ROUND_ROBIN", leastRequest = "LEAST_REQUEST"
        case random = "RANDOM", passthrough = "PASSTHROUGH", leastConn = "LEAST_CONN"
    }
    public enum HashKey: Sendable, Hashable, Codable {
        case sourceIP
        /// HTTP only: a request header (lower-case name), cookie, or query parameter.
        case header(String)
        case cookie(String)
        case queryParameter(String)
    }
    case simple(Simple)
    /// Istio's `consistentHash` with `maglev` (the default when no table kind is named).
    case consistentHash(key: HashKey, tableSize: Int?)
}

public struct ConnectionPoolSettings: Sendable, Hashable, Codable {
    public var maxConnections: Int?
    public var connectTimeout: Duration?
    public var idleTimeout: Duration?
    public var http: HTTP?
    public init(maxConnections: Int? = nil, connectTimeout: Duration? = nil, idleTimeout: Duration? = nil,
                http: HTTP? = nil) {
        self.maxConnections = maxConnections
        self.connectTimeout = connectTimeout
        self.idleTimeout = idleTimeout
        self.http = http
    }

    /// Istio's `connectionPool.http`: the circuit-breaker limits of the L7 path.
    public struct HTTP: Sendable, Hashable, Codable {
        public var http1MaxPendingRequests: Int?
        public var http2MaxRequests: Int?
        public var maxRequestsPerConnection: Int?
        public var maxRetries: Int?
        public var idleTimeout: Duration?
        public var maxConcurrentStreams: Int?
        public var h2UpgradePolicy: String?
    }
}

public struct OutlierDetection: Sendable, Hashable, Codable {
    /// Consecutive errors before an endpoint is ejected (Istio's `consecutive5xxErrors`): any 5xx response,
    /// and connect failures and resets (which are all TCP has). 0: this detector is off.
    public var consecutiveErrors: Int
    /// Consecutive gateway errors (502, 503, 504, connect failures, resets) before an ejection (Istio's
    /// `consecutiveGatewayErrors`, also its deprecated `consecutiveErrors`). 0: this detector is off.
    public var consecutiveGatewayErrors: Int
    public var interval: Duration
    public var baseEjectionTime: Duration
    public var maxEjectionPercent: Int

    public init(consecutiveErrors: Int = 5, consecutiveGatewayErrors: Int = 0, interval: Duration = .seconds(10),
                baseEjectionTime: Duration = .seconds(30), maxEjectionPercent: Int = 10) {
        self.consecutiveErrors = consecutiveErrors
        self.consecutiveGatewayErrors = consecutiveGatewayErrors
        self.interval = interval
        self.baseEjectionTime = baseEjectionTime
        self.maxEjectionPercent = maxEjectionPercent
    }
}

// MARK: - ServiceEntry / WorkloadEntry

public struct ServiceEntry: Sendable, Hashable, Codable {
    public var hosts: [String]
    public var addresses: [String]
    public var ports: [ServicePort]
    public var location: Location
    public var resolution: Resolution
    public var endpoints: [WorkloadEntry]
    public var workloadSelector: [String: String]?
    public var exportTo: [String]

    public enum Location: String, Sendable, Hashable, Codable { case meshExternal = "MESH_EXTERNAL", meshInternal = "MESH_INTERNAL" }
    public enum Resolution: String, Sendable, Hashable, Codable {
        case none = "NONE", `static` = "STATIC", dns = "DNS", dnsRoundRobin = "DNS_ROUND_ROBIN"
    }
}

public struct ServicePort: Sendable, Hashable, Codable {
    public var number: UInt16
    public var `protocol`: PortProtocol
    public var name: String
    public var targetPort: UInt16?
}

public struct WorkloadEntry: Sendable, Hashable, Codable {
    public var address: String
    public var ports: [String: UInt16]
    public var labels: [String: String]
    public var weight: Int?
    public var serviceAccount: String?
    public var network: String?
    public var locality: String?

    public init(address: String, ports: [String: UInt16] = [:], labels: [String: String] = [:], weight: Int? = nil,
                serviceAccount: String? = nil, network: String? = nil, locality: String? = nil) {
        self.address = address
        self.ports = ports
        self.labels = labels
        self.weight = weight
        self.serviceAccount = serviceAccount
        self.network = network
        self.locality = locality
    }
}

// MARK: - sluice.dev/v1 HealthCheck

/// Active health checking of a service's endpoints. Istio has no such resource (Envoy does, per cluster), so
/// Sluice adds one in Istio's shape: it selects a host like a DestinationRule does.
public struct HealthCheck: Sendable, Hashable, Codable {
    public var host: String
    public var interval: Duration
    public var timeout: Duration
    public var unhealthyThreshold: Int
    public var healthyThreshold: Int
    /// Set for HTTP checks: `GET path` must answer with one of the expected statuses; else a TCP connect check.
    public var http: HTTPCheck?
    /// Set for gRPC checks: `grpc.health.v1.Health/Check` must answer SERVING (Envoy's `grpc_health_check`).
    public var grpc: GRPCCheck?

    public struct GRPCCheck: Sendable, Hashable, Codable {
        /// The service asked about; empty: the server as a whole.
        public var serviceName: String
        /// `:authority` sent with the check (the service host unless set).
        public var authority: String?
    }

    public struct HTTPCheck: Sendable, Hashable, Codable {
        public var path: String
        /// `Host` sent with the check (the service host unless set).
        public var host: String?
        /// Statuses that count as healthy (Envoy's default: 200 only).
        public var expectedStatuses: [ClosedRange<Int>]
    }
}
