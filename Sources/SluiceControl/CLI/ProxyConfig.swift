import Foundation
import SluiceModel
import SluiceProtocol

/// `sluice proxy-config NODE listeners|clusters|routes|endpoints|secrets|all`, as `istioctl proxy-config`: what that
/// node's agent serves now, asked of the agent itself over its stream (not recomputed from the stored mesh).
extension CLI {
    public enum ProxyConfigSection: String, Sendable, CaseIterable {
        case listeners, clusters, routes, endpoints, secrets, all
    }

    public func proxyConfig(node: String, section: ProxyConfigSection, output: Output) -> Int32 {
        let dump: AgentConfigDump
        do {
            let path = "/sluice/v1/nodes/\(node.addingPercentEncoding(withAllowedCharacters: .urlPathAllowed) ?? node)/configdump"
            let reply = try client.call("GET", path)
            guard reply.status == 200 else {
                err(serverError(reply))
                return 1
            }
            if let e = reply.json?["error"]?.stringValue {
                err("error: node \(node)'s agent: \(e)")
                return 1
            }
            dump = try AgentConfigDump.decode(reply.body)
        } catch let e as DecodingError {
            err("error: node \(node)'s agent sent a configuration this CLI cannot read (\(e)); is it another version?")
            return 1
        } catch {
            err("\(error)")
            return 1
        }
        if output == .json || output == .yaml {
            let value = Self.json(of: dump, section)
            if output == .json {
                out(String(decoding: (try? JSONSerialization.data(
                    withJSONObject: JSONSerialization.jsonObject(with: value.data),
                    options: [.prettyPrinted, .sortedKeys, .withoutEscapingSlashes])) ?? value.data, as: UTF8.self))
            } else {
                out(value.yaml.hasSuffix("\n") ? String(value.yaml.dropLast()) : value.yaml)
            }
            return 0
        }
        let sections: [ProxyConfigSection] = section == .all ? [.listeners, .clusters, .routes, .endpoints, .secrets] : [section]
        var blocks: [String] = []
        for s in sections {
            let rows = Self.table(dump, s, wide: output == .wide)
            if rows.count == 1 && section != .all {
                err("No \(s.rawValue) on node \(node).")
                return 0
            }
            blocks.append(Self.columns(rows))
        }
        out(blocks.joined(separator: "\n\n"))
        return 0
    }

    /// The part of the dump a section shows, as JSON (the whole dump for `all`).
    static func json(of dump: AgentConfigDump, _ section: ProxyConfigSection) -> JSONValue {
        let whole = (try? JSONValue(parsing: dump.encoded())) ?? .null
        switch section {
        case .all: return whole
        case .listeners:
            return .object(["listeners": whole[path: ["snapshot", "listeners"]] ?? .array([]),
                            "bound": whole["listeners"] ?? .array([]),
                            "services": whole[path: ["snapshot", "services"]] ?? .array([])])
        case .clusters: return whole[path: ["snapshot", "clusters"]] ?? .array([])
        case .routes: return whole[path: ["snapshot", "virtualServices"]] ?? .array([])
        case .endpoints:
            return .array(dump.snapshot.clusters.flatMap { c in
                c.endpoints.enumerated().map { i, e -> JSONValue in
                    var o: [String: JSONValue] = ["cluster": .string(c.name), "address": .string(e.address.description),
                                                  "weight": .int(Int64(e.weight)),
                                                  "healthy": .bool(Self.healthy(dump, c.name, i))]
                    if let n = e.node { o["node"] = .string(n) }
                    if let id = e.identity { o["identity"] = .string(id) }
                    return .object(o)
                }
            })
        case .secrets: return whole["secrets"] ?? .array([])
        }
    }

    static func healthy(_ dump: AgentConfigDump, _ cluster: String, _ i: Int) -> Bool {
        guard let h = dump.endpointHealth[cluster], i < h.count else { return true }
        return h[i]
    }

