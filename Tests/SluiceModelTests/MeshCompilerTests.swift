import Foundation
import SluiceModel
import SluiceTestSupport
import XCTest

/// Per-node compilation: scoping, identities, BPF map entries, determinism and incremental deltas.
final class MeshCompilerTests: XCTestCase {
    static let seed = UInt64(ProcessInfo.processInfo.environment["SLUICE_TEST_SEED"] ?? "") ?? 7
    static let rounds = Int(ProcessInfo.processInfo.environment["SLUICE_TEST_ROUNDS"] ?? "") ?? 300

    // MARK: - Builders

    static func decode(_ yaml: String, file: String = "mesh.yaml") -> [Resource] {
        let (resources, diagnostics) = ResourceDecoder.decode(yaml, file: file)
        precondition(!diagnostics.contains { $0.severity == .error }, "\(diagnostics)")
        return resources
    }

    static func service(_ name: String, ns: String, vip: String?, port: Int = 9000, proto: String = "TCP",
                        exportTo: String? = nil, selector: String? = nil) -> String {
        """
        apiVersion: networking.istio.io/v1
        kind: ServiceEntry
        metadata: {name: \(name), namespace: \(ns)}
        spec:
          hosts: [\(name).\(ns).svc.cluster.local]
          \(vip.map { "addresses: [\($0)]" } ?? "")
          location: MESH_INTERNAL
          resolution: STATIC
          ports: [{number: \(port), name: p, protocol: \(proto)}]
          workloadSelector: {labels: {app: \(selector ?? name)}}
          \(exportTo.map { "exportTo: [\"\($0)\"]" } ?? "")
        ---

        """
    }

    static func workload(_ name: String, ns: String, app: String, ip: String, node: String, version: String = "v1",
                         sa: String? = nil) -> String {
        """
        apiVersion: networking.istio.io/v1
        kind: WorkloadEntry
        metadata:
          name: \(name)
          namespace: \(ns)
          annotations: {sluice.dev/node: \(node), sluice.dev/cgroup: /sys/fs/cgroup/\(name)}
        spec:
          address: \(ip)
          labels: {app: \(app), version: \(version)}
          ports: {p: 8000}
          \(sa.map { "serviceAccount: \($0)" } ?? "")
        ---

        """
    }

    /// Two namespaces over three nodes; `reviews` is exported only to its own namespace.
    static let twoNamespaces =
        service("ratings", ns: "shop", vip: "10.96.0.10")
        + service("reviews", ns: "books", vip: "10.96.0.20", exportTo: ".")
        + workload("ratings-1", ns: "shop", app: "ratings", ip: "10.1.0.1", node: "node-a", sa: "ratings")
        + workload("ratings-2", ns: "shop", app: "ratings", ip: "10.1.0.2", node: "node-b", version: "v2")
        + workload("reviews-1", ns: "books", app: "reviews", ip: "10.1.0.3", node: "node-b")
        + """
        apiVersion: sluice.dev/v1
        kind: MeshConfig
        metadata: {name: mesh, namespace: istio-system}
        spec: {trustDomain: example.org}
        """

    // MARK: - Scoping and identities

    func testNodeGetsOnlyItsWorkloadsWithTheirIdentities() throws {
        let m = try MeshCompiler(Self.decode(Self.twoNamespaces))
        XCTAssertEqual(m.nodes, ["node-a", "node-b"])
        let a = m.snapshot(for: "node-a")
        XCTAssertEqual(a.workloads.map(\.name), ["ratings-1"])
        let w = a.workloads[0]
        XCTAssertEqual(w.identity, "spiffe://example.org/ns/shop/sa/ratings")
        XCTAssertEqual(w.cgroup, "/sys/fs/cgroup/ratings-1")
        XCTAssertEqual(w.address, "10.1.0.1")
        let b = m.snapshot(for: "node-b")
        XCTAssertEqual(b.workloads.map { "\($0.namespace)/\($0.name)" }, ["books/reviews-1", "shop/ratings-2"])
        XCTAssertEqual(b.workloads.map(\.identity),
                       ["spiffe://example.org/ns/books/sa/default", "spiffe://example.org/ns/shop/sa/default"])
    }

