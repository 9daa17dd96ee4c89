import CXen
import Core
import XCTest

/// A ring of 8-byte requests and responses, to check io/ring.h's index arithmetic apart from
/// any device protocol.
enum WordRing: RingTypes {
    typealias Request = UInt64
    typealias Response = UInt64
    static var entrySize: Int { 8 }
}

final class SharedRingTests: XCTestCase {
    private var page: UnsafeMutableRawPointer!
    override func setUp() { page = .allocate(byteCount: 4096, alignment: 4096) }
    override func tearDown() { page.deallocate() }

    private func word(_ offset: Int) -> UInt32 { page.load(fromByteOffset: offset, as: UInt32.self) }
    private func setWord(_ offset: Int, _ v: UInt32) { page.storeBytes(of: v, toByteOffset: offset, as: UInt32.self) }

    func testRingSizesAreRingHsPowersOfTwo() {
        // __RING_SIZE: (bytes - 64) / entry, rounded down to a power of two.
        XCTAssertEqual(SharedRingLayout.entries(bytes: 4096, entrySize: MemoryLayout<blkif_sring_entry>.size), 32)
        XCTAssertEqual(SharedRingLayout.entries(bytes: 16 * 4096, entrySize: MemoryLayout<blkif_sring_entry>.size), 512)
        XCTAssertEqual(SharedRingLayout.entries(bytes: 4096, entrySize: 8), 256)   // (4096-64)/8 = 504 -> 256
        XCTAssertEqual(SharedRingLayout.entries(bytes: 64, entrySize: 8), 0)
    }

    func testInitialisationWritesTheHeaderAsSharedRingInit() {
        memset(page, 0xFF, 4096)
        _ = FrontRing<WordRing>(initializing: page, bytes: 4096)
        XCTAssertEqual([word(0), word(4), word(8), word(12)], [0, 1, 0, 1])   // req_prod, req_event, rsp_prod, rsp_event
        XCTAssertTrue((16..<64).allSatisfy { page.load(fromByteOffset: $0, as: UInt8.self) == 0 })
    }

    func testRequestsAndResponsesFlowAndWrapManyTimes() {
        var front = FrontRing<WordRing>(initializing: page, bytes: 4096)
        var back = BackRing<WordRing>(shared: page, bytes: 4096)
        XCTAssertEqual(front.size, 256)
        var next: UInt64 = 0, expected: UInt64 = 0
        for round in 0..<50 {
            let burst = UInt64(1 + round * 7 % 200)
            for _ in 0..<burst { front.putRequest(next); next += 1 }
            _ = front.pushRequests()
            XCTAssertEqual(back.unconsumedRequests(), UInt32(burst))
            while let n = back.unconsumedRequests(), n > 0 {
                let r = back.takeRequest()
                XCTAssertEqual(r, expected)
                back.putResponse(r * 3)
                expected += 1
            }
            _ = back.pushResponses()
            XCTAssertEqual(front.unconsumedResponses(), UInt32(burst))
            for i in 0..<burst { XCTAssertEqual(front.takeResponse(), (expected - burst + i) * 3) }
            XCTAssertEqual(front.freeRequests, 256)
        }
        XCTAssertGreaterThan(next, 256 * 10, "the indices wrapped the ring many times")
    }

    func testNotificationsFollowTheEventIndices() {
        var front = FrontRing<WordRing>(initializing: page, bytes: 4096)
        var back = BackRing<WordRing>(shared: page, bytes: 4096)
        front.putRequest(1)
        XCTAssertTrue(front.pushRequests(), "req_event = 1: the first request notifies")
        front.putRequest(2)
        XCTAssertFalse(front.pushRequests(), "the backend has not asked again: no notification")
        _ = back.takeRequest(); _ = back.takeRequest()
        XCTAssertEqual(back.finalCheckForRequests(), 0)
        XCTAssertEqual(word(4), 3, "final check asks for the request after the last taken")
        front.putRequest(3)
        XCTAssertTrue(front.pushRequests(), "the backend re-armed: notify")

        // A request published between the backend's last look and its final check is seen.
        _ = back.takeRequest()
        front.putRequest(4)
        _ = front.pushRequests()
        XCTAssertEqual(back.finalCheckForRequests(), 1)

        back.putResponse(10)
        XCTAssertTrue(back.pushResponses(), "rsp_event = 1: the first response notifies")
        back.putResponse(20)
        XCTAssertFalse(back.pushResponses())
        XCTAssertEqual(front.finalCheckForResponses(), 2)
        _ = front.takeResponse(); _ = front.takeResponse()
        XCTAssertEqual(front.finalCheckForResponses(), 0)
        back.putResponse(30)
        XCTAssertTrue(back.pushResponses(), "the frontend re-armed: notify")
    }

    func testAProducerIndexBeyondTheRingIsReportedNotFollowed() {
        _ = FrontRing<WordRing>(initializing: page, bytes: 4096)
        var back = BackRing<WordRing>(shared: page, bytes: 4096)
        setWord(0, 256)                          // a full ring: allowed
        XCTAssertEqual(back.unconsumedRequests(), 256)
        setWord(0, 257)                          // more than the ring holds: broken
        XCTAssertNil(back.unconsumedRequests())
        XCTAssertNil(back.finalCheckForRequests())
        setWord(0, 0xFFFF_FFF0)                  // "negative": broken too
        XCTAssertNil(back.unconsumedRequests())
    }

    func testTheBackendNeverTakesMoreThanThereIsRoomToAnswer() {
        var back = BackRing<WordRing>(shared: page, bytes: 4096)
        _ = FrontRing<WordRing>(initializing: page, bytes: 4096)
        setWord(0, 256)
        for _ in 0..<200 { _ = back.takeRequest() }
        // 200 taken, none answered: 56 more may be taken, whatever req_prod says within bounds.
        XCTAssertEqual(back.unconsumedRequests(), 56)
        for _ in 0..<56 { _ = back.takeRequest() }
        XCTAssertEqual(back.unconsumedRequests(), 0)
        for i in 0..<10 { back.putResponse(UInt64(i)) }
        _ = back.pushResponses()
        setWord(0, 266)                          // the frontend reuses the 10 answered slots
        XCTAssertEqual(back.unconsumedRequests(), 10)
    }

    /// putResponse(zeroed:) writes the whole response: bytes the fill leaves alone are zero,
    /// not what the slot held (the request, or anything else), and nothing past the response.
    func testAZeroedResponseSlotKeepsNoOldBytes() {
        var back = BackRing<PaddedRing>(shared: page, bytes: 4096)
        _ = FrontRing<PaddedRing>(initializing: page, bytes: 4096)
        let slot = page + SharedRingLayout.headerSize
        memset(slot, 0xAA, 2 * PaddedRing.entrySize)
        back.putResponse(zeroed: { $0.storeBytes(of: 0x11, toByteOffset: 0, as: UInt8.self) })
        XCTAssertEqual(Array(UnsafeRawBufferPointer(start: slot, count: PaddedRing.entrySize)),
                       [0x11, 0, 0, 0, 0, 0, 0, 0, 0xAA, 0xAA, 0xAA, 0xAA, 0xAA, 0xAA, 0xAA, 0xAA], "8 bytes of response, then the entry's rest")
        XCTAssertEqual(back.responseProducer, 1)
    }
}

/// A ring whose 8-byte responses sit in 16-byte entries, to see what a response write touches.
enum PaddedRing: RingTypes {
    typealias Request = (UInt64, UInt64)
    typealias Response = UInt64
    static var entrySize: Int { 16 }
}
