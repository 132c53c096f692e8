import Foundation
import SluiceModel
import SluiceTestSupport
import XCTest

/// `JSONValue.data` is hand-written for speed: it must write exactly what `JSONEncoder` (sorted keys, slashes
/// unescaped) writes, and what it writes must parse back to the same document.
final class JSONValueTests: XCTestCase {
    static let seed = UInt64(ProcessInfo.processInfo.environment["SLUICE_TEST_SEED"] ?? "") ?? UInt64.random(in: 1...UInt64.max)

    func testTheWriterMatchesJSONEncoderOnRandomDocuments() throws {
        print("JSONValueTests seed \(Self.seed) (SLUICE_TEST_SEED=\(Self.seed) repeats it)")
        var rng = SeededRandom(seed: Self.seed)
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.sortedKeys, .withoutEscapingSlashes]
        // Characters that need escaping, multi-byte ones, and ones that sort unusually.
        let alphabet: [String] = ["a", "Z", "0", "9", "-", ".", "/", "\"", "\\", "\n", "\r", "\t", "\u{8}", "\u{c}", "\u{1}",
                                  "\u{1f}", "\u{7f}", "é", "e\u{301}", "😀", "\u{2028}", " ", "_"]
        func string() -> String {
            String((0..<Int.random(in: 0...8, using: &rng)).map { _ in alphabet.randomElement(using: &rng)! }.joined())
        }
        func value(_ depth: Int) -> JSONValue {
            switch Int.random(in: 0..<(depth > 3 ? 6 : 8), using: &rng) {
            case 0: return .null
            case 1: return .bool(Bool.random(using: &rng))
            case 2: return .int(Int64.random(in: Int64.min...Int64.max, using: &rng) >> Int64.random(in: 0...63, using: &rng))
            case 3:
                let d = [0.1, 1.5, 2.0, 1e21, 1e-7, 1e15, 1e16, 123456789.125, 3e300, .leastNonzeroMagnitude]
                    .randomElement(using: &rng)! * (Bool.random(using: &rng) ? 1 : -3)
                return .double(d)
            case 4, 5: return .string(string())
            case 6: return .array((0..<Int.random(in: 0...4, using: &rng)).map { _ in value(depth + 1) })
            default:
                var o: [String: JSONValue] = [:]
                for _ in 0..<Int.random(in: 0...5, using: &rng) { o[string()] = value(depth + 1) }
                return .object(o)
            }
        }
        for i in 0..<2_000 {
            let v = value(0)
            let mine = v.data
            XCTAssertEqual(String(decoding: mine, as: UTF8.self), String(decoding: try encoder.encode(v), as: UTF8.self),
                           "document \(i), seed \(Self.seed)")
            // Parsed back, it is the same document (a double the parser reads as an integer, such as 1e+16, is
            // written as one from then on).
            let once = try JSONValue(parsing: mine)
            XCTAssertEqual(try JSONValue(parsing: once.data), once, "document \(i) does not round-trip, seed \(Self.seed)")
            if !String(decoding: mine, as: UTF8.self).contains("e+") { XCTAssertEqual(once.data, mine, "document \(i), seed \(Self.seed)") }
        }
    }
}