    func testExportToLimitsWhichNodesSeeAService() throws {
        let m = try MeshCompiler(Self.decode(Self.twoNamespaces))
        let a = m.snapshot(for: "node-a")
        XCTAssertEqual(a.services.map(\.host), ["ratings.shop.svc.cluster.local"],
                       "reviews is exported to books only, and node-a runs nothing in books")
        XCTAssertEqual(a.clusters.map(\.name), ["outbound|9000||ratings.shop.svc.cluster.local"])
        let b = m.snapshot(for: "node-b")
        XCTAssertEqual(b.services.map(\.host), ["ratings.shop.svc.cluster.local", "reviews.books.svc.cluster.local"])
        let idle = m.snapshot(for: "node-without-workloads")
        XCTAssertEqual(idle.items, [], "a node that runs nothing needs nothing")
    }

    func testEndpointsCarryTheirNodeAndIdentity() throws {
        let m = try MeshCompiler(Self.decode(Self.twoNamespaces))
        let c = try XCTUnwrap(m.snapshot(for: "node-a").cluster(named: "outbound|9000||ratings.shop.svc.cluster.local"))
        XCTAssertEqual(c.endpoints.map(\.address.description), ["10.1.0.1:8000", "10.1.0.2:8000"])
        XCTAssertEqual(c.endpoints.map(\.node), ["node-a", "node-b"])
        XCTAssertEqual(c.endpoints.map(\.identity),
                       ["spiffe://example.org/ns/shop/sa/ratings", "spiffe://example.org/ns/shop/sa/default"])
        XCTAssertEqual(c.protocol, .tcp)
        XCTAssertEqual(c.idleTimeout, .seconds(3600))
    }

    func testPoliciesGoOnlyToNodesRunningWhatTheySelect() throws {
        let yaml = Self.twoNamespaces + """

        ---
        apiVersion: security.istio.io/v1
        kind: AuthorizationPolicy
        metadata: {name: ratings-v2-only, namespace: shop}
        spec:
          selector: {matchLabels: {version: v2}}
          rules: [{from: [{source: {principals: [cluster.local/ns/shop/sa/web]}}]}]
        ---
        apiVersion: security.istio.io/v1
        kind: PeerAuthentication
        metadata: {name: mesh-wide, namespace: istio-system}
        spec: {mtls: {mode: PERMISSIVE}}
        """
        let m = try MeshCompiler(Self.decode(yaml))
        let a = m.snapshot(for: "node-a"), b = m.snapshot(for: "node-b")
        XCTAssertEqual(a.authorizationPolicies, [], "node-a runs no v2 workload")
        XCTAssertEqual(b.authorizationPolicies.map(\.qualifiedName), ["shop/ratings-v2-only"])
        XCTAssertEqual(a.peerAuthentications.map(\.qualifiedName), ["istio-system/mesh-wide"],
                       "a root-namespace policy without selector covers the mesh")
        XCTAssertEqual(b.peerAuthentications.map(\.qualifiedName), ["istio-system/mesh-wide"])
    }

    /// Istio's PeerAuthentication precedence: the workload's own (selector) policy, then its namespace's, then the
    /// mesh's; UNSET defers; `portLevelMtls` refines the workload's own policy.
    func testPeerAuthenticationInEffectFollowsIstiosPrecedence() throws {
        func modes(_ policies: String) throws -> [String: (PeerAuthentication.Mode, [UInt16: PeerAuthentication.Mode])] {
            let m = try MeshCompiler(Self.decode(Self.twoNamespaces + policies))
            let b = m.snapshot(for: "node-b")
            return Dictionary(uniqueKeysWithValues: b.workloads.map { ("\($0.namespace)/\($0.name)", ($0.peerAuthentication, $0.peerAuthenticationPorts)) })
        }
        func policy(_ name: String, _ ns: String, _ body: String) -> String {
            "\n---\napiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: \(name), namespace: \(ns)}\nspec: \(body)\n"
        }
        var m = try modes("")
        XCTAssertEqual(m["shop/ratings-2"]?.0, .permissive, "nothing set: PERMISSIVE")
        m = try modes(policy("mesh", "istio-system", "{mtls: {mode: STRICT}}"))
        XCTAssertEqual(m["shop/ratings-2"]?.0, .strict)
        XCTAssertEqual(m["books/reviews-1"]?.0, .strict)
        m = try modes(policy("mesh", "istio-system", "{mtls: {mode: STRICT}}") + policy("shop", "shop", "{mtls: {mode: PERMISSIVE}}"))
        XCTAssertEqual(m["shop/ratings-2"]?.0, .permissive, "the namespace's overrides the mesh's")
        XCTAssertEqual(m["books/reviews-1"]?.0, .strict)
        m = try modes(policy("shop", "shop", "{mtls: {mode: PERMISSIVE}}")
                      + policy("ratings", "shop", "{selector: {matchLabels: {app: ratings}}, mtls: {mode: UNSET}, portLevelMtls: {8000: {mode: STRICT}}}"))
        XCTAssertEqual(m["shop/ratings-2"]?.0, .permissive, "UNSET defers to the namespace's")
        XCTAssertEqual(m["shop/ratings-2"]?.1, [8000: .strict])
        // DISABLE on the endpoint's port: its callers send plaintext (no tunnel).
        let disabled = try MeshCompiler(Self.decode(Self.twoNamespaces + policy("ratings", "shop",
            "{selector: {matchLabels: {app: ratings}}, mtls: {mode: STRICT}, portLevelMtls: {8000: {mode: DISABLE}}}")))
        let c = try XCTUnwrap(disabled.snapshot(for: "node-a").cluster(named: "outbound|9000||ratings.shop.svc.cluster.local"))
        XCTAssertEqual(c.endpoints.map(\.plaintext), [true, true])
        let plain = try XCTUnwrap(try MeshCompiler(Self.decode(Self.twoNamespaces)).snapshot(for: "node-a")
            .cluster(named: "outbound|9000||ratings.shop.svc.cluster.local"))
        XCTAssertEqual(plain.endpoints.map(\.plaintext), [nil, nil])
    }

