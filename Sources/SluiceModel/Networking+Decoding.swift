extension Gateway {
    static func decode(_ r: YAMLReader) -> Gateway? {
        r.checkKeys(["selector", "servers"])
        var servers: [Server] = []
        for s in r.array("servers") {
            guard s.expectMapping() else { continue }
            s.checkKeys(["port", "bind", "hosts", "name", "tls", "defaultEndpoint"])
            guard let p = s.child("port"), p.expectMapping() else {
                r.sink.error("\(s.path).port", s.line, "required field 'port' is missing")
                continue
            }
            guard let port = Gateway.Port.decode(p) else { continue }
            if let bind = s.string("bind"), IPAddress(bind) == nil {
                r.sink.error("\(s.path).bind", s.child("bind")?.line, "'\(bind)' is not an IP address")
                continue
            }
            let hosts = s.strings("hosts")
            if hosts.isEmpty {
                s.sink.error("\(s.path).hosts", s.line, "a server needs at least one host", hint: "use [\"*\"] for any host")
            }
            let tls = s.child("tls").flatMap { ServerTLSSettings.decode($0, port: port) }
            if tls == nil && (port.protocol == .https || port.protocol == .tls) {
                s.sink.error("\(s.path).tls", s.line, "a \(port.protocol.rawValue) server needs tls settings",
                             hint: "add tls: {mode: PASSTHROUGH} or {mode: SIMPLE, credentialName: ...}")
            }
            servers.append(Server(port: port, bind: s.string("bind"), hosts: hosts, name: s.string("name"), tls: tls))
        }
        if servers.isEmpty {
            r.sink.error("\(r.path).servers", r.line, "a Gateway needs at least one server")
            return nil
        }
        return Gateway(selector: r.stringMap("selector"), servers: servers)
    }
}

extension Gateway.Port {
    static func decode(_ p: YAMLReader) -> Gateway.Port? {
        p.checkKeys(["number", "protocol", "name", "targetPort"])
        guard let number = p.port("number") else {
            if p.child("number") == nil { p.sink.error("\(p.path).number", p.line, "required field 'number' is missing") }
            return nil
        }
        let protoText = p.string("protocol") ?? "TCP"
        guard let proto = PortProtocol(istio: protoText) else {
            p.sink.error("\(p.path).protocol", p.child("protocol")?.line, "unknown protocol '\(protoText)'",
                         hint: "one of \(PortProtocol.declarable.joined(separator: ", "))")
            return nil
        }
        return Gateway.Port(number: number, protocol: proto, name: p.string("name") ?? "\(protoText.lowercased())-\(number)")
    }
}

extension VirtualService {
    static func decode(_ r: YAMLReader) -> VirtualService? {
        r.checkKeys(["hosts", "gateways", "http", "tcp", "tls", "exportTo"])
        let hosts = r.strings("hosts")
        for (i, h) in hosts.enumerated() where !isValidHost(h) {
            r.sink.error("\(r.path).hosts[\(i)]", r.line, "'\(h)' is not a valid host")
        }
        var tcp: [TCPRoute] = []
        for t in r.array("tcp") {
            guard t.expectMapping() else { continue }
            t.checkKeys(["match", "route"])
            var matches: [L4Match] = []
            for m in t.array("match") {
                guard m.expectMapping() else { continue }
                m.checkKeys(["port", "destinationSubnets", "sourceLabels", "gateways", "sourceNamespace"])
                matches.append(L4Match(port: m.port("port"), destinationSubnets: m.strings("destinationSubnets"),
                                       sourceLabels: m.stringMap("sourceLabels"), gateways: m.strings("gateways")))
            }
            let routes = RouteDestination.decodeList(t)
            if routes.isEmpty { t.sink.error("\(t.path).route", t.line, "a tcp route needs at least one destination") }
            tcp.append(TCPRoute(match: matches, route: routes))
        }
        var tls: [TLSRoute] = []
        for t in r.array("tls") {
            guard t.expectMapping() else { continue }
            t.checkKeys(["match", "route"])
            var matches: [TLSMatch] = []
            for m in t.array("match") {
                guard m.expectMapping() else { continue }
                m.checkKeys(["sniHosts", "port", "destinationSubnets", "sourceLabels", "gateways", "sourceNamespace"])
                let sni = m.strings("sniHosts")
                if sni.isEmpty {
                    m.sink.error("\(m.path).sniHosts", m.line, "a tls match needs sniHosts",
                                 hint: "list the server names this route takes, e.g. [\(hosts.first ?? "api.example.com")]")
                }
                for (i, h) in sni.enumerated() where !isValidHost(h) {
                    m.sink.error("\(m.path).sniHosts[\(i)]", m.line, "'\(h)' is not a valid host")
                }
                matches.append(TLSMatch(sniHosts: sni, port: m.port("port"),
                                        destinationSubnets: m.strings("destinationSubnets"),
                                        sourceLabels: m.stringMap("sourceLabels"), gateways: m.strings("gateways")))
            }
            if matches.isEmpty {
                t.sink.error("\(t.path).match", t.line, "a tls route needs a match with sniHosts")
            }
            let routes = RouteDestination.decodeList(t)
            if routes.isEmpty { t.sink.error("\(t.path).route", t.line, "a tls route needs at least one destination") }
            tls.append(TLSRoute(match: matches, route: routes))
        }
        let http = r.array("http").compactMap { HTTPRoute.decode($0) }
        if http.isEmpty && tcp.isEmpty && tls.isEmpty {
            r.sink.error(r.path, r.line, "a VirtualService needs at least one http, tcp or tls route")
        }
        return VirtualService(hosts: hosts, gateways: r.strings("gateways"), http: http, tcp: tcp, tls: tls,
                              exportTo: decodeExportTo(r))
    }
}

