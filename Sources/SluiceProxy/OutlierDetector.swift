import SluiceModel

/// Passive outlier detection for one cluster on one worker (Envoy's consecutive-failure detector): an endpoint
/// that fails `consecutiveErrors` connects in a row is ejected for `baseEjectionTime * n`, where `n` counts its
/// recent ejections, so flapping endpoints stay out longer. Clock is injected (monotonic nanoseconds).
public struct OutlierDetector: Sendable {
    public struct EndpointState: Sendable {
        var consecutiveFailures = 0
        var ejectedUntil: UInt64 = 0
        var ejections = 0
    }

    let settings: OutlierDetection
    public private(set) var endpoints: [EndpointState]
    static let maxEjectionNanos: UInt64 = 300_000_000_000  // Envoy's max_ejection_time default

    public init(settings: OutlierDetection, endpointCount: Int) {
        self.settings = settings
        endpoints = Array(repeating: EndpointState(), count: endpointCount)
    }

    @inline(__always)
    public func isEjected(_ i: Int, now: UInt64) -> Bool { endpoints[i].ejectedUntil > now }

    public func ejectedCount(now: UInt64) -> Int { endpoints.filter { $0.ejectedUntil > now }.count }

    /// Records a failed connect. Returns true when this failure ejected the endpoint.
    @discardableResult
    public mutating func recordFailure(_ i: Int, now: UInt64) -> Bool {
        guard settings.consecutiveErrors > 0 else { return false }
        endpoints[i].consecutiveFailures += 1
        guard endpoints[i].consecutiveFailures >= settings.consecutiveErrors, endpoints[i].ejectedUntil <= now else {
            return false
        }
        // maxEjectionPercent caps how many may be out at once; like Envoy, one may always be ejected.
        let limit = max(1, endpoints.count * settings.maxEjectionPercent / 100)
        guard settings.maxEjectionPercent > 0, ejectedCount(now: now) < limit else { return false }
        endpoints[i].ejections += 1
        let base = settings.baseEjectionTime.clampedNanoseconds
        // Saturating: a huge baseEjectionTime in config must not overflow on the data plane.
        let (scaled, overflow) = base.multipliedReportingOverflow(by: UInt64(endpoints[i].ejections))
        let span = min(overflow ? .max : scaled, max(base, Self.maxEjectionNanos))
        let (until, late) = now.addingReportingOverflow(span)
        endpoints[i].ejectedUntil = late ? .max : until
        endpoints[i].consecutiveFailures = 0
        return true
    }

    /// Records a successful connect: resets the failure run and slowly forgets earlier ejections.
    public mutating func recordSuccess(_ i: Int) {
        endpoints[i].consecutiveFailures = 0
        if endpoints[i].ejections > 0 && endpoints[i].ejectedUntil == 0 { endpoints[i].ejections -= 1 }
        endpoints[i].ejectedUntil = 0
    }
}