    /// With tunnels, kernel balancing is given up for a service with a mesh backend on another node; a service the
    /// compiler already sends to the agent (an AuthorizationPolicy on requests) keeps its reason; one on connection
    /// attributes alone leaves the service to the kernel, which checks it at connect().
    func testServicesWithGuardedOrRemoteBackendsGoThroughTheAgent() throws {
        let plain = try MeshCompiler(Self.decode(Self.twoNamespaces)).snapshot(for: "node-a")
        XCTAssertTrue(plain.servedByAgent(tunnels: false).bpfServices[0].isL4Only)
        XCTAssertEqual(plain.servedByAgent(tunnels: true).bpfServices[0].action,
                       .proxy(reason: "mutual TLS to workloads on other nodes (HBONE)"), "ratings-2 runs on node-b")
        let guarded = try MeshCompiler(Self.decode(Self.twoNamespaces + """

            ---
            apiVersion: security.istio.io/v1
            kind: AuthorizationPolicy
            metadata: {name: ratings, namespace: shop}
            spec: {selector: {matchLabels: {app: ratings}}, rules: [{to: [{operation: {methods: [GET]}}]}]}
            """)).snapshot(for: "node-a")
        XCTAssertEqual(guarded.servedByAgent(tunnels: true).bpfServices[0].action,
                       .proxy(reason: "AuthorizationPolicy shop/ratings authorizes its workloads' requests"))
        let connectionOnly = try MeshCompiler(Self.decode(Self.twoNamespaces + """

            ---
            apiVersion: security.istio.io/v1
            kind: AuthorizationPolicy
            metadata: {name: ratings, namespace: shop}
            spec: {selector: {matchLabels: {app: ratings}}, rules: [{from: [{source: {namespaces: [shop]}}]}]}
            """)).snapshot(for: "node-a")
        XCTAssertTrue(connectionOnly.bpfServices[0].isL4Only)
    }

    // MARK: - BPF services map

    func testPlainTCPServiceIsBalancedInTheKernel() throws {
        let m = try MeshCompiler(Self.decode(Self.twoNamespaces))
        let entries = m.snapshot(for: "node-a").bpfServices
        XCTAssertEqual(entries.count, 1)
        let e = entries[0]
        XCTAssertEqual(e.address.description, "10.96.0.10:9000")
        XCTAssertEqual(e.protocol, .tcp)
        XCTAssertEqual(e.action, .balance(loadBalancing: .random, backends: [
            .init(address: EndpointAddress(parsing: "10.1.0.1:8000")!, weight: 1),
            .init(address: EndpointAddress(parsing: "10.1.0.2:8000")!, weight: 1),
        ]))
    }

