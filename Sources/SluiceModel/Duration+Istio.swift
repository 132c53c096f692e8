/// Parses Istio/protobuf duration strings: `1s`, `0.5s`, `250ms`, `10us`, `1m`, `2h`, `1h30m`.
public func parseIstioDuration(_ text: String) -> Duration? {
    var rest = Substring(text.trimmingSpaces())
    guard !rest.isEmpty else { return nil }
    var total: Duration = .zero
    while !rest.isEmpty {
        let numberEnd = rest.firstIndex(where: { !($0.isNumber || $0 == ".") }) ?? rest.endIndex
        guard numberEnd != rest.startIndex, let value = Double(rest[rest.startIndex..<numberEnd]), value >= 0,
            value.isFinite
        else { return nil }
        rest = rest[numberEnd...]
        let unitEnd = rest.firstIndex(where: { $0.isNumber || $0 == "." }) ?? rest.endIndex
        let unit = rest[rest.startIndex..<unitEnd]
        rest = rest[unitEnd...]
        let nanosPerUnit: Double
        switch unit {
        case "h": nanosPerUnit = 3_600e9
        case "m": nanosPerUnit = 60e9
        case "s": nanosPerUnit = 1e9
        case "ms": nanosPerUnit = 1e6
        case "us", "µs": nanosPerUnit = 1e3
        case "ns": nanosPerUnit = 1
        default: return nil
        }
        let nanos = value * nanosPerUnit
        guard nanos < 1e18 else { return nil }
        total += .nanoseconds(Int64(nanos))
    }
    return total
}

extension Duration {
    /// Whole nanoseconds, clamped to 0...UInt64.max: what deadlines on a monotonic clock need.
    public var clampedNanoseconds: UInt64 {
        let (s, atto) = components
        guard s >= 0 else { return 0 }
        guard s < Int64(UInt64.max / 1_000_000_000) - 1 else { return UInt64.max }
        return UInt64(s) * 1_000_000_000 + UInt64(max(0, atto / 1_000_000_000))
    }

    /// Whole milliseconds, rounded down.
    public var milliseconds: Int64 {
        let (s, atto) = components
        return s * 1000 + atto / 1_000_000_000_000_000
    }
}

extension String {
    func trimmingSpaces() -> String {
        var s = Substring(self)
        while let f = s.first, f == " " || f == "\t" || f == "\n" || f == "\r" { s = s.dropFirst() }
        while let l = s.last, l == " " || l == "\t" || l == "\n" || l == "\r" { s = s.dropLast() }
        return String(s)
    }
}
