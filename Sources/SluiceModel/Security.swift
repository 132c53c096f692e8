/// `security.istio.io/v1`: AuthorizationPolicy, PeerAuthentication, RequestAuthentication.

public struct AuthorizationPolicy: Sendable, Hashable, Codable {
    public enum Action: String, Sendable, Hashable, Codable { case allow = "ALLOW", deny = "DENY", audit = "AUDIT", custom = "CUSTOM" }

    public struct Source: Sendable, Hashable, Codable {
        public var principals: [String] = [], notPrincipals: [String] = []
        public var requestPrincipals: [String] = [], notRequestPrincipals: [String] = []
        public var namespaces: [String] = [], notNamespaces: [String] = []
        public var ipBlocks: [String] = [], notIpBlocks: [String] = []
        public var remoteIpBlocks: [String] = [], notRemoteIpBlocks: [String] = []

        public init(principals: [String] = [], notPrincipals: [String] = [], requestPrincipals: [String] = [],
                    notRequestPrincipals: [String] = [], namespaces: [String] = [], notNamespaces: [String] = [],
                    ipBlocks: [String] = [], notIpBlocks: [String] = [], remoteIpBlocks: [String] = [],
                    notRemoteIpBlocks: [String] = []) {
            self.principals = principals
            self.notPrincipals = notPrincipals
            self.requestPrincipals = requestPrincipals
            self.notRequestPrincipals = notRequestPrincipals
            self.namespaces = namespaces
            self.notNamespaces = notNamespaces
            self.ipBlocks = ipBlocks
            self.notIpBlocks = notIpBlocks
            self.remoteIpBlocks = remoteIpBlocks
            self.notRemoteIpBlocks = notRemoteIpBlocks
        }
    }

    public struct Operation: Sendable, Hashable, Codable {
        public var hosts: [String] = [], notHosts: [String] = []
        public var ports: [UInt16] = [], notPorts: [UInt16] = []
        public var methods: [String] = [], notMethods: [String] = []
        public var paths: [String] = [], notPaths: [String] = []

        public init(hosts: [String] = [], notHosts: [String] = [], ports: [UInt16] = [], notPorts: [UInt16] = [],
                    methods: [String] = [], notMethods: [String] = [], paths: [String] = [], notPaths: [String] = []) {
            self.hosts = hosts
            self.notHosts = notHosts
            self.ports = ports
            self.notPorts = notPorts
            self.methods = methods
            self.notMethods = notMethods
            self.paths = paths
            self.notPaths = notPaths
        }
    }

    public struct Condition: Sendable, Hashable, Codable {
        public var key: String
        public var values: [String]
        public var notValues: [String]

        public init(key: String, values: [String], notValues: [String]) {
            self.key = key
            self.values = values
            self.notValues = notValues
        }
    }

    public struct Rule: Sendable, Hashable, Codable {
        public var from: [Source]
        public var to: [Operation]
        public var when: [Condition]

        public init(from: [Source], to: [Operation], when: [Condition]) {
            self.from = from
            self.to = to
            self.when = when
        }
    }

    public var selector: [String: String]?
    public var action: Action
    /// The external authorizer for CUSTOM.
    public var provider: String?
    /// `nil` rules: the policy has no `rules` field (ALLOW with none denies everything, Istio's "allow-nothing").
    public var rules: [Rule]?

    public init(selector: [String: String]?, action: Action, provider: String?, rules: [Rule]?) {
        self.selector = selector
        self.action = action
        self.provider = provider
        self.rules = rules
    }
}

public struct PeerAuthentication: Sendable, Hashable, Codable {
    public enum Mode: String, Sendable, Hashable, Codable { case unset = "UNSET", disable = "DISABLE", permissive = "PERMISSIVE", strict = "STRICT" }
    public var selector: [String: String]?
    public var mode: Mode
    public var portLevel: [UInt16: Mode]
}

public struct RequestAuthentication: Sendable, Hashable, Codable {
    public struct JWTRule: Sendable, Hashable, Codable {
        public var issuer: String
        public var audiences: [String]
        public var jwksUri: String?
        public var jwks: String?
        public var fromHeaders: [(name: String, prefix: String?)] {
            zip(fromHeaderNames, fromHeaderPrefixes).map { ($0, $1) }
        }
        var fromHeaderNames: [String]
        var fromHeaderPrefixes: [String?]
        public var fromParams: [String]
        public var forwardOriginalToken: Bool
        public var outputPayloadToHeader: String?
    }
    public var selector: [String: String]?
    public var jwtRules: [JWTRule]
}

extension AuthorizationPolicy.Rule {
    /// Whether the rule names request attributes (HTTP method, path, host, headers, JWT): only a proxy that parses
    /// the request can check it; on a connection, Istio's L4 semantics apply.
    public var namesRequestAttributes: Bool {
        from.contains { !$0.requestPrincipals.isEmpty || !$0.notRequestPrincipals.isEmpty || !$0.remoteIpBlocks.isEmpty
            || !$0.notRemoteIpBlocks.isEmpty }
            || to.contains { !$0.hosts.isEmpty || !$0.notHosts.isEmpty || !$0.methods.isEmpty || !$0.notMethods.isEmpty
                || !$0.paths.isEmpty || !$0.notPaths.isEmpty }
            || when.contains { Self.isRequestKey($0.key) }
    }

    /// `when` keys about the request rather than the connection.
    public static func isRequestKey(_ key: String) -> Bool { key.hasPrefix("request.") || key == "remote.ip" }
}

extension AuthorizationPolicy {
    /// Whether checking it needs the request (a rule naming request attributes, or a CUSTOM provider).
    public var needsRequest: Bool { action == .custom || (rules ?? []).contains { $0.namesRequestAttributes } }
}
