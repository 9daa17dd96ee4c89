import Core
@testable import Devices
import Foundation
import Glibc
import TestPeers
import XCTest

/// The `compress` filter: bytes read back against a model (random writes, partial chunks,
/// FUA, flush, discard, write-zeroes, a size that is not a multiple of the chunk), holes,
/// the ratio, discard that gives space back, the ordering that makes its map crash-safe, and
/// damaged or truncated metadata and chunks.
final class CompressFilterTests: XCTestCase {
    private var directory = ""

    override func setUp() {
        directory = makeTemporaryDirectory(self)
    }

    private func spec(_ container: String, size: Int? = nil, chunk: String = "16K", below: Int = 16 << 20) -> String {
        "compress(\(size.map { "size=\($0), " } ?? "")chunk=\(chunk)) | file(path=\(container), size=\(below))"
    }

    /// Bytes zstd squeezes: runs of a few values.
    static func compressible(_ count: Int, seed: UInt64) -> [UInt8] {
        let noise = patternBytes(count / 64 + 1, seed: seed)
        return (0..<count).map { noise[$0 / 64] & 0x7 }
    }

    // MARK: Bytes against a model

    /// 400 random operations on a 3 MiB + 2.5 KiB device of 16 KiB chunks (the last partial):
    /// writes of 512 B to 40 KiB at any sector, compressible or not, FUA writes, flushes,
    /// write-zeroes and discards (zeroes); every read matches the model, then again after close
    /// and reopen.
    func testRandomOperationsAgainstAModel() throws {
        let size = 3 << 20 | 2560
        let container = "\(directory)/c.img"
        let stack = spec(container, size: size)
        let device = try DeviceRegistry.open(stack)
        XCTAssertEqual(device.geometry.size, UInt64(size))
        XCTAssertEqual(device.capabilities, [.write, .flush, .fua, .discard, .writeZeroes])
        device.close()
        try checkRandomOperations(stack, model: [UInt8](repeating: 0, count: size), steps: 400, seed: 4321, data: { length, step, random in
            random.next() % 2 == 0 ? patternBytes(length, seed: UInt64(step)) : Self.compressible(length, seed: UInt64(step))
        }, discarded: { model, range in model.replaceSubrange(range, with: repeatElement(0, count: range.count)) })
    }

    /// Many requests in flight at once from the caller's view: each reads back what it wrote.
    func testConcurrentRequests() throws {
        let device = try DeviceRegistry.open(spec("\(directory)/c.img", chunk: "64K"))
        defer { device.close() }
        checkConcurrentRequests(device)
    }

    // MARK: Holes, ratio, space

    /// Unwritten chunks read as zeroes and are holes in the extents; compressible data reaches a
    /// ratio above 3, random data about 1 (stored raw); discarding gives the container file's
    /// space back at the next flush, and writing again reuses it.
    func testHolesRatioAndDiscardFreesSpace() throws {
        let container = "\(directory)/c.img"
        let device = try DeviceRegistry.open(spec(container, chunk: "64K", below: 32 << 20)) as! CompressFilter
        defer { device.close() }
        XCTAssertTrue(try device.readBytes(1 << 20, at: 5 << 20).allSatisfy { $0 == 0 })
        let text = Self.compressible(4 << 20, seed: 1)
        try device.writeBytes(text, at: 0)
        try device.sync.flush()
        XCTAssertGreaterThan(device.ratio, 3, device.ratioDescription)
        let random = patternBytes(4 << 20, seed: 2)
        try device.writeBytes(random, at: 8 << 20)
        try device.sync.flush()
        XCTAssertTrue(try device.readBytes(4 << 20, at: 0) == text)
        XCTAssertTrue(try device.readBytes(4 << 20, at: 8 << 20) == random)
        XCTAssertEqual(try device.extents(at: 4 << 20, length: 4 << 20), [BlockExtent(offset: 4 << 20, length: 4 << 20, isHole: true, isZero: true)])
        XCTAssertFalse(try device.extents(at: 0, length: 1 << 20).first!.isHole)
        XCTAssertLessThan(device.ratio, 2.2, "half the data is random: \(device.ratioDescription)")
        let full = allocatedBytes(container)
        try device.sync.discard(at: 8 << 20, length: 4 << 20)
        XCTAssertTrue(try device.readBytes(4 << 20, at: 8 << 20).allSatisfy { $0 == 0 }, "discarded chunks read as zeroes")
        try device.sync.flush()
        XCTAssertLessThanOrEqual(allocatedBytes(container), full - (4 << 20) + (64 << 10), "the random chunks' space went back")
        try device.writeBytes(random, at: 12 << 20)
        try device.sync.flush()
        XCTAssertLessThanOrEqual(allocatedBytes(container), full + (64 << 10), "the freed space was reused")
        XCTAssertTrue(try device.readBytes(4 << 20, at: 12 << 20) == random)
    }

