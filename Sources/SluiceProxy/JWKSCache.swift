import Foundation
import Synchronization

/// JSON Web Key Sets named by `jwksUri` (http(s) URLs), fetched off the data plane — as istiod resolves them for
/// Envoy — and kept: a runtime is built with the keys at hand, and ``refresh()`` (every few minutes, by the
/// agent's config thread) fetches them again so that a changed set rebuilds the runtime.
///
/// A set that cannot be fetched leaves its issuer without keys (its tokens fail with "Jwks remote fetch is
/// failed"); the last good set is kept when a refresh fails.
public final class JWKSCache: Sendable {
    public typealias Fetch = @Sendable (String) throws -> String

    private struct Entry {
        var text: String?
        var failedAt: ContinuousClock.Instant?
    }

    private let entries = Mutex<[String: Entry]>([:])
    private let fetch: Fetch
    /// How long a failed first fetch is not tried again when a runtime is built.
    private let retryAfter: Duration

    /// - Parameter fetch: GETs the URL and returns the body (throws on any failure or a status other than 200).
    public init(retryAfter: Duration = .seconds(30), fetch: @escaping Fetch) {
        self.fetch = fetch
        self.retryAfter = retryAfter
    }

    /// The set at `uri`: the one kept, else fetched now (on the caller's thread: the config thread).
    public func text(for uri: String) -> String? {
        let entry = entries.withLock { $0[uri] }
        if let text = entry?.text { return text }
        if let failed = entry?.failedAt, ContinuousClock.now - failed < retryAfter { return nil }
        do {
            let text = try fetch(uri)
            entries.withLock { $0[uri] = Entry(text: text) }
            return text
        } catch {
            entries.withLock { $0[uri] = Entry(text: nil, failedAt: .now) }
            return nil
        }
    }

    /// Fetches every set asked for again; returns whether one changed (or arrived for the first time).
    public func refresh() -> Bool {
        let uris = entries.withLock { Array($0.keys) }
        var changed = false
        for uri in uris {
            guard let text = try? fetch(uri) else { continue }
            let before = entries.withLock { e in
                defer { e[uri] = Entry(text: text) }
                return e[uri]?.text
            }
            if before != text { changed = true }
        }
        return changed
    }
}
