import CSluiceLinux
@testable import SluiceBPF
import SluiceModel
import XCTest

/// The Swift side of the structs shared with the BPF programs (the C side asserts the same sizes in
/// bpf/lib/types.h), and the slot tables the kernel picks backends from.
final class LayoutAndTableTests: XCTestCase {
    func testSharedStructLayoutsMatchTheBPFSide() {
        XCTAssertEqual(MemoryLayout<sl_service_key>.size, 8)
        XCTAssertEqual(MemoryLayout<sl_service_key>.offset(of: \.addr), 0)
        XCTAssertEqual(MemoryLayout<sl_service_key>.offset(of: \.port), 4)
        XCTAssertEqual(MemoryLayout<sl_service_key>.offset(of: \.proto), 6)
        XCTAssertEqual(MemoryLayout<sl_service>.size, 16)
        XCTAssertEqual(MemoryLayout<sl_service>.offset(of: \.slot_base), 0)
        XCTAssertEqual(MemoryLayout<sl_service>.offset(of: \.slots), 4)
        XCTAssertEqual(MemoryLayout<sl_service>.offset(of: \.action), 6)
        XCTAssertEqual(MemoryLayout<sl_service>.offset(of: \.lb), 7)
        XCTAssertEqual(MemoryLayout<sl_service>.offset(of: \.id), 8)
        XCTAssertEqual(MemoryLayout<sl_backend>.size, 8)
        XCTAssertEqual(MemoryLayout<sl_backend>.offset(of: \.port), 4)
        XCTAssertEqual(MemoryLayout<sl_config>.size, 12)
        XCTAssertEqual(MemoryLayout<sl_config>.offset(of: \.agent_port), 4)
        XCTAssertEqual(MemoryLayout<sl_config>.offset(of: \.dns_port), 6)
        XCTAssertEqual(MemoryLayout<sl_config>.offset(of: \.flags), 8)
        XCTAssertEqual(MemoryLayout<sl_original_dst>.size, 16)
        XCTAssertEqual(MemoryLayout<sl_original_dst>.offset(of: \.flags), 6)
        XCTAssertEqual(MemoryLayout<sl_original_dst>.offset(of: \.cgroup_id), 8)
        XCTAssertEqual(MemoryLayout<sl_peer_key>.size, 8)
        XCTAssertEqual(MemoryLayout<sl_peer_key>.offset(of: \.port), 4)
        XCTAssertEqual(MemoryLayout<sl_cidr_key>.size, 8)
        XCTAssertEqual(MemoryLayout<sl_cidr_key>.offset(of: \.addr), 4)
        XCTAssertEqual(MemoryLayout<sl_service_key6>.size, 20)
        XCTAssertEqual(MemoryLayout<sl_service_key6>.offset(of: \.port), 16)
        XCTAssertEqual(MemoryLayout<sl_backend6>.size, 20)
        XCTAssertEqual(MemoryLayout<sl_original_dst6>.size, 32)
        XCTAssertEqual(MemoryLayout<sl_original_dst6>.offset(of: \.cgroup_id), 24)
    }

    static func entry(_ weights: [UInt32], lb: NodeSnapshot.BPFService.LoadBalancing) -> NodeSnapshot.BPFService {
        let backends = weights.enumerated().map { i, w in
            NodeSnapshot.BPFService.Backend(address: EndpointAddress(parsing: "10.0.0.\(i + 1):80")!, weight: w)
        }
        return NodeSnapshot.BPFService(address: EndpointAddress(parsing: "10.96.0.1:80")!, protocol: .tcp, host: "h",
                                       action: .balance(loadBalancing: lb, backends: backends))
    }

    static func v4(_ t: Datapath.SlotTable) -> [sl_backend] {
        if case .v4(let b) = t { return b }
        return []
    }

    func testRandomTablesApportionSlotsByWeight() {
        let table = Self.v4(Datapath.slotTable(Self.entry([1, 2, 3], lb: .random)))
        XCTAssertEqual(table.count, 96)
        let counts = Dictionary(grouping: table, by: { $0.addr }).mapValues(\.count)
        XCTAssertEqual(counts.values.sorted(), [16, 32, 48])
        XCTAssertEqual(table[0].port, UInt16(80).bigEndian, "ports in network order, as connect4 writes them")
        // Uneven weights: largest remainders get the spare slots, total stays exact.
        let odd = Self.v4(Datapath.slotTable(Self.entry([1, 1, 1, 7], lb: .random)))
        XCTAssertEqual(odd.count, 128)
        XCTAssertEqual(Dictionary(grouping: odd, by: { $0.addr }).mapValues(\.count).values.sorted(), [13, 13, 13, 89])
    }

    func testMaglevTablesArePrimeSizedAndWeighted() {
        let table = Self.v4(Datapath.slotTable(Self.entry([1, 3], lb: .maglev)))
        XCTAssertEqual(table.count, 211, "the smallest prime >= 100 x backends")
        let share = Double(table.filter { $0.addr == table.max { $0.addr < $1.addr }!.addr }.count) / 211
        XCTAssertEqual(share, 0.75, accuracy: 0.02)
    }

    func testBackendsOfTheOtherFamilyAreLeftOut() {
        let backends = [NodeSnapshot.BPFService.Backend(address: EndpointAddress(parsing: "[fd00::1]:80")!, weight: 1),
                        NodeSnapshot.BPFService.Backend(address: EndpointAddress(parsing: "10.0.0.1:80")!, weight: 1)]
        let six = NodeSnapshot.BPFService(address: EndpointAddress(parsing: "[fd99::1]:80")!, protocol: .tcp, host: "h",
                                          action: .balance(loadBalancing: .random, backends: backends))
        guard case .v6(let table) = Datapath.slotTable(six) else { return XCTFail() }
        XCTAssertEqual(table.count, 32, "one IPv6 backend, 32 slots")
        XCTAssertEqual(table[0].port, UInt16(80).bigEndian)
    }

    func testSlotAllocatorReusesFreedRangesAndCoalesces() {
        var a = SlotAllocator(capacity: 100)
        let x = a.allocate(30)!, y = a.allocate(30)!, z = a.allocate(30)!
        XCTAssertEqual([x, y, z], [0, 30, 60])
        XCTAssertNil(a.allocate(11))
        a.release(30..<60)
        XCTAssertEqual(a.allocate(20), 30, "first fit")
        a.release(0..<30)
        a.release(30..<50)
        a.release(60..<90)
        XCTAssertEqual(a.free, [0..<100], "neighbours merge back into one range")
        a.reserve(40..<45)
        XCTAssertEqual(a.free, [0..<40, 45..<100])
        XCTAssertEqual(a.available, 95)
    }
}
