import Foundation

/// When a certificate is renewed (Istio's node agent): at half its lifetime, give or take a jitter so a fleet
/// does not renew in step; after a failed attempt, again after a back-off that doubles up to a ceiling, while the
/// current certificate keeps being used; an alarm once less than a tenth of the lifetime is left. Pure: the
/// caller supplies the clock and the random draw.
public struct RotationSchedule: Sendable, Equatable {
    public var notBefore: Date
    public var notAfter: Date
    /// Consecutive failed renewals since the last success.
    public private(set) var failures = 0
    /// When the next attempt is due.
    public private(set) var nextAttempt: Date

    public static let jitter = 0.1
    public static let firstBackOff: TimeInterval = 1
    public static let maxBackOff: TimeInterval = 60

    /// - Parameter random: a draw in `0..<1` that places the renewal within ±``jitter`` of the lifetime's middle.
    public init(notBefore: Date, notAfter: Date, random: Double) {
        self.notBefore = notBefore
        self.notAfter = notAfter
        nextAttempt = Self.renewal(notBefore: notBefore, notAfter: notAfter, random: random)
    }

    static func renewal(notBefore: Date, notAfter: Date, random: Double) -> Date {
        let lifetime = notAfter.timeIntervalSince(notBefore)
        let fraction = 0.5 + (random * 2 - 1) * jitter
        return notBefore.addingTimeInterval(lifetime * fraction)
    }

    public func isDue(_ now: Date) -> Bool { now >= nextAttempt }

    /// A renewal failed at `now`: try again after the back-off (never later than what is left of the lifetime
    /// allows a last attempt for).
    public mutating func failed(at now: Date) {
        failures += 1
        nextAttempt = now.addingTimeInterval(Self.backOff(failures: failures))
    }

    /// The wait after `failures` consecutive failures: 1 s, doubling, at most ``maxBackOff``.
    public static func backOff(failures: Int) -> TimeInterval {
        min(maxBackOff, firstBackOff * pow(2, Double(max(1, failures) - 1)))
    }

    /// A new certificate arrived: schedule its renewal.
    public mutating func renewed(notBefore: Date, notAfter: Date, random: Double) {
        self = RotationSchedule(notBefore: notBefore, notAfter: notAfter, random: random)
    }

    /// Less than a tenth of the lifetime is left (or none): time to raise the alarm.
    public func isNearExpiry(_ now: Date) -> Bool {
        notAfter.timeIntervalSince(now) < notAfter.timeIntervalSince(notBefore) * 0.1
    }

    public func isExpired(_ now: Date) -> Bool { now >= notAfter }
}
