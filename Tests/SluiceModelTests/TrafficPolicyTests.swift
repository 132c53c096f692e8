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
        let mesh = Self.mesh("""
                tls: {mode: ISTIO_MUTUAL}
            """)
        let (resources, diagnostics) = ResourceDecoder.decode(mesh, file: "tls.yaml")
        XCTAssertEqual(diagnostics, [])
        guard case .destinationRule(let dr) = resources[1].spec else { return XCTFail() }
        XCTAssertEqual(dr.trafficPolicy?.tls?.mode, .istioMutual)

        // The proxy does not originate TLS: a client that asks for it is refused, never sent out in plaintext.
        for mode in ["SIMPLE", "MUTUAL"] {
            let refused = ResourceDecoder.decode(Self.mesh("""
                    tls: {mode: \(mode), credentialName: c}
                """), file: "tls.yaml").diagnostics
            XCTAssertEqual(refused.map(\.path), ["spec.trafficPolicy.tls.mode"], "\(refused)")
            XCTAssertTrue(refused.first?.message.contains("does not originate TLS") == true, "\(refused)")
            XCTAssertEqual(refused.first?.severity, .error)
        }
        let mutual = Self.mesh("""
                tls: {mode: MUTUAL}
            """)
        let errors = ResourceDecoder.decode(mutual, file: "tls.yaml").diagnostics
        XCTAssertEqual(errors.map(\.path), ["spec.trafficPolicy.tls.mode", "spec.trafficPolicy.tls.mode"])
        XCTAssertEqual(errors.last?.message, "MUTUAL needs the client's certificate and key")
        XCTAssertEqual(errors.last?.line, 18)
        // Restrictions not applied are refused; settings without effect are warned about, by name.
        let sans = ResourceDecoder.decode(Self.mesh("""
                tls: {mode: ISTIO_MUTUAL, subjectAltNames: [spiffe://cluster.local/ns/a/sa/b], sni: x.example}
            """), file: "tls.yaml").diagnostics
        XCTAssertEqual(sans.map(\.severity), [.error, .warning])
        XCTAssertEqual(sans.map(\.path), ["spec.trafficPolicy.tls.subjectAltNames", "spec.trafficPolicy.tls.sni"])

        let bogus = ResourceDecoder.decode(Self.mesh("    tls: {mode: SOMETIMES}"), file: "tls.yaml").diagnostics
        XCTAssertEqual(bogus.map(\.message), ["'SOMETIMES' is not a valid value"])
    }

    func testFieldsReadButNotEnforcedAreNamed() {
        let yaml = """
            apiVersion: networking.istio.io/v1
            kind: VirtualService
            metadata: {name: r}
            spec:
              hosts: [r.default.svc.cluster.local]
              http:
              - route: [{destination: {host: r.default.svc.cluster.local}}]
                corsPolicy: {allowOrigins: [{exact: https://a.example}]}
                mirrors: [{destination: {host: r.default.svc.cluster.local}}]
            ---
            apiVersion: networking.istio.io/v1
            kind: DestinationRule
            metadata: {name: r}
            spec:
              host: r.default.svc.cluster.local
              trafficPolicy:
                loadBalancer: {simple: ROUND_ROBIN, localityLbSetting: {enabled: true}, warmup: {duration: 10s}}
            """
        let d = ResourceDecoder.decode(yaml, file: "f.yaml").diagnostics
        XCTAssertEqual(d.map(\.path), ["spec.http[0].corsPolicy", "spec.http[0].mirrors",
                                        "spec.trafficPolicy.loadBalancer.localityLbSetting",
                                        "spec.trafficPolicy.loadBalancer.warmup"])
        XCTAssertTrue(d.allSatisfy { $0.severity == .warning && $0.message.contains("not enforced by this version") }, "\(d)")
        let perPort = ResourceDecoder.decode("""
            apiVersion: networking.istio.io/v1
            kind: DestinationRule
            metadata: {name: r}
            spec:
              host: r.default.svc.cluster.local
              trafficPolicy:
                portLevelSettings: [{port: {number: 80}, connectionPool: {tcp: {maxConnections: 1}}}]
            """, file: "f.yaml").diagnostics
        XCTAssertEqual(perPort.map(\.severity), [.error])
        XCTAssertEqual(perPort.map(\.path), ["spec.trafficPolicy.portLevelSettings"])
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

    func testHTTPSServersSharingAPortCompileToOneListenerWithACertificateEach() throws {
        let yaml = """
            apiVersion: networking.istio.io/v1
            kind: Gateway
            metadata: {name: gw, namespace: edge, annotations: {sluice.dev/node: n1}}
            spec:
              servers:
              - {port: {number: 443, name: https-a, protocol: HTTPS}, hosts: [edge/a.example.com],
                 tls: {mode: SIMPLE, credentialName: a-cert}}
              - {port: {number: 443, name: https-b, protocol: HTTPS}, hosts: ["*.b.example.com"],
                 tls: {mode: MUTUAL, serverCertificate: /b.crt, privateKey: /b.key, caCertificates: /ca.crt}}
              - {port: {number: 8443, name: https-p, protocol: HTTPS}, hosts: [c.example.com], tls: {mode: PASSTHROUGH}}
              - {port: {number: 80, name: http, protocol: HTTP}, hosts: ["*"], tls: {httpsRedirect: true}}
            ---
            apiVersion: networking.istio.io/v1
            kind: VirtualService
            metadata: {name: app, namespace: edge}
            spec:
              hosts: ["*"]
              gateways: [gw]
              http: [{directResponse: {status: 200}}]
            """
        let passthrough = "  - {port: {number: 8443, name: https-p, protocol: HTTPS}, hosts: [c.example.com], tls: {mode: PASSTHROUGH}}\n"
        let (resources, _) = ResourceDecoder.decode(yaml.replacingOccurrences(of: passthrough, with: ""), file: "gw.yaml")
        let snapshot = try SnapshotCompiler(node: "n1").compile(resources)
        let byPort = Dictionary(uniqueKeysWithValues: snapshot.listeners.map { ($0.address.port, $0) })
        XCTAssertEqual(byPort[443]?.tls.map(\.hosts), [["a.example.com"], ["*.b.example.com"]])
        XCTAssertEqual(byPort[443]?.tls.map(\.mode), [.simple, .mutual])
        XCTAssertEqual(byPort[443]?.tls.first?.credentialName, "a-cert")
        XCTAssertEqual(byPort[80]?.httpsRedirect, true)
        XCTAssertEqual(byPort[80]?.tls, [])
        // An HTTPS server that does not terminate TLS cannot route requests.
        let (withPassthrough, _) = ResourceDecoder.decode(yaml, file: "gw.yaml")
        XCTAssertThrowsError(try SnapshotCompiler(node: "n1").compile(withPassthrough)) {
            XCTAssertEqual(($0 as? ConfigErrors)?.diagnostics.map(\.path), ["spec.servers[2].tls.mode"])
        }
    }

    func testPortProtocolFollowsTheDeclarationThenTheName() {
        XCTAssertEqual(PortProtocol.selected(declared: "http", name: "tcp-x"), .http)
        XCTAssertEqual(PortProtocol.selected(declared: nil, name: "http-web"), .http)
        XCTAssertEqual(PortProtocol.selected(declared: nil, name: "grpc"), .grpc)
        XCTAssertEqual(PortProtocol.selected(declared: nil, name: "grpc-web"), .http)
        XCTAssertEqual(PortProtocol.selected(declared: nil, name: "tcp-db"), .tcp)
        XCTAssertEqual(PortProtocol.selected(declared: nil, name: "mysql"), .tcp)
        XCTAssertEqual(PortProtocol.selected(declared: nil, name: "web"), .unspecified)
        XCTAssertEqual(PortProtocol.selected(declared: nil, name: "httpbin"), .unspecified, "a prefix ends at '-'")
        XCTAssertEqual(PortProtocol.selected(declared: nil, name: nil), .unspecified)
        XCTAssertNil(PortProtocol.selected(declared: "UNSPECIFIED", name: nil), "not a protocol one can declare")
        XCTAssertNil(PortProtocol.selected(declared: "SMTP", name: nil))
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