    /// A container just large enough for its data raw: rewriting it all without a flush
    /// needs the old versions' space, so the filter flushes early and reuses it; past that, a
    /// write that cannot fit fails with ENOSPC, and what was there still reads back.
    func testFullContainerFlushesToReuseOldVersions() throws {
        let device = try DeviceRegistry.open("compress(size=1M, chunk=64K) | file(path=\(directory)/c.img, size=\((1 << 20) + (192 << 10)))")
        defer { device.close() }
        let first = patternBytes(1 << 20, seed: 1), second = patternBytes(1 << 20, seed: 2)
        try device.writeBytes(first, at: 0)
        try device.writeBytes(second, at: 0)
        XCTAssertTrue(try device.readBytes(1 << 20, at: 0) == second)
        let more = patternBytes(1 << 20, seed: 3)
        XCTAssertNoThrow(try device.writeBytes(more, at: 0), "the old versions are freed again")
        XCTAssertTrue(try device.readBytes(1 << 20, at: 0) == more)
    }

    // MARK: Ordering

    /// What a second opening sees while the first is still open (as after a SIGKILL): a new
    /// version of a chunk is not in the map until a flush (the older one shows), then is; a FUA
    /// write is at once.
    func testMapReachesDiskOnlyAtFlushOrFUA() throws {
        let stack = spec("\(directory)/c.img")
        let first = try DeviceRegistry.open(stack)
        defer { first.close() }
        let a = patternBytes(4096, seed: 1), b = patternBytes(4096, seed: 2), c = patternBytes(4096, seed: 3)
        try first.writeBytes(a, at: 0)
        func seen(_ offset: Int) throws -> [UInt8] {
            let second = try DeviceRegistry.open(stack)
            defer { _ = second }   // not closed: closing would write its own (stale) map
            return try second.readBytes(4096, at: UInt64(offset))
        }
        XCTAssertTrue(try seen(0).allSatisfy { $0 == 0 }, "unflushed: the hole")
        try first.sync.flush()
        XCTAssertTrue(try seen(0) == a, "flushed")
        try first.writeBytes(c, at: 0)
        XCTAssertTrue(try seen(0) == a, "unflushed rewrite: the flushed version")
        try first.writeBytes(b, at: 65536, fua: true)
        XCTAssertTrue(try seen(65536) == b, "FUA")
        XCTAssertTrue(try seen(0) == c, "the FUA write's map block carried the rewrite too")
    }

    // MARK: Bad metadata

