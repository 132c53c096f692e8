import SluiceModel
import XCTest

/// security.istio.io resources, from Istio's authorization and authentication tasks.
final class SecurityTests: XCTestCase {
    func decodeOne(_ yaml: String) -> (Resource.Spec?, [Diagnostic]) {
        let (resources, diagnostics) = ResourceDecoder.decode(yaml, file: "sec.yaml")
        return (resources.first?.spec, diagnostics)
    }

    func testAllowNothingPolicy() {
        let (spec, d) = decodeOne("""
            apiVersion: security.istio.io/v1
            kind: AuthorizationPolicy
            metadata: {name: allow-nothing, namespace: default}
            spec: {}
            """)
        XCTAssertEqual(d, [])
        guard case .authorizationPolicy(let p) = spec else { return XCTFail("\(String(describing: spec))") }
        XCTAssertEqual(p.action, .allow)
        XCTAssertNil(p.rules, "no rules field: matches nothing, so ALLOW denies all")
    }

    func testHTTPAllowRuleWithPrincipalsPathsAndConditions() throws {
        let (spec, d) = decodeOne("""
            apiVersion: security.istio.io/v1beta1
            kind: AuthorizationPolicy
            metadata: {name: productpage-viewer, namespace: default}
            spec:
              selector:
                matchLabels: {app: productpage}
              action: ALLOW
              rules:
              - from:
                - source:
                    principals: ["cluster.local/ns/default/sa/bookinfo-gateway"]
                    ipBlocks: ["10.0.0.0/8", "fd00::1"]
                to:
                - operation:
                    methods: ["GET"]
                    paths: ["/productpage", "/static/*"]
                    ports: ["9080"]
                when:
                - key: request.headers[x-token]
                  notValues: ["guest"]
            """)
        XCTAssertEqual(d, [])
        guard case .authorizationPolicy(let p) = spec else { return XCTFail() }
        let rule = try XCTUnwrap(p.rules?.first)
        XCTAssertEqual(p.selector, ["app": "productpage"])
        XCTAssertEqual(rule.from[0].principals, ["cluster.local/ns/default/sa/bookinfo-gateway"])
        XCTAssertEqual(rule.to[0].methods, ["GET"])
        XCTAssertEqual(rule.to[0].ports, [9080])
        XCTAssertEqual(rule.when[0].key, "request.headers[x-token]")
        XCTAssertEqual(rule.when[0].notValues, ["guest"])
    }

    func testInvalidAuthorizationPoliciesAreErrors() {
        let cases: [(String, String, String)] = [
            ("action: CUSTOM", "spec.provider", "needs a provider"),
            ("action: DENY\n  provider: {name: ext}", "spec.provider", "only to action CUSTOM"),
            ("action: MAYBE", "spec.action", "not a valid value"),
            ("rules: [{from: [{source: {ipBlocks: [\"10.0.0.0/33\"]}}]}]", "spec.rules[0].from[0].source.ipBlocks[0]", "CIDR"),
            ("rules: [{to: [{operation: {ports: [\"http\"]}}]}]", "spec.rules[0].to[0].operation.ports[0]", "port number"),
            ("rules: [{when: [{key: request.color, values: [red]}]}]", "spec.rules[0].when[0].key", "not a condition key"),
            ("rules: [{when: [{key: source.ip}]}]", "spec.rules[0].when[0]", "values or notValues"),
        ]
        for (body, path, message) in cases {
            let (_, d) = decodeOne("apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: p}\nspec:\n  \(body)\n")
            XCTAssertTrue(d.contains { $0.severity == .error && $0.path == path && $0.message.contains(message) }, "\(body): \(d)")
        }
    }

    func testPeerAuthenticationModes() {
        let (spec, d) = decodeOne("""
            apiVersion: security.istio.io/v1
            kind: PeerAuthentication
            metadata: {name: default, namespace: istio-system}
            spec:
              selector: {matchLabels: {app: finance}}
              mtls: {mode: STRICT}
              portLevelMtls:
                8080: {mode: DISABLE}
            """)
        XCTAssertEqual(d, [])
        guard case .peerAuthentication(let p) = spec else { return XCTFail() }
        XCTAssertEqual(p.mode, .strict)
        XCTAssertEqual(p.portLevel, [8080: .disable])
        let (_, bad) = decodeOne("""
            apiVersion: security.istio.io/v1
            kind: PeerAuthentication
            metadata: {name: default}
            spec:
              mtls: {mode: STRICTER}
              portLevelMtls: {8080: {mode: DISABLE}}
            """)
        XCTAssertEqual(Set(bad.filter { $0.severity == .error }.map(\.path)), ["spec.mtls.mode", "spec.portLevelMtls"])
    }

    func testRequestAuthenticationJWTRules() {
        let (spec, d) = decodeOne("""
            apiVersion: security.istio.io/v1
            kind: RequestAuthentication
            metadata: {name: jwt-example, namespace: foo}
            spec:
              selector: {matchLabels: {app: httpbin}}
              jwtRules:
              - issuer: "testing@secure.istio.io"
                jwksUri: "https://raw.githubusercontent.com/istio/istio/release-1.24/security/tools/jwt/samples/jwks.json"
                audiences: [httpbin]
                fromHeaders: [{name: x-jwt, prefix: "Bearer "}]
                forwardOriginalToken: true
            """)
        XCTAssertEqual(d, [])
        guard case .requestAuthentication(let ra) = spec else { return XCTFail() }
        XCTAssertEqual(ra.jwtRules[0].issuer, "testing@secure.istio.io")
        XCTAssertEqual(ra.jwtRules[0].audiences, ["httpbin"])
        XCTAssertEqual(ra.jwtRules[0].fromHeaders.map(\.name), ["x-jwt"])
        XCTAssertEqual(ra.jwtRules[0].fromHeaders.map(\.prefix), ["Bearer "])
        XCTAssertTrue(ra.jwtRules[0].forwardOriginalToken)
        let (_, bad) = decodeOne("""
            apiVersion: security.istio.io/v1
            kind: RequestAuthentication
            metadata: {name: j}
            spec:
              jwtRules:
              - {issuer: a, jwksUri: "ftp://x", jwks: "{}"}
              - {jwksUri: "https://x"}
              - {issuer: a}
            """)
        let messages = bad.filter { $0.severity == .error }.map(\.message)
        XCTAssertTrue(messages.contains("jwksUri and jwks are mutually exclusive"), "\(messages)")
        XCTAssertTrue(messages.contains("'ftp://x' is not an http(s) URL"))
        XCTAssertTrue(messages.contains("required field 'issuer' is missing"))
        XCTAssertTrue(messages.contains("issuer 'a' appears in two rules"))
    }

    func testSecurityKindsNeedTheSecurityAPIGroup() {
        let (_, d) = decodeOne("apiVersion: networking.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: x}\nspec: {}\n")
        XCTAssertEqual(d.first?.path, "apiVersion")
        XCTAssertEqual(d.first?.hint, "use security.istio.io/v1")
    }
}
