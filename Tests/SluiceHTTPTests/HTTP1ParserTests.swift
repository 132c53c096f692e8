@testable import SluiceHTTP
import XCTest

final class HTTP1ParserTests: XCTestCase {
    func parse(_ text: String, limits: HTTP1Limits = HTTP1Limits()) -> HTTP1Parser.Result {
        Array(text.utf8).withUnsafeBytes { HTTP1Parser.parseRequestHead($0, limits: limits) }
    }

    func head(_ text: String, file: StaticString = #filePath, line: UInt = #line) -> HTTP1RequestHead? {
        guard case .head(let h) = parse(text) else {
            XCTFail("expected a head, got \(parse(text))", file: file, line: line)
            return nil
        }
        return h
    }

    func error(_ text: String, limits: HTTP1Limits = HTTP1Limits()) -> HTTP1Error? {
        if case .error(let e) = parse(text, limits: limits) { return e }
        return nil
    }

    func string(_ text: String, _ r: Range<Int>) -> String {
        String(decoding: Array(text.utf8)[r], as: UTF8.self)
    }

    func testParsesARequestHeadZeroCopy() throws {
        let text = "GET /reviews/1?x=y HTTP/1.1\r\nHost: reviews:9080\r\nUser-Agent:  curl/8 \r\nX-Empty:\r\n\r\nBODY"
        let h = try XCTUnwrap(head(text))
        XCTAssertEqual(string(text, h.method), "GET")
        XCTAssertEqual(string(text, h.target), "/reviews/1?x=y")
        XCTAssertEqual(h.minorVersion, 1)
        XCTAssertEqual(h.headers.map { string(text, $0.name) }, ["Host", "User-Agent", "X-Empty"])
        XCTAssertEqual(h.headers.map { string(text, $0.value) }, ["reviews:9080", "curl/8", ""], "values trimmed")
        XCTAssertEqual(h.framing, .none)
        XCTAssertTrue(h.keepAlive)
        XCTAssertEqual(h.length, text.utf8.count - 4, "the body starts after the head")
    }

    func testIncompleteUntilTheBlankLine() {
        guard case .incomplete = parse("GET / HTTP/1.1\r\nHost: a\r\n") else { return XCTFail() }
        guard case .incomplete = parse("GET / HTT") else { return XCTFail() }
    }

    func testKeepAliveFollowsVersionAndConnection() throws {
        XCTAssertFalse(try XCTUnwrap(head("GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")).keepAlive)
        XCTAssertFalse(try XCTUnwrap(head("GET / HTTP/1.0\r\n\r\n")).keepAlive)
        XCTAssertTrue(try XCTUnwrap(head("GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n")).keepAlive)
        let up = try XCTUnwrap(head("GET /ws HTTP/1.1\r\nHost: a\r\nConnection: keep-alive, Upgrade\r\nUpgrade: websocket\r\n\r\n"))
        XCTAssertTrue(up.upgrade)
        let expect = try XCTUnwrap(head("PUT /x HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n"))
        XCTAssertTrue(expect.expectContinue)
        XCTAssertEqual(expect.framing, .contentLength(5))
    }

    func testPipelinedRequestsParseOneAfterAnother() throws {
        let text = "GET /a HTTP/1.1\r\nHost: a\r\n\r\nGET /b HTTP/1.1\r\nHost: a\r\n\r\n"
        let bytes = Array(text.utf8)
        let first = try XCTUnwrap(head(text))
        let rest = bytes[first.length...]
        let second = rest.withUnsafeBytes { HTTP1Parser.parseRequestHead($0) }
        guard case .head(let h2) = second else { return XCTFail("\(second)") }
        XCTAssertEqual(String(decoding: Array(rest)[h2.target], as: UTF8.self), "/b")
    }

    /// Request smuggling shapes and malformed heads: each refused with its status.
    func testSmugglingShapesAreRefused() {
        let cases: [(String, HTTP1Error)] = [
            ("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n",
             .badRequest("both Content-Length and Transfer-Encoding")),
            ("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\nContent-Length: 4\r\n\r\n",
             .badRequest("duplicate Content-Length")),
            ("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: +4\r\n\r\n", .badRequest("malformed Content-Length")),
            ("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 4, 4\r\n\r\n", .badRequest("malformed Content-Length")),
            ("POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
             .notImplemented("transfer coding other than chunked")),
            ("POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n",
             .badRequest("duplicate Transfer-Encoding")),
            ("POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding : chunked\r\n\r\n", .badRequest("bad header name")),
            ("GET / HTTP/1.1\r\nHost: a\r\nX-A: 1\r\n folded\r\n\r\n", .badRequest("obs-fold (line folding)")),
            ("GET / HTTP/1.1\r\nHost: a\rX: 1\r\n\r\n", .badRequest("bare CR")),
            ("GET / HTTP/1.1\r\nHost: a\nX: 1\r\n\r\n", .badRequest("bare LF")),
            ("GET / HTTP/1.1\r\nHost: a\u{0}b\r\n\r\n", .badRequest("NUL byte")),
            ("GET / HTTP/1.1\r\nX: 1\r\n\r\n", .badRequest("missing Host")),
            ("GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", .badRequest("duplicate Host")),
            ("POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n",
             .badRequest("Transfer-Encoding in an HTTP/1.0 request")),
            ("GET / HTTP/2.0\r\nHost: a\r\n\r\n", .badRequest("unsupported HTTP version")),
            ("G(T / HTTP/1.1\r\nHost: a\r\n\r\n", .badRequest("bad method")),
            ("GET /a b HTTP/1.1\r\nHost: a\r\n\r\n", .badRequest("unsupported HTTP version")),
            ("GET / HTTP/1.1\r\nHost: a\r\nX: a\u{1}b\r\n\r\n", .badRequest("control character in a header value")),
        ]
        for (text, expected) in cases {
            XCTAssertEqual(error(text), expected, text.debugDescription)
            XCTAssertEqual(error(text)?.status, expected.status)
        }
    }

