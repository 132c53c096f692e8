import SluiceModel
import XCTest

@testable import SluiceProxy

/// Istio's AuthorizationPolicy semantics, field by field: for each field a policy that names it, and requests
/// that should and should not match (the allow/deny matrix).
final class AuthorizationEngineTests: XCTestCase {
    typealias P = AuthorizationPolicy

    func policy(_ action: P.Action, _ rules: [P.Rule]?, name: String = "p") -> Named<AuthorizationPolicy> {
        Named(namespace: "shop", name: name, spec: P(selector: nil, action: action, provider: nil, rules: rules))
    }

    func request(ip: String = "10.0.0.5", principal: String? = nil, method: String = "GET", path: String = "/",
                 host: String = "shop.example", port: UInt16 = 8080, headers: [String: String] = [:]) -> AuthorizationRequest {
        var r = AuthorizationRequest(sourceIP: IPAddress(ip), principal: principal, port: port)
        r.method = method
        r.path = path
        r.host = host
        r.headers = headers
        return r
    }

    /// ALLOW with one rule: whether each request is allowed.
    func allowed(_ rule: P.Rule, _ requests: [AuthorizationRequest]) -> [Bool] {
        let engine = AuthorizationEngine([policy(.allow, [rule])])
        return requests.map { engine.evaluate($0).allowed }
    }

    func testSourceFieldsMatrix() {
        let reviews = "spiffe://cluster.local/ns/shop/sa/reviews", ratings = "spiffe://cluster.local/ns/other/sa/ratings"
        XCTAssertEqual(allowed(P.Rule(from: [.init(principals: [reviews])], to: [], when: []),
                               [request(principal: reviews), request(principal: ratings), request()]),
                       [true, false, false], "principals (none over plaintext)")
        XCTAssertEqual(allowed(P.Rule(from: [.init(principals: ["*"])], to: [], when: []),
                               [request(principal: reviews), request()]), [true, false], "principals: * means authenticated")
        XCTAssertEqual(allowed(P.Rule(from: [.init(notPrincipals: [reviews])], to: [], when: []),
                               [request(principal: reviews), request(principal: ratings), request()]), [false, true, true])
        XCTAssertEqual(allowed(P.Rule(from: [.init(namespaces: ["shop"])], to: [], when: []),
                               [request(principal: reviews), request(principal: ratings), request()]), [true, false, false])
        XCTAssertEqual(allowed(P.Rule(from: [.init(notNamespaces: ["shop"])], to: [], when: []),
                               [request(principal: reviews), request(principal: ratings)]), [false, true])
        XCTAssertEqual(allowed(P.Rule(from: [.init(ipBlocks: ["10.0.0.0/24", "192.168.1.7"])], to: [], when: []),
                               [request(ip: "10.0.0.200"), request(ip: "10.0.1.1"), request(ip: "192.168.1.7"),
                                request(ip: "192.168.1.8")]), [true, false, true, false])
        XCTAssertEqual(allowed(P.Rule(from: [.init(notIpBlocks: ["10.0.0.0/8"])], to: [], when: []),
                               [request(ip: "10.9.9.9"), request(ip: "11.0.0.1")]), [false, true])
        XCTAssertEqual(allowed(P.Rule(from: [.init(ipBlocks: ["fd00::/64"])], to: [], when: []),
                               [request(ip: "fd00::1"), request(ip: "fd00:0:0:1::1"), request(ip: "10.0.0.1")]),
                       [true, false, false])
    }

