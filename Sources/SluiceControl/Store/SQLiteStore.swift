import Foundation
import GRDB
import SluiceModel

/// The embedded store: one SQLite file (WAL), one row per object and a bounded change log.
///
/// Durability: every commit is one transaction; with WAL and `synchronous=NORMAL` a committed transaction survives
/// the process being killed (the WAL pages are in the kernel before `COMMIT` returns), and may be lost only to a
/// power failure of the host since the last checkpoint. `sqlite:PATH?sync=full` makes every commit wait for the
/// disk (`synchronous=FULL`) for hosts where that matters more than write rate.
public final class SQLiteStore: ConfigStore, @unchecked Sendable {
    // @unchecked: `pool` is GRDB's thread-safe DatabasePool; the other members are immutable.
    let pool: DatabasePool
    public let location: String
    /// How many change-log entries are kept (older ones are dropped as new ones come).
    let keepChanges: Int64

    /// Opens (creating if needed) the store at `path`.
    public init(path: String, fullSync: Bool = false, keepChanges: Int64 = 10_000) throws {
        location = "sqlite:\(path)"
        self.keepChanges = keepChanges
        var config = Configuration()
        config.prepareDatabase { db in
            try db.execute(sql: fullSync ? "PRAGMA synchronous = FULL" : "PRAGMA synchronous = NORMAL")
        }
        config.busyMode = .timeout(5)
        do {
            pool = try DatabasePool(path: path, configuration: config)
            try pool.write { db in
                try db.execute(sql: """
                    CREATE TABLE IF NOT EXISTS objects (
                        grp TEXT NOT NULL, resource TEXT NOT NULL, namespace TEXT NOT NULL, name TEXT NOT NULL,
                        revision INTEGER NOT NULL, body BLOB NOT NULL,
                        PRIMARY KEY (grp, resource, namespace, name)) WITHOUT ROWID;
                    CREATE TABLE IF NOT EXISTS changes (
                        revision INTEGER PRIMARY KEY, type TEXT NOT NULL,
                        grp TEXT NOT NULL, resource TEXT NOT NULL, namespace TEXT NOT NULL, name TEXT NOT NULL,
                        body BLOB NOT NULL);
                    CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
                    """)
            }
        } catch {
            throw StoreError("cannot open the store at \(path): \(error)")
        }
    }

    /// `sqlite:PATH[?sync=full]`.
    public convenience init(url: String) throws {
        guard url.hasPrefix("sqlite:") else { throw StoreError("--store '\(url)' is not sqlite:PATH") }
        var rest = String(url.dropFirst("sqlite:".count))
        var full = false
        if let q = rest.firstIndex(of: "?") {
            let query = rest[rest.index(after: q)...]
            guard query == "sync=full" || query == "sync=normal" else {
                throw StoreError("--store: unknown option '\(query)' (sync=full or sync=normal)")
            }
            full = query == "sync=full"
            rest = String(rest[..<q])
        }
        guard !rest.isEmpty else { throw StoreError("--store '\(url)' names no file") }
        try self.init(path: rest, fullSync: full)
    }

    public func load() throws -> StoreContents {
        try pool.read { db in
            var objects: [StoredObject] = []
            for row in try Row.fetchAll(db, sql: "SELECT grp, resource, namespace, name, revision, body FROM objects") {
                let key = StoreKey(group: row[0], resource: row[1], namespace: row[2], name: row[3])
                objects.append(StoredObject(key: key, object: try Self.decode(row[5], key), revision: row[4]))
            }
            var changes: [StoreChange] = []
            let sql = "SELECT revision, type, grp, resource, namespace, name, body FROM changes ORDER BY revision"
            for row in try Row.fetchAll(db, sql: sql) {
                let key = StoreKey(group: row[2], resource: row[3], namespace: row[4], name: row[5])
                guard let kind = StoreChange.Kind(rawValue: row[1]) else {
                    throw StoreError("change \(row[0] as Int64) has an unknown type '\(row[1] as String)'")
                }
                changes.append(StoreChange(kind: kind, object: StoredObject(key: key, object: try Self.decode(row[6], key),
                                                                             revision: row[0])))
            }
            let revision = try Int64.fetchOne(db, sql: "SELECT value FROM meta WHERE key = 'revision'") ?? 0
            return StoreContents(objects: objects, revision: revision, changes: changes)
        }
    }

    public func commit(_ change: StoreChange) throws {
        let o = change.object, k = o.key
        let body = o.object.data
        // Cached statements: SQLite parses each statement once per connection, not once per write.
        try pool.write { db in
            let current = try Int64.fetchOne(db.cachedStatement(sql: "SELECT value FROM meta WHERE key = 'revision'")) ?? 0
            guard change.revision == current + 1 else {
                throw StoreError("revision \(change.revision) does not follow the stored revision \(current)")
            }
            switch change.kind {
            case .added, .modified:
                try db.cachedStatement(sql: """
                    INSERT INTO objects (grp, resource, namespace, name, revision, body) VALUES (?, ?, ?, ?, ?, ?)
                    ON CONFLICT (grp, resource, namespace, name) DO UPDATE SET revision = excluded.revision, body = excluded.body
                    """).execute(arguments: [k.group, k.resource, k.namespace, k.name, o.revision, body])
            case .deleted:
                try db.cachedStatement(sql: "DELETE FROM objects WHERE grp = ? AND resource = ? AND namespace = ? AND name = ?")
                    .execute(arguments: [k.group, k.resource, k.namespace, k.name])
            }
            try db.cachedStatement(sql: "INSERT INTO changes (revision, type, grp, resource, namespace, name, body) VALUES (?, ?, ?, ?, ?, ?, ?)")
                .execute(arguments: [o.revision, change.kind.rawValue, k.group, k.resource, k.namespace, k.name, body])
            try db.cachedStatement(sql: "INSERT INTO meta (key, value) VALUES ('revision', ?) ON CONFLICT (key) DO UPDATE SET value = excluded.value")
                .execute(arguments: [o.revision])
            // Drop the oldest log entries in batches rather than one per write.
            if o.revision % 256 == 0 {
                try db.execute(sql: "DELETE FROM changes WHERE revision <= ?", arguments: [o.revision - keepChanges])
            }
        }
    }

    static func decode(_ body: Data, _ key: StoreKey) throws -> JSONValue {
        do { return try JSONValue(parsing: body) } catch {
            throw StoreError("stored object \(key) is not valid JSON: \(error)")
        }
    }
}
