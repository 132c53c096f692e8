/// Istio's `VirtualService.http` routes: match, route or redirect or direct response, rewrite, headers,
/// timeout, retries, fault injection and mirroring. The L7 pipeline consumes these (issue 5).
public struct HTTPRoute: Sendable, Hashable, Codable {
    public var name: String?
    public var match: [HTTPMatch]
    public var route: [VirtualService.RouteDestination]
    public var redirect: HTTPRedirect?
    public var directResponse: DirectResponse?
    public var rewrite: HTTPRewrite?
    public var timeout: Duration?
    public var retries: HTTPRetry?
    public var fault: HTTPFault?
    public var mirror: VirtualService.Destination?
    /// Percentage of traffic mirrored, 0...100 (Istio's default when `mirror` is set: 100).
    public var mirrorPercentage: Double?
    public var headers: HeaderOperations?
}

public enum StringMatch: Sendable, Hashable, Codable {
    case exact(String)
    case prefix(String)
    case regex(String)
}

public struct HTTPMatch: Sendable, Hashable, Codable {
    public var name: String?
    public var uri: StringMatch?
    public var scheme: StringMatch?
    public var method: StringMatch?
    public var authority: StringMatch?
    public var headers: [String: StringMatch]
    public var withoutHeaders: [String: StringMatch]
    public var queryParams: [String: StringMatch]
    public var port: UInt16?
    public var sourceLabels: [String: String]
    public var gateways: [String]
    public var ignoreUriCase: Bool
}

public struct HTTPRedirect: Sendable, Hashable, Codable {
    public var uri: String?
    public var authority: String?
    public var port: UInt16?
    public var scheme: String?
    public var redirectCode: Int
}

public struct DirectResponse: Sendable, Hashable, Codable {
    public var status: Int
    public var body: String?
}

public struct HTTPRewrite: Sendable, Hashable, Codable {
    public var uri: String?
    public var authority: String?
    /// Istio's `uriRegexRewrite`: replace what `match` matches in the path with `rewrite` (`\1` groups).
    public var uriRegexRewrite: RegexRewrite?

    public struct RegexRewrite: Sendable, Hashable, Codable {
        public var match: String
        public var rewrite: String
    }
}

public struct HTTPRetry: Sendable, Hashable, Codable {
    public var attempts: Int
    public var perTryTimeout: Duration?
    /// Envoy retry conditions (`5xx`, `gateway-error`, `connect-failure`, `retriable-4xx`, `reset`, ...) and
    /// status codes, as Istio passes them through.
    public var retryOn: [String]

    public init(attempts: Int, perTryTimeout: Duration?, retryOn: [String]) {
        self.attempts = attempts
        self.perTryTimeout = perTryTimeout
        self.retryOn = retryOn
    }
}

public struct HTTPFault: Sendable, Hashable, Codable {
    public struct Delay: Sendable, Hashable, Codable {
        public var fixedDelay: Duration
        public var percentage: Double
    }
    public struct Abort: Sendable, Hashable, Codable {
        public enum Kind: Sendable, Hashable, Codable { case httpStatus(Int), grpcStatus(String) }
        public var kind: Kind
        public var percentage: Double
    }
    public var delay: Delay?
    public var abort: Abort?
}

public struct HeaderOperations: Sendable, Hashable, Codable {
    public struct Ops: Sendable, Hashable, Codable {
        public var set: [String: String]
        public var add: [String: String]
        public var remove: [String]
    }
    public var request: Ops?
    public var response: Ops?
}
