import SluiceModel
import XCTest

final class DecodingTests: XCTestCase {
    let mesh = Fixtures.smallMesh

    func testDecodesEveryKindOfASmallMesh() {
        let (resources, diagnostics) = ResourceDecoder.decode(mesh, file: "mesh.yaml")
        XCTAssertEqual(diagnostics, [])
        XCTAssertEqual(resources.map(\.kind), [.gateway, .virtualService, .serviceEntry, .destinationRule])
        XCTAssertEqual(resources[1].metadata.namespace, "shop")
        guard case .destinationRule(let dr) = resources[3].spec else { return XCTFail() }
        XCTAssertEqual(dr.trafficPolicy?.loadBalancer, .consistentHash(key: .sourceIP, tableSize: 65537))
        XCTAssertEqual(dr.trafficPolicy?.connectionPool, .init(maxConnections: 100, connectTimeout: .milliseconds(250),
                                                              idleTimeout: .seconds(3600)))
        XCTAssertEqual(dr.trafficPolicy?.outlierDetection,
                       .init(consecutiveErrors: 0, consecutiveGatewayErrors: 2, interval: .seconds(1),
                             baseEjectionTime: .seconds(30), maxEjectionPercent: 50))
        XCTAssertEqual(dr.subsets.map(\.name), ["primary", "replica"])
    }

    func testCompilesListenersAndClustersFieldByField() throws {
        let (resources, _) = ResourceDecoder.decode(mesh, file: "mesh.yaml")
        let snap = try SnapshotCompiler().compile(resources)
        XCTAssertEqual(snap.listeners.count, 1)
        let l = snap.listeners[0]
        XCTAssertEqual(l.name, "shop/edge:127.0.0.1:8443")
        XCTAssertEqual(l.address, EndpointAddress(parsing: "127.0.0.1:8443"))
        XCTAssertEqual(l.routes.map(\.weight), [80, 20])
        let primary = try XCTUnwrap(snap.cluster(named: l.routes[0].cluster))
        XCTAssertEqual(primary.name, "outbound|5432|primary|db.shop.svc.cluster.local")
        XCTAssertEqual(primary.endpoints.map(\.address.description), ["10.0.0.1:5432", "10.0.0.2:15432"])
        XCTAssertEqual(primary.endpoints.map(\.weight), [3, 1])
        XCTAssertEqual(primary.loadBalancer, .consistentHash(key: .sourceIP, tableSize: 65537))
        XCTAssertEqual(primary.connectTimeout, .milliseconds(250))
        XCTAssertEqual(primary.maxConnections, 100)
        let replica = try XCTUnwrap(snap.cluster(named: l.routes[1].cluster))
        XCTAssertEqual(replica.endpoints.map(\.address.description), ["[fd00::3]:5432"])
        XCTAssertEqual(replica.loadBalancer, .simple(.leastRequest), "subset policy overrides the top level")
        XCTAssertEqual(replica.outlierDetection?.consecutiveGatewayErrors, 2, "and inherits what it does not set")
    }

    func testCompilationIsDeterministic() throws {
        let (resources, _) = ResourceDecoder.decode(mesh, file: "mesh.yaml")
        let a = try SnapshotCompiler().compile(resources)
        let b = try SnapshotCompiler().compile(resources.reversed())
        XCTAssertEqual(a, b)
    }

    func testWeightsMustSumToHundredAndTheErrorSaysWhere() {
        let bad = mesh.replacingOccurrences(of: "weight: 20", with: "weight: 30")
        let (_, diagnostics) = ResourceDecoder.decode(bad, file: "mesh.yaml")
        let e = diagnostics.first { $0.severity == .error }
        XCTAssertEqual(e?.file, "mesh.yaml")
        XCTAssertEqual(e?.resource, "VirtualService shop/db")
        XCTAssertEqual(e?.path, "spec.tcp[0].route")
        XCTAssertEqual(e?.line, 19, "the line where the destinations start")
        XCTAssertTrue(e?.message.contains("110") ?? false)
    }

    func testUnknownFieldsAreWarnedWithTheirPath() {
        let odd = mesh.replacingOccurrences(of: "resolution: STATIC", with: "resolution: STATIC\n  resolutoin: DNS")
        let (resources, diagnostics) = ResourceDecoder.decode(odd, file: "f.yaml")
        XCTAssertEqual(resources.count, 4, "a warning does not drop the resource")
        let w = diagnostics.first { $0.severity == .warning }
        XCTAssertEqual(w?.path, "spec.resolutoin")
        XCTAssertEqual(w?.line, 30)
    }

    func testDuplicateFieldsAreErrors() {
        let dup = mesh.replacingOccurrences(of: "resolution: STATIC", with: "resolution: STATIC\n  resolution: DNS")
        let (_, diagnostics) = ResourceDecoder.decode(dup, file: "d.yaml")
        XCTAssertEqual(diagnostics.count, 1)
        XCTAssertTrue(diagnostics[0].message.contains("duplicated key(s): 'resolution'"), "\(diagnostics)")
    }

