import SluiceModel

/// What one upstream attempt of a request came to.
public enum AttemptOutcome: Sendable, Equatable {
    /// A response head arrived; `grpcStatus` from headers or trailers-only responses.
    case response(status: Int, grpcStatus: Int?)
    /// The connection was reset or closed before a complete response head.
    case reset
    /// No connection could be made.
    case connectFailure
    /// HTTP/2 REFUSED_STREAM: the upstream did not process the request.
    case refusedStream
    /// The per-try timeout fired.
    case perTryTimeout
}

/// Istio's `retries` with Envoy's semantics, as a pure decision: after each attempt, deliver what came back, or
/// retry after a jittered exponential back-off, or give up. No clock or I/O here: the caller supplies random
/// bits and whether the retry budget and body allow another attempt.
public struct RetryPolicy: Sendable, Equatable {
    /// Retries after the first attempt (Istio's `attempts`).
    public var attempts: Int
    public var perTryTimeout: Duration?
    var on: Set<String>
    var statusCodes: Set<Int>
    /// Envoy's defaults: 25 ms base, 10x base maximum.
    public var baseBackoff: Duration = .milliseconds(25)
    public var maxBackoff: Duration = .milliseconds(250)

    /// Istio's default when a route sets no `retries`: 2 attempts on connect-failure, refused-stream,
    /// unavailable, cancelled and retriable-status-codes 503.
    public static let istioDefault = RetryPolicy(
        HTTPRetry(attempts: 2, perTryTimeout: nil, retryOn: ["connect-failure", "refused-stream", "unavailable",
                                                             "cancelled", "retriable-status-codes", "503"]))

    public init(_ r: HTTPRetry) {
        attempts = r.attempts
        perTryTimeout = r.perTryTimeout
        on = Set(r.retryOn.filter { Int($0) == nil })
        statusCodes = Set(r.retryOn.compactMap { Int($0) })
    }

    public enum Decision: Sendable, Equatable {
        case deliver
        case retry(after: Duration)
        /// Retriable, but not allowed: the last outcome goes to the client.
        case giveUp(String)
    }

    /// Whether `outcome` is one the policy retries.
    public func isRetriable(_ outcome: AttemptOutcome) -> Bool {
        switch outcome {
        case .connectFailure:
            return on.contains("connect-failure") || on.contains("5xx") || on.contains("gateway-error")
        case .reset:
            return on.contains("reset") || on.contains("5xx")
        case .refusedStream:
            return on.contains("refused-stream") || on.contains("reset") || on.contains("5xx")
        case .perTryTimeout:
            return on.contains("5xx") || on.contains("gateway-error")
        case .response(let status, let grpc):
            if let g = grpc {
                switch g {
                case 1 where on.contains("cancelled"): return true
                case 4 where on.contains("deadline-exceeded"): return true
                case 8 where on.contains("resource-exhausted"): return true
                case 13 where on.contains("internal"): return true
                case 14 where on.contains("unavailable"): return true
                default: break
                }
            }
            if status >= 500 && on.contains("5xx") { return true }
            if [502, 503, 504].contains(status) && on.contains("gateway-error") { return true }
            if status == 409 && on.contains("retriable-4xx") { return true }
            // Istio turns numeric retryOn entries into Envoy's retriable-status-codes.
            return statusCodes.contains(status)
        }
    }

    /// Decides after attempt number `retriesDone + 1`.
    /// - Parameters:
    ///   - bodyReplayable: the whole request body is still held, so a retry sends it again in full.
    ///   - budgetAllows: the cluster's retry budget (`connectionPool.http.maxRetries`) has room.
    ///   - random: uniformly random bits for the jitter.
    public func decide(_ outcome: AttemptOutcome, retriesDone: Int, bodyReplayable: Bool, budgetAllows: Bool,
                       random: UInt64) -> Decision {
        guard isRetriable(outcome) else { return .deliver }
        guard retriesDone < attempts else { return .giveUp("attempts exhausted") }
        guard bodyReplayable else { return .giveUp("the request body was not kept, so it cannot be sent again") }
        guard budgetAllows else { return .giveUp("retry budget exhausted") }
        // Full jitter: uniform in [0, min(max, base * 2^n)).
        let base = baseBackoff.clampedNanoseconds, cap = maxBackoff.clampedNanoseconds
        let ceiling = min(cap, base << min(UInt64(retriesDone), 20))
        return .retry(after: .nanoseconds(Int64(ceiling == 0 ? 0 : random % ceiling)))
    }
}
