import Core
@testable import Devices
import Dispatch
import Glibc
import Synchronization
import XCTest

final class MemoryDeviceTests: XCTestCase {
    let chunk: UInt64 = 64 * 1024

    func testWritesAcrossChunksReadBack() throws {
        let memory = MemoryDevice(size: 1 << 20)
        let data = TestBuffer(count: 3 * 4096 + 512, pattern: 9)
        try memory.write(from: data.buffers, at: chunk - 4096, fua: false)
        XCTAssertEqual(try memory.readBytes(data.count, at: chunk - 4096), TestBuffer.expected(data.count, 9))
        XCTAssertEqual(try memory.readBytes(512, at: 0), [UInt8](repeating: 0, count: 512), "holes read as zeroes")
        XCTAssertEqual(memory.allocatedChunks, 2)
    }

    func testSubmitCompletesWithTheData() {
        let memory = MemoryDevice(size: 1 << 20)
        let data = TestBuffer(count: 8192, pattern: 3)
        XCTAssertEqual(memory.submitAndWait(memory.writeRequest(data, at: 4096)), .success)
        let back = TestBuffer(count: 8192)
        XCTAssertEqual(memory.submitAndWait(memory.readRequest(back, at: 4096)), .success)
        XCTAssertEqual(back.bytes, data.bytes)
    }

    func testExtentsReportHolesAndDataByChunk() throws {
        let memory = MemoryDevice(size: 1 << 20)
        try memory.writePattern(4096, seed: 1, at: 0, fua: false)
        try memory.writePattern(4096, seed: 2, at: 3 * chunk + 512, fua: false)
        XCTAssertEqual(try memory.extents(at: 0, length: 1 << 20), [
            BlockExtent(offset: 0, length: chunk, isHole: false, isZero: false),
            BlockExtent(offset: chunk, length: 2 * chunk, isHole: true, isZero: true),
            BlockExtent(offset: 3 * chunk, length: chunk, isHole: false, isZero: false),
            BlockExtent(offset: 4 * chunk, length: (1 << 20) - 4 * chunk, isHole: true, isZero: true),
        ])
        XCTAssertEqual(try memory.extents(at: 4096, length: 8192), [BlockExtent(offset: 4096, length: 8192, isHole: false, isZero: false)])

        // Discarding a whole chunk frees it; zeroing the only data of a chunk frees it too.
        try memory.discard(at: 3 * chunk, length: chunk)
        try memory.writeZeroes(at: 0, length: 4096, mayDiscard: false)
        XCTAssertEqual(memory.allocatedChunks, 0)
        XCTAssertEqual(try memory.extents(at: 0, length: 1 << 20), [BlockExtent(offset: 0, length: 1 << 20, isHole: true, isZero: true)])
    }

    func testPartialZeroKeepsTheRestOfTheChunk() throws {
        let memory = MemoryDevice(size: 1 << 20)
        try memory.writePattern(8192, seed: 5, at: 0, fua: false)
        try memory.writeZeroes(at: 0, length: 4096, mayDiscard: true)
        XCTAssertEqual(try memory.readBytes(4096, at: 0), [UInt8](repeating: 0, count: 4096))
        XCTAssertEqual(try memory.readBytes(4096, at: 4096), Array(TestBuffer.expected(8192, 5)[4096...]))
        XCTAssertEqual(memory.allocatedChunks, 1)
    }

    func testConcurrentWritersDoNotLoseData() throws {
        // 64 writers at once, each 68 KiB every 96 KiB: each write spans two chunks and
        // several writers allocate chunks in the same directory page at the same time.
        let memory = MemoryDevice(size: 16 << 20)
        let length = 68 * 1024, stride: UInt64 = 96 * 1024
        DispatchQueue.concurrentPerform(iterations: 64) { i in
            try! memory.writePattern(length, seed: UInt8(i), at: UInt64(i) * stride)
        }
        for i in 0..<64 {
            XCTAssertEqual(try memory.readBytes(length, at: UInt64(i) * stride), TestBuffer.expected(length, UInt8(i)), "writer \(i)")
        }
    }

    func testAWriteTheHostHasNoMemoryForFailsWithNoSpaceAndTheDeviceKeepsServing() throws {
        // A 500 GiB device on a host whose memory runs out after the directory page and two
        // chunks: calloc's nil, as a client filling the device would meet it.
        final class Budget: Sendable { let left = Atomic<Int>(3) }
        let budget = Budget()
        let memory = MemoryDevice(size: 500 << 30) { size in
            budget.left.subtract(1, ordering: .relaxed).newValue >= 0 ? calloc(1, size) : nil
        }
        try memory.writePattern(4096, seed: 1, at: 0)
        try memory.writePattern(4096, seed: 2, at: chunk)
        let full = TestBuffer(count: 4096, pattern: 3)
        guard case .failure(let error) = memory.submitAndWait(memory.writeRequest(full, at: 7 * chunk)) else {
            return XCTFail("a write with no memory left succeeded")
        }
        XCTAssertEqual(error.code, .noSpace)
        XCTAssertEqual(error.errno, ENOSPC)

        // Still serving: what was written reads back, the failed range reads as a hole, and
        // writes into chunks that exist still succeed.
        XCTAssertEqual(try memory.readBytes(4096, at: 0), TestBuffer.expected(4096, 1))
        XCTAssertEqual(try memory.readBytes(4096, at: 7 * chunk), [UInt8](repeating: 0, count: 4096))
        try memory.writePattern(4096, seed: 4, at: chunk + 8192)
        XCTAssertEqual(try memory.readBytes(4096, at: chunk + 8192), TestBuffer.expected(4096, 4))
        XCTAssertEqual(memory.allocatedChunks, 2)
    }

    func testNullReadsZeroesAndForgetsWrites() throws {
        let null = NullDevice(size: 1 << 20)
        try null.writePattern(4096, seed: 1, at: 0, fua: true)
        let back = TestBuffer(count: 4096, pattern: 2)
        XCTAssertEqual(null.submitAndWait(null.readRequest(back, at: 0)), .success)
        XCTAssertEqual(back.bytes, [UInt8](repeating: 0, count: 4096))
        XCTAssertEqual(null.capabilities, .all)
    }
}
