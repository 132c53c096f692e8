import SluiceModel

/// What an authorization decision looks at, for one request (L7) or connection (L4: no method, path, headers).
public struct AuthorizationRequest: Sendable {
    public var sourceIP: IPAddress?
    /// The peer's mTLS identity (`spiffe://TD/ns/NS/sa/SA`), nil over plaintext.
    public var principal: String?
    /// The JWT's `iss/sub` (RequestAuthentication), nil without a valid token.
    public var requestPrincipal: String?
    public var claims: [String: [String]] = [:]
    public var host: String = ""
    public var port: UInt16 = 0
    public var method: String = ""
    public var path: String = ""
    /// Lower-case names.
    public var headers: [String: String] = [:]
    public var destinationIP: IPAddress?
    public var sni: String?
    /// A connection, not a request (tunnel streams, relayed TCP): rules on request attributes cannot be checked.
    public var layer4 = false

    public init(sourceIP: IPAddress?, principal: String? = nil, port: UInt16) {
        self.sourceIP = sourceIP
        self.principal = principal.map(Self.bare)
        self.port = port
    }

    /// A SPIFFE ID without its scheme, as Istio writes principals.
    static func bare(_ principal: String) -> String {
        principal.hasPrefix("spiffe://") ? String(principal.dropFirst(9)) : principal
    }

    /// `ns` of the principal (Istio's `source.namespace`).
    var namespace: String? {
        guard let p = principal, let r = p.range(of: "/ns/") else { return nil }
        return String(p[r.upperBound...].prefix { $0 != "/" })
    }
}

/// Istio's AuthorizationPolicy evaluation for the policies that apply to one workload or gateway: CUSTOM is not
/// supported (ignored, reported at build), any matching DENY denies, then with ALLOW policies present one must
/// match, otherwise the request is allowed; matching AUDIT policies mark the decision for the log. A policy
/// matches when one of its rules does; a rule when some `from` source, some `to` operation and every `when`
/// condition match (absent parts match everything). String fields take Istio's forms: exact, `prefix*`,
/// `*suffix` and `*`; IP fields take addresses and CIDRs. Pure and immutable: built off the data plane.
public final class AuthorizationEngine: Sendable {
    public enum Decision: Equatable, Sendable {
        case allow(audited: Bool)
        /// `policy`: the DENY policy that matched, or nil when no ALLOW policy did.
        case deny(policy: String?, audited: Bool)

        public var allowed: Bool { if case .allow = self { return true } else { return false } }
    }

    struct Compiled: Sendable {
        let name: String
        let action: AuthorizationPolicy.Action
        let rules: [AuthorizationPolicy.Rule]?
    }

    let deny: [Compiled]
    let allow: [Compiled]
    let audit: [Compiled]
    /// CUSTOM policies present (not enforced here).
    public let unsupported: [String]

    public init(_ policies: [Named<AuthorizationPolicy>]) {
        // Principals compare in Istio's form, `TD/ns/NS/sa/SA` (a policy may also spell the `spiffe://` scheme).
        let all = policies.map { p in
            Compiled(name: p.qualifiedName, action: p.spec.action, rules: p.spec.rules.map { rules in
                rules.map { rule in
                    var rule = rule
                    for i in rule.from.indices {
                        rule.from[i].principals = rule.from[i].principals.map(AuthorizationRequest.bare)
                        rule.from[i].notPrincipals = rule.from[i].notPrincipals.map(AuthorizationRequest.bare)
                    }
                    return rule
                }
            })
        }
        deny = all.filter { $0.action == .deny }
        allow = all.filter { $0.action == .allow }
        audit = all.filter { $0.action == .audit }
        unsupported = all.filter { $0.action == .custom }.map(\.name)
    }

    public var isEmpty: Bool { deny.isEmpty && allow.isEmpty && audit.isEmpty }

    public func evaluate(_ r: AuthorizationRequest) -> Decision {
        let audited = audit.contains { Self.matches($0, r) }
        if let d = deny.first(where: { Self.matches($0, r) }) { return .deny(policy: d.name, audited: audited) }
        if allow.isEmpty || allow.contains(where: { Self.matches($0, r) }) { return .allow(audited: audited) }
        return .deny(policy: nil, audited: audited)
    }

    static func matches(_ p: Compiled, _ r: AuthorizationRequest) -> Bool {
        // No `rules` field: matches nothing (for ALLOW that is Istio's allow-nothing).
        guard let rules = p.rules else { return false }
        return rules.contains { rule in
            if r.layer4 && rule.namesRequestAttributes {
                // A connection has no request to check these against (as Istio's ztunnel): an ALLOW rule cannot be
                // satisfied, a DENY rule applies on its connection attributes alone (failing closed).
                guard p.action == .deny else { return false }
                return (rule.from.isEmpty || rule.from.contains { connectionSource($0, r) })
                    && (rule.to.isEmpty || rule.to.contains { (($0.ports.isEmpty || $0.ports.contains(r.port)) && !$0.notPorts.contains(r.port)) })
                    && rule.when.filter { !AuthorizationPolicy.Rule.isRequestKey($0.key) }.allSatisfy { condition($0, r) }
            }
            return (rule.from.isEmpty || rule.from.contains { source($0, r) })
                && (rule.to.isEmpty || rule.to.contains { operation($0, r) })
                && rule.when.allSatisfy { condition($0, r) }
        }
    }

    static func connectionSource(_ s: AuthorizationPolicy.Source, _ r: AuthorizationRequest) -> Bool {
        field(s.principals, s.notPrincipals, r.principal)
            && field(s.namespaces, s.notNamespaces, r.namespace)
            && ipField(s.ipBlocks, s.notIpBlocks, r.sourceIP)
    }