    func testServicesThatNeedTheAgentSayWhy() throws {
        let yaml = Self.service("web", ns: "shop", vip: "10.96.0.1", port: 80, proto: "HTTP")
            + Self.service("routed", ns: "shop", vip: "10.96.0.2")
            + Self.service("guarded", ns: "guarded", vip: "10.96.0.3")
            + Self.service("hashed", ns: "shop", vip: "10.96.0.4")
            + Self.service("range", ns: "shop", vip: "10.97.0.0/16")
            + Self.workload("w1", ns: "shop", app: "web", ip: "10.1.0.1", node: "n")
            + Self.workload("w2", ns: "shop", app: "routed", ip: "10.1.0.2", node: "n")
            + Self.workload("w3", ns: "guarded", app: "guarded", ip: "10.1.0.3", node: "n")
            + Self.workload("w4", ns: "shop", app: "hashed", ip: "10.1.0.4", node: "n")
            + """
            apiVersion: networking.istio.io/v1
            kind: VirtualService
            metadata: {name: routed, namespace: shop}
            spec:
              hosts: [routed.shop.svc.cluster.local]
              tcp: [{route: [{destination: {host: routed.shop.svc.cluster.local}}]}]
            ---
            apiVersion: security.istio.io/v1
            kind: PeerAuthentication
            metadata: {name: strict, namespace: guarded}
            spec: {mtls: {mode: STRICT}}
            ---
            apiVersion: networking.istio.io/v1
            kind: DestinationRule
            metadata: {name: hashed, namespace: shop}
            spec:
              host: hashed.shop.svc.cluster.local
              trafficPolicy: {loadBalancer: {consistentHash: {useSourceIp: true}}}
            """
        let snap = try MeshCompiler(Self.decode(yaml)).snapshot(for: "n")
        let byHost = Dictionary(uniqueKeysWithValues: snap.bpfServices.map { ($0.host, $0) })
        XCTAssertEqual(byHost.count, 4, "a CIDR address is matched by the agent, not by a map entry")
        func reason(_ host: String) -> String? {
            if case .proxy(let r)? = byHost["\(host).svc.cluster.local"]?.action { return r }
            return nil
        }
        XCTAssertEqual(reason("web.shop"), "port 80 speaks HTTP; the L7 proxy serves it")
        XCTAssertEqual(reason("routed.shop"), "VirtualService shop/routed routes routed.shop.svc.cluster.local")
        XCTAssertEqual(reason("guarded.guarded"), "PeerAuthentication guarded/strict requires mutual TLS")
        guard case .balance(let lb, let backends)? = byHost["hashed.shop.svc.cluster.local"]?.action else {
            return XCTFail("hashed should be balanced in the kernel")
        }
        XCTAssertEqual(lb, .maglev)
        XCTAssertEqual(backends.map(\.address.description), ["10.1.0.4:8000"])
    }

    // MARK: - Determinism

    func testOutputIsByteIdenticalWhateverTheInputOrder() throws {
        let resources = Self.decode(Self.twoNamespaces + "\n---\n" + Fixtures.smallMesh)
        let reference = try MeshCompiler(resources).snapshot(for: "node-b").canonicalJSON()
        XCTAssertGreaterThan(reference.count, 1000)
        var rng = SystemRandomNumberGenerator()
        for _ in 0..<5 {
            let shuffled = try MeshCompiler(resources.shuffled(using: &rng)).snapshot(for: "node-b").canonicalJSON()
            XCTAssertEqual(shuffled, reference)
        }
        let text = String(decoding: reference, as: UTF8.self)
        XCTAssertTrue(text.contains("\"identity\":\"spiffe://example.org/ns/books/sa/default\""), text)
    }

    // MARK: - Incremental

    func testDeltaReachesOnlyNodesThatSeeTheService() throws {
        var m = try MeshCompiler(Self.decode(Self.twoNamespaces))
        let before = Dictionary(uniqueKeysWithValues: m.nodes.map { ($0, m.snapshot(for: $0)) })
        // A new endpoint of reviews (exported to books only): node-b sees reviews, node-a does not.
        let change = Self.decode(Self.workload("reviews-2", ns: "books", app: "reviews", ip: "10.1.0.9", node: "node-c"))
        let delta = try m.apply(change.map { .upsert($0) })
        XCTAssertEqual(delta.nodes.map(\.node), ["node-b", "node-c"])
        XCTAssertEqual(delta.recompiledServices, 1)
        let forB = delta.nodes[0]
        XCTAssertEqual(forB.removed, [])
        XCTAssertEqual(forB.upserted.map(\.key.description),
                       ["cluster:outbound|9000||reviews.books.svc.cluster.local", "bpfService:10.96.0.20:9000/TCP"])
        XCTAssertEqual(before["node-b"]!.applying(forB), m.snapshot(for: "node-b"))
        let forC = delta.nodes[1]
        XCTAssertEqual(NodeSnapshot(node: "node-c", mesh: m.mesh).applying(forC), m.snapshot(for: "node-c"))
        XCTAssertEqual(m.snapshot(for: "node-a"), before["node-a"], "node-a got no delta and nothing changed for it")
    }