    func testLimitsAnswer414And431() {
        var limits = HTTP1Limits()
        limits.maxURIBytes = 64
        limits.maxHeaderCount = 3
        limits.maxHeadBytes = 512
        let longURI = "GET /" + String(repeating: "a", count: 100) + " HTTP/1.1\r\nHost: a\r\n\r\n"
        XCTAssertEqual(error(longURI, limits: limits), .uriTooLong)
        let partialLongURI = "GET /" + String(repeating: "a", count: 100)
        XCTAssertEqual(error(partialLongURI, limits: limits), .uriTooLong,
                       "refused before the head is complete")
        let many = "GET / HTTP/1.1\r\nHost: a\r\nA: 1\r\nB: 1\r\nC: 1\r\n\r\n"
        XCTAssertEqual(error(many, limits: limits), .headersTooLarge)
        let big = "GET / HTTP/1.1\r\nHost: a\r\nX: " + String(repeating: "v", count: 600)
        XCTAssertEqual(error(big, limits: limits), .headersTooLarge,
                       "an unterminated head that cannot fit is refused at once")
    }

    /// Random mutations of valid requests: never a crash; a head, if any, has ranges inside the input.
    func testMutatedRequestsNeverCrash() {
        var rng = SystemRandomNumberGenerator()
        let seeds = ["POST /a?b=c HTTP/1.1\r\nHost: a\r\nContent-Length: 12\r\nX-Y: z\r\n\r\n",
                     "GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n",
                     "PUT /x HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\nExpect: 100-continue\r\n\r\n"]
        let alphabet: [UInt8] = Array(" \t\r\n:,;\u{0}\u{7f}aZ0-/".utf8) + [0xFF, 0xC3]
        for round in 0..<30_000 {
            var bytes = Array(seeds[round % seeds.count].utf8)
            for _ in 0..<Int.random(in: 1...5, using: &rng) {
                let at = Int.random(in: 0..<bytes.count, using: &rng)
                switch Int.random(in: 0..<3, using: &rng) {
                case 0: bytes[at] = alphabet.randomElement(using: &rng)!
                case 1: bytes.insert(alphabet.randomElement(using: &rng)!, at: at)
                default: bytes.remove(at: at)
                }
                if bytes.isEmpty { bytes = [0x0D] }
            }
            let result = bytes.withUnsafeBytes { HTTP1Parser.parseRequestHead($0) }
            if case .head(let h) = result {
                XCTAssertLessThanOrEqual(h.length, bytes.count)
                for (n, v) in h.headers { XCTAssertTrue(n.upperBound <= h.length && v.upperBound <= h.length) }
            }
        }
    }
}

final class BodyDecoderTests: XCTestCase {
    /// Feeds `wire` in pieces of `step` bytes; returns the body and the bytes left after it.
    func decode(_ framing: BodyFraming, _ wire: String, step: Int) throws(HTTP1Error) -> (body: String, rest: String) {
        var d = BodyDecoder(framing)
        let bytes = Array(wire.utf8)
        var body: [UInt8] = []
        var i = 0
        while i < bytes.count && !d.isDone {
            let piece = Array(bytes[i..<min(i + step, bytes.count)])
            let used: Int
            do {
                used = try piece.withUnsafeBytes { b in try d.feed(b) { r in body += piece[r] } }
            } catch let e as HTTP1Error {
                throw e
            } catch {
                throw .badRequest("\(error)")
            }
            i += used
            if used < piece.count { break }
        }
        XCTAssertTrue(d.isDone, "body complete")
        return (String(decoding: body, as: UTF8.self), String(decoding: bytes[i...], as: UTF8.self))
    }

    func testContentLengthStopsAtTheNextRequest() throws {
        for step in [1, 3, 100] {
            let r = try decode(.contentLength(5), "helloGET / HTTP/1.1", step: step)
            XCTAssertEqual(r.body, "hello")
            XCTAssertEqual(r.rest, "GET / HTTP/1.1")
        }
    }