    func testOperationFieldsMatrix() {
        XCTAssertEqual(allowed(P.Rule(from: [], to: [.init(methods: ["GET", "HEAD"])], when: []),
                               [request(method: "GET"), request(method: "POST")]), [true, false])
        XCTAssertEqual(allowed(P.Rule(from: [], to: [.init(notMethods: ["DELETE"])], when: []),
                               [request(method: "GET"), request(method: "DELETE")]), [true, false])
        XCTAssertEqual(allowed(P.Rule(from: [], to: [.init(paths: ["/api/*", "*.css", "/exact"])], when: []),
                               [request(path: "/api/v1"), request(path: "/site.css"), request(path: "/exact"),
                                request(path: "/exactly"), request(path: "/other")]), [true, true, true, false, false])
        XCTAssertEqual(allowed(P.Rule(from: [], to: [.init(notPaths: ["/admin*"])], when: []),
                               [request(path: "/admin/x"), request(path: "/home")]), [false, true])
        XCTAssertEqual(allowed(P.Rule(from: [], to: [.init(ports: [8080])], when: []),
                               [request(port: 8080), request(port: 9090)]), [true, false])
        XCTAssertEqual(allowed(P.Rule(from: [], to: [.init(notPorts: [9090])], when: []),
                               [request(port: 8080), request(port: 9090)]), [true, false])
        XCTAssertEqual(allowed(P.Rule(from: [], to: [.init(hosts: ["shop.example", "*.internal"])], when: []),
                               [request(host: "shop.example:8080"), request(host: "api.internal"), request(host: "evil.example")]),
                       [true, true, false])
        XCTAssertEqual(allowed(P.Rule(from: [], to: [.init(notHosts: ["evil.example"])], when: []),
                               [request(host: "shop.example"), request(host: "evil.example")]), [true, false])
    }

    func testConditionsMatrix() {
        let header = P.Condition(key: "request.headers[X-Tenant]", values: ["acme", "beta*"], notValues: [])
        XCTAssertEqual(allowed(P.Rule(from: [], to: [], when: [header]),
                               [request(headers: ["x-tenant": "acme"]), request(headers: ["x-tenant": "beta2"]),
                                request(headers: ["x-tenant": "other"]), request()]), [true, true, false, false])
        let notHeader = P.Condition(key: "request.headers[x-debug]", values: [], notValues: ["*"])
        XCTAssertEqual(allowed(P.Rule(from: [], to: [], when: [notHeader]),
                               [request(headers: ["x-debug": "1"]), request()]), [false, true])
        let ip = P.Condition(key: "source.ip", values: ["10.0.0.0/30"], notValues: ["10.0.0.2"])
        XCTAssertEqual(allowed(P.Rule(from: [], to: [], when: [ip]),
                               [request(ip: "10.0.0.1"), request(ip: "10.0.0.2"), request(ip: "10.0.0.9")]), [true, false, false])
        let port = P.Condition(key: "destination.port", values: ["8080"], notValues: [])
        XCTAssertEqual(allowed(P.Rule(from: [], to: [], when: [port]), [request(port: 8080), request(port: 1)]), [true, false])
        let ns = P.Condition(key: "source.namespace", values: ["shop"], notValues: [])
        XCTAssertEqual(allowed(P.Rule(from: [], to: [], when: [ns]),
                               [request(principal: "spiffe://cluster.local/ns/shop/sa/a"), request()]), [true, false])
        var withClaims = request()
        withClaims.claims = ["groups": ["dev", "admin"]]
        let claim = P.Condition(key: "request.auth.claims[groups]", values: ["admin"], notValues: [])
        XCTAssertEqual(allowed(P.Rule(from: [], to: [], when: [claim]), [withClaims, request()]), [true, false])
        let unknown = P.Condition(key: "request.nonsense", values: ["x"], notValues: [])
        XCTAssertEqual(allowed(P.Rule(from: [], to: [], when: [unknown]), [request()]), [false])
    }