    /// istioctl analyze's IST0130: a rule after one that matches every request, or with the same matches as an
    /// earlier one, is reported (a warning with its own code), and rules that can each be reached are not.
    func testUnreachableVirtualServiceRulesAreReported() throws {
        let yaml = Self.service("web", ns: "shop", vip: "10.9.0.1", proto: "HTTP") + """
            apiVersion: networking.istio.io/v1
            kind: VirtualService
            metadata: {name: web, namespace: shop}
            spec:
              hosts: [web.shop.svc.cluster.local]
              http:
              - name: a
                match: [{uri: {prefix: /api}, name: first}]
                route: [{destination: {host: web.shop.svc.cluster.local}}]
              - name: same-as-a
                match: [{uri: {prefix: /api}, name: renamed}]
                route: [{destination: {host: web.shop.svc.cluster.local}}]
              - match: [{uri: {prefix: /}}]
                route: [{destination: {host: web.shop.svc.cluster.local}}]
              - route: [{destination: {host: web.shop.svc.cluster.local}}]
            ---
            apiVersion: networking.istio.io/v1
            kind: VirtualService
            metadata: {name: fine, namespace: shop}
            spec:
              hosts: [fine.example]
              http:
              - match: [{headers: {end-user: {exact: jason}}}]
                route: [{destination: {host: web.shop.svc.cluster.local}}]
              - match: [{uri: {prefix: /api}}]
                route: [{destination: {host: web.shop.svc.cluster.local}}]
              - route: [{destination: {host: web.shop.svc.cluster.local}}]
            """
        let compiler = try MeshCompiler(Self.decode(yaml))
        let unreachable = compiler.warnings.filter { $0.code == .virtualServiceUnreachableRule }
        XCTAssertEqual(unreachable.map(\.path), ["spec.http[1].match", "spec.http[3]"], "\(compiler.warnings)")
        XCTAssertTrue(unreachable.allSatisfy { $0.resource == "VirtualService shop/web" && $0.code.code == "SLC0130" })
        XCTAssertTrue(unreachable[1].message.contains("rule http[2] before it matches every request"), unreachable[1].message)
    }

    func testRejectedChangeKeepsTheLastGoodConfiguration() throws {
        var m = try MeshCompiler(Self.decode(Self.twoNamespaces))
        let before = m.snapshot(for: "node-b")
        let bad = Self.decode("""
            apiVersion: networking.istio.io/v1
            kind: VirtualService
            metadata: {name: bad, namespace: books}
            spec:
              hosts: [reviews.books.svc.cluster.local]
              http: [{route: [{destination: {host: reviews.books.svc.cluster.local, subset: v9}}]}]
            """)
        XCTAssertThrowsError(try m.apply(bad.map { .upsert($0) })) { error in
            let d = (error as? ConfigErrors)?.diagnostics.first
            XCTAssertEqual(d?.path, "spec.http[0].route[0].destination.subset")
            XCTAssertEqual(d?.resource, "VirtualService books/bad")
        }
        XCTAssertEqual(m.snapshot(for: "node-b"), before)
    }