extension VirtualService.RouteDestination {
    static func decodeList(_ parent: YAMLReader) -> [Self] {
        var out: [Self] = []
        let items = parent.array("route")
        for d in items {
            guard d.expectMapping() else { continue }
            d.checkKeys(["destination", "weight", "headers"])
            guard let dest = d.child("destination"), dest.expectMapping() else {
                d.sink.error("\(d.path).destination", d.line, "required field 'destination' is missing")
                continue
            }
            dest.checkKeys(["host", "subset", "port"])
            guard let host = dest.requiredString("host") else { continue }
            if !isValidHost(host) || host.hasPrefix("*") {
                d.sink.error("\(dest.path).host", dest.line, "'\(host)' is not a valid destination host",
                             hint: "name a service host without wildcards")
            }
            var port: UInt16?
            if let p = dest.child("port"), p.expectMapping() {
                p.checkKeys(["number"])
                port = p.port("number")
            }
            let weight = d.int("weight", in: 0...100)
            out.append(.init(destination: .init(host: host, subset: dest.string("subset"), port: port), weight: weight,
                             headers: d.child("headers").flatMap { HeaderOperations.decode($0) }))
        }
        if out.count > 1 || out.contains(where: { $0.weight != nil }) {
            let sum = out.reduce(0) { $0 + ($1.weight ?? 0) }
            if sum != 100 {
                parent.sink.error("\(parent.path).route", parent.child("route")?.line ?? parent.line, "route weights add up to \(sum), not 100",
                                  hint: "make the weights of all destinations of this route sum to 100")
            }
        }
        return out
    }
}

extension DestinationRule {
    static func decode(_ r: YAMLReader) -> DestinationRule? {
        r.checkKeys(["host", "trafficPolicy", "subsets", "exportTo", "workloadSelector"])
        guard let host = r.requiredString("host") else { return nil }
        let policy = r.child("trafficPolicy").flatMap { TrafficPolicy.decode($0) }
        var subsets: [Subset] = []
        var seen: Set<String> = []
        for s in r.array("subsets") {
            guard s.expectMapping() else { continue }
            s.checkKeys(["name", "labels", "trafficPolicy"])
            guard let name = s.requiredString("name") else { continue }
            if !seen.insert(name).inserted {
                s.sink.error("\(s.path).name", s.line, "subset '\(name)' is defined twice")
            }
            subsets.append(Subset(name: name, labels: s.stringMap("labels"),
                                  trafficPolicy: s.child("trafficPolicy").flatMap { TrafficPolicy.decode($0) }))
        }
        return DestinationRule(host: host, trafficPolicy: policy, subsets: subsets, exportTo: decodeExportTo(r))
    }
}

