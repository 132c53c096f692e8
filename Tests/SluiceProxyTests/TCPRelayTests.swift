import SluiceProxy
import XCTest

final class TCPRelayTests: XCTestCase {
    typealias A = TCPRelay.Action
    func chunk(_ id: UInt16, _ len: Int32 = 100) -> TCPRelay.Chunk { .init(buffer: id, length: len) }

    func testStartReadsBothSides() {
        var r = TCPRelay()
        XCTAssertEqual(r.start().array, [.receive(.downstream), .receive(.upstream)])
    }

    func testReceivedDataIsSentToTheOtherSideAndReadingContinues() {
        var r = TCPRelay()
        _ = r.start()
        XCTAssertEqual(r.received(from: .downstream, chunk(1)).array, [.send(.upstream, chunk(1)), .receive(.downstream)])
    }

    func testBackPressureStopsReadingWhileTwoChunksWait() {
        var r = TCPRelay()
        _ = r.start()
        _ = r.received(from: .downstream, chunk(1))
        // Second chunk while the first is still being sent: queue it and stop reading the client.
        XCTAssertEqual(r.received(from: .downstream, chunk(2)).array, [])
        XCTAssertEqual(r.buffersHeld, 2)
        // First send done: release it, send the queued one, resume reading.
        XCTAssertEqual(r.sent(to: .upstream, bytes: 100).array,
                       [.release(1), .send(.upstream, chunk(2)), .receive(.downstream)])
    }

    func testPartialSendResendsTheRest() {
        var r = TCPRelay()
        _ = r.start()
        _ = r.received(from: .upstream, chunk(3, 1000))
        XCTAssertEqual(r.sent(to: .downstream, bytes: 400).array,
                       [.send(.downstream, .init(buffer: 3, offset: 400, length: 600))])
        XCTAssertEqual(r.sent(to: .downstream, bytes: 600).array, [.release(3)])
    }

    func testHalfCloseWaitsForPendingDataThenShutsDownWrite() {
        var r = TCPRelay()
        _ = r.start()
        _ = r.received(from: .downstream, chunk(1))
        XCTAssertEqual(r.receivedEOF(from: .downstream).array, [], "data still in flight")
        XCTAssertEqual(r.sent(to: .upstream, bytes: 100).array, [.release(1), .shutdownWrite(.upstream)])
        XCTAssertFalse(r.closed, "the other direction is still open")
        // Upstream answers after the half-close, then closes: the connection completes.
        XCTAssertEqual(r.received(from: .upstream, chunk(2)).array, [.send(.downstream, chunk(2)), .receive(.upstream)])
        XCTAssertEqual(r.sent(to: .downstream, bytes: 100).array, [.release(2)])
        XCTAssertEqual(r.receivedEOF(from: .upstream).array, [.shutdownWrite(.downstream), .close(reset: false)])
        XCTAssertTrue(r.closed)
    }

    func testFailureReleasesEveryHeldBuffer() {
        var r = TCPRelay()
        _ = r.start()
        _ = r.received(from: .downstream, chunk(1))
        _ = r.received(from: .downstream, chunk(2))
        _ = r.received(from: .upstream, chunk(3))
        XCTAssertEqual(r.failed(reset: true).array, [.release(1), .release(2), .release(3), .close(reset: true)])
        XCTAssertEqual(r.buffersHeld, 0)
        XCTAssertEqual(r.failed(reset: true).array, [], "closing twice does nothing")
        XCTAssertEqual(r.received(from: .upstream, chunk(4)).array, [.release(4)], "late data is dropped")
    }

    func testStalledReceiveResumesOnlyWhenAllowed() {
        var r = TCPRelay()
        _ = r.start()
        r.receiveStalled(.downstream)
        XCTAssertEqual(r.resumeReceive(.downstream).array, [.receive(.downstream)])
        XCTAssertEqual(r.resumeReceive(.downstream).array, [], "already receiving")
        _ = r.receivedEOF(from: .upstream)
        XCTAssertEqual(r.resumeReceive(.upstream).array, [], "no reads after EOF")
    }
}