    /// A rejected batch leaves exactly the state before it, even where an index keeps one resource per host or
    /// per mesh (found by review: a second HealthCheck, a MeshConfig renamed in a failing batch).
    func testRejectedBatchesRestoreOneOfAKindIndexes() throws {
        let base = Self.twoNamespaces + """

            ---
            apiVersion: sluice.dev/v1
            kind: HealthCheck
            metadata: {name: hc1, namespace: shop}
            spec: {host: ratings.shop.svc.cluster.local}
            """
        var m = try MeshCompiler(Self.decode(base))
        let before = m.nodes.map { m.snapshot(for: $0) }
        let secondCheck = Self.decode("""
            apiVersion: sluice.dev/v1
            kind: HealthCheck
            metadata: {name: hc2, namespace: shop}
            spec: {host: ratings.shop.svc.cluster.local}
            """)
        XCTAssertThrowsError(try m.apply(secondCheck.map { .upsert($0) }))
        XCTAssertEqual(m.nodes.map { m.snapshot(for: $0) }, before)

        let renamed = Self.decode("""
            apiVersion: sluice.dev/v1
            kind: MeshConfig
            metadata: {name: mesh2, namespace: istio-system}
            spec: {trustDomain: example.org}
            ---
            apiVersion: networking.istio.io/v1
            kind: VirtualService
            metadata: {name: bad, namespace: shop}
            spec:
              hosts: [ratings.shop.svc.cluster.local]
              http: [{route: [{destination: {host: ratings.shop.svc.cluster.local, subset: nope}}]}]
            """)
        for _ in 0..<10 {
            let batch: [ResourceChange] = [.delete(ResourceKey(kind: .meshConfig, namespace: "istio-system", name: "mesh"))]
                + renamed.map { .upsert($0) }
            XCTAssertThrowsError(try m.apply(batch))
            XCTAssertEqual(m.mesh.trustDomain, "example.org")
            XCTAssertEqual(m.nodes.map { m.snapshot(for: $0) }, before)
        }
    }

    func testAServiceEntryWithSeveralHostsHasOneMapEntryPerAddress() throws {
        let yaml = """
            apiVersion: networking.istio.io/v1
            kind: ServiceEntry
            metadata: {name: two, namespace: shop}
            spec:
              hosts: [a.shop.svc.cluster.local, b.shop.svc.cluster.local]
              addresses: [10.96.5.5]
              resolution: STATIC
              ports: [{number: 80, name: tcp, protocol: TCP}]
              endpoints: [{address: 10.1.5.5}]
            ---

            """ + Self.workload("w", ns: "shop", app: "x", ip: "10.1.0.1", node: "n")
        let m = try MeshCompiler(Self.decode(yaml))
        let snap = m.snapshot(for: "n")
        XCTAssertEqual(snap.bpfServices.map(\.host), ["a.shop.svc.cluster.local"])
        XCTAssertEqual(NodeSnapshot(node: "n", mesh: snap.mesh, items: snap.items), snap, "keys are unique")
    }