extension TrafficPolicy {
    static func decode(_ r: YAMLReader) -> TrafficPolicy? {
        guard r.expectMapping() else { return nil }
        r.checkKeys(["loadBalancer", "connectionPool", "outlierDetection", "tls", "portLevelSettings", "tunnel",
                     "proxyProtocol"])
        var policy = TrafficPolicy()
        r.notEnforced(["tunnel", "proxyProtocol"])
        // Per-port settings can carry limits and TLS: accepting them unapplied would leave ports unprotected.
        r.refuseUnenforced(["portLevelSettings"], hint: "put the settings in trafficPolicy, or in a subset")
        if let lb = r.child("loadBalancer"), lb.expectMapping() {
            lb.checkKeys(["simple", "consistentHash", "localityLbSetting", "warmupDurationSecs", "warmup"])
            lb.notEnforced(["localityLbSetting", "warmupDurationSecs", "warmup"])
            if lb.child("simple") != nil, lb.child("consistentHash") != nil {
                lb.sink.error(lb.path, lb.line, "'simple' and 'consistentHash' are mutually exclusive")
            } else if let simple = lb.enumValue("simple", LoadBalancerSettings.Simple.self) {
                policy.loadBalancer = .simple(simple)
            } else if let ch = lb.child("consistentHash"), ch.expectMapping() {
                ch.checkKeys(["useSourceIp", "httpHeaderName", "httpCookie", "httpQueryParameterName", "maglev",
                              "ringHash", "minimumRingSize"])
                var tableSize: Int?
                if let mg = ch.child("maglev"), mg.expectMapping() {
                    mg.checkKeys(["tableSize"])
                    tableSize = mg.int("tableSize", in: 1...5_000_011)
                    if let t = tableSize, !isPrime(t) {
                        mg.sink.error("\(mg.path).tableSize", mg.line, "maglev tableSize \(t) is not prime",
                                      hint: "use a prime such as 65537")
                    }
                }
                var keys: [LoadBalancerSettings.HashKey] = []
                if ch.bool("useSourceIp") == true { keys.append(.sourceIP) }
                if let h = ch.string("httpHeaderName") { keys.append(.header(h.lowercased())) }
                if let q = ch.string("httpQueryParameterName") { keys.append(.queryParameter(q)) }
                if let c = ch.child("httpCookie"), c.expectMapping() {
                    c.checkKeys(["name", "path", "ttl", "attributes"])
                    if let name = c.string("name") { keys.append(.cookie(name)) } else {
                        c.sink.error("\(c.path).name", c.line, "httpCookie needs a name")
                    }
                }
                if keys.count == 1 {
                    policy.loadBalancer = .consistentHash(key: keys[0], tableSize: tableSize)
                } else {
                    ch.sink.error(ch.path, ch.line, keys.isEmpty ? "consistentHash names no hash key" :
                                    "useSourceIp, httpHeaderName, httpCookie and httpQueryParameterName are mutually exclusive",
                                  hint: "set exactly one of them")
                }
            }
        }
        if let cp = r.child("connectionPool"), cp.expectMapping() {
            cp.checkKeys(["tcp", "http"])
            if let tcp = cp.child("tcp"), tcp.expectMapping() {
                tcp.checkKeys(["maxConnections", "connectTimeout", "tcpKeepalive", "maxConnectionDuration",
                               "idleTimeout"])
                policy.connectionPool = ConnectionPoolSettings(
                    maxConnections: tcp.int("maxConnections", in: 1...Int(Int32.max)),
                    connectTimeout: tcp.duration("connectTimeout"), idleTimeout: tcp.duration("idleTimeout"))
            }
            if let h = cp.child("http"), h.expectMapping() {
                h.checkKeys(["http1MaxPendingRequests", "http2MaxRequests", "maxRequestsPerConnection", "maxRetries",
                             "idleTimeout", "h2UpgradePolicy", "useClientProtocol", "maxConcurrentStreams"])
                let limit = 1...Int(Int32.max)
                var pool = policy.connectionPool ?? ConnectionPoolSettings()
                pool.http = .init(
                    http1MaxPendingRequests: h.int("http1MaxPendingRequests", in: limit),
                    http2MaxRequests: h.int("http2MaxRequests", in: limit),
                    maxRequestsPerConnection: h.int("maxRequestsPerConnection", in: 0...Int(Int32.max)),
                    maxRetries: h.int("maxRetries", in: 0...Int(Int32.max)), idleTimeout: h.duration("idleTimeout"),
                    maxConcurrentStreams: h.int("maxConcurrentStreams", in: limit),
                    h2UpgradePolicy: h.string("h2UpgradePolicy"))
                if let p = pool.http?.h2UpgradePolicy, !["DEFAULT", "DO_NOT_UPGRADE", "UPGRADE"].contains(p) {
                    h.sink.error("\(h.path).h2UpgradePolicy", h.line, "'\(p)' is not a valid value",
                                 hint: "DEFAULT, DO_NOT_UPGRADE or UPGRADE")
                }
                policy.connectionPool = pool
            }
        }
        if let od = r.child("outlierDetection"), od.expectMapping() {
            od.checkKeys(["consecutiveErrors", "consecutive5xxErrors", "consecutiveGatewayErrors", "interval",
                          "baseEjectionTime", "maxEjectionPercent", "minHealthPercent", "splitExternalLocalOriginErrors",
                          "consecutiveLocalOriginFailures"])
            var o = OutlierDetection()
            let gateway = od.int("consecutiveGatewayErrors", in: 0...Int(Int32.max))
                ?? od.int("consecutiveErrors", in: 0...Int(Int32.max))
            o.consecutiveGatewayErrors = gateway ?? 0
            // The 5xx detector keeps Istio's default of 5 unless only gateway errors were asked for.
            o.consecutiveErrors = od.int("consecutive5xxErrors", in: 0...Int(Int32.max))
                ?? od.int("consecutiveLocalOriginFailures", in: 0...Int(Int32.max)) ?? (gateway == nil ? 5 : 0)
            if let d = od.duration("interval") { o.interval = d }
            if let d = od.duration("baseEjectionTime") { o.baseEjectionTime = d }
            if let p = od.int("maxEjectionPercent", in: 0...100) { o.maxEjectionPercent = p }
            policy.outlierDetection = o
        }
        policy.tls = r.child("tls").flatMap { ClientTLSSettings.decode($0) }
        return policy
    }
}

