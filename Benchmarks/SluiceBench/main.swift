// Control-plane benchmarks (`make bench` runs them after the peer comparison; `make bench-config` alone):
// decode + validate, whole-mesh compile for one node, and incremental updates fanned out to 1,000 nodes.
// Prints one JSON object on stdout; progress on stderr.
import Foundation
import SluiceIdentity
import SluiceModel

struct Shape {
    var services = 10_000
    var endpointsPerService = 10
    var virtualServices = 2_000
    var nodes = 1_000
    var namespaces = 100
}

func now() -> UInt64 { DispatchTime.now().uptimeNanoseconds }
func ms(_ from: UInt64, _ to: UInt64) -> Double { Double(to - from) / 1e6 }
func log(_ s: String) { FileHandle.standardError.write((s + "\n").data(using: .utf8)!) }

/// Service `i`'s ServiceEntry. Every other service is private to its namespace, as teams often do.
func serviceEntryYAML(_ i: Int, namespace ns: String, port: Int) -> String {
    """
    apiVersion: networking.istio.io/v1
    kind: ServiceEntry
    metadata: {name: svc\(i), namespace: \(ns)}
    spec:
      hosts: [svc\(i).\(ns).svc.cluster.local]
      addresses: [10.\(96 + i / 62_500).\(i / 250 % 250).\(i % 250 + 1)]
      location: MESH_INTERNAL
      resolution: STATIC
      ports: [{number: \(port), name: \(i % 3 == 0 ? "http" : "tcp"), protocol: \(i % 3 == 0 ? "HTTP" : "TCP")}]
      workloadSelector: {labels: {app: svc\(i)}}
    \(i % 2 == 1 ? "  exportTo: [\".\"]\n" : "")
    """
}

/// A mesh like a large cluster's: services in namespaces, workloads spread over nodes, canaries for some.
func meshYAML(_ s: Shape, range: Range<Int>? = nil) -> String {
    var out = ""
    let range = range ?? 0..<s.services
    out.reserveCapacity(range.count * s.endpointsPerService * 330)
    for i in range {
        let ns = "ns\(i % s.namespaces)", host = "svc\(i).\(ns).svc.cluster.local"
        out += "---\n" + serviceEntryYAML(i, namespace: ns, port: 9080)
        for e in 0..<s.endpointsPerService {
            let n = (i * s.endpointsPerService + e) % s.nodes
            out += """
                ---
                apiVersion: networking.istio.io/v1
                kind: WorkloadEntry
                metadata:
                  name: svc\(i)-\(e)
                  namespace: \(ns)
                  annotations: {sluice.dev/node: node\(n)}
                spec:
                  address: 10.\(i / 6_250 % 250).\(i / 25 % 250).\(i % 25 * 10 + e + 1)
                  labels: {app: svc\(i), version: v\(e % 2 + 1)}
                  serviceAccount: svc\(i)

                """
        }
        if i < s.virtualServices {
            out += """
                ---
                apiVersion: networking.istio.io/v1
                kind: DestinationRule
                metadata: {name: svc\(i), namespace: \(ns)}
                spec:
                  host: \(host)
                  trafficPolicy: {loadBalancer: {simple: LEAST_REQUEST}}
                  subsets:
                  - {name: v1, labels: {version: v1}}
                  - {name: v2, labels: {version: v2}}
                ---
                apiVersion: networking.istio.io/v1
                kind: VirtualService
                metadata: {name: svc\(i), namespace: \(ns)}
                spec:
                  hosts: [\(host)]
                  http:
                  - match: [{headers: {end-user: {exact: jason}}}]
                    route: [{destination: {host: \(host), subset: v2}}]
                  - route:
                    - {destination: {host: \(host), subset: v1}, weight: 90}
                    - {destination: {host: \(host), subset: v2}, weight: 10}
                    retries: {attempts: 3, perTryTimeout: 2s, retryOn: 5xx}
                    timeout: 10s

                """
        }
    }
    return out
}

