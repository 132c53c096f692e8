import XCTest

@testable import SluiceHTTP

final class ProtocolDetectorTests: XCTestCase {
    func verdict(_ s: String) -> ProtocolDetector.Verdict { ProtocolDetector.classify(Array(s.utf8)) }

    func testRequestLinesAreHTTP1() {
        for line in ["GET / HTTP/1.1\r\n", "POST /x HTTP/1.0\r\n", "DELETE ", "OPTIONS * HTTP/1.1", "PATCH /a"] {
            XCTAssertEqual(verdict(line), .http1, line)
        }
    }

    func testThePrefaceIsHTTP2OnlyWhenWhole() {
        XCTAssertEqual(verdict("PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"), .http2)
        XCTAssertEqual(verdict("PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\u{4}"), .http2)
        XCTAssertEqual(verdict("PRI * HTTP/2.0\r\n"), .needMore)
        XCTAssertEqual(verdict("PRI * HTTP/2.0\r\n\r\nXX\r\n\r\n"), .tcp)
    }

    func testPartialMethodsWaitAndEverythingElseIsTCP() {
        XCTAssertEqual(verdict("GE"), .needMore)
        XCTAssertEqual(verdict("P"), .needMore, "POST, PUT, PATCH, PRI...")
        XCTAssertEqual(verdict(""), .needMore)
        XCTAssertEqual(verdict("GETX / HTTP/1.1"), .tcp)
        XCTAssertEqual(verdict("get / HTTP/1.1"), .tcp, "methods are case-sensitive")
        XCTAssertEqual(verdict("\u{16}\u{3}\u{1}\u{2}\u{0}"), .tcp, "a TLS ClientHello")
        XCTAssertEqual(verdict("SSH-2.0-OpenSSH_9.2\r\n"), .tcp)
        XCTAssertEqual(ProtocolDetector.classify([0x00, 0x00, 0x00, 0x2a]), .tcp)
    }

    /// Every split of real first flights gives a verdict that only moves from needMore to the right answer.
    func testVerdictIsStableAsBytesArrive() {
        let flights: [(String, ProtocolDetector.Verdict)] = [
            ("GET /index.html HTTP/1.1\r\nHost: a\r\n\r\n", .http1),
            ("PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\u{4}\0\0\0\0\0", .http2),
            ("PROPFIND /dav HTTP/1.1\r\n", .http1),
            ("PUTTY", .tcp),
        ]
        for (flight, final) in flights {
            let bytes = Array(flight.utf8)
            var decided = false
            for n in 1...bytes.count {
                let v = ProtocolDetector.classify(Array(bytes[0..<n]))
                if decided { XCTAssertEqual(v, final, "\(flight) at \(n)") }
                if v != .needMore {
                    XCTAssertEqual(v, final, "\(flight) at \(n)")
                    decided = true
                }
            }
            XCTAssertTrue(decided, flight)
        }
    }
}
