func decodeSelector(_ r: YAMLReader) -> [String: String]? {
    guard let s = r.child("selector"), s.expectMapping() else { return nil }
    s.checkKeys(["matchLabels"])
    return s.stringMap("matchLabels")
}

func isValidCIDR(_ text: String) -> Bool {
    let parts = text.split(separator: "/", omittingEmptySubsequences: false)
    guard parts.count <= 2, let ip = IPAddress(String(parts[0])) else { return false }
    guard parts.count == 2 else { return true }
    guard let bits = Int(parts[1]) else { return false }
    return bits >= 0 && bits <= (ip.isIPv4 ? 32 : 128)
}

extension AuthorizationPolicy {
    /// Condition keys Istio documents for `when`; header and claim keys take a bracketed name.
    static let conditionKeys: Set<String> = [
        "source.ip", "remote.ip", "source.namespace", "source.principal", "request.auth.principal",
        "request.auth.audiences", "request.auth.presenter", "destination.ip", "destination.port", "connection.sni",
    ]

    static func decode(_ r: YAMLReader) -> AuthorizationPolicy? {
        r.checkKeys(["selector", "targetRef", "targetRefs", "action", "provider", "rules"])
        let action = r.enumValue("action", Action.self) ?? .allow
        var provider: String?
        if let p = r.child("provider"), p.expectMapping() {
            p.checkKeys(["name"])
            provider = p.requiredString("name")
        }
        if action == .custom && provider == nil {
            r.sink.error("\(r.path).provider", r.line, "action CUSTOM needs a provider", hint: "set provider.name")
        } else if action != .custom && r.child("provider") != nil {
            r.sink.error("\(r.path).provider", r.child("provider")?.line, "provider applies only to action CUSTOM")
        }
        var rules: [Rule]?
        if r.child("rules") != nil {
            rules = r.array("rules").compactMap { rule in
                guard rule.expectMapping() else { return nil }
                rule.checkKeys(["from", "to", "when"])
                let from: [Source] = rule.array("from").compactMap { f in
                    guard f.expectMapping() else { return nil }
                    f.checkKeys(["source"])
                    guard let s = f.child("source"), s.expectMapping() else { return nil }
                    return decodeSource(s)
                }
                let to: [Operation] = rule.array("to").compactMap { t in
                    guard t.expectMapping() else { return nil }
                    t.checkKeys(["operation"])
                    guard let o = t.child("operation"), o.expectMapping() else { return nil }
                    return decodeOperation(o)
                }
                let when: [Condition] = rule.array("when").compactMap { c in
                    guard c.expectMapping() else { return nil }
                    c.checkKeys(["key", "values", "notValues"])
                    guard let key = c.requiredString("key") else { return nil }
                    let known = conditionKeys.contains(key) || key.hasPrefix("request.headers[") && key.hasSuffix("]")
                        || key.hasPrefix("request.auth.claims[") && key.hasSuffix("]")
                        || key.hasPrefix("experimental.envoy.filters.")
                    if !known {
                        c.sink.error("\(c.path).key", c.child("key")?.line, "'\(key)' is not a condition key",
                                     hint: "e.g. request.headers[x-token], source.ip, request.auth.claims[iss]")
                    }
                    let values = c.strings("values"), notValues = c.strings("notValues")
                    if values.isEmpty && notValues.isEmpty {
                        c.sink.error(c.path, c.line, "a condition needs values or notValues")
                    }
                    return Condition(key: key, values: values, notValues: notValues)
                }
                return Rule(from: from, to: to, when: when)
            }
        }
        return AuthorizationPolicy(selector: decodeSelector(r), action: action, provider: provider, rules: rules)
    }

    static func decodeSource(_ s: YAMLReader) -> Source {
        s.checkKeys(["principals", "notPrincipals", "requestPrincipals", "notRequestPrincipals", "namespaces",
                     "notNamespaces", "ipBlocks", "notIpBlocks", "remoteIpBlocks", "notRemoteIpBlocks"])
        func cidrs(_ key: String) -> [String] {
            let list = s.strings(key)
            for (i, c) in list.enumerated() where !isValidCIDR(c) {
                s.sink.error("\(s.path).\(key)[\(i)]", s.child(key)?.line, "'\(c)' is not an IP address or CIDR block")
            }
            return list
        }
        return Source(principals: s.strings("principals"), notPrincipals: s.strings("notPrincipals"),
                      requestPrincipals: s.strings("requestPrincipals"), notRequestPrincipals: s.strings("notRequestPrincipals"),
                      namespaces: s.strings("namespaces"), notNamespaces: s.strings("notNamespaces"),
                      ipBlocks: cidrs("ipBlocks"), notIpBlocks: cidrs("notIpBlocks"),
                      remoteIpBlocks: cidrs("remoteIpBlocks"), notRemoteIpBlocks: cidrs("notRemoteIpBlocks"))
    }

