import SluiceModel

/// Passive outlier detection for one cluster on one worker (Envoy's consecutive 5xx and consecutive gateway-failure
/// detectors): an endpoint with `consecutiveErrors` errors in a row (any 5xx, connect failure or reset), or
/// `consecutiveGatewayErrors` gateway errors in a row (502, 503, 504, connect failure, reset), is ejected for
/// `baseEjectionTime * n`, where `n` counts its recent ejections, so flapping endpoints stay out longer. Clock is
/// injected (monotonic nanoseconds).
public struct OutlierDetector: Sendable {
    public struct EndpointState: Sendable {
        var consecutiveFailures = 0
        var consecutiveGatewayFailures = 0
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

    /// Records an error: a connect failure or reset (`gateway`: true), or a 5xx response (`gateway` for 502-504).
    /// Returns true when this error ejected the endpoint.
    @discardableResult
    public mutating func recordFailure(_ i: Int, now: UInt64, gateway: Bool = true) -> Bool {
        endpoints[i].consecutiveFailures += 1
        endpoints[i].consecutiveGatewayFailures = gateway ? endpoints[i].consecutiveGatewayFailures + 1 : 0
        let by5xx = settings.consecutiveErrors > 0 && endpoints[i].consecutiveFailures >= settings.consecutiveErrors
        let byGateway = settings.consecutiveGatewayErrors > 0
            && endpoints[i].consecutiveGatewayFailures >= settings.consecutiveGatewayErrors
        guard by5xx || byGateway, endpoints[i].ejectedUntil <= now else { return false }
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
        endpoints[i].consecutiveGatewayFailures = 0
        return true
    }

    /// Records a successful connect: resets the failure run and slowly forgets earlier ejections.
    public mutating func recordSuccess(_ i: Int) {
        endpoints[i].consecutiveFailures = 0
        endpoints[i].consecutiveGatewayFailures = 0
        if endpoints[i].ejections > 0 && endpoints[i].ejectedUntil == 0 { endpoints[i].ejections -= 1 }
        endpoints[i].ejectedUntil = 0
    }
}
