/// `sluice.dev/v1` kinds, only where Istio has no resource that fits; written in Istio's shape.

/// Rate limits for a service (Istio configures these through EnvoyFilter patches; Sluice gives them a resource).
/// `local` limits are token buckets each agent enforces on its own; `quotas` are mesh-wide budgets the control
/// plane apportions.
public struct RateLimitPolicy: Sendable, Hashable, Codable {
    public enum Key: Sendable, Hashable, Codable {
        /// One bucket for all traffic that matches.
        case none
        case sourceIP
        case header(String)
        case sourcePrincipal
    }

    public struct TokenBucket: Sendable, Hashable, Codable {
        public var maxTokens: Int
        public var tokensPerFill: Int
        public var fillInterval: Duration
        public init(maxTokens: Int, tokensPerFill: Int, fillInterval: Duration) {
            self.maxTokens = maxTokens
            self.tokensPerFill = tokensPerFill
            self.fillInterval = fillInterval
        }
    }

    public struct Local: Sendable, Hashable, Codable {
        public var name: String?
        /// Applies to requests matching any of these (all requests when empty).
        public var match: [HTTPMatch]
        public var tokenBucket: TokenBucket
        public var key: Key
        /// Status sent when the bucket is empty (429 unless set).
        public var status: Int
    }

    public struct Quota: Sendable, Hashable, Codable {
        public var name: String
        public var limit: Int
        public var per: Duration
        public var key: Key
    }

    public var host: String
    public var local: [Local]
    public var quotas: [Quota]
}

/// Mesh-wide settings (Istio's MeshConfig, as a resource).
public struct MeshConfig: Sendable, Hashable, Codable {
    public enum OutboundPolicy: String, Sendable, Hashable, Codable { case allowAny = "ALLOW_ANY", registryOnly = "REGISTRY_ONLY" }
    public var trustDomain: String
    public var connectTimeout: Duration
    public var tcpIdleTimeout: Duration
    public var requestTimeout: Duration?
    public var accessLog: Bool
    public var tracingSamplingPercent: Double
    public var outboundTrafficPolicy: OutboundPolicy
    /// Policies in this namespace without a selector apply to the whole mesh (Istio's `rootNamespace`).
    public var rootNamespace: String
    /// How long the agent waits for a client's first bytes on a port of no declared protocol before it treats the
    /// connection as TCP (server-first protocols such as MySQL send nothing first).
    public var protocolDetectionTimeout: Duration

    public static let defaults = MeshConfig(
        trustDomain: "cluster.local", connectTimeout: .seconds(10), tcpIdleTimeout: .seconds(3600), requestTimeout: nil,
        accessLog: false, tracingSamplingPercent: 1, outboundTrafficPolicy: .allowAny, rootNamespace: "istio-system",
        protocolDetectionTimeout: .milliseconds(100))
}

extension RateLimitPolicy {
    static func decodeKey(_ r: YAMLReader) -> Key {
        guard let k = r.child("key") else { return .none }
        guard k.expectMapping() else { return .none }
        k.checkKeys(["sourceIp", "header", "sourcePrincipal"])
        let set = ["sourceIp", "header", "sourcePrincipal"].filter { k.child($0) != nil }
        if set.count > 1 { k.sink.error(k.path, k.line, "sourceIp, header and sourcePrincipal are mutually exclusive") }
        if k.bool("sourceIp") == true { return .sourceIP }
        if k.bool("sourcePrincipal") == true { return .sourcePrincipal }
        if let h = k.string("header") {
            guard !h.isEmpty else {
                k.sink.error("\(k.path).header", k.line, "header name is empty")
                return .none
            }
            return .header(h.lowercased())
        }
        return .none
    }