    /// Truncated containers, damaged header fields, map blocks and entries, and a damaged
    /// chunk: each an error naming the file and the offset, never a crash or wrong data.
    func testDamagedMetadataIsRefusedWithFileAndOffset() throws {
        let container = "\(directory)/c.img"
        let stack = spec(container, below: 2 << 20)
        let device = try DeviceRegistry.open(stack)
        try device.writeBytes(Self.compressible(65536, seed: 3), at: 0)
        try device.writeBytes(Self.compressible(16384, seed: 4), at: 32768)
        device.close()
        let image = try DamagedImage(path: container, spec: stack)
        func damaged(_ change: (inout [UInt8]) -> Void) -> String { image.open(change) }
        func check(_ message: String, _ fragments: [String], file: StaticString = #filePath, line: UInt = #line) {
            image.check(message, fragments, file: file, line: line)
        }
        let mapBlock = 4096
        /// The map entry of chunk `n`, changed and the block sealed again.
        func entry(_ n: Int, _ change: (inout FormatBlock) -> Void) -> String {
            damaged { bytes in
                var block = FormatBlock(bytes: Array(bytes[mapBlock..<mapBlock + 4096]))
                var e = FormatBlock(bytes: Array(block.bytes[(4 + n * 16)..<(4 + n * 16 + 16)]))
                change(&e)
                block.bytes.replaceSubrange((4 + n * 16)..<(4 + n * 16 + 16), with: e.bytes)
                block.seal()
                bytes.replaceSubrange(mapBlock..<mapBlock + 4096, with: block.bytes)
            }
        }
        check(damaged { $0 = Array($0.prefix(2048)) }, ["truncated", "offset 0"])
        check(damaged { $0[0] = 0x58 }, ["bad magic", "offset 0"])
        check(damaged { $0[24] ^= 1 }, ["checksum", "offset 4092"])
        check(damaged { $0[mapBlock + 9] ^= 0x10 }, ["compress map block 0", "checksum", "offset 8188"])
        check(damaged { $0.replaceSubrange(0..<4096, with: repeatElement(0, count: 4096)) }, ["wiped", "offset 0"])
        check(entry(0) { $0.put64(1 << 40, 0) }, ["chunk 0", "outside the data area", "offset \(mapBlock + 4)"])
        check(entry(1) { $0.put64($0.u64(0) + 512, 0) }, ["chunk 1", "outside the data area", "offset \(mapBlock + 20)"])
        check(entry(0) { $0.put32(70000, 8) }, ["chunk 0", "does not fit", "offset \(mapBlock + 4)"])
        let stored = FormatBlock(bytes: Array(image.good[(mapBlock + 4)..<(mapBlock + 20)]))
        check(entry(2) { $0.put64(stored.u64(0), 0); $0.put32(stored.u32(8), 8) }, ["chunk 2", "over another chunk's"])
        check(damaged { $0 = Array($0.prefix(65536)) }, ["truncated", "offset 65536"])
        // A damaged chunk opens (its entry is sound) but its read fails, naming file and offset.
        FileManager.default.createFile(atPath: container, contents: Data(image.good.enumerated().map { i, b in
            i >= Int(stored.u64(0)) + 8 && i < Int(stored.u64(0)) + 40 ? b ^ 0x55 : b
        }))
        let opened = try DeviceRegistry.open(stack)
        defer { opened.close() }
        let result = opened.submitAndWait(BlockRequest(operation: .read, offset: 0, length: 4096, buffers: TestBuffer(count: 4096).buffers))
        guard case .failure(let error) = result else { return XCTFail("a damaged chunk read back") }
        XCTAssertTrue(error.message.contains(container) && error.message.contains("offset \(stored.u64(0))") && error.message.contains("checksum"), error.message)
    }

    /// Every 61st byte of the header and map block flipped: an error, never a trap.
    func testFlippedBytesNeverOpen() throws {
        let container = "\(directory)/c.img"
        let stack = spec(container, below: 2 << 20)
        let device = try DeviceRegistry.open(stack)
        try device.writeBytes(Self.compressible(65536, seed: 3), at: 0)
        device.close()
        let image = try DamagedImage(path: container, spec: stack)
        for offset in stride(from: 0, to: 8192, by: 61) {
            XCTAssertFalse(image.open { $0[offset] ^= 0x5A }.isEmpty, "a flip at \(offset) opened")
        }
    }

    /// Spec errors name compress and what to do.
    func testSpecErrors() throws {
        XCTAssertTrue(openError("compress(chunk=12K) | memory(size=2M)").contains("power of two"))
        XCTAssertTrue(openError("compress(level=40) | memory(size=2M)").contains("level"))
        XCTAssertTrue(openError("compress(size=1G, chunk=4K) | memory(size=64K)").contains("needs more than"))
        let stack = spec("\(directory)/c.img", size: 1 << 20)
        try DeviceRegistry.open(stack).close()
        XCTAssertTrue(openError(stack.replacingOccurrences(of: "size=1048576", with: "size=2M")).contains("not size=2097152"))
        XCTAssertTrue(openError(stack.replacingOccurrences(of: "chunk=16K", with: "chunk=32K")).contains("not chunk=32768"))
    }
}