    func testMissingSubsetIsACompileError() throws {
        let bad = mesh.replacingOccurrences(of: "subset: replica", with: "subset: canary")
        let (resources, _) = ResourceDecoder.decode(bad, file: "mesh.yaml")
        XCTAssertThrowsError(try SnapshotCompiler().compile(resources)) { error in
            let d = (error as! ConfigErrors).diagnostics[0]
            XCTAssertEqual(d.path, "spec.tcp[0].route[1].destination.subset")
            XCTAssertTrue(d.message.contains("canary"))
            XCTAssertNotNil(d.hint)
        }
    }

    func testBadValuesAreErrors() {
        let cases: [(String, String, String)] = [
            ("connectTimeout: 250ms", "connectTimeout: soon", "spec.trafficPolicy.connectionPool.tcp.connectTimeout"),
            ("number: 5432, name: pg", "number: 70000, name: pg", "spec.ports[0].number"),
            ("tableSize: 65537", "tableSize: 65536", "spec.trafficPolicy.loadBalancer.consistentHash.maglev.tableSize"),
            ("address: 10.0.0.1,", "address: not-an-ip,", "spec.endpoints[1].address"),
            ("apiVersion: networking.istio.io/v1beta1", "apiVersion: networking.istio.io/v9", "apiVersion"),
        ]
        for (from, to, path) in cases {
            let (_, diagnostics) = ResourceDecoder.decode(mesh.replacingOccurrences(of: from, with: to), file: "m.yaml")
            XCTAssertTrue(diagnostics.contains { $0.severity == .error && $0.path == path },
                          "\(to): \(diagnostics)")
        }
    }

    func testInvalidYAMLIsOneClearError() {
        let (resources, diagnostics) = ResourceDecoder.decode("kind: [unclosed\n", file: "x.yaml")
        XCTAssertEqual(resources.count, 0)
        XCTAssertEqual(diagnostics.count, 1)
        XCTAssertTrue(diagnostics[0].message.hasPrefix("not valid YAML"))
    }

    func testJSONDecodesLikeYAML() {
        let json = #"{"apiVersion": "networking.istio.io/v1", "kind": "DestinationRule", "metadata": {"name": "r"}, "#
            + #""spec": {"host": "a.b", "trafficPolicy": {"loadBalancer": {"simple": "RANDOM"}}}}"#
        let (resources, diagnostics) = ResourceDecoder.decode(json, file: "r.json")
        XCTAssertEqual(diagnostics, [])
        guard case .destinationRule(let dr)? = resources.first?.spec else { return XCTFail() }
        XCTAssertEqual(dr.trafficPolicy?.loadBalancer, .simple(.random))
    }

    func testDurationsParseIstioSyntax() {
        XCTAssertEqual(parseIstioDuration("1s"), .seconds(1))
        XCTAssertEqual(parseIstioDuration("0.5s"), .milliseconds(500))
        XCTAssertEqual(parseIstioDuration("250ms"), .milliseconds(250))
        XCTAssertEqual(parseIstioDuration("1m30s"), .seconds(90))
        XCTAssertEqual(parseIstioDuration("1h"), .seconds(3600))
        XCTAssertNil(parseIstioDuration("1"))
        XCTAssertNil(parseIstioDuration("-1s"))
        XCTAssertNil(parseIstioDuration("s"))
        XCTAssertNil(parseIstioDuration(""))
    }
}

/// A small mesh of every L4 kind, written as Istio users write it.
enum Fixtures {
    static  let smallMesh = """
        apiVersion: networking.istio.io/v1
        kind: Gateway
        metadata: {name: edge, namespace: shop}
        spec:
          servers:
          - port: {number: 8443, name: tcp, protocol: TCP}
            bind: 127.0.0.1
            hosts: ["*"]
        ---
        apiVersion: networking.istio.io/v1beta1
        kind: VirtualService
        metadata: {name: db, namespace: shop}
        spec:
          hosts: [db.shop.svc.cluster.local]
          gateways: [edge]
          tcp:
          - match: [{port: 8443}]
            route:
            - destination: {host: db.shop.svc.cluster.local, subset: primary, port: {number: 5432}}
              weight: 80
            - destination: {host: db.shop.svc.cluster.local, subset: replica, port: {number: 5432}}
              weight: 20
        ---
        apiVersion: networking.istio.io/v1
        kind: ServiceEntry
        metadata: {name: db, namespace: shop}
        spec:
          hosts: [db.shop.svc.cluster.local]
          resolution: STATIC
          ports: [{number: 5432, name: pg, protocol: TCP}]
          endpoints:
          - {address: 10.0.0.2, labels: {role: primary}, ports: {pg: 15432}}
          - {address: 10.0.0.1, labels: {role: primary}, weight: 3}
          - {address: "fd00::3", labels: {role: replica}}
        ---
        apiVersion: networking.istio.io/v1alpha3
        kind: DestinationRule
        metadata: {name: db, namespace: shop}
        spec:
          host: db.shop.svc.cluster.local
          trafficPolicy:
            loadBalancer: {consistentHash: {useSourceIp: true, maglev: {tableSize: 65537}}}
            connectionPool: {tcp: {maxConnections: 100, connectTimeout: 250ms, idleTimeout: 1h}}
            outlierDetection: {consecutiveGatewayErrors: 2, interval: 1s, baseEjectionTime: 30s, maxEjectionPercent: 50}
          subsets:
          - name: primary
            labels: {role: primary}
          - name: replica
            labels: {role: replica}
            trafficPolicy: {loadBalancer: {simple: LEAST_REQUEST}}
        """
}
