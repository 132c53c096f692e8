import Foundation
import SluiceModel
import SluiceTestSupport
import XCTest
@testable import SluiceControl

/// The config API's pure parts: YAML to JSON as kubectl sends it, the two patch formats, label selectors.
final class ConfigAPIUnitTests: XCTestCase {
    /// `creationTimestamp` is formatted by hand: it must read as ISO8601DateFormatter's internet date-time in UTC.
    func testCreationTimestampsAreRFC3339InUTC() {
        let f = ISO8601DateFormatter()
        f.formatOptions = [.withInternetDateTime]
        let seed = ProcessInfo.processInfo.environment["SEED"].flatMap(UInt64.init) ?? UInt64.random(in: 1...UInt64.max)
        print("timestamp seed \(seed) (SEED=\(seed) repeats it)")
        var rng = SeededRandom(seed: seed)
        for t in [0, 951_782_400, 1_700_000_000.9, 4_102_444_799] + (0..<200).map({ _ in Double.random(in: 0..<4_102_444_800, using: &rng) }) {
            let d = Date(timeIntervalSince1970: t)
            XCTAssertEqual(MeshState.timestamp(d), f.string(from: Date(timeIntervalSince1970: t.rounded(.down))), "\(t)")
        }
    }

    func testYAMLScalarsAreTypedAsKubectlSendsThem() throws {
        let docs = try JSONValue.documents(yaml: """
            a: 10
            b: "10"
            c: true
            d: 'true'
            e: 1.5
            f: ~
            g: [x, 2]
            ---
            ---
            h: {}
            """)
        XCTAssertEqual(docs.count, 2)
        XCTAssertEqual(docs[0]["a"], .int(10))
        XCTAssertEqual(docs[0]["b"], .string("10"))
        XCTAssertEqual(docs[0]["c"], .bool(true))
        XCTAssertEqual(docs[0]["d"], .string("true"))
        XCTAssertEqual(docs[0]["e"], .double(1.5))
        XCTAssertEqual(docs[0]["f"], .null)
        XCTAssertEqual(docs[0]["g"], .array(["x", .int(2)]))
        // JSON text round-trips, keys sorted.
        XCTAssertEqual(try JSONValue(parsing: docs[0].data), docs[0])
        XCTAssertEqual(JSONValue.object(["b": .int(1), "a": .bool(false)]).text, #"{"a":false,"b":1}"#)
        XCTAssertThrowsError(try JSONValue.documents(yaml: "a: [1"))
        // YAML output reads back as the same value.
        XCTAssertEqual(try JSONValue.documents(yaml: docs[0].yaml), [docs[0]])
    }

    func testMergePatchFollowsRFC7386() throws {
        let target = try JSONValue(parsing: Data(#"{"a":"b","c":{"d":"e","f":"g"}}"#.utf8))
        let patch = try JSONValue(parsing: Data(#"{"a":"z","c":{"f":null}}"#.utf8))
        XCTAssertEqual(JSONPatch.merge(target, patch).text, #"{"a":"z","c":{"d":"e"}}"#)
    }

    func testJSONPatchOperationsAndFailures() throws {
        let doc = try JSONValue(parsing: Data(#"{"a":[1,2],"b":{"c":1}}"#.utf8))
        func ops(_ s: String) throws -> JSONValue { try JSONValue(parsing: Data(s.utf8)) }
        XCTAssertEqual(try JSONPatch.apply(doc, ops(#"[{"op":"add","path":"/a/-","value":3},{"op":"remove","path":"/b/c"}]"#)).text,
                       #"{"a":[1,2,3],"b":{}}"#)
        XCTAssertEqual(try JSONPatch.apply(doc, ops(#"[{"op":"move","from":"/b/c","path":"/d"},{"op":"copy","from":"/d","path":"/e"}]"#)).text,
                       #"{"a":[1,2],"b":{},"d":1,"e":1}"#)
        XCTAssertEqual(try JSONPatch.apply(doc, ops(#"[{"op":"replace","path":"/a~1x","value":1}]"#.replacingOccurrences(of: "a~1x", with: "a/0"))).text,
                       #"{"a":[1,2],"b":{"c":1}}"#)
        for bad in [#"[{"op":"test","path":"/b/c","value":2}]"#, #"[{"op":"remove","path":"/zz"}]"#,
                    #"[{"op":"add","path":"/a/9","value":1}]"#, #"[{"op":"frob","path":"/a"}]"#, #"{"op":"add"}"#] {
            XCTAssertThrowsError(try JSONPatch.apply(doc, ops(bad)), bad)
        }
    }

    func testLabelSelectors() throws {
        let labels = ["app": "reviews", "version": "v2"]
        for (s, expected) in [("app=reviews", true), ("app==reviews,version!=v1", true), ("version in (v1, v2)", true),
                              ("version notin (v2)", false), ("app", true), ("!app", false), ("tier", false), ("", true)] {
            XCTAssertEqual(try LabelSelector(s).matches(labels), expected, s)
        }
        XCTAssertThrowsError(try LabelSelector("a b"))
    }

    func testStoreCommitsAreDurableAndOrdered() throws {
        let path = NSTemporaryDirectory() + "sluice-store-\(UUID().uuidString).db"
        defer { for s in ["", "-wal", "-shm"] { try? FileManager.default.removeItem(atPath: path + s) } }
        let store = try SQLiteStore(path: path)
        let key = StoreKey(group: "networking.istio.io", resource: "virtualservices", namespace: "a", name: "b")
        try store.commit(StoreChange(kind: .added, object: StoredObject(key: key, object: ["x": .int(1)], revision: 1)))
        XCTAssertThrowsError(try store.commit(StoreChange(kind: .modified, object: StoredObject(key: key, object: [:], revision: 5))),
                             "a revision that does not follow is refused")
        try store.commit(StoreChange(kind: .deleted, object: StoredObject(key: key, object: ["x": .int(1)], revision: 2)))
        let reopened = try SQLiteStore(path: path).load()
        XCTAssertEqual(reopened.revision, 2)
        XCTAssertTrue(reopened.objects.isEmpty)
        XCTAssertEqual(reopened.changes.map(\.kind), [.added, .deleted])
    }
}

extension JSONValue: ExpressibleByDictionaryLiteral {
    public init(dictionaryLiteral elements: (String, JSONValue)...) {
        self = .object(Dictionary(elements, uniquingKeysWith: { a, _ in a }))
    }
}