    static func source(_ s: AuthorizationPolicy.Source, _ r: AuthorizationRequest) -> Bool {
        field(s.principals, s.notPrincipals, r.principal)
            && field(s.requestPrincipals, s.notRequestPrincipals, r.requestPrincipal)
            && field(s.namespaces, s.notNamespaces, r.namespace)
            && ipField(s.ipBlocks, s.notIpBlocks, r.sourceIP)
            && ipField(s.remoteIpBlocks, s.notRemoteIpBlocks, r.sourceIP)
    }

    static func operation(_ o: AuthorizationPolicy.Operation, _ r: AuthorizationRequest) -> Bool {
        let host = r.host.split(separator: ":").first.map(String.init) ?? r.host
        let hostsOK = (o.hosts.isEmpty || o.hosts.contains { stringMatch($0, host.lowercased()) || stringMatch($0, r.host.lowercased()) })
            && !o.notHosts.contains { stringMatch($0, host.lowercased()) || stringMatch($0, r.host.lowercased()) }
        return hostsOK
            && (o.ports.isEmpty || o.ports.contains(r.port)) && !o.notPorts.contains(r.port)
            && field(o.methods, o.notMethods, r.method)
            && field(o.paths, o.notPaths, r.path)
    }

    static func condition(_ c: AuthorizationPolicy.Condition, _ r: AuthorizationRequest) -> Bool {
        let values: [String]
        let key = c.key
        switch key {
        case "source.ip", "remote.ip":
            return ipField(c.values, c.notValues, r.sourceIP)
        case "destination.ip":
            return ipField(c.values, c.notValues, r.destinationIP)
        case "destination.port":
            values = [String(r.port)]
        case "source.principal": values = r.principal.map { [$0] } ?? []
        case "source.namespace": values = r.namespace.map { [$0] } ?? []
        case "request.auth.principal": values = r.requestPrincipal.map { [$0] } ?? []
        case "connection.sni": values = r.sni.map { [$0] } ?? []
        default:
            if key.hasPrefix("request.headers["), key.hasSuffix("]") {
                let name = key.dropFirst("request.headers[".count).dropLast().lowercased()
                values = r.headers[name].map { [$0] } ?? []
            } else if key.hasPrefix("request.auth.claims["), key.hasSuffix("]") {
                values = r.claims[String(key.dropFirst("request.auth.claims[".count).dropLast())] ?? []
            } else {
                return false  // an unknown key never matches (the validator reports it)
            }
        }
        // As a list field, with several values (a claim may hold many): one must match, none may be excluded.
        if !c.values.isEmpty && !values.contains(where: { v in c.values.contains { stringMatch($0, v) } }) { return false }
        return !values.contains { v in c.notValues.contains { stringMatch($0, v) } }
    }

    /// A list field and its `not` twin: the value must match one of `positive` (when given) and none of `negative`.
    /// A missing value (no principal over plaintext) matches no positive list but passes a negative one.
    static func field(_ positive: [String], _ negative: [String], _ value: String?) -> Bool {
        if !positive.isEmpty {
            guard let v = value, positive.contains(where: { stringMatch($0, v) }) else { return false }
        }
        if let v = value, negative.contains(where: { stringMatch($0, v) }) { return false }
        return true
    }

    static func ipField(_ positive: [String], _ negative: [String], _ ip: IPAddress?) -> Bool {
        if !positive.isEmpty {
            guard let ip, positive.contains(where: { cidrContains($0, ip) }) else { return false }
        }
        if let ip, negative.contains(where: { cidrContains($0, ip) }) { return false }
        return true
    }

    /// Istio's string match: `*` (present), `prefix*`, `*suffix`, else exact.
    static func stringMatch(_ pattern: String, _ value: String) -> Bool {
        if pattern == "*" { return !value.isEmpty }
        if pattern.hasSuffix("*") { return value.hasPrefix(pattern.dropLast()) }
        if pattern.hasPrefix("*") { return value.hasSuffix(pattern.dropFirst()) }
        return value == pattern
    }

    /// Whether `block` (an address or `address/prefix`) contains `ip`.
    static func cidrContains(_ block: String, _ ip: IPAddress) -> Bool {
        let parts = block.split(separator: "/", maxSplits: 1)
        guard let base = IPAddress(String(parts[0])) else { return false }
        switch (base, ip) {
        case (.v4(let b), .v4(let a)):
            let bits = parts.count == 2 ? Int(parts[1]) ?? -1 : 32
            guard (0...32).contains(bits) else { return false }
            let mask: UInt32 = bits == 0 ? 0 : ~UInt32(0) << (32 - bits)
            return (UInt32(bigEndian: b) & mask) == (UInt32(bigEndian: a) & mask)
        case (.v6(let bh, let bl), .v6(let ah, let al)):
            let bits = parts.count == 2 ? Int(parts[1]) ?? -1 : 128
            guard (0...128).contains(bits) else { return false }
            let b = (UInt64(bigEndian: bh), UInt64(bigEndian: bl)), a = (UInt64(bigEndian: ah), UInt64(bigEndian: al))
            let hiMask: UInt64 = bits >= 64 ? ~0 : (bits == 0 ? 0 : ~UInt64(0) << (64 - bits))
            let loMask: UInt64 = bits <= 64 ? 0 : (bits == 128 ? ~0 : ~UInt64(0) << (128 - bits))
            return (b.0 & hiMask) == (a.0 & hiMask) && (b.1 & loMask) == (a.1 & loMask)
        default:
            return false
        }
    }
}
