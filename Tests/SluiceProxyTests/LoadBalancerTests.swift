import SluiceModel
import SluiceProxy
import XCTest

final class LoadBalancerTests: XCTestCase {
    func testRoundRobinCyclesThroughEqualEndpoints() {
        var rr = RoundRobinBalancer(weights: [1, 1, 1])
        let picks = (0..<6).map { _ in rr.pick { _ in true }! }
        XCTAssertEqual(picks, [0, 1, 2, 0, 1, 2])
    }

    func testRoundRobinSkipsUnavailableEndpoints() {
        var rr = RoundRobinBalancer(weights: [1, 1, 1])
        let picks = (0..<4).map { _ in rr.pick { $0 != 1 }! }
        XCTAssertEqual(picks, [0, 2, 0, 2])
        XCTAssertNil(rr.pick { _ in false })
    }

    func testWeightedRoundRobinInterleavesInProportion() {
        var rr = RoundRobinBalancer(weights: [5, 1, 1])
        let picks = (0..<7).map { _ in rr.pick { _ in true }! }
        // Smooth WRR: exactly 5:1:1 per cycle, and the heavy endpoint is not picked five times in a row.
        XCTAssertEqual(picks.filter { $0 == 0 }.count, 5)
        XCTAssertEqual(picks.filter { $0 == 1 }.count, 1)
        XCTAssertEqual(picks, [0, 0, 1, 0, 2, 0, 0])
    }

    func testRandomFollowsWeights() {
        let rb = RandomBalancer(weights: [1, 2, 7])
        var rng = FastRandom(seed: 42)
        var counts = [0, 0, 0]
        let n = 100_000
        for _ in 0..<n { counts[rb.pick(&rng) { _ in true }!] += 1 }
        // Chi-square with 2 degrees of freedom; 13.8 is the 0.999 quantile.
        let expected = [0.1, 0.2, 0.7].map { $0 * Double(n) }
        let chi2 = zip(counts, expected).reduce(0.0) { $0 + pow(Double($1.0) - $1.1, 2) / $1.1 }
        XCTAssertLessThan(chi2, 13.8, "counts \(counts)")
    }

    func testRandomAvoidsUnavailableEndpoints() {
        let rb = RandomBalancer(weights: [1, 1, 1])
        var rng = FastRandom(seed: 7)
        for _ in 0..<1000 { XCTAssertEqual(rb.pick(&rng) { $0 == 2 }, 2) }
        XCTAssertNil(rb.pick(&rng) { _ in false })
    }

    func testLeastRequestPrefersTheLessLoadedOfTwoChoices() {
        let lr = LeastRequestBalancer(weights: [1, 1])
        var rng = FastRandom(seed: 1)
        let active = [10, 0]
        var counts = [0, 0]
        for _ in 0..<1000 { counts[lr.pick(&rng, active: { active[$0] }) { _ in true }!] += 1 }
        // Endpoint 0 wins only when both draws land on it (p = 1/4).
        XCTAssertGreaterThan(counts[1], 650)
        XCTAssertGreaterThan(counts[0], 150)
    }

    func testLeastRequestWeighsActiveCountsByWeight() {
        let lr = LeastRequestBalancer(weights: [4, 1])
        var rng = FastRandom(seed: 3)
        // 3 active on a weight-4 endpoint is a lighter load than 1 on a weight-1 endpoint.
        let active = [3, 1]
        var sawZeroWhenBothDrawn = false
        for _ in 0..<200 {
            if lr.pick(&rng, active: { active[$0] }, { _ in true }) == 0 { sawZeroWhenBothDrawn = true }
        }
        XCTAssertTrue(sawZeroWhenBothDrawn)
        var only1 = 0
        for _ in 0..<1000 where lr.pick(&rng, active: { active[$0] }, { _ in true }) == 1 { only1 += 1 }
        XCTAssertLessThan(only1, 400, "endpoint 1 should win only when drawn twice")
    }

    func testLeastRequestFallsBackToAnyAvailableEndpoint() {
        let lr = LeastRequestBalancer(weights: Array(repeating: 1, count: 100))
        var rng = FastRandom(seed: 9)
        for _ in 0..<100 { XCTAssertEqual(lr.pick(&rng, active: { _ in 0 }) { $0 == 57 }, 57) }
    }
}

final class MaglevTests: XCTestCase {
    func keys(_ n: Int) -> [String] { (0..<n).map { "10.0.\($0 / 256).\($0 % 256):8080" } }

    func testTableSizeIsPrimeAndAtLeastHundredTimesBackends() {
        for n in [1, 3, 10, 100, 700, 1000] {
            let size = MaglevTable.tableSize(backends: n)
            XCTAssertGreaterThanOrEqual(size, 100 * n)
            XCTAssertGreaterThanOrEqual(size, MaglevTable.defaultSize)
            XCTAssertTrue((2..<Int(Double(size).squareRoot()) + 1).allSatisfy { size % $0 != 0 }, "\(size) not prime")
        }
    }

    func testEveryBackendGetsAnEvenShare() {
        let n = 50
        let size = MaglevTable.tableSize(backends: n)
        let t = MaglevTable(keys: keys(n), weights: Array(repeating: 1, count: n), size: size)
        var counts = [Int](repeating: 0, count: n)
        for b in t.table { counts[Int(b)] += 1 }
        let ideal = Double(size) / Double(n)
        for c in counts { XCTAssertEqual(Double(c), ideal, accuracy: ideal * 0.02) }
    }

    func testWeightsScaleShares() {
        let t = MaglevTable(keys: keys(3), weights: [1, 2, 1], size: 65537)
        var counts = [0, 0, 0]
        for b in t.table { counts[Int(b)] += 1 }
        XCTAssertEqual(Double(counts[1]) / Double(counts[0]), 2.0, accuracy: 0.05)
    }

    func testRemovingOneBackendMovesLittleMoreThanItsOwnKeys() {
        for n in [10, 50, 200] {
            let size = MaglevTable.tableSize(backends: n)
            let all = keys(n)
            let before = MaglevTable(keys: all, weights: Array(repeating: 1, count: n), size: size)
            let removed = n / 2
            var rest = all
            rest.remove(at: removed)
            let after = MaglevTable(keys: rest, weights: Array(repeating: 1, count: n - 1), size: size)
            // Map indices of the smaller table back to backend keys to compare ownership slot by slot.
            var moved = 0
            for s in 0..<size where all[Int(before.table[s])] != rest[Int(after.table[s])] { moved += 1 }
            let movedFraction = Double(moved) / Double(size)
            let minimum = 1.0 / Double(n)
            XCTAssertLessThanOrEqual(movedFraction - minimum, 0.01,
                                     "n=\(n): moved \(movedFraction), minimum \(minimum)")
        }
    }

    func testPickProbesPastUnavailableBackends() {
        let t = MaglevTable(keys: keys(4), weights: [1, 1, 1, 1], size: 65537)
        var rng = FastRandom(seed: 5)
        for _ in 0..<1000 {
            let h = rng.next()
            let first = t.pick(hash: h) { _ in true }!
            let second = t.pick(hash: h) { $0 != first }!
            XCTAssertNotEqual(first, second)
            XCTAssertEqual(t.pick(hash: h) { _ in true }, first, "same key, same backend")
        }
        XCTAssertNil(t.pick(hash: 1) { _ in false })
    }
}
