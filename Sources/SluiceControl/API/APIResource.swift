import SluiceModel

/// One kind the config API serves, with the names Kubernetes discovery gives it (so `kubectl get vs` works).
public struct APIResource: Sendable, Hashable {
    public var group: String
    public var versions: [String]
    public var kind: String
    public var plural: String
    public var singular: String
    public var shortNames: [String]
    /// The kind Sluice compiles; nil for kinds it stores but does not enforce yet (a warning says so).
    public var model: ResourceKind?
    /// Extra columns of `kubectl get` (Istio's additionalPrinterColumns): header and the field path they show.
    public var columns: [(name: String, path: [String])]

    public var listKind: String { kind + "List" }
    /// The version answers come in when the request names none (the storage version).
    public var preferredVersion: String { versions[0] }
    public var categories: [String] {
        group.hasSuffix("istio.io") ? ["istio-io", group.replacingOccurrences(of: ".", with: "-")] : ["sluice"]
    }

    public static func == (a: APIResource, b: APIResource) -> Bool { a.group == b.group && a.plural == b.plural }
    public func hash(into h: inout Hasher) {
        h.combine(group)
        h.combine(plural)
    }

    /// Every kind Sluice reads, as Istio's CRDs name them.
    public static let all: [APIResource] = {
        let networking = ["v1", "v1beta1", "v1alpha3"], security = ["v1", "v1beta1"]
        func r(_ g: String, _ v: [String], _ kind: String, _ plural: String, _ short: [String], _ model: ResourceKind?,
               _ columns: [(String, [String])] = []) -> APIResource
        {
            APIResource(group: g, versions: v, kind: kind, plural: plural, singular: kind.lowercased(), shortNames: short,
                        model: model, columns: columns.map { (name: $0.0, path: $0.1) })
        }
        return [
            r("networking.istio.io", networking, "VirtualService", "virtualservices", ["vs"], .virtualService,
              [("Gateways", ["spec", "gateways"]), ("Hosts", ["spec", "hosts"])]),
            r("networking.istio.io", networking, "DestinationRule", "destinationrules", ["dr"], .destinationRule,
              [("Host", ["spec", "host"])]),
            r("networking.istio.io", networking, "ServiceEntry", "serviceentries", ["se"], .serviceEntry,
              [("Hosts", ["spec", "hosts"]), ("Location", ["spec", "location"]), ("Resolution", ["spec", "resolution"])]),
            r("networking.istio.io", networking, "WorkloadEntry", "workloadentries", ["we"], .workloadEntry,
              [("Address", ["spec", "address"])]),
            r("networking.istio.io", networking, "Gateway", "gateways", ["gw"], .gateway),
            r("security.istio.io", security, "AuthorizationPolicy", "authorizationpolicies", ["ap"], .authorizationPolicy,
              [("Action", ["spec", "action"])]),
            r("security.istio.io", security, "PeerAuthentication", "peerauthentications", ["pa"], .peerAuthentication,
              [("Mode", ["spec", "mtls", "mode"])]),
            r("security.istio.io", security, "RequestAuthentication", "requestauthentications", ["ra"],
              .requestAuthentication),
            r("telemetry.istio.io", ["v1"], "Telemetry", "telemetries", ["telemetry"], nil),
            r("sluice.dev", ["v1"], "HealthCheck", "healthchecks", ["hc"], .healthCheck),
            r("sluice.dev", ["v1"], "RateLimitPolicy", "ratelimitpolicies", ["rlp"], .rateLimitPolicy),
            r("sluice.dev", ["v1"], "MeshConfig", "meshconfigs", ["mc"], .meshConfig),
        ]
    }()

    /// Groups in discovery order.
    public static let groups: [String] = {
        var seen: [String] = []
        for r in all where !seen.contains(r.group) { seen.append(r.group) }
        return seen
    }()

    public static func find(group: String, plural: String) -> APIResource? {
        all.first { $0.group == group && $0.plural == plural }
    }

    public static func find(group: String, kind: String) -> APIResource? {
        all.first { $0.group == group && $0.kind == kind }
    }

    /// The resource a user's word names: kind, plural, singular or short name, optionally `.group` qualified,
    /// case-insensitively (as `kubectl get` resolves it).
    public static func named(_ word: String) -> APIResource? {
        let w = word.lowercased()
        let (name, group) = w.firstIndex(of: ".").map { (String(w[..<$0]), String(w[w.index(after: $0)...])) } ?? (w, "")
        return all.first { r in
            (group.isEmpty || r.group == group)
                && (r.plural == name || r.singular == name || r.kind.lowercased() == name || r.shortNames.contains(name))
        }
    }

    public static func forModel(_ kind: ResourceKind) -> APIResource? { all.first { $0.model == kind } }
}
