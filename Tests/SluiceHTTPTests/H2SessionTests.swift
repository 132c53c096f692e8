import SluiceHTTP
import XCTest

/// Two sessions, client and server, wired back to back in memory.
final class H2SessionTests: XCTestCase {
    /// Moves bytes both ways until neither side has anything to send; returns each side's events.
    func pump(_ client: H2Session, _ server: H2Session) -> (client: [H2Session.Event], server: [H2Session.Event]) {
        var ce: [H2Session.Event] = [], se: [H2Session.Event] = []
        for _ in 0..<20 {
            let c = client.takeOutput(), s = server.takeOutput()
            if c.isEmpty && s.isEmpty { break }
            c.withUnsafeBytes { XCTAssertTrue(server.receive($0)) }
            s.withUnsafeBytes { XCTAssertTrue(client.receive($0)) }
            ce += client.takeEvents()
            se += server.takeEvents()
        }
        return (ce, se)
    }

    func testRequestWithBodyAndResponseWithTrailersCrossIntact() {
        let client = H2Session(server: false), server = H2Session(server: true)
        let id = client.request(H2Fields([(":method", "POST"), (":scheme", "http"), (":authority", "svc"),
                                          (":path", "/pkg.Svc/Call"), ("content-type", "application/grpc")]), endStream: false)
        XCTAssertEqual(id, 1)
        Array("hello".utf8).withUnsafeBytes { client.send(stream: id, $0) }
        client.finish(stream: id)
        var (_, se) = pump(client, server)
        guard case .headers(let sid, let fields, false)? = se.first else { return XCTFail("\(se)") }
        XCTAssertEqual(fields.first(":path"), "/pkg.Svc/Call")
        let body = se.compactMap { if case .data(_, let b) = $0 { b } else { nil } }.flatMap { $0 }
        XCTAssertEqual(String(decoding: body, as: UTF8.self), "hello")
        XCTAssertTrue(se.contains { if case .end(sid) = $0 { true } else { false } })
        server.consume(stream: sid, bytes: body.count)
        server.respond(stream: sid, H2Fields([(":status", "200"), ("content-type", "application/grpc")]), endStream: false)
        Array("world".utf8).withUnsafeBytes { server.send(stream: sid, $0) }
        server.finish(stream: sid, trailers: H2Fields([("grpc-status", "0")]))
        let (ce, se2) = pump(client, server)
        se = se2
        XCTAssertTrue(ce.contains { if case .headers(1, let f, false) = $0 { f.first(":status") == "200" } else { false } })
        XCTAssertEqual(ce.compactMap { if case .data(_, let b) = $0 { String(decoding: b, as: UTF8.self) } else { nil } }, ["world"])
        XCTAssertTrue(ce.contains { if case .trailers(1, let f) = $0 { f.first("grpc-status") == "0" } else { false } })
        XCTAssertTrue(ce.contains { if case .closed(1, 0) = $0 { true } else { false } })
        XCTAssertTrue(se.contains { if case .drained(sid, 5) = $0 { true } else { false } })
    }

    func testGarbageIsAProtocolErrorNotACrash() {
        let server = H2Session(server: true)
        let junk = Array("GET / HTTP/1.1\r\nHost: x\r\n\r\n".utf8)
        XCTAssertFalse(junk.withUnsafeBytes { server.receive($0) })
        XCTAssertTrue(server.failed)
    }

    func testResetStreamReachesThePeer() {
        let client = H2Session(server: false), server = H2Session(server: true)
        let id = client.request(H2Fields([(":method", "GET"), (":scheme", "http"), (":authority", "a"), (":path", "/")]),
                                endStream: true)
        _ = pump(client, server)
        server.reset(stream: id)
        let (ce, _) = pump(client, server)
        XCTAssertTrue(ce.contains { if case .closed(id, 8) = $0 { true } else { false } }, "\(ce)")
    }
}
