import Foundation
import SluiceModel
import SluiceTestSupport
import XCTest

/// Hostile and malformed input: every case ends in diagnostics, never a crash or a hang.
final class HostileInputTests: XCTestCase {
    func testDeepNestingIsABoundedError() {
        for depth in [200, 100_000] {
            let text = "apiVersion: networking.istio.io/v1\nkind: Gateway\nmetadata: {name: x}\nspec: "
                + String(repeating: "[", count: depth) + String(repeating: "]", count: depth) + "\n"
            let (resources, diagnostics) = ResourceDecoder.decode(text, file: "deep.yaml")
            XCTAssertEqual(resources.count, 0)
            XCTAssertTrue(diagnostics.contains { $0.severity == .error }, "depth \(depth)")
        }
        let (_, diagnostics) = ResourceDecoder.decode(
            "spec: " + String(repeating: "[", count: 1000) + String(repeating: "]", count: 1000), file: "deep.yaml")
        XCTAssertEqual(diagnostics.map(\.message), ["not valid YAML: nesting is deeper than 256 levels"])
    }

    func testAliasesWithinBudgetResolve() throws {
        let text = """
            apiVersion: networking.istio.io/v1
            kind: WorkloadEntry
            metadata: {name: a, labels: &labels {app: ratings, version: v1}}
            spec: {address: 10.0.0.1, labels: *labels}
            """
        let (resources, diagnostics) = ResourceDecoder.decode(text, file: "alias.yaml")
        XCTAssertEqual(diagnostics, [])
        guard case .workloadEntry(let we)? = resources.first?.spec else { return XCTFail("\(resources)") }
        XCTAssertEqual(we.labels, ["app": "ratings", "version": "v1"])
        XCTAssertEqual(resources[0].metadata.labels, we.labels)
    }

    func testAliasBombIsABoundedError() {
        // Eleven levels of ten-fold aliases: 10^11 nodes if anything expanded them.
        var text = "apiVersion: networking.istio.io/v1\nkind: Gateway\nmetadata: {name: x}\nx-bomb:\n"
        text += "  a0: &a0 [x, x, x, x, x, x, x, x, x, x]\n"
        for i in 1..<12 { text += "  a\(i): &a\(i) [" + Array(repeating: "*a\(i - 1)", count: 10).joined(separator: ", ") + "]\n" }
        text += "spec:\n  servers: *a11\n"
        let start = Date()
        let (resources, diagnostics) = ResourceDecoder.decode(text, file: "bomb.yaml")
        XCTAssertEqual(resources.count, 0)
        XCTAssertEqual(diagnostics.map(\.message), ["not valid YAML: aliases expand to more than 100000 nodes"])
        XCTAssertLessThan(Date().timeIntervalSince(start), 2)
    }

    func testInvalidUTF8AndOversizedFilesAreClearErrors() throws {
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("sluice-hostile-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(at: dir) }
        try Data([0x6B, 0x69, 0x6E, 0x64, 0x3A, 0x20, 0xFF, 0xFE, 0x0A]).write(to: dir.appendingPathComponent("bad.yaml"))
        try Data(count: ResourceDecoder.maxFileBytes + 1).write(to: dir.appendingPathComponent("huge.yaml"))
        let result = ConfigLoader.load(path: dir.path)
        XCTAssertEqual(result.errors.map(\.message).sorted(),
                       ["file is larger than 16 MiB", "file is not valid UTF-8"])
    }

    /// Random mutations of a valid mesh (byte flips, insertions, deletions, line shuffles, truncation): decoding
    /// and compiling must only ever produce resources or diagnostics. Seeded, so a failure reproduces.
    func testRandomMutationsNeverCrash() {
        let base = Array(Fixtures.smallMesh.utf8)
        var rng = SeededRandom(seed: 0x5EED)
        let alphabet = Array(" \n:-[]{}&*!|>'\"#%@`,?0123456789abcdefghijklmnopqrstuvwxyz".utf8)
        var errors = 0
        for round in 0..<3000 {
            var bytes = base
            for _ in 0..<(1 + Int(rng.next() % 6)) {
                let pos = Int(rng.next() % UInt64(max(1, bytes.count)))
                switch rng.next() % 6 {
                case 0: bytes[pos] = alphabet[Int(rng.next() % UInt64(alphabet.count))]
                case 1: bytes.insert(alphabet[Int(rng.next() % UInt64(alphabet.count))], at: pos)
                case 2: bytes.remove(at: pos)
                case 3: bytes = Array(bytes[..<pos])
                case 4:
                    var lines = bytes.split(separator: 10, omittingEmptySubsequences: false)
                    if lines.count > 2 {
                        let a = Int(rng.next() % UInt64(lines.count)), b = Int(rng.next() % UInt64(lines.count))
                        lines.swapAt(a, b)
                    }
                    bytes = Array(lines.joined(separator: [10]))
                default: bytes.insert(UInt8(truncatingIfNeeded: rng.next()), at: pos)
                }
                if bytes.isEmpty { bytes = [10] }
            }
            guard let text = String(validating: bytes, as: UTF8.self) else { continue }
            let (resources, diagnostics) = ResourceDecoder.decode(text, file: "fuzz-\(round).yaml")
            if diagnostics.contains(where: { $0.severity == .error }) { errors += 1 }
            for d in diagnostics { XCTAssertFalse(d.message.isEmpty) }
            _ = try? SnapshotCompiler().compile(resources)
        }
        XCTAssertGreaterThan(errors, 1000, "mutations should mostly be caught")
    }
}
