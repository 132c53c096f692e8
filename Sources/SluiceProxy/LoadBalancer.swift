/// Load-balancing algorithms. Pure Swift: no sockets, no clocks, testable in isolation.
///
/// Each worker owns its balancer state (no locks on the request path). `available(i)` tells whether endpoint
/// `i` may be picked now (healthy and not ejected).

/// Smooth weighted round robin (nginx's algorithm): with equal weights it is plain round robin; with weights
/// it interleaves picks instead of sending bursts to the heaviest endpoint.
public struct RoundRobinBalancer: Sendable {
    let weights: [Int]
    var current: [Int]
    let total: Int
    var next = 0
    let uniform: Bool

    public init(weights: [UInt32]) {
        self.weights = weights.map { Int($0) }
        current = Array(repeating: 0, count: weights.count)
        total = self.weights.reduce(0, +)
        uniform = Set(weights).count <= 1
    }

    public mutating func pick(_ available: (Int) -> Bool) -> Int? {
        let n = weights.count
        guard n > 0 else { return nil }
        if uniform {
            for _ in 0..<n {
                let i = next
                next = next + 1 == n ? 0 : next + 1
                if available(i) { return i }
            }
            return nil
        }
        var best = -1
        var liveTotal = 0
        for i in 0..<n where available(i) {
            current[i] += weights[i]
            liveTotal += weights[i]
            if best < 0 || current[i] > current[best] { best = i }
        }
        guard best >= 0 else { return nil }
        current[best] -= liveTotal
        return best
    }
}

/// Uniform random source for the balancers: xorshift64*, seeded per worker.
public struct FastRandom: Sendable {
    var state: UInt64
    public init(seed: UInt64) { state = seed == 0 ? 0x9E37_79B9_7F4A_7C15 : seed }
    @inline(__always)
    public mutating func next() -> UInt64 {
        state ^= state >> 12
        state ^= state << 25
        state ^= state >> 27
        return state &* 0x2545_F491_4F6C_DD1D
    }
    /// Uniform in 0..<bound (Lemire's multiply-shift; bias is negligible for bounds far below 2^64).
    @inline(__always)
    public mutating func next(below bound: Int) -> Int {
        Int(next().multipliedFullWidth(by: UInt64(bound)).high)
    }
}

/// Weighted random: picks endpoint i with probability weight(i) / total over available endpoints.
public struct RandomBalancer: Sendable {
    let cumulative: [UInt64]
    let weights: [UInt32]

    public init(weights: [UInt32]) {
        self.weights = weights
        var acc: UInt64 = 0
        cumulative = weights.map { acc += UInt64($0); return acc }
    }

    public func pick(_ rng: inout FastRandom, _ available: (Int) -> Bool) -> Int? {
        guard let total = cumulative.last, total > 0 else { return nil }
        let r = UInt64(rng.next(below: Int(total)))
        var lo = 0, hi = cumulative.count - 1
        while lo < hi {
            let mid = (lo + hi) / 2
            if cumulative[mid] > r { hi = mid } else { lo = mid + 1 }
        }
        if available(lo) { return lo }
        // The drawn endpoint is out: draw again among the available ones only.
        var liveTotal: UInt64 = 0
        for i in weights.indices where available(i) { liveTotal += UInt64(weights[i]) }
        guard liveTotal > 0 else { return nil }
        var x = UInt64(rng.next(below: Int(liveTotal)))
        for i in weights.indices where available(i) {
            if x < UInt64(weights[i]) { return i }
            x -= UInt64(weights[i])
        }
        return nil
    }
}

/// Least request with the power of two choices: draw two available endpoints at random, take the one with fewer
/// active connections relative to its weight.
public struct LeastRequestBalancer: Sendable {
    let weights: [UInt32]
    public init(weights: [UInt32]) { self.weights = weights }

    public func pick(_ rng: inout FastRandom, active: (Int) -> Int, _ available: (Int) -> Bool) -> Int? {
        let n = weights.count
        guard n > 0 else { return nil }
        var a = -1, b = -1
        for _ in 0..<4 {
            let i = rng.next(below: n)
            if available(i) { a = i; break }
        }
        for _ in 0..<4 {
            let i = rng.next(below: n)
            if available(i) { b = i; break }
        }
        if a < 0 && b < 0 {
            // Most endpoints are out: scan for any that is in.
            for i in 0..<n where available(i) { return i }
            return nil
        }
        if a < 0 { return b }
        if b < 0 || a == b { return a }
        // Compare active/weight without division: active_a * w_b vs active_b * w_a.
        let la = active(a) * Int(weights[b]), lb = active(b) * Int(weights[a])
        return la <= lb ? a : b
    }
}