func decodeAll(_ text: String) -> [Resource] {
    let (resources, diagnostics) = ResourceDecoder.decode(text, file: "bench.yaml")
    if let e = diagnostics.first(where: { $0.severity == .error }) { fatalError("bench input invalid: \(e)") }
    return resources
}

let shape = Shape()
var result: [String: Any] = [:]

/// Best of five: decode `text` and validate it as a whole mesh.
@MainActor
func timeDecode(_ text: String, as name: String) throws {
    var best = Double.infinity, count = 0
    for _ in 0..<5 {
        let t0 = now()
        let r = decodeAll(text)
        _ = try MeshCompiler(r)
        best = min(best, ms(t0, now()))
        count = r.count
    }
    result["\(name)_resources"] = count
    result["\(name)_ms"] = best
    result["\(name)_resources_per_s"] = Double(count) / best * 1000
    log("\(name): \(count) resources decoded and validated in \(String(format: "%.1f", best)) ms")
}

// 1. Decode + validate: the first 10,000 resources' worth of YAML (services with their endpoints and routes).
do {
    var small = Shape()
    small.services = 800
    small.virtualServices = 160
    let text = meshYAML(small)
    try timeDecode(text, as: "decode")
}

// 1b. The same with heavy resources only: 3,333 services each with 10 inline endpoints, a DestinationRule with
// subsets and outlier detection, and a weighted VirtualService (the mix `bench.py` also times through the CLI).
do {
    var text = ""
    for i in 0..<3_333 {
        let eps = (0..<10).map { e in "  - {address: 10.\(i / 250 % 250).\(i % 250).\(e + 1), labels: {version: v\(e % 2 + 1)}}\n" }
        text += """
            ---
            apiVersion: networking.istio.io/v1
            kind: ServiceEntry
            metadata: {name: svc\(i), namespace: bench}
            spec:
              hosts: [svc\(i).bench.svc.cluster.local]
              location: MESH_INTERNAL
              resolution: STATIC
              ports: [{number: 9080, name: tcp, protocol: TCP}]
              endpoints:
            \(eps.joined())---
            apiVersion: networking.istio.io/v1
            kind: DestinationRule
            metadata: {name: svc\(i), namespace: bench}
            spec:
              host: svc\(i).bench.svc.cluster.local
              trafficPolicy:
                loadBalancer: {simple: LEAST_REQUEST}
                outlierDetection: {consecutiveGatewayErrors: 5, interval: 10s, baseEjectionTime: 30s}
              subsets:
              - {name: v1, labels: {version: v1}}
              - {name: v2, labels: {version: v2}}
            ---
            apiVersion: networking.istio.io/v1
            kind: VirtualService
            metadata: {name: svc\(i), namespace: bench}
            spec:
              hosts: [svc\(i).bench.svc.cluster.local]
              tcp:
              - route:
                - {destination: {host: svc\(i).bench.svc.cluster.local, subset: v1}, weight: 90}
                - {destination: {host: svc\(i).bench.svc.cluster.local, subset: v2}, weight: 10}

            """
    }
    try timeDecode(text, as: "decode_heavy")
}