    func testChunkedWithExtensionsAndTrailersInAnyPieces() throws {
        let wire = "5;name=v\r\nhello\r\n6\r\n world\r\nA \r\n0123456789\r\n0\r\nX-Trailer: t\r\n\r\nNEXT"
        for step in [1, 2, 7, 1000] {
            let r = try decode(.chunked, wire, step: step)
            XCTAssertEqual(r.body, "hello world0123456789")
            XCTAssertEqual(r.rest, "NEXT")
        }
    }

    func testBadChunksAreRefused() {
        let bad = ["0x10\r\n", "-1\r\n", "fffffffffffffffff\r\n", "\r\n", "5\r\nhello!\r\n", "5\nhello\r\n",
                   "5\r\nhello\r0\r\n\r\n", "5\r\nhello\r\n0\r\nX: 1\n\r\n"]
        for wire in bad {
            XCTAssertThrowsError(try decode(.chunked, wire, step: 1000), wire.debugDescription)
        }
        let longLine = "1;" + String(repeating: "e", count: 2000) + "\r\n"
        XCTAssertThrowsError(try decode(.chunked, longLine, step: 1000))
    }

    /// A body of any size costs the decoder's fixed state, whatever the piece sizes.
    func testMemoryIsBoundedRegardlessOfBodySize() throws {
        XCTAssertLessThanOrEqual(MemoryLayout<BodyDecoder>.size, 48)
        var d = BodyDecoder(.contentLength(1 << 40))
        let chunk = [UInt8](repeating: 0x61, count: 65536)
        var seen = 0
        for _ in 0..<64 {
            _ = try chunk.withUnsafeBytes { b in try d.feed(b) { seen += $0.count } }
        }
        XCTAssertEqual(seen, 64 * 65536)
        XCTAssertFalse(d.isDone)
    }
}

final class HTTP1ResponseHeadTests: XCTestCase {
    func parse(_ text: String, head: Bool = false) -> HTTP1Parser.ResponseResult {
        Array(text.utf8).withUnsafeBytes { HTTP1Parser.parseResponseHead($0, requestMethodIsHEAD: head) }
    }

    func response(_ text: String, head: Bool = false) -> HTTP1ResponseHead? {
        if case .head(let h) = parse(text, head: head) { return h }
        XCTFail("\(parse(text, head: head))")
        return nil
    }

    func testFramingFollowsStatusMethodAndHeaders() throws {
        let ok = try XCTUnwrap(response("HTTP/1.1 200 OK\r\nContent-Length: 12\r\n\r\n"))
        XCTAssertEqual(ok.status, 200)
        XCTAssertEqual(String(decoding: Array("HTTP/1.1 200 OK\r\n".utf8)[ok.reason], as: UTF8.self), "OK")
        XCTAssertEqual(ok.framing, .contentLength(12))
        XCTAssertTrue(ok.keepAlive)
        XCTAssertEqual(try XCTUnwrap(response("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")).framing, .chunked)
        for status in ["204 No Content", "304 Not Modified", "100 Continue", "101 Switching Protocols"] {
            XCTAssertEqual(try XCTUnwrap(response("HTTP/1.1 \(status)\r\nContent-Length: 5\r\n\r\n")).framing, .none, status)
        }
        XCTAssertEqual(try XCTUnwrap(response("HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n", head: true)).framing, .none,
                       "a response to HEAD has no body")
        let eof = try XCTUnwrap(response("HTTP/1.1 200 OK\r\nServer: old\r\n\r\n"))
        XCTAssertEqual(eof.framing, .untilClose)
        XCTAssertFalse(eof.keepAlive, "a body delimited by close cannot share the connection")
        XCTAssertFalse(try XCTUnwrap(response("HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n")).keepAlive)
        XCTAssertEqual(try XCTUnwrap(response("HTTP/1.1 503\r\nContent-Length: 0\r\n\r\n")).status, 503,
                       "the reason phrase is optional")
    }

    func testUnsafeResponsesAre502() {
        for text in ["HTTP/1.1 2OO OK\r\n\r\n", "HTTP/1.1 200 OK\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n",
                     "HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n", "HTTP/2 200\r\n\r\n",
                     "HTTP/1.1 200 OK\r\n folded\r\n\r\n", "HTTP/1.1 099 Low\r\n\r\n"] {
            guard case .error(let e) = parse(text) else { XCTFail(text.debugDescription); continue }
            XCTAssertEqual(e.status, 502, text.debugDescription)
        }
    }

    func testBodyUntilCloseTakesEverything() throws {
        var d = BodyDecoder(.untilClose)
        var seen = 0
        let used = try Array("abc".utf8).withUnsafeBytes { b in try d.feed(b) { seen += $0.count } }
        XCTAssertEqual(used, 3)
        XCTAssertEqual(seen, 3)
        XCTAssertFalse(d.isDone, "only the connection's close ends it")
    }
}
