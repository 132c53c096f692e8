import Foundation
import XCTest

@testable import SluiceIdentity

final class RotationScheduleTests: XCTestCase {
    let start = Date(timeIntervalSince1970: 1_000_000)

    func testRenewsAtHalfTheLifetimeWithinTheJitter() {
        let end = start.addingTimeInterval(1000)
        XCTAssertEqual(RotationSchedule(notBefore: start, notAfter: end, random: 0.5).nextAttempt, start.addingTimeInterval(500))
        XCTAssertEqual(RotationSchedule(notBefore: start, notAfter: end, random: 0).nextAttempt, start.addingTimeInterval(400))
        XCTAssertEqual(RotationSchedule(notBefore: start, notAfter: end, random: 0.999_999).nextAttempt.timeIntervalSince(start),
                       600, accuracy: 0.01)
        let s = RotationSchedule(notBefore: start, notAfter: end, random: 0.5)
        XCTAssertFalse(s.isDue(start.addingTimeInterval(499)))
        XCTAssertTrue(s.isDue(start.addingTimeInterval(500)))
    }

    func testFailuresBackOffDoublingToACeilingAndSuccessResets() {
        var s = RotationSchedule(notBefore: start, notAfter: start.addingTimeInterval(86_400), random: 0.5)
        var now = s.nextAttempt
        var waits: [TimeInterval] = []
        for _ in 0..<9 {
            s.failed(at: now)
            waits.append(s.nextAttempt.timeIntervalSince(now))
            now = s.nextAttempt
        }
        XCTAssertEqual(waits, [1, 2, 4, 8, 16, 32, 60, 60, 60])
        s.renewed(notBefore: now, notAfter: now.addingTimeInterval(100), random: 0.5)
        XCTAssertEqual(s.failures, 0)
        XCTAssertEqual(s.nextAttempt, now.addingTimeInterval(50))
    }

    func testTheAlarmSoundsInTheLastTenthAndExpiryIsExact() {
        let s = RotationSchedule(notBefore: start, notAfter: start.addingTimeInterval(1000), random: 0.5)
        XCTAssertFalse(s.isNearExpiry(start.addingTimeInterval(899)))
        XCTAssertTrue(s.isNearExpiry(start.addingTimeInterval(901)))
        XCTAssertFalse(s.isExpired(start.addingTimeInterval(999)))
        XCTAssertTrue(s.isExpired(start.addingTimeInterval(1000)))
    }
}