// 2. Whole-mesh compile for one node.
log("generating \(shape.services) services, \(shape.services * shape.endpointsPerService) endpoints, \(shape.virtualServices) VirtualServices")
// Generated and decoded in slices: the loader caps one file at 16 MiB, as a user's files would be split.
var resources: [Resource] = []
for first in stride(from: 0, to: shape.services, by: 500) {
    resources += decodeAll(meshYAML(shape, range: first..<min(first + 500, shape.services)))
}
var best = (compile: Double.infinity, snapshot: Double.infinity)
var snap = NodeSnapshot(node: "node0")
for _ in 0..<3 {
    // Freeing the previous compiler's state is left out of the timing: a fresh start has none.
    let t0 = now()
    let fresh = try MeshCompiler(resources)
    let t1 = now()
    let one = fresh.snapshot(for: "node0")
    let t2 = now()
    snap = one
    best = (min(best.compile, ms(t0, t1)), min(best.snapshot, ms(t1, t2)))
}
var compiler = try MeshCompiler(resources)
result["resources"] = resources.count
result["compile_mesh_ms"] = best.compile
result["snapshot_one_node_ms"] = best.snapshot
result["compile_for_one_node_ms"] = best.compile + best.snapshot
result["node0_services"] = snap.services.count
result["node0_clusters"] = snap.clusters.count
result["node0_endpoints"] = snap.clusters.reduce(0) { $0 + $1.endpoints.count }
result["node0_json_bytes"] = snap.canonicalJSON().count
log("compile: mesh \(String(format: "%.0f", best.compile)) ms + node0 snapshot \(String(format: "%.0f", best.snapshot)) ms; node0 sees \(snap.services.count) services")

// 3. Incremental: one service changes (a new endpoint; then a port change); deltas for all 1,000 nodes.
var times: [Double] = [], fanout: [Int] = [], portTimes: [Double] = []
for k in 0..<21 {
    let i = k * 467 % shape.services, ns = "ns\(i % shape.namespaces)"
    let add = decodeAll("""
        apiVersion: networking.istio.io/v1
        kind: WorkloadEntry
        metadata:
          name: svc\(i)-new
          namespace: \(ns)
          annotations: {sluice.dev/node: node\(k)}
        spec:
          address: 10.250.0.\(k + 1)
          labels: {app: svc\(i), version: v1}
        """)
    let t0 = now()
    let delta = try compiler.apply(add.map { .upsert($0) })
    times.append(ms(t0, now()))
    fanout.append(delta.nodes.count)
    // The same service's port changes (its clusters are renamed on every node that sees it).
    let moved = decodeAll(serviceEntryYAML(i, namespace: ns, port: 9081))
    let t2 = now()
    _ = try compiler.apply(moved.map { .upsert($0) })
    portTimes.append(ms(t2, now()))
}
times.sort()
portTimes.sort()
result["incremental_endpoint_ms_median"] = times[times.count / 2]
result["incremental_endpoint_ms_max"] = times.last!
result["incremental_port_ms_median"] = portTimes[portTimes.count / 2]
result["incremental_nodes_reached_median"] = fanout.sorted()[fanout.count / 2]
result["nodes"] = compiler.nodes.count
log("incremental: endpoint added \(String(format: "%.1f", times[times.count / 2])) ms median, reaching \(fanout.sorted()[fanout.count / 2]) of \(compiler.nodes.count) nodes")

// The CA: CSR signatures per second on one core (verify the request, build and sign the certificate, PEM out).
let ca = try CertificateAuthority(generatingRootFor: "cluster.local")
let requests = try (0..<100).map { i -> (String, SPIFFEID) in
    let id = SPIFFEID(trustDomain: "cluster.local", namespace: "ns\(i % 10)", serviceAccount: "sa\(i)")
    return (try WorkloadKey().signingRequest(for: id), id)
}
var signTimes: [Double] = []
for _ in 0..<3 {
    let t0 = now()
    for round in 0..<10 {
        for (pem, id) in requests {
            _ = try ca.sign(requestPEM: pem, for: id, lifetime: .seconds(86_400), requester: "node\(round)")
        }
    }
    signTimes.append(ms(t0, now()))
}
let signPerSecond = Double(requests.count * 10) / (signTimes.min()! / 1000)
result["ca_signatures_per_s"] = signPerSecond
log("CA: \(Int(signPerSecond)) CSR signatures/s on one thread (best of 3 x 1,000)")

let json = try JSONSerialization.data(withJSONObject: result, options: [.sortedKeys])
print(String(decoding: json, as: UTF8.self))
