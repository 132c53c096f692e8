@testable import SluiceHTTP
import XCTest

/// Feeds `wire` in pieces of `step`, dealing with each message before reading the next (as the worker does);
/// returns what happened, one line per event.
func drive<Head>(_ reader: inout HTTP1Reader<Head>, _ wire: String, step: Int, describe: (Head, [UInt8]) -> String)
    -> [String]
{
    var log: [String] = [], body: [UInt8] = []
    var pending = Array(wire.utf8)
    var stopped = false
    while !pending.isEmpty && !stopped {
        let piece = Array(pending.prefix(step))
        let used = piece.withUnsafeBytes { b in
            reader.feed(b) { event in
                switch event {
                case .head(let h, let bytes): log.append("head " + describe(h, bytes))
                case .body(let r): body += piece[r]
                case .end:
                    log.append("end " + String(decoding: body, as: UTF8.self))
                    body = []
                case .error(let e):
                    log.append("error \(e.status)")
                    stopped = true
                }
            }
        }
        pending.removeFirst(used)
        reader.next()
    }
    if !body.isEmpty { log.append("open " + String(decoding: body, as: UTF8.self)) }
    return log
}

final class HTTP1RequestReaderTests: XCTestCase {
    func read(_ wire: String, step: Int, limits: HTTP1Limits = HTTP1Limits()) -> [String] {
        var reader = HTTP1RequestReader(limits: limits)
        return drive(&reader, wire, step: step) { h, bytes in
            String(decoding: bytes[h.method], as: UTF8.self) + " " + String(decoding: bytes[h.target], as: UTF8.self)
        }
    }

    func testPipelinedRequestsWithBodiesInAnyPieces() {
        let wire = "POST /a HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\n\r\nhello"
            + "PUT /b HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"
            + "GET /c HTTP/1.1\r\nHost: h\r\n\r\n"
        let expected = ["head POST /a", "end hello", "head PUT /b", "end abcde", "head GET /c", "end "]
        for step in [1, 2, 5, 13, 4096] {
            XCTAssertEqual(read(wire, step: step), expected, "pieces of \(step)")
        }
    }

    func testBadRequestsStopTheConnection() {
        let wire = "POST /a HTTP/1.1\r\nHost: h\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n1\r\nx\r\n0\r\n\r\n"
            + "GET /smuggled HTTP/1.1\r\nHost: h\r\n\r\n"
        XCTAssertEqual(read(wire, step: 7), ["error 400"], "nothing after the bad head is read")
        XCTAssertEqual(read("PUT /a HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", step: 3),
                       ["head PUT /a", "error 400"])
    }

    func testHeadsAreBoundedAcrossPieces() {
        var limits = HTTP1Limits()
        limits.maxHeadBytes = 256
        let wire = "GET / HTTP/1.1\r\nHost: h\r\n" + String(repeating: "X-Pad: 0123456789\r\n", count: 40)
        XCTAssertEqual(read(wire, step: 10, limits: limits), ["error 431"])
    }

    func testSlowlorisIsVisibleToTheWorker() {
        var reader = HTTP1RequestReader()
        XCTAssertFalse(reader.isInsideHead)
        _ = Array("GET / HT".utf8).withUnsafeBytes { reader.feed($0) { _ in } }
        XCTAssertTrue(reader.isInsideHead, "a header timeout applies while a head dribbles in")
    }
}

final class HTTP1ResponseReaderTests: XCTestCase {
    func events(_ wire: String, head: Bool = false, step: Int) -> [String] {
        var reader = HTTP1ResponseReader()
        reader.answeringHEAD = head
        return drive(&reader, wire, step: step) { h, _ in "\(h.status)" }
    }

    func testInterimThenFinalResponseWithChunkedBody() {
        let wire = "HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nbody\r\n0\r\n\r\n"
        for step in [1, 9, 4096] {
            XCTAssertEqual(events(wire, step: step), ["head 100", "end ", "head 200", "end body"])
        }
    }

    func testHeadResponsesHaveNoBodyAndUntilCloseStaysOpen() {
        XCTAssertEqual(events("HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n", head: true, step: 5), ["head 200", "end "])
        XCTAssertEqual(events("HTTP/1.0 200 OK\r\n\r\nstreamed until close", step: 6),
                       ["head 200", "open streamed until close"], "the worker ends it when the upstream closes")
        XCTAssertEqual(events("HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n", step: 64), ["error 502"])
    }
}
