import XCTest

@testable import SluiceHTTP

final class StreamMapTests: XCTestCase {
    /// Random inserts, updates in place and removals agree with a Dictionary at every step.
    func testAgreesWithADictionary() {
        var rng = SystemRandomNumberGenerator()
        for _ in 0..<20 {
            var map = StreamMap<[Int]>()
            var reference: [Int32: [Int]] = [:]
            for _ in 0..<2000 {
                // Mostly odd ids near each other, as streams are, plus far ones that collide.
                let key = Int32.random(in: 0..<64, using: &rng) * 2 + 1 + (Bool.random() ? 0 : 4096)
                switch Int.random(in: 0..<4, using: &rng) {
                case 0:
                    map[key] = [Int(key)]
                    reference[key] = [Int(key)]
                case 1:
                    map[key]?.append(1)
                    reference[key]?.append(1)
                case 2:
                    XCTAssertEqual(map.removeValue(forKey: key), reference.removeValue(forKey: key))
                default:
                    map[key] = nil
                    reference[key] = nil
                }
                XCTAssertEqual(map.count, reference.count)
            }
            for (k, v) in reference { XCTAssertEqual(map[k], v) }
            XCTAssertEqual(Dictionary(uniqueKeysWithValues: map.map { ($0.key, $0.value) }), reference)
        }
    }

    func testUpdatesInPlaceDoNotCopyTheValue() {
        var map = StreamMap<[UInt8]>()
        map[1] = []
        map[1]!.reserveCapacity(1 << 20)
        let before = map[1]!.capacity
        for _ in 0..<1000 { map[1]!.append(7) }
        XCTAssertEqual(map[1]!.capacity, before, "the buffer was copied")
        map.removeAll()
        XCTAssertTrue(map.isEmpty)
        XCTAssertNil(map[1])
    }
}