    /// A section as rows (the first is the header), in istioctl proxy-config's columns where Sluice has them.
    static func table(_ dump: AgentConfigDump, _ section: ProxyConfigSection, wide: Bool) -> [[String]] {
        let s = dump.snapshot
        switch section {
        case .listeners:
            var rows = [["ADDRESS", "PORT", "PROTOCOL", "TYPE", "DESTINATION"] + (wide ? ["NAME", "TLS"] : [])]
            let bound = Dictionary(dump.listeners.map { ($0.name, $0.port) }, uniquingKeysWith: { a, _ in a })
            for l in s.listeners {
                let port = bound[l.name].flatMap { $0 }.map(String.init) ?? "\(l.address.port) (not bound)"
                let destination = l.isHTTP ? "Route: \(l.gateway ?? "mesh")"
                    : l.routes.map { "\($0.cluster) (\($0.weight))" }.joined(separator: ", ")
                let tls = l.tls.isEmpty ? (l.httpsRedirect ? "redirect to https" : "-")
                    : l.tls.map { "\($0.mode.rawValue) \($0.hosts.joined(separator: ","))" }.joined(separator: "; ")
                rows.append(["\(l.address.ip)", port, l.protocol.rawValue, l.gateway.map { "gateway \($0)" } ?? "listener",
                             destination] + (wide ? [l.name, tls] : []))
            }
            // The services the node's workloads call: captured in the kernel and served by the outbound listener.
            for svc in s.services {
                for a in svc.addresses.isEmpty ? ["-"] : svc.addresses {
                    for p in svc.ports {
                        rows.append([a, "\(p.number)", p.protocol.rawValue, "captured",
                                     "Cluster: outbound|\(p.number)||\(svc.host)"] + (wide ? ["\(svc.namespace)/\(svc.host)", "-"] : []))
                    }
                }
            }
            return rows
        case .clusters:
            var rows = [["SERVICE FQDN", "PORT", "SUBSET", "PROTOCOL", "ENDPOINTS", "LOAD BALANCER"]
                        + (wide ? ["NAME", "CONNECT TIMEOUT", "OUTLIER DETECTION"] : [])]
            for c in s.clusters {
                rows.append([c.serviceHost, "\(c.servicePort)", c.subset ?? "-", c.protocol.rawValue, "\(c.endpoints.count)",
                             Self.describe(c.loadBalancer)]
                            + (wide ? [c.name, "\(c.connectTimeout)", c.outlierDetection == nil ? "-" : "on"] : []))
            }
            return rows
        case .routes:
            var rows = [["VIRTUAL SERVICE", "HOSTS", "GATEWAYS", "RULE", "MATCH", "DESTINATIONS"]]
            for vs in s.virtualServices {
                let name = "\(vs.name).\(vs.namespace)", hosts = vs.spec.hosts.joined(separator: ",")
                let gateways = vs.spec.gateways.isEmpty ? "mesh" : vs.spec.gateways.joined(separator: ",")
                for (i, r) in vs.spec.http.enumerated() {
                    let destinations = r.route.map { d in
                        "\(d.destination.host)\(d.destination.subset.map { ":" + $0 } ?? "")" + (r.route.count > 1 ? " (\(d.weight ?? 0))" : "")
                    }
                    let action = r.redirect != nil ? "redirect" : r.directResponse.map { "direct response \($0.status)" }
                    rows.append([name, hosts, gateways, r.name ?? "http[\(i)]", Self.describe(r.match),
                                 action ?? destinations.joined(separator: ", ")])
                }
                for (i, r) in vs.spec.tcp.enumerated() {
                    rows.append([name, hosts, gateways, "tcp[\(i)]", r.match.isEmpty ? "*" : "\(r.match.count) matches",
                                 r.route.map { "\($0.destination.host)\($0.destination.subset.map { ":" + $0 } ?? "")" }
                                    .joined(separator: ", ")])
                }
                for (i, r) in vs.spec.tls.enumerated() {
                    rows.append([name, hosts, gateways, "tls[\(i)]",
                                 "sni " + r.match.flatMap(\.sniHosts).joined(separator: ","),
                                 r.route.map { "\($0.destination.host)\($0.destination.subset.map { ":" + $0 } ?? "")" }
                                    .joined(separator: ", ")])
                }
            }
            return rows
        case .endpoints:
            var rows = [["ENDPOINT", "STATUS", "CLUSTER"] + (wide ? ["WEIGHT", "NODE", "IDENTITY"] : [])]
            for c in s.clusters {
                for (i, e) in c.endpoints.enumerated() {
                    rows.append([e.address.description, Self.healthy(dump, c.name, i) ? "HEALTHY" : "UNHEALTHY", c.name]
                                + (wide ? ["\(e.weight)", e.node ?? "-", e.identity ?? "-"] : []))
                }
            }
            return rows
        case .secrets:
            let iso = ISO8601DateFormatter()
            var rows = [["RESOURCE NAME", "TYPE", "STATUS", "VALID CERT", "SERIAL NUMBER", "NOT AFTER", "NOT BEFORE"]]
            for x in dump.secrets {
                rows.append([x.name, x.type, x.status, x.valid ? "true" : "false", x.serialNumber ?? "-",
                             x.notAfter.map(iso.string) ?? "-", x.notBefore.map(iso.string) ?? "-"])
            }
            return rows
        case .all:
            return []
        }
    }

    static func describe(_ lb: LoadBalancerSettings) -> String {
        switch lb {
        case .simple(let s): s.rawValue
        case .consistentHash: "CONSISTENT_HASH"
        default: "\(lb)"
        }
    }

    static func describe(_ matches: [HTTPMatch]) -> String {
        if matches.isEmpty { return "/*" }
        return matches.map { m in
            var parts: [String] = []
            switch m.uri {
            case .exact(let u)?: parts.append(u)
            case .prefix(let p)?: parts.append(p + "*")
            case .regex(let r)?: parts.append("~" + r)
            case nil: parts.append("/*")
            }
            if let method = m.method { parts.append("method \(method)") }
            for h in m.headers.keys.sorted() { parts.append("header \(h)") }
            for q in m.queryParams.keys.sorted() { parts.append("query \(q)") }
            if let p = m.port { parts.append("port \(p)") }
            return parts.joined(separator: " ")
        }.joined(separator: " | ")
    }
}