    static func decodeOperation(_ o: YAMLReader) -> Operation {
        o.checkKeys(["hosts", "notHosts", "ports", "notPorts", "methods", "notMethods", "paths", "notPaths"])
        func ports(_ key: String) -> [UInt16] {
            o.strings(key).enumerated().compactMap { i, p in
                guard let n = UInt16(p), n > 0 else {
                    o.sink.error("\(o.path).\(key)[\(i)]", o.child(key)?.line, "'\(p)' is not a port number")
                    return nil
                }
                return n
            }
        }
        return Operation(hosts: o.strings("hosts"), notHosts: o.strings("notHosts"), ports: ports("ports"),
                         notPorts: ports("notPorts"), methods: o.strings("methods"), notMethods: o.strings("notMethods"),
                         paths: o.strings("paths"), notPaths: o.strings("notPaths"))
    }
}

extension PeerAuthentication {
    static func decode(_ r: YAMLReader) -> PeerAuthentication? {
        r.checkKeys(["selector", "mtls", "portLevelMtls"])
        var mode = Mode.unset
        if let m = r.child("mtls"), m.expectMapping() {
            m.checkKeys(["mode"])
            mode = m.enumValue("mode", Mode.self) ?? .unset
        }
        let selector = decodeSelector(r)
        var portLevel: [UInt16: Mode] = [:]
        if let pl = r.child("portLevelMtls"), pl.expectMapping() {
            if selector == nil {
                pl.sink.error(pl.path, pl.line, "portLevelMtls needs a workload selector",
                              hint: "add selector.matchLabels, as Istio requires")
            }
            for pair in pl.pairs {
                let key = pair.key
                guard let port = UInt16(key), port > 0, let v = pl.child(key), v.expectMapping() else {
                    pl.sink.error("\(pl.path).\(key)", pair.keyLine, "'\(key)' is not a port number")
                    continue
                }
                v.checkKeys(["mode"])
                portLevel[port] = v.enumValue("mode", Mode.self) ?? .unset
            }
        }
        return PeerAuthentication(selector: selector, mode: mode, portLevel: portLevel)
    }
}

extension RequestAuthentication {
    static func decode(_ r: YAMLReader) -> RequestAuthentication? {
        r.checkKeys(["selector", "targetRef", "targetRefs", "jwtRules"])
        var issuers = Set<String>()
        let rules: [JWTRule] = r.array("jwtRules").compactMap { j in
            guard j.expectMapping() else { return nil }
            j.checkKeys(["issuer", "audiences", "jwksUri", "jwks", "fromHeaders", "fromParams", "fromCookies",
                         "outputPayloadToHeader", "forwardOriginalToken", "outputClaimToHeaders", "timeout"])
            guard let issuer = j.requiredString("issuer") else { return nil }
            if !issuers.insert(issuer).inserted {
                j.sink.error("\(j.path).issuer", j.child("issuer")?.line, "issuer '\(issuer)' appears in two rules")
            }
            let uri = j.string("jwksUri"), jwks = j.string("jwks")
            if uri != nil && jwks != nil {
                j.sink.error(j.path, j.line, "jwksUri and jwks are mutually exclusive")
            }
            if let uri, !(uri.hasPrefix("https://") || uri.hasPrefix("http://")) {
                j.sink.error("\(j.path).jwksUri", j.child("jwksUri")?.line, "'\(uri)' is not an http(s) URL")
            }
            var names: [String] = [], prefixes: [String?] = []
            for h in j.array("fromHeaders") {
                guard h.expectMapping() else { continue }
                h.checkKeys(["name", "prefix"])
                if let n = h.requiredString("name") {
                    names.append(n)
                    prefixes.append(h.string("prefix"))
                }
            }
            return JWTRule(issuer: issuer, audiences: j.strings("audiences"), jwksUri: uri, jwks: jwks,
                           fromHeaderNames: names, fromHeaderPrefixes: prefixes, fromParams: j.strings("fromParams"),
                           forwardOriginalToken: j.bool("forwardOriginalToken") ?? false,
                           outputPayloadToHeader: j.string("outputPayloadToHeader"))
        }
        return RequestAuthentication(selector: decodeSelector(r), jwtRules: rules)
    }
}
