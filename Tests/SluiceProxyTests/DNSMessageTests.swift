import SluiceModel
@testable import SluiceProxy
import XCTest

final class DNSMessageTests: XCTestCase {
    static func query(_ name: String, type: UInt16 = 1, id: UInt16 = 0xBEEF) -> [UInt8] {
        var q: [UInt8] = [UInt8(id >> 8), UInt8(id & 0xFF), 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]
        for label in name.split(separator: ".") { q += [UInt8(label.utf8.count)] + Array(label.utf8) }
        return q + [0, UInt8(type >> 8), UInt8(type & 0xFF), 0, 1]
    }

    func testParsesAStandardQueryCaseInsensitively() throws {
        let q = try XCTUnwrap(DNSQuery(Self.query("Reviews.Shop.svc.cluster.local", type: 28)))
        XCTAssertEqual(q.id, 0xBEEF)
        XCTAssertEqual(q.name, "reviews.shop.svc.cluster.local")
        XCTAssertEqual(q.type, DNSQuery.typeAAAA)
        XCTAssertTrue(q.recursionDesired)
    }

    func testAnswersCarryTheQuestionAndOneRecordPerAddressOfTheAskedFamily() throws {
        let bytes = Self.query("db.shop.svc.cluster.local")
        let q = try XCTUnwrap(DNSQuery(bytes))
        let a = q.answer([IPAddress("10.96.0.7")!, IPAddress("fd00::7")!], ttl: 30)
        XCTAssertEqual(Array(a[0..<2]), [0xBE, 0xEF])
        XCTAssertEqual(a[2] & 0x80, 0x80, "a response")
        XCTAssertEqual(a[3] & 0x0F, 0, "NOERROR")
        XCTAssertEqual(Array(a[6..<8]), [0, 1], "one A record; the AAAA address is left out")
        XCTAssertEqual(Array(a[12..<bytes.count]), Array(bytes[12...]), "the question, echoed")
        let record = Array(a[bytes.count...])
        XCTAssertEqual(Array(record[0..<2]), [0xC0, 0x0C], "name: pointer to the question")
        XCTAssertEqual(Array(record[10..<12]), [0, 4])
        XCTAssertEqual(Array(record[12..<16]), [10, 96, 0, 7])
        let missing = q.answer(nil)
        XCTAssertEqual(missing[3] & 0x0F, 3, "NXDOMAIN")
        XCTAssertEqual(DNSServer.servfail(q)[3] & 0x0F, 2)
    }

    func testEDNSQueriesAndOtherTypesForMeshHosts() throws {
        var edns = Self.query("db.shop.svc.cluster.local")
        edns[11] = 1
        edns += [0, 0, 41, 0x10, 0, 0, 0, 0, 0, 0, 0]  // OPT: root name, type 41, size 4096, no options
        let q = try XCTUnwrap(DNSQuery(edns), "an OPT record does not hide a mesh name")
        XCTAssertEqual(q.name, "db.shop.svc.cluster.local")
        let srv = try XCTUnwrap(DNSQuery(Self.query("db.shop.svc.cluster.local", type: 33)))
        let a = srv.answer([IPAddress("10.96.0.7")!])
        XCTAssertEqual(a[3] & 0x0F, 0, "NOERROR")
        XCTAssertEqual(Array(a[6..<8]), [0, 0], "no records: NODATA for SRV of a mesh host")
    }

    func testRefusesWhatItDoesNotAnswer() {
        var response = Self.query("a.b")
        response[2] |= 0x80
        XCTAssertNil(DNSQuery(response), "a response")
        var two = Self.query("a.b")
        two[5] = 2
        XCTAssertNil(DNSQuery(two), "two questions")
        var pointer = Self.query("a.b")
        pointer[12] = 0xC0
        XCTAssertNil(DNSQuery(pointer), "a compression pointer")
        XCTAssertNil(DNSQuery(Array(Self.query("a.b").dropLast())), "truncated")
        XCTAssertNil(DNSQuery(Self.query(Array(repeating: "a", count: 130).joined(separator: "."))), "name over 255")
    }

    /// Random bytes and random mutations of a valid query: never a crash, never a hang.
    func testArbitraryBytesNeverCrashTheParser() {
        var rng = SystemRandomNumberGenerator()
        let valid = Self.query("reviews.shop.svc.cluster.local")
        for round in 0..<20_000 {
            var bytes: [UInt8]
            if round % 2 == 0 {
                bytes = (0..<Int.random(in: 0..<80, using: &rng)).map { _ in UInt8.random(in: 0...255, using: &rng) }
            } else {
                bytes = valid
                for _ in 0..<Int.random(in: 1...4, using: &rng) {
                    bytes[Int.random(in: 0..<bytes.count, using: &rng)] = UInt8.random(in: 0...255, using: &rng)
                }
                if Bool.random(using: &rng) { bytes = Array(bytes.prefix(Int.random(in: 0...bytes.count, using: &rng))) }
            }
            if let q = DNSQuery(bytes) { _ = q.answer([IPAddress("10.0.0.1")!]) }
        }
    }
}
