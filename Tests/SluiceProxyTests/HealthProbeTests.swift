import XCTest

@testable import SluiceProxy

final class HealthProbeTests: XCTestCase {
    func testGRPCRequestFrameEncodesTheServiceName() {
        XCTAssertEqual(GRPCHealthProbe.requestFrame(service: ""), [0, 0, 0, 0, 0])
        XCTAssertEqual(GRPCHealthProbe.requestFrame(service: "a.B"), [0, 0, 0, 0, 5, 0x0A, 3] + Array("a.B".utf8))
        let long = String(repeating: "x", count: 200)
        XCTAssertEqual(Array(GRPCHealthProbe.requestFrame(service: long)[0..<8]), [0, 0, 0, 0, 203, 0x0A, 0xC8, 0x01])
    }

    func testOnlyServingIsHealthy() {
        XCTAssertTrue(GRPCHealthProbe.serving([0, 0, 0, 0, 2, 0x08, 0x01]))
        XCTAssertFalse(GRPCHealthProbe.serving([0, 0, 0, 0, 2, 0x08, 0x02]), "NOT_SERVING")
        XCTAssertFalse(GRPCHealthProbe.serving([0, 0, 0, 0, 0]), "UNKNOWN (field absent)")
        XCTAssertFalse(GRPCHealthProbe.serving([1, 0, 0, 0, 2, 0x08, 0x01]), "compressed frames are not read")
        XCTAssertFalse(GRPCHealthProbe.serving([0, 0, 0]), "truncated")
        // Unknown length-delimited fields are skipped.
        XCTAssertTrue(GRPCHealthProbe.serving([0, 0, 0, 0, 6, 0x12, 0x02, 0x61, 0x62, 0x08, 0x01]))
    }

    func testHTTPStatusLines() {
        XCTAssertEqual(HTTPHealthProbe.statusCode(Array("HTTP/1.1 204 No".utf8)), 204)
        XCTAssertEqual(HTTPHealthProbe.statusCode(Array("HTTP/1.1 2".utf8)), nil)
        XCTAssertEqual(HTTPHealthProbe.statusCode(Array("SSH-2.0-OpenSSH".utf8)), 0)
    }
}
