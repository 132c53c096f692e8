import SluiceModel

/// What clients of the API (`sluice apply`, the `--config` seed) need to know about objects they send.
public enum APIObjects {
    /// The resource and version an object's `apiVersion` and `kind` name, if the API serves them.
    public static func resource(of o: JSONValue) -> (APIResource, String)? {
        guard let apiVersion = o["apiVersion"]?.stringValue, let kind = o["kind"]?.stringValue,
              let slash = apiVersion.firstIndex(of: "/")
        else { return nil }
        let group = String(apiVersion[..<slash]), version = String(apiVersion[apiVersion.index(after: slash)...])
        guard let r = APIResource.find(group: group, kind: kind), r.versions.contains(version) else { return nil }
        return (r, version)
    }

    /// Objects in the order a mesh can take them one at a time: what others refer to first (services, workloads,
    /// destination rules, gateways), then what refers (virtual services), then policies. Each write is validated
    /// against the stored mesh, so a VirtualService naming a subset must come after the DestinationRule defining
    /// it. Deleting goes the other way round. The order within a rank is kept.
    public static func dependencyOrder(_ objects: [JSONValue], deleting: Bool = false) -> [JSONValue] {
        let rank: [String: Int] = [
            "MeshConfig": 0, "ServiceEntry": 1, "WorkloadEntry": 2, "DestinationRule": 3, "HealthCheck": 3, "Gateway": 4,
            "VirtualService": 5, "RateLimitPolicy": 6, "PeerAuthentication": 6, "RequestAuthentication": 6,
            "AuthorizationPolicy": 6, "Telemetry": 6,
        ]
        let ranked = objects.enumerated().map { (rank[$0.element["kind"]?.stringValue ?? ""] ?? 7, $0.offset, $0.element) }
        let sorted = ranked.sorted { ($0.0, $0.1) < ($1.0, $1.1) }.map(\.2)
        return deleting ? sorted.reversed() : sorted
    }
}
