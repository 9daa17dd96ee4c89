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

    /// A batch whose frames were all let go is followed by one on the same frames (a working
    /// set of one batch); while the last batch's first frame is held, the pool goes on round
    /// its slots and never writes under the holder.
    func testABatchReusesTheLastBatchsFramesOnceTheyAreGone() {
        var pool = FramePool(frames: 8, frameCapacity: 64)
        func batch(_ n: Int) -> [UnsafeMutableRawPointer] {
            pool.beginBatch()
            return (0..<n).map { _ in pool.allocate(count: 4).bytes }   // each frame dropped at once
        }
        let first = batch(3)
        XCTAssertEqual(batch(3), first, "the frames were gone: the same three again")
        XCTAssertEqual(batch(2), Array(first.prefix(2)))

        pool.beginBatch()
        let (held, heldBytes, _) = pool.allocate(count: 4)
        heldBytes.storeBytes(of: 0x0102_0304 as UInt32, as: UInt32.self)
        XCTAssertEqual(heldBytes, first[0])
        let next = batch(3)
        XCTAssertEqual(next, [first[1], first[2]] + [next[2]], "on round the slots after the held frame")
        XCTAssertFalse(next.contains(heldBytes), "the held frame is not handed out again")
        XCTAssertEqual(held.bytes, [4, 3, 2, 1], "its bytes are untouched")
        let after = batch(1)
        XCTAssertEqual(after, [next[0]], "the batch after starts where the last began, its frames gone")
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
