import Foundation
import Synchronization

/// Nodes an operator deleted (`sluice delete node NAME`, as `kubectl delete node`): a deleted node's certificate opens
/// no agent stream and renews no certificate until the node joins again with a new join token.
///
/// Kept in `STATE_DIR/deleted-nodes` (one name per line) beside the CA's key rather than in the mesh store: it is a
/// fact about identity, as the join tokens are, and it must hold across restarts or a restart would undo a deletion.
public final class DeletedNodes: Sendable {
    let path: String?
    private let names: Mutex<Set<String>>

    /// An empty list kept in memory only.
    public init() {
        path = nil
        names = Mutex([])
    }

    /// Reads the list kept at `path` (none yet: empty).
    public init(path: String) throws {
        self.path = path
        var names: Set<String> = []
        if FileManager.default.fileExists(atPath: path) {
            let text = try String(contentsOfFile: path, encoding: .utf8)
            names = Set(text.split(separator: "\n").map { $0.trimmingCharacters(in: .whitespaces) }.filter { !$0.isEmpty })
        }
        self.names = Mutex(names)
    }

    public func contains(_ node: String) -> Bool { names.withLock { $0.contains(node) } }

    /// Marks `node` deleted (saved before this returns). False when it already was.
    public func insert(_ node: String) throws -> Bool {
        try names.withLock { n in
            guard !n.contains(node) else { return false }
            var next = n
            next.insert(node)
            try save(next)
            n = next
            return true
        }
    }

    /// The node joined again: it is a member once more.
    public func remove(_ node: String) throws {
        try names.withLock { n in
            guard n.contains(node) else { return }
            var next = n
            next.remove(node)
            try save(next)
            n = next
        }
    }

    private func save(_ names: Set<String>) throws {
        guard let path else { return }
        try Data(names.sorted().map { $0 + "\n" }.joined().utf8).write(to: URL(fileURLWithPath: path), options: .atomic)
    }
}