    /// Random edits of a small mesh: after each, every node's old snapshot plus its delta equals a fresh
    /// compile, and nodes without a delta are unchanged.
    func testDeltasMatchFullRecompilesUnderRandomChanges() throws {
        var rng = SeededRandom(seed: Self.seed)
        let namespaces = ["a", "b", "c"], nodes = ["n1", "n2", "n3", "n4"]
        var yaml = ""
        for i in 0..<6 {
            let ns = namespaces[i % 3]
            yaml += Self.service("s\(i)", ns: ns, vip: "10.96.0.\(i + 1)", exportTo: i % 2 == 0 ? "." : nil)
        }
        for i in 0..<12 {
            yaml += Self.workload("w\(i)", ns: namespaces[i % 3], app: "s\(i % 6)", ip: "10.1.0.\(i + 1)",
                                  node: nodes[i % 4])
        }
        var m = try MeshCompiler(Self.decode(yaml))
        var rejected = 0, changedRounds = 0
        for round in 0..<Self.rounds {
            let before = Dictionary(uniqueKeysWithValues: nodes.map { ($0, m.snapshot(for: $0)) })
            let i = Int.random(in: 0..<14, using: &rng), ns = namespaces[i % 3]
            let text: String
            var delete: ResourceKey?
            switch Int.random(in: 0..<10, using: &rng) {
            case 0:
                text = Self.workload("w\(i)", ns: ns, app: "s\(i % 6)", ip: "10.1.\(round % 250).\(i + 1)",
                                     node: nodes.randomElement(using: &rng)!)
            case 1:
                text = ""
                delete = ResourceKey(kind: .workloadEntry, namespace: ns, name: "w\(i)")
            case 2:
                text = Self.service("s\(i % 6)", ns: namespaces[(i % 6) % 3], vip: "10.96.0.\(i % 6 + 1)",
                                    port: [9000, 9001].randomElement(using: &rng)!,
                                    exportTo: Bool.random(using: &rng) ? "." : nil)
            case 3:
                text = """
                    apiVersion: networking.istio.io/v1
                    kind: DestinationRule
                    metadata: {name: s\(i % 6), namespace: \(namespaces[(i % 6) % 3])}
                    spec:
                      host: s\(i % 6).\(namespaces[(i % 6) % 3]).svc.cluster.local
                      subsets: [{name: v1, labels: {version: v1}}]
                    """
            case 4:
                text = """
                    apiVersion: security.istio.io/v1
                    kind: AuthorizationPolicy
                    metadata: {name: p\(i), namespace: \(ns)}
                    spec: {selector: {matchLabels: {app: s\(i % 6)}}, action: DENY, rules: [{}]}
                    """
            case 5:
                text = """
                    apiVersion: networking.istio.io/v1
                    kind: VirtualService
                    metadata: {name: v\(i), namespace: \(ns)}
                    spec:
                      hosts: [s\(i % 6).\(namespaces[(i % 6) % 3]).svc.cluster.local]
                      exportTo: ["\(Bool.random(using: &rng) ? "*" : ".")"]
                      tcp: [{route: [{destination: {host: s\(i % 6).\(namespaces[(i % 6) % 3]).svc.cluster.local}}]}]
                    """
            case 6:
                // A gateway that runs where s(i % 6) runs, and a route bound to it.
                let host = "s\(i % 6).\(namespaces[(i % 6) % 3]).svc.cluster.local"
                text = """
                    apiVersion: networking.istio.io/v1
                    kind: Gateway
                    metadata: {name: g\(i % 3), namespace: \(ns)}
                    spec:
                      selector: {app: s\(i % 6)}
                      servers: [{port: {number: \(7000 + i), name: tcp, protocol: TCP}, hosts: ["*"]}]
                    ---
                    apiVersion: networking.istio.io/v1
                    kind: VirtualService
                    metadata: {name: gv\(i % 3), namespace: \(ns)}
                    spec:
                      hosts: ["*"]
                      gateways: [g\(i % 3)]
                      tcp: [{route: [{destination: {host: \(host), port: {number: 9000}}}]}]
                    """
            case 7:
                text = """
                    apiVersion: security.istio.io/v1
                    kind: PeerAuthentication
                    metadata: {name: root, namespace: istio-system}
                    spec: {mtls: {mode: \(Bool.random(using: &rng) ? "STRICT" : "PERMISSIVE")}}
                    """
            case 8:
                text = """
                    apiVersion: sluice.dev/v1
                    kind: MeshConfig
                    metadata: {name: mesh, namespace: istio-system}
                    spec: {trustDomain: td\(i % 2).example}
                    """
            default:
                text = ""
                delete = ResourceKey(kind: [.virtualService, .authorizationPolicy, .destinationRule, .gateway,
                                            .peerAuthentication].randomElement(using: &rng)!,
                                     namespace: ns, name: ["v\(i)", "p\(i)", "s\(i % 6)", "g\(i % 3)"].randomElement(using: &rng)!)
            }
            let changes: [ResourceChange] = delete.map { [.delete($0)] } ?? Self.decode(text).map { .upsert($0) }
            let delta: MeshDelta
            do { delta = try m.apply(changes) } catch {
                rejected += 1  // e.g. the port a route names went away
                continue
            }
            if !delta.nodes.isEmpty { changedRounds += 1 }
            let byNode = Dictionary(uniqueKeysWithValues: delta.nodes.map { ($0.node, $0) })
            for node in nodes {
                let expected = m.snapshot(for: node)
                let got = byNode[node].map { before[node]!.applying($0) } ?? before[node]!
                XCTAssertEqual(Self.difference(got, expected), "", "round \(round) node \(node), change \(changes)")
                if got != expected { return }
            }
        }
        // The walk must mostly be accepted changes that reach nodes, or it proves little.
        XCTAssertLessThan(rejected, Self.rounds / 4)
        XCTAssertGreaterThan(changedRounds, Self.rounds / 2, "rejected \(rejected)")
    }
}

extension MeshCompilerTests {
    /// Keys whose items differ between two snapshots, one per line ("" when equal).
    static func difference(_ got: NodeSnapshot, _ expected: NodeSnapshot) -> String {
        let a = Dictionary(uniqueKeysWithValues: got.items.map { ($0.key, $0) })
        let b = Dictionary(uniqueKeysWithValues: expected.items.map { ($0.key, $0) })
        return Set(a.keys).union(b.keys).sorted().compactMap { k in
            switch (a[k], b[k]) {
            case (nil, _): "missing \(k)"
            case (_, nil): "extra \(k)"
            case (let x, let y) where x != y: "differs \(k)"
            default: nil
            }
        }.joined(separator: "\n")
    }
}
