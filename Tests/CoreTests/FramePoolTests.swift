import Core
import XCTest

final class FramePoolTests: XCTestCase {
    /// A frame comes back to the pool only when every copy of it is gone: its bytes are then
    /// handed out again; a frame still held is never written under its holder.
    func testAFrameIsReusedOnlyWhenNoCopyIsLeft() {
        var pool = FramePool(frames: 2, frameCapacity: 64)
        var (first, bytes, reused) = pool.allocate(count: 4)
        XCTAssertFalse(reused, "a new pool has nothing to reuse")
        bytes.storeBytes(of: 0xdead_beef as UInt32, as: UInt32.self)
        let held = first   // a holder downstream
        first = EthernetFrame(count: 0)
        _ = pool.allocate(count: 8)   // the second slot
        let again = pool.allocate(count: 4)
        XCTAssertFalse(again.reused, "the first frame is still held: it gets a new frame")
        XCTAssertNotEqual(again.bytes, bytes)
        XCTAssertEqual(held.bytes, [0xef, 0xbe, 0xad, 0xde], "the holder's bytes are untouched")

        // Everything let go: the pool's frames come round again, bytes and all.
        var pool2 = FramePool(frames: 1, frameCapacity: 64)
        do {
            let (frame, p, _) = pool2.allocate(count: 3)
            p.initializeMemory(as: UInt8.self, from: [1, 2, 3], count: 3)
            XCTAssertEqual(frame.bytes, [1, 2, 3])
        }
        let (frame, p, reusedNow) = pool2.allocate(count: 2, offload: FrameOffload(checksum: .validated), queue: 3)
        XCTAssertTrue(reusedNow)
        XCTAssertEqual(frame.bytes, [1, 2], "the count is the new one, the bytes the frame held")
        XCTAssertEqual(frame.offload.checksum, .validated)
        XCTAssertEqual(frame.queue, 3)
        XCTAssertNotNil(p)
    }

    /// A frame longer than the pool's frames is allocated for its own, whole.
    func testALongFrameIsAllocatedForItsOwn() {
        var pool = FramePool(frames: 4, frameCapacity: 16)
        let (frame, bytes, reused) = pool.allocate(count: 100)
        XCTAssertFalse(reused)
        bytes.initializeMemory(as: UInt8.self, repeating: 7, count: 100)
        XCTAssertEqual(frame.count, 100)
        XCTAssertEqual(frame.bytes, [UInt8](repeating: 7, count: 100))
    }
}
