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
