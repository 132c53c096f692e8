import SluiceModel
import XCTest

final class SluiceKindsTests: XCTestCase {
    func testRateLimitPolicyDecodesLocalBucketsAndQuotas() {
        let (resources, d) = ResourceDecoder.decode("""
            apiVersion: sluice.dev/v1
            kind: RateLimitPolicy
            metadata: {name: reviews}
            spec:
              host: reviews.default.svc.cluster.local
              local:
              - name: per-user
                match: [{uri: {prefix: /api}}]
                tokenBucket: {maxTokens: 100, tokensPerFill: 10, fillInterval: 100ms}
                key: {header: X-User}
              - tokenBucket: {maxTokens: 1000}
              quotas:
              - {name: daily, limit: 100000, per: 24h, key: {sourcePrincipal: true}}
            """, file: "rl.yaml")
        XCTAssertEqual(d, [])
        guard case .rateLimitPolicy(let p)? = resources.first?.spec else { return XCTFail() }
        XCTAssertEqual(p.local.count, 2)
        XCTAssertEqual(p.local[0].key, .header("x-user"))
        XCTAssertEqual(p.local[0].tokenBucket, .init(maxTokens: 100, tokensPerFill: 10, fillInterval: .milliseconds(100)))
        XCTAssertEqual(p.local[0].status, 429)
        XCTAssertEqual(p.local[1].tokenBucket.tokensPerFill, 1000, "a bucket refills to full by default")
        XCTAssertEqual(p.local[1].key, RateLimitPolicy.Key.none)
        XCTAssertEqual(p.quotas[0].per, .seconds(86400))
        XCTAssertEqual(p.quotas[0].key, .sourcePrincipal)
    }

    func testRateLimitPolicyErrors() {
        let cases: [(String, String, String)] = [
            ("local: [{key: {sourceIp: true}}]", "spec.local[0].tokenBucket", "missing"),
            ("local: [{tokenBucket: {maxTokens: 0}}]", "spec.local[0].tokenBucket.maxTokens", "out of range"),
            ("local: [{tokenBucket: {maxTokens: 5}, key: {sourceIp: true, header: a}}]", "spec.local[0].key", "mutually exclusive"),
            ("quotas: [{name: q, limit: 5}]", "spec.quotas[0].per", "missing"),
            ("quotas: []", "spec", "needs local limits or quotas"),
        ]
        for (body, path, message) in cases {
            let (_, d) = ResourceDecoder.decode("apiVersion: sluice.dev/v1\nkind: RateLimitPolicy\nmetadata: {name: r}\nspec:\n  host: a\n  \(body)\n",
                                                file: "rl.yaml")
            XCTAssertTrue(d.contains { $0.severity == .error && $0.path == path && $0.message.contains(message) }, "\(body): \(d)")
        }
    }

    func testMeshConfigSetsDefaultsTheCompilerUses() throws {
        let mesh = Fixtures.smallMesh.replacingOccurrences(of: "connectTimeout: 250ms, ", with: "")
            + "\n---\napiVersion: sluice.dev/v1\nkind: MeshConfig\nmetadata: {name: mesh}\nspec:\n  trustDomain: example.org\n  connectTimeout: 3s\n  tcpIdleTimeout: 10m\n"
        let (resources, d) = ResourceDecoder.decode(mesh, file: "m.yaml")
        XCTAssertEqual(d, [])
        let snap = try SnapshotCompiler().compile(resources)
        XCTAssertEqual(snap.clusters[0].connectTimeout, .seconds(3))
        XCTAssertEqual(snap.clusters[0].idleTimeout, .seconds(3600), "the DestinationRule's idleTimeout wins")
        let two = mesh + "---\napiVersion: sluice.dev/v1\nkind: MeshConfig\nmetadata: {name: other}\nspec: {}\n"
        XCTAssertThrowsError(try SnapshotCompiler().compile(ResourceDecoder.decode(two, file: "m.yaml").resources))
    }
}