func isPrime(_ n: Int) -> Bool {
    if n < 2 { return false }
    if n < 4 { return true }
    if n % 2 == 0 { return false }
    var i = 3
    while i * i <= n {
        if n % i == 0 { return false }
        i += 2
    }
    return true
}

extension ServiceEntry {
    static func decode(_ r: YAMLReader) -> ServiceEntry? {
        r.checkKeys(["hosts", "addresses", "ports", "location", "resolution", "endpoints", "workloadSelector",
                     "exportTo", "subjectAltNames"])
        r.notEnforced(["subjectAltNames"], hint: "mesh endpoints are verified against the identity of their serviceAccount")
        let hosts = r.strings("hosts")
        if hosts.isEmpty { r.sink.error("\(r.path).hosts", r.line, "a ServiceEntry needs at least one host") }
        for (i, h) in hosts.enumerated() where !isValidHost(h) {
            r.sink.error("\(r.path).hosts[\(i)]", r.line, "'\(h)' is not a valid host")
        }
        var ports: [ServicePort] = []
        for p in r.array("ports") {
            guard p.expectMapping() else { continue }
            p.checkKeys(["number", "protocol", "name", "targetPort"])
            guard let number = p.port("number") else {
                if p.child("number") == nil { p.sink.error("\(p.path).number", p.line, "required field 'number' is missing") }
                continue
            }
            // Without a declared protocol, the name's prefix decides, else the agent detects it per connection.
            guard let proto = PortProtocol.selected(declared: p.string("protocol"), name: p.string("name")) else {
                p.sink.error("\(p.path).protocol", p.line, "unknown protocol '\(p.string("protocol") ?? "")'",
                             hint: "one of \(PortProtocol.declarable.joined(separator: ", "))")
                continue
            }
            ports.append(ServicePort(number: number, protocol: proto, name: p.string("name") ?? "port-\(number)",
                                     targetPort: p.port("targetPort")))
        }
        if ports.isEmpty { r.sink.error("\(r.path).ports", r.line, "a ServiceEntry needs at least one port") }
        let location = r.enumValue("location", ServiceEntry.Location.self) ?? .meshExternal
        let resolution = r.enumValue("resolution", ServiceEntry.Resolution.self) ?? .none
        var endpoints: [WorkloadEntry] = []
        for e in r.array("endpoints") {
            guard e.expectMapping(), let w = WorkloadEntry.decode(e) else { continue }
            if resolution == .static, IPAddress(w.address) == nil {
                e.sink.error("\(e.path).address", e.line, "'\(w.address)' is not an IP address",
                             hint: "resolution STATIC needs IP endpoints; use DNS resolution for host names")
            }
            endpoints.append(w)
        }
        var selector: [String: String]?
        if let ws = r.child("workloadSelector"), ws.expectMapping() {
            ws.checkKeys(["labels"])
            selector = ws.stringMap("labels")
        }
        return ServiceEntry(hosts: hosts, addresses: r.strings("addresses"), ports: ports, location: location,
                            resolution: resolution, endpoints: endpoints, workloadSelector: selector,
                            exportTo: decodeExportTo(r))
    }
}

