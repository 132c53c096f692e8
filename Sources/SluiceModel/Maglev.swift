/// A Maglev lookup table (Eisenbud et al., NSDI 2016): consistent hashing in which each backend owns about
/// `weight / totalWeight` of the table's slots, and removing one backend moves little more than its own keys.
public struct MaglevTable: Sendable {
    /// Backend index per slot.
    public let table: [Int32]
    public var size: Int { table.count }

    /// Istio/Envoy's default Maglev table size, prime.
    public static let defaultSize = 65537

    /// The smallest prime that is at least `max(requested, 100 * backends)`: with 100 slots per backend or more,
    /// shares and disruption stay within about 1% of ideal.
    public static func tableSize(backends: Int, requested: Int? = nil) -> Int {
        var n = max(requested ?? defaultSize, 100 * backends)
        while !isPrime(n) { n += 1 }
        return n
    }

    /// - Parameters:
    ///   - keys: one stable key per backend (for example its address); determines each backend's permutation.
    ///   - weights: relative weights; a backend of weight 2 gets about twice the slots of one of weight 1.
    public init(keys: [String], weights: [UInt32], size: Int) {
        precondition(keys.count == weights.count)
        let n = keys.count
        guard n > 0 else {
            table = []
            return
        }
        let m = UInt64(size)
        var offsets = [UInt64](repeating: 0, count: n)
        var skips = [UInt64](repeating: 0, count: n)
        for i in 0..<n {
            offsets[i] = fnv1a(keys[i], seed: 0xCBF2_9CE4_8422_2325) % m
            skips[i] = fnv1a(keys[i], seed: 0x8422_2325_CBF2_9CE4) % (m - 1) + 1
        }
        let maxWeight = UInt64(weights.max() ?? 1)
        var next = [UInt64](repeating: 0, count: n)
        var filledBy = [UInt64](repeating: 0, count: n)
        var t = [Int32](repeating: -1, count: size)
        var filled = 0
        var iteration: UInt64 = 0
        while filled < size {
            iteration += 1
            for i in 0..<n where filled < size {
                // Weighted Maglev: backend i takes a turn only while its share lags weight_i / maxWeight.
                if (filledBy[i] + 1) * maxWeight > iteration * UInt64(weights[i]) { continue }
                var c = (offsets[i] + next[i] * skips[i]) % m
                while t[Int(c)] >= 0 {
                    next[i] += 1
                    c = (offsets[i] + next[i] * skips[i]) % m
                }
                t[Int(c)] = Int32(i)
                next[i] += 1
                filledBy[i] += 1
                filled += 1
            }
        }
        table = t
    }

    /// The backend for `hash`; if it is out, the next available slot's backend (linear probe), so that keys of
    /// healthy backends do not move when another one goes out.
    @inline(__always)
    public func pick(hash: UInt64, _ available: (Int) -> Bool) -> Int? {
        guard !table.isEmpty else { return nil }
        var slot = Int(hash % UInt64(table.count))
        for _ in 0..<min(table.count, 4096) {
            let b = Int(table[slot])
            if available(b) { return b }
            slot += 1
            if slot == table.count { slot = 0 }
        }
        return nil
    }
}

func fnv1a(_ s: String, seed: UInt64) -> UInt64 {
    var h = seed
    for b in s.utf8 {
        h ^= UInt64(b)
        h = h &* 0x100_0000_01B3
    }
    // FNV alone mixes the last bytes poorly; finish with a strong mix.
    h ^= h >> 33
    h = h &* 0xFF51_AFD7_ED55_8CCD
    h ^= h >> 33
    return h
}
