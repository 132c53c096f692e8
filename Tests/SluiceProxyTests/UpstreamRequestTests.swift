import SluiceHTTP
import SluiceModel
import SluiceProxy
import XCTest

final class UpstreamRequestTests: XCTestCase {
    static func route(_ yaml: String) -> HTTPRoute {
        let text = """
            apiVersion: networking.istio.io/v1
            kind: VirtualService
            metadata: {name: r}
            spec:
              hosts: [reviews]
              http:
              - \(yaml)
            """
        let (resources, diagnostics) = ResourceDecoder.decode(text, file: "vs.yaml")
        precondition(diagnostics.isEmpty, "\(diagnostics)")
        guard case .virtualService(let vs) = resources[0].spec else { fatalError() }
        return vs.http[0]
    }

    func upstream(_ request: String, _ route: HTTPRoute?, prefix: String? = nil) -> String {
        let bytes = Array(request.utf8)
        return bytes.withUnsafeBytes { b in
            guard case .head(let h) = HTTP1Parser.parseRequestHead(b) else { fatalError("bad test request") }
            let out = UpstreamRequest.head(h, in: b, route: route, destination: route?.route.first,
                                           context: .init(clientAddress: "10.0.0.7", requestID: "rid-1",
                                                          matchedPrefix: prefix))
            return String(decoding: out, as: UTF8.self)
        }
    }

    func testRewritesPathAndAuthorityAndAppliesHeaderOperations() {
        let route = Self.route("""
            match: [{uri: {prefix: /v1/}}]
                rewrite: {uri: /api/, authority: reviews.internal}
                headers:
                  request: {set: {x-version: canary}, add: {x-added: one}, remove: [x-secret]}
                route:
                - destination: {host: reviews}
                  headers: {request: {set: {x-dest: v2}}}
            """)
        let out = upstream("GET /v1/books?id=3 HTTP/1.1\r\nHost: reviews\r\nX-Secret: s\r\nX-Version: old\r\n"
                           + "Connection: keep-alive, X-Hop\r\nX-Hop: h\r\nKeep-Alive: 5\r\n\r\n", route, prefix: "/v1/")
        XCTAssertEqual(out, "GET /api/books?id=3 HTTP/1.1\r\n"
                       + "host: reviews.internal\r\nx-forwarded-for: 10.0.0.7\r\nx-forwarded-proto: http\r\n"
                       + "x-request-id: rid-1\r\nx-version: canary\r\nx-added: one\r\nx-dest: v2\r\n\r\n")
    }

    func testForwardedForGrowsAndRequestIDIsKeptAndFramingPassesThrough() {
        let out = upstream("POST /x HTTP/1.1\r\nHost: a\r\nX-Forwarded-For: 1.2.3.4\r\nX-Request-Id: abc\r\n"
                           + "Transfer-Encoding: chunked\r\nTE: trailers\r\n\r\n", nil)
        XCTAssertEqual(out, "POST /x HTTP/1.1\r\nhost: a\r\nx-forwarded-for: 1.2.3.4, 10.0.0.7\r\nx-request-id: abc\r\n"
                       + "transfer-encoding: chunked\r\nx-forwarded-proto: http\r\n\r\n")
    }

    func testWebSocketUpgradeIsForwarded() {
        let out = upstream("GET /ws HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n", nil)
        XCTAssertTrue(out.contains("upgrade: websocket\r\n") && out.hasSuffix("connection: upgrade\r\n\r\n"), out)
    }
}

final class FaultInjectionTests: XCTestCase {
    /// Istio's fault-injection task: a 7 s delay for 100%, a 500 abort for 50%: measured over draws.
    func testPercentagesHoldOverManyRequests() {
        let route = UpstreamRequestTests.route("""
            fault:
                  delay: {fixedDelay: 7s, percentage: {value: 100}}
                  abort: {httpStatus: 500, percentage: {value: 50}}
                route: [{destination: {host: ratings}}]
            """)
        var rng = SystemRandomNumberGenerator()
        var delayed = 0, aborted = 0
        for _ in 0..<10_000 {
            let d = FaultInjection.decide(route.fault) { Double.random(in: 0..<1, using: &rng) }
            if d.delay == .seconds(7) { delayed += 1 }
            if d.abort == .httpStatus(500) { aborted += 1 }
        }
        XCTAssertEqual(delayed, 10_000)
        XCTAssertEqual(Double(aborted) / 10_000, 0.5, accuracy: 0.03)
        XCTAssertEqual(FaultInjection.decide(nil) { 0 }, .init(delay: nil, abort: nil))
    }
}
