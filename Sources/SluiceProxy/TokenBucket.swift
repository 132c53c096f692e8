import SluiceModel

/// A local rate limit's token bucket (RateLimitPolicy `local`), owned by one worker: no atomics on the request
/// path. A policy's capacity and refill are split over the workers (``share(of:worker:workers:)``) so that all
/// workers together admit at most what the policy allows.
public struct TokenBucket: Sendable, Equatable {
    public let maxTokens: Int
    public let tokensPerFill: Int
    public let fillIntervalNanos: UInt64
    private(set) var tokens: Int
    private var lastFill: UInt64

    public init(maxTokens: Int, tokensPerFill: Int, fillInterval: Duration, now: UInt64) {
        self.maxTokens = maxTokens
        self.tokensPerFill = tokensPerFill
        fillIntervalNanos = max(1, fillInterval.clampedNanoseconds)
        tokens = maxTokens
        lastFill = now
    }

    /// This worker's part of `bucket`: capacity and refill divided over `workers`, the remainders going to the
    /// first workers, so the parts add up exactly to the whole.
    public static func share(of bucket: RateLimitPolicy.TokenBucket, worker: Int, workers: Int, now: UInt64) -> TokenBucket {
        func part(_ total: Int) -> Int { total / workers + (worker < total % workers ? 1 : 0) }
        return TokenBucket(maxTokens: part(bucket.maxTokens), tokensPerFill: part(bucket.tokensPerFill),
                           fillInterval: bucket.fillInterval, now: now)
    }

    /// Takes one token if there is one (`now` in nanoseconds, monotonic).
    public mutating func take(now: UInt64) -> Bool {
        refill(now)
        guard tokens > 0 else { return false }
        tokens -= 1
        return true
    }

    /// Seconds until the next fill, for `retry-after` (at least 1).
    public func retryAfterSeconds(now: UInt64) -> Int {
        let elapsed = now >= lastFill ? now - lastFill : 0
        let wait = fillIntervalNanos > elapsed ? fillIntervalNanos - elapsed : 0
        return max(1, Int((wait + 999_999_999) / 1_000_000_000))
    }

    public var remaining: Int { tokens }

    private mutating func refill(_ now: UInt64) {
        guard now > lastFill else { return }
        let fills = (now - lastFill) / fillIntervalNanos
        guard fills > 0 else { return }
        let added = fills > UInt64(Int.max / max(1, tokensPerFill)) ? maxTokens : Int(fills) * tokensPerFill
        tokens = min(maxTokens, tokens + added)
        lastFill += fills * fillIntervalNanos
    }
}
