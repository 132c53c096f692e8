import SluiceModel
import SluiceProxy
import XCTest

final class RetryPolicyTests: XCTestCase {
    let policy = RetryPolicy(HTTPRetry(attempts: 3, perTryTimeout: .seconds(2), retryOn: ["5xx", "retriable-4xx", "429"]))

    func testRetriesStopAtTheAttemptBudget() {
        var retries = 0
        var last: RetryPolicy.Decision = .deliver
        while true {
            last = policy.decide(.response(status: 503, grpcStatus: nil), retriesDone: retries, bodyReplayable: true,
                                 budgetAllows: true, random: 12345)
            guard case .retry = last else { break }
            retries += 1
        }
        XCTAssertEqual(retries, 3)
        XCTAssertEqual(last, .giveUp("attempts exhausted"))
    }

    func testWhatIsRetriedFollowsRetryOn() {
        func retried(_ o: AttemptOutcome, _ p: RetryPolicy? = nil) -> Bool {
            if case .retry = (p ?? policy).decide(o, retriesDone: 0, bodyReplayable: true, budgetAllows: true, random: 1) {
                return true
            }
            return false
        }
        XCTAssertTrue(retried(.response(status: 500, grpcStatus: nil)))
        XCTAssertTrue(retried(.response(status: 409, grpcStatus: nil)), "retriable-4xx is 409")
        XCTAssertTrue(retried(.response(status: 429, grpcStatus: nil)), "a numeric retryOn entry")
        XCTAssertFalse(retried(.response(status: 404, grpcStatus: nil)))
        XCTAssertFalse(retried(.response(status: 200, grpcStatus: nil)))
        XCTAssertTrue(retried(.reset), "5xx covers resets")
        XCTAssertTrue(retried(.perTryTimeout), "and per-try timeouts")
        let grpc = RetryPolicy(HTTPRetry(attempts: 1, perTryTimeout: nil, retryOn: ["unavailable", "cancelled"]))
        XCTAssertTrue(retried(.response(status: 200, grpcStatus: 14), grpc))
        XCTAssertFalse(retried(.response(status: 200, grpcStatus: 13), grpc))
        XCTAssertFalse(retried(.connectFailure, grpc))
        XCTAssertTrue(retried(.connectFailure, RetryPolicy.istioDefault))
        XCTAssertTrue(retried(.response(status: 503, grpcStatus: nil), RetryPolicy.istioDefault))
    }

    func testNoRetryWithoutTheFullBodyOrBudget() {
        XCTAssertEqual(policy.decide(.reset, retriesDone: 0, bodyReplayable: false, budgetAllows: true, random: 0),
                       .giveUp("the request body was not kept, so it cannot be sent again"))
        XCTAssertEqual(policy.decide(.reset, retriesDone: 0, bodyReplayable: true, budgetAllows: false, random: 0),
                       .giveUp("retry budget exhausted"))
    }

    func testBackOffIsJitteredExponentialAndCapped() {
        var long = policy
        long.attempts = 10
        for n in 0..<8 {
            let ceiling = Int64(min(250, 25 << n))  // 25, 50, 100, 200, then the 250 ms cap
            var seen: Set<Int64> = []
            for r in stride(from: UInt64(0), to: 1_000_000_000, by: 7_777_777) {
                guard case .retry(let d) = long.decide(.reset, retriesDone: n, bodyReplayable: true, budgetAllows: true,
                                                       random: r &* 2_654_435_761)
                else { return XCTFail() }
                let ms = d.components.attoseconds / 1_000_000_000_000_000 + d.components.seconds * 1000
                XCTAssertLessThan(ms, ceiling)
                seen.insert(ms)
            }
            XCTAssertGreaterThan(seen.count, 5, "jittered, not fixed (ceiling \(ceiling) ms)")
        }
    }
}

final class TokenBucketTests: XCTestCase {
    let second: UInt64 = 1_000_000_000

    func testBucketAdmitsCapacityThenTheRefillRate() {
        var b = TokenBucket(maxTokens: 10, tokensPerFill: 5, fillInterval: .seconds(1), now: 0)
        XCTAssertEqual((0..<15).filter { _ in b.take(now: 0) }.count, 10)
        XCTAssertEqual(b.retryAfterSeconds(now: 0), 1)
        XCTAssertEqual((0..<15).filter { _ in b.take(now: second / 2) }.count, 0, "no fill before the interval")
        XCTAssertEqual((0..<15).filter { _ in b.take(now: second) }.count, 5)
        XCTAssertEqual((0..<15).filter { _ in b.take(now: 10 * second) }.count, 10, "refill caps at capacity")
    }

    /// Two workers with their shares admit, together, what one bucket with the policy's numbers would: never
    /// more, over 60 s of random arrivals.
    func testWorkerSharesTogetherRespectThePolicy() {
        let policy = RateLimitPolicy.TokenBucket(maxTokens: 101, tokensPerFill: 33, fillInterval: .milliseconds(100))
        var workers = (0..<2).map { TokenBucket.share(of: policy, worker: $0, workers: 2, now: 0) }
        XCTAssertEqual(workers.map(\.maxTokens).reduce(0, +), 101)
        XCTAssertEqual(workers.map(\.tokensPerFill).reduce(0, +), 33)
        var rng = SystemRandomNumberGenerator()
        var admitted = 0
        var now: UInt64 = 0
        while now < 60 * second {
            now += UInt64.random(in: 0...2_000_000, using: &rng)  // ~1,000 requests/s offered, 330/s allowed
            let w = Int.random(in: 0..<2, using: &rng)
            if workers[w].take(now: now) { admitted += 1 }
        }
        let allowed = 101 + Int(60 * second / 100_000_000) * 33
        XCTAssertLessThanOrEqual(admitted, allowed)
        XCTAssertGreaterThan(admitted, allowed * 9 / 10, "and close to it when offered more")
    }
}