    static func decode(_ r: YAMLReader) -> RateLimitPolicy? {
        r.checkKeys(["host", "local", "quotas"])
        guard let host = r.requiredString("host") else { return nil }
        let local: [Local] = r.array("local").compactMap { l in
            guard l.expectMapping() else { return nil }
            l.checkKeys(["name", "match", "tokenBucket", "key", "status"])
            guard let tb = l.child("tokenBucket"), tb.expectMapping() else {
                l.sink.error("\(l.path).tokenBucket", l.line, "required field 'tokenBucket' is missing")
                return nil
            }
            tb.checkKeys(["maxTokens", "tokensPerFill", "fillInterval"])
            guard let maxTokens = tb.int("maxTokens", in: 1...Int(Int32.max)) else {
                if tb.child("maxTokens") == nil { tb.sink.error("\(tb.path).maxTokens", tb.line, "required field 'maxTokens' is missing") }
                return nil
            }
            let fill = tb.duration("fillInterval") ?? .seconds(1)
            if fill < .milliseconds(1) {
                tb.sink.error("\(tb.path).fillInterval", tb.child("fillInterval")?.line, "fillInterval must be at least 1ms")
            }
            return Local(name: l.string("name"), match: l.array("match").compactMap { HTTPMatch.decode($0) },
                         tokenBucket: TokenBucket(maxTokens: maxTokens,
                                                  tokensPerFill: tb.int("tokensPerFill", in: 1...Int(Int32.max)) ?? maxTokens,
                                                  fillInterval: fill),
                         key: decodeKey(l), status: l.int("status", in: 400...599) ?? 429)
        }
        var names = Set<String>()
        let quotas: [Quota] = r.array("quotas").compactMap { q in
            guard q.expectMapping() else { return nil }
            q.checkKeys(["name", "limit", "per", "key"])
            guard let name = q.requiredString("name"), let limit = q.int("limit", in: 1...Int(Int32.max)) else {
                if q.child("limit") == nil { q.sink.error("\(q.path).limit", q.line, "required field 'limit' is missing") }
                return nil
            }
            if !names.insert(name).inserted { q.sink.error("\(q.path).name", q.line, "quota '\(name)' is defined twice") }
            guard let per = q.duration("per") else {
                if q.child("per") == nil { q.sink.error("\(q.path).per", q.line, "required field 'per' is missing", hint: "e.g. per: 1m") }
                return nil
            }
            return Quota(name: name, limit: limit, per: per, key: decodeKey(q))
        }
        if local.isEmpty && quotas.isEmpty {
            r.sink.error(r.path, r.line, "a RateLimitPolicy needs local limits or quotas")
        }
        return RateLimitPolicy(host: host, local: local, quotas: quotas)
    }
}

extension MeshConfig {
    static func decode(_ r: YAMLReader) -> MeshConfig? {
        r.checkKeys(["trustDomain", "connectTimeout", "tcpIdleTimeout", "requestTimeout", "accessLog", "tracing",
                     "outboundTrafficPolicy", "rootNamespace", "protocolDetectionTimeout"])
        var m = MeshConfig.defaults
        if let ns = r.string("rootNamespace") {
            if isDNSLabel(ns, maxLength: 63, allowDots: false) { m.rootNamespace = ns } else {
                r.sink.error("\(r.path).rootNamespace", r.child("rootNamespace")?.line, "'\(ns)' is not a namespace name")
            }
        }
        if let td = r.string("trustDomain") {
            if isDNSLabel(td, maxLength: 255, allowDots: true) { m.trustDomain = td } else {
                r.sink.error("\(r.path).trustDomain", r.child("trustDomain")?.line, "'\(td)' is not a valid trust domain",
                             hint: "use lower-case letters, digits, '-' and '.', as SPIFFE requires")
            }
        }
        if let d = r.duration("connectTimeout") { m.connectTimeout = d }
        if let d = r.duration("tcpIdleTimeout") { m.tcpIdleTimeout = d }
        if let d = r.duration("protocolDetectionTimeout") {
            if d > .zero && d <= .seconds(10) { m.protocolDetectionTimeout = d } else {
                r.sink.error("\(r.path).protocolDetectionTimeout", r.child("protocolDetectionTimeout")?.line,
                             "protocolDetectionTimeout must be above 0 and at most 10s",
                             hint: "declare a port's protocol to skip detection")
            }
        }
        m.requestTimeout = r.duration("requestTimeout")
        if let a = r.bool("accessLog") { m.accessLog = a }
        if let t = r.child("tracing"), t.expectMapping() {
            t.checkKeys(["samplingPercent"])
            if let p = t.double("samplingPercent", in: 0...100) { m.tracingSamplingPercent = p }
        }
        if let o = r.child("outboundTrafficPolicy"), o.expectMapping() {
            o.checkKeys(["mode"])
            if let mode = o.enumValue("mode", OutboundPolicy.self) { m.outboundTrafficPolicy = mode }
        }
        return m
    }
}
