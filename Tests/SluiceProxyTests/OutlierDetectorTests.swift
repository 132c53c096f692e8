import SluiceModel
import SluiceProxy
import XCTest

final class OutlierDetectorTests: XCTestCase {
    let second: UInt64 = 1_000_000_000

    func testEjectsAfterConsecutiveFailuresForBaseTime() {
        var d = OutlierDetector(settings: .init(consecutiveErrors: 3, baseEjectionTime: .seconds(10), maxEjectionPercent: 100),
                                endpointCount: 2)
        XCTAssertFalse(d.recordFailure(0, now: 0))
        XCTAssertFalse(d.recordFailure(0, now: 0))
        XCTAssertTrue(d.recordFailure(0, now: 0))
        XCTAssertTrue(d.isEjected(0, now: 9 * second))
        XCTAssertFalse(d.isEjected(0, now: 10 * second))
        XCTAssertFalse(d.isEjected(1, now: 0))
    }

    /// The gateway-error detector counts 502-504 and connect failures; a 500 breaks its run but feeds the 5xx one.
    func testGatewayErrorsAndAny5xxAreSeparateRuns() {
        var gateway = OutlierDetector(settings: .init(consecutiveErrors: 0, consecutiveGatewayErrors: 2, maxEjectionPercent: 100),
                                      endpointCount: 1)
        XCTAssertFalse(gateway.recordFailure(0, now: 0, gateway: true))
        XCTAssertFalse(gateway.recordFailure(0, now: 0, gateway: false), "a 500 is not a gateway error")
        XCTAssertFalse(gateway.recordFailure(0, now: 0, gateway: true))
        XCTAssertFalse(gateway.recordFailure(0, now: 0, gateway: false))
        XCTAssertFalse(gateway.recordFailure(0, now: 0, gateway: false), "500s never eject with the 5xx detector off")
        XCTAssertFalse(gateway.recordFailure(0, now: 0, gateway: true))
        XCTAssertTrue(gateway.recordFailure(0, now: 0, gateway: true))

        var any = OutlierDetector(settings: .init(consecutiveErrors: 3, consecutiveGatewayErrors: 0, maxEjectionPercent: 100),
                                  endpointCount: 1)
        XCTAssertFalse(any.recordFailure(0, now: 0, gateway: false))
        XCTAssertFalse(any.recordFailure(0, now: 0, gateway: true))
        XCTAssertTrue(any.recordFailure(0, now: 0, gateway: false))
    }

    func testSuccessResetsTheFailureRun() {
        var d = OutlierDetector(settings: .init(consecutiveErrors: 2, maxEjectionPercent: 100), endpointCount: 1)
        d.recordFailure(0, now: 0)
        d.recordSuccess(0)
        XCTAssertFalse(d.recordFailure(0, now: 0))
        XCTAssertTrue(d.recordFailure(0, now: 0))
    }

    func testRepeatedEjectionsBackOffLonger() {
        var d = OutlierDetector(settings: .init(consecutiveErrors: 1, baseEjectionTime: .seconds(10), maxEjectionPercent: 100),
                                endpointCount: 1)
        XCTAssertTrue(d.recordFailure(0, now: 0))
        XCTAssertTrue(d.recordFailure(0, now: 10 * second))  // back, fails again at once
        XCTAssertTrue(d.isEjected(0, now: 29 * second), "second ejection lasts 2 x base")
        XCTAssertFalse(d.isEjected(0, now: 30 * second))
    }

    func testMaxEjectionPercentCapsEjectionsButAllowsOne() {
        var d = OutlierDetector(settings: .init(consecutiveErrors: 1, maxEjectionPercent: 10), endpointCount: 4)
        XCTAssertTrue(d.recordFailure(0, now: 0), "one may always be ejected")
        XCTAssertFalse(d.recordFailure(1, now: 0), "10% of 4 rounds to one")
        XCTAssertEqual(d.ejectedCount(now: 0), 1)
    }

    func testHugeEjectionTimesSaturateInsteadOfOverflowing() {
        var d = OutlierDetector(settings: .init(consecutiveErrors: 1, baseEjectionTime: .seconds(Int64.max / 2),
                                                maxEjectionPercent: 100), endpointCount: 1)
        XCTAssertTrue(d.recordFailure(0, now: 5 * second))
        XCTAssertTrue(d.isEjected(0, now: .max - 1))
    }

    func testZeroConsecutiveErrorsDisablesDetection() {
        var d = OutlierDetector(settings: .init(consecutiveErrors: 0, maxEjectionPercent: 100), endpointCount: 1)
        for _ in 0..<10 { XCTAssertFalse(d.recordFailure(0, now: 0)) }
    }
}