extension WorkloadEntry {
    static func decode(_ r: YAMLReader) -> WorkloadEntry? {
        r.checkKeys(["address", "ports", "labels", "weight", "serviceAccount", "network", "locality"])
        guard let address = r.requiredString("address") else { return nil }
        var ports: [String: UInt16] = [:]
        if let p = r.child("ports"), p.expectMapping() {
            for pair in p.pairs {
                let reader = YAMLReader(node: pair.value, path: "\(p.path).\(pair.key)", sink: r.sink)
                if let n = reader.asPort() { ports[pair.key] = n }
            }
        }
        return WorkloadEntry(address: address, ports: ports, labels: r.stringMap("labels"),
                             weight: r.int("weight", in: 1...Int(UInt32.max)), serviceAccount: r.string("serviceAccount"),
                             network: r.string("network"), locality: r.string("locality"))
    }
}

extension HealthCheck {
    static func decode(_ r: YAMLReader) -> HealthCheck? {
        r.checkKeys(["host", "interval", "timeout", "unhealthyThreshold", "healthyThreshold", "http", "grpc"])
        guard let host = r.requiredString("host") else { return nil }
        var http: HealthCheck.HTTPCheck?
        if let h = r.child("http"), h.expectMapping() {
            h.checkKeys(["path", "host", "expectedStatuses"])
            let path = h.string("path") ?? "/"
            if !path.hasPrefix("/") || path.utf8.contains(where: { $0 <= 0x20 || $0 == 0x7F }) {
                h.sink.error("\(h.path).path", h.line, "path '\(path)' must start with / and hold no spaces or control bytes")
            }
            var statuses: [ClosedRange<Int>] = []
            for item in h.array("expectedStatuses") where item.expectMapping() {
                item.checkKeys(["start", "end"])
                let start = item.int("start", in: 100...599), end = item.int("end", in: 100...600)
                guard let start, let end, start < end else {
                    item.sink.error(item.path, item.line, "a status range needs start < end (end exclusive, 100...600)")
                    continue
                }
                statuses.append(start...(end - 1))
            }
            http = .init(path: path, host: h.string("host"), expectedStatuses: statuses.isEmpty ? [200...200] : statuses)
        }
        var grpc: HealthCheck.GRPCCheck?
        if let g = r.child("grpc"), g.expectMapping() {
            g.checkKeys(["serviceName", "authority"])
            grpc = .init(serviceName: g.string("serviceName") ?? "", authority: g.string("authority"))
            if http != nil { r.sink.error("\(r.path).grpc", g.line, "a HealthCheck is http or grpc, not both") }
        }
        return HealthCheck(host: host, interval: r.duration("interval") ?? .seconds(5),
                           timeout: r.duration("timeout") ?? .seconds(1),
                           unhealthyThreshold: r.int("unhealthyThreshold", in: 1...100) ?? 2,
                           healthyThreshold: r.int("healthyThreshold", in: 1...100) ?? 1, http: http, grpc: grpc)
    }
}

/// Istio's `exportTo`: `*`, `.` or namespace names.
func decodeExportTo(_ r: YAMLReader) -> [String] {
    let list = r.strings("exportTo")
    for (i, ns) in list.enumerated() where ns != "*" && ns != "." && !isDNSLabel(ns, maxLength: 63, allowDots: false) {
        r.sink.error("\(r.path).exportTo[\(i)]", r.child("exportTo")?.line ?? r.line,
                     "'\(ns)' is not '*', '.' or a namespace name", hint: "export to '*' (all), '.' (own namespace) or names")
    }
    if list.contains("*") && list.count > 1 {
        r.sink.error("\(r.path).exportTo", r.child("exportTo")?.line ?? r.line, "'*' cannot be combined with other values",
                     hint: "use '*' alone, or list the namespaces")
    }
    return list
}
