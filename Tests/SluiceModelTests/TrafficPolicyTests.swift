import SluiceModel
import XCTest

/// DestinationRule traffic policies and gateway TLS, from Istio's circuit-breaking and TLS tasks.
final class TrafficPolicyTests: XCTestCase {
    static func mesh(_ policy: String) -> String {
        """
        apiVersion: networking.istio.io/v1
        kind: ServiceEntry
        metadata: {name: httpbin, namespace: default}
        spec:
          hosts: [httpbin.default.svc.cluster.local]
          addresses: [10.96.0.9]
          location: MESH_INTERNAL
          resolution: STATIC
          ports: [{number: 8000, name: http, protocol: HTTP}]
          endpoints: [{address: 10.0.0.9}]
        ---
        apiVersion: networking.istio.io/v1
        kind: DestinationRule
        metadata: {name: httpbin, namespace: default}
        spec:
          host: httpbin.default.svc.cluster.local
          trafficPolicy:
        \(policy)
        """
    }

    /// Istio's "Circuit Breaking" task, verbatim.
    func testCircuitBreakingTaskCompilesIntoTheCluster() throws {
        let yaml = Self.mesh("""
                connectionPool:
                  tcp: {maxConnections: 1}
                  http: {http1MaxPendingRequests: 1, maxRequestsPerConnection: 1}
                outlierDetection:
                  consecutive5xxErrors: 1
                  interval: 1s
                  baseEjectionTime: 3m
                  maxEjectionPercent: 100
            """)
        let (resources, diagnostics) = ResourceDecoder.decode(yaml, file: "cb.yaml")
        XCTAssertEqual(diagnostics, [])
        let snap = try SnapshotCompiler(node: "any").compile(resources)
        XCTAssertEqual(snap.clusters, [], "no workload on the node, so nothing to reach")
        // Gateways run everywhere; a node reaching httpbin through one gets the cluster.
        let gateway = """

            ---
            apiVersion: networking.istio.io/v1
            kind: Gateway
            metadata: {name: edge, namespace: default}
            spec:
              servers: [{port: {number: 8443, name: tcp, protocol: TCP}, hosts: ["*"]}]
            ---
            apiVersion: networking.istio.io/v1
            kind: VirtualService
            metadata: {name: edge, namespace: default}
            spec:
              hosts: ["*"]
              gateways: [edge]
              tcp: [{route: [{destination: {host: httpbin.default.svc.cluster.local}}]}]
            """
        let withGateway = ResourceDecoder.decode(yaml + gateway, file: "cb.yaml").resources
        let c = try XCTUnwrap(try SnapshotCompiler(node: "edge-1").compile(withGateway)
            .cluster(named: "outbound|8000||httpbin.default.svc.cluster.local"))
        XCTAssertEqual(c.maxConnections, 1)
        XCTAssertEqual(c.httpPool?.http1MaxPendingRequests, 1)
        XCTAssertEqual(c.httpPool?.maxRequestsPerConnection, 1)
        XCTAssertEqual(c.outlierDetection, .init(consecutiveErrors: 1, interval: .seconds(1),
                                                 baseEjectionTime: .seconds(180), maxEjectionPercent: 100))
        XCTAssertEqual(c.protocol, .http)
    }

    func testClientTLSModesAndTheirRequirements() throws {
        let ok = Self.mesh("""
                tls: {mode: SIMPLE, sni: httpbin.example.com, subjectAltNames: [httpbin.example.com]}
            """)
        let (resources, diagnostics) = ResourceDecoder.decode(ok, file: "tls.yaml")
        XCTAssertEqual(diagnostics, [])
        guard case .destinationRule(let dr) = resources[1].spec else { return XCTFail() }
        XCTAssertEqual(dr.trafficPolicy?.tls?.mode, .simple)
        XCTAssertEqual(dr.trafficPolicy?.tls?.sni, "httpbin.example.com")

        let mutual = Self.mesh("""
                tls: {mode: MUTUAL}
            """)
        let errors = ResourceDecoder.decode(mutual, file: "tls.yaml").diagnostics
        XCTAssertEqual(errors.map(\.path), ["spec.trafficPolicy.tls.mode"])
        XCTAssertEqual(errors.first?.message, "MUTUAL needs the client's certificate and key")
        XCTAssertEqual(errors.first?.line, 18)

        let bogus = ResourceDecoder.decode(Self.mesh("    tls: {mode: SOMETIMES}"), file: "tls.yaml").diagnostics
        XCTAssertEqual(bogus.map(\.message), ["'SOMETIMES' is not a valid value"])
    }

    func testGatewayServerTLS() {
        func decode(_ server: String) -> [Diagnostic] {
            let yaml = """
                apiVersion: networking.istio.io/v1
                kind: Gateway
                metadata: {name: gw}
                spec:
                  servers:
                  - \(server)
                """
            return ResourceDecoder.decode(yaml, file: "gw.yaml").diagnostics
        }
        XCTAssertEqual(decode("{port: {number: 443, name: https, protocol: HTTPS}, hosts: [a.example.com], "
                              + "tls: {mode: SIMPLE, credentialName: a-cert, minProtocolVersion: TLSV1_2}}"), [])
        XCTAssertEqual(decode("{port: {number: 443, name: https, protocol: HTTPS}, hosts: [a.example.com]}").map(\.message),
                       ["a HTTPS server needs tls settings"])
        XCTAssertEqual(decode("{port: {number: 443, name: https, protocol: HTTPS}, hosts: [a.example.com], "
                              + "tls: {mode: SIMPLE}}").map(\.message),
                       ["SIMPLE terminates TLS and needs the server's certificate and key"])
        XCTAssertEqual(decode("{port: {number: 443, name: tls, protocol: TLS}, hosts: [a.example.com], "
                              + "tls: {mode: MUTUAL, credentialName: c, minProtocolVersion: TLSV1_3, "
                              + "maxProtocolVersion: TLSV1_2}}").map(\.message),
                       ["minProtocolVersion is above maxProtocolVersion"])
    }

    func testTLSRoutesMatchBySNI() throws {
        let yaml = """
            apiVersion: networking.istio.io/v1
            kind: VirtualService
            metadata: {name: passthrough}
            spec:
              hosts: [a.example.com]
              gateways: [gw]
              tls:
              - match: [{port: 443, sniHosts: [a.example.com]}]
                route: [{destination: {host: a.internal, port: {number: 8443}}}]
            """
        let (resources, diagnostics) = ResourceDecoder.decode(yaml, file: "vs.yaml")
        XCTAssertEqual(diagnostics, [])
        guard case .virtualService(let vs) = resources.first?.spec else { return XCTFail() }
        XCTAssertEqual(vs.tls.first?.match.first?.sniHosts, ["a.example.com"])
        XCTAssertEqual(vs.tls.first?.match.first?.port, 443)
        XCTAssertEqual(vs.tls.first?.route.first?.destination.port, 8443)
        let missing = ResourceDecoder.decode(yaml.replacingOccurrences(of: "sniHosts: [a.example.com]", with: "gateways: [gw]"),
                                             file: "vs.yaml").diagnostics
        XCTAssertEqual(missing.map(\.path), ["spec.tls[0].match[0].sniHosts"])
    }
}