    func testActionsCombineAsIstioDoes() {
        let adminPaths = P.Rule(from: [], to: [.init(paths: ["/admin*"])], when: [])
        let getOnly = P.Rule(from: [], to: [.init(methods: ["GET"])], when: [])
        // DENY wins over ALLOW.
        let both = AuthorizationEngine([policy(.allow, [getOnly], name: "a"), policy(.deny, [adminPaths], name: "d")])
        XCTAssertEqual(both.evaluate(request(path: "/admin/x")), .deny(policy: "shop/d", audited: false))
        XCTAssertEqual(both.evaluate(request(path: "/home")), .allow(audited: false))
        XCTAssertEqual(both.evaluate(request(method: "POST", path: "/home")), .deny(policy: nil, audited: false))
        // No ALLOW policy: allowed unless denied.
        let denyOnly = AuthorizationEngine([policy(.deny, [adminPaths])])
        XCTAssertTrue(denyOnly.evaluate(request(method: "POST")).allowed)
        // ALLOW without rules allows nothing; with one empty rule, everything.
        XCTAssertFalse(AuthorizationEngine([policy(.allow, nil)]).evaluate(request()).allowed)
        XCTAssertTrue(AuthorizationEngine([policy(.allow, [P.Rule(from: [], to: [], when: [])])]).evaluate(request()).allowed)
        // DENY without rules denies nothing.
        XCTAssertTrue(AuthorizationEngine([policy(.deny, nil)]).evaluate(request()).allowed)
        // AUDIT marks, never decides.
        let audit = AuthorizationEngine([policy(.audit, [adminPaths])])
        XCTAssertEqual(audit.evaluate(request(path: "/admin")), .allow(audited: true))
        XCTAssertEqual(audit.evaluate(request(path: "/x")), .allow(audited: false))
        // CUSTOM is reported, not enforced.
        XCTAssertEqual(AuthorizationEngine([policy(.custom, [getOnly], name: "ext")]).unsupported, ["shop/ext"])
        // Within a rule, from AND to AND when; across rules, OR.
        let rule = P.Rule(from: [.init(ipBlocks: ["10.0.0.0/24"])], to: [.init(methods: ["GET"])], when: [])
        let engine = AuthorizationEngine([policy(.allow, [rule, P.Rule(from: [], to: [.init(paths: ["/public"])], when: [])])])
        XCTAssertEqual([engine.evaluate(request(ip: "10.0.0.1")).allowed, engine.evaluate(request(ip: "10.1.0.1")).allowed,
                        engine.evaluate(request(ip: "10.1.0.1", path: "/public")).allowed,
                        engine.evaluate(request(ip: "10.0.0.1", method: "PUT")).allowed], [true, false, true, false])
    }

    /// On a connection (tunnel stream, relayed TCP) request attributes are unknown, as for Istio's ztunnel: an ALLOW
    /// rule naming them is never satisfied, a DENY rule naming them applies on its connection attributes alone.
    func testConnectionsCannotSatisfyRequestRulesAndDenyRulesFailClosed() {
        let client = "cluster.local/ns/shop/sa/client"
        var connection = AuthorizationRequest(sourceIP: IPAddress("10.0.0.5"), principal: "spiffe://" + client, port: 7000)
        connection.layer4 = true
        let byPrincipal = P.Rule(from: [.init(principals: [client])], to: [], when: [])
        let byMethod = P.Rule(from: [.init(principals: [client])], to: [.init(methods: ["GET"])], when: [])
        let byHeader = P.Rule(from: [], to: [], when: [.init(key: "request.headers[x-user]", values: ["a"], notValues: [])])
        XCTAssertTrue(AuthorizationEngine([policy(.allow, [byPrincipal])]).evaluate(connection).allowed)
        XCTAssertFalse(AuthorizationEngine([policy(.allow, [byMethod])]).evaluate(connection).allowed,
                       "an ALLOW on methods cannot be checked on a connection")
        XCTAssertFalse(AuthorizationEngine([policy(.deny, [byMethod])]).evaluate(connection).allowed,
                       "a DENY on methods applies on its principal alone")
        XCTAssertFalse(AuthorizationEngine([policy(.deny, [byHeader])]).evaluate(connection).allowed)
        var other = connection
        other.principal = "cluster.local/ns/shop/sa/other"
        XCTAssertTrue(AuthorizationEngine([policy(.deny, [byMethod])]).evaluate(other).allowed, "the principal differs")
        // The same rules on a request are checked in full.
        var request = connection
        request.layer4 = false
        request.method = "POST"
        XCTAssertTrue(AuthorizationEngine([policy(.deny, [byMethod])]).evaluate(request).allowed)
        request.method = "GET"
        XCTAssertTrue(AuthorizationEngine([policy(.allow, [byMethod])]).evaluate(request).allowed)
    }
}
