import Core
@testable import Devices
import Foundation
import Glibc
import TestPeers
import XCTest

/// The `cow` filter: bytes read back against a model (random writes, partial clusters, FUA,
/// flush, discard, write-zeroes, a size that is not a multiple of the cluster), the ordering
/// that makes its map crash-safe, discard through to the base, `softdev commit`, and damaged
/// or truncated metadata.
final class COWFilterTests: XCTestCase {
    private var directory = ""

    override func setUp() {
        directory = makeTemporaryDirectory(self)
    }

    static func pattern(_ count: Int, seed: UInt64) -> [UInt8] { patternBytes(count, seed: seed) }

    /// A base image of `size` pattern bytes, and the spec of a cow stack over it.
    private func makeBase(_ size: Int, name: String = "base.img") -> (path: String, bytes: [UInt8]) {
        let path = "\(directory)/\(name)"
        let bytes = Self.pattern(size, seed: 99)
        FileManager.default.createFile(atPath: path, contents: Data(bytes))
        return (path, bytes)
    }

    private func spec(base: String, overlay: String, cluster: String = "16K", size: Int) -> String {
        "cow(base=\"file(path=\(base), readonly=true)\", cluster=\(cluster)) | file(path=\(overlay), size=\(size + (1 << 20)))"
    }

    private func fileBytes(_ path: String) throws -> [UInt8] { [UInt8](try Data(contentsOf: URL(fileURLWithPath: path))) }

    // MARK: Bytes against a model

    /// 400 random operations on a 3 MiB + 2.5 KiB base (the last cluster partial) with 16 KiB
    /// clusters: writes of 512 B to 40 KiB at any sector (partial clusters copy the base),
    /// FUA writes, flushes, write-zeroes, discards (whole clusters read as the base again);
    /// every read matches the model, then again after close and reopen; the base never changes.
    func testRandomOperationsAgainstAModel() throws {
        let size = 3 << 20 | 2560
        let (base, original) = makeBase(size)
        let overlay = "\(directory)/overlay.img"
        let stack = spec(base: base, overlay: overlay, size: size)
        let device = try DeviceRegistry.open(stack)
        XCTAssertEqual(device.geometry.size, UInt64(size))
        XCTAssertEqual(device.capabilities, [.write, .flush, .fua, .discard, .writeZeroes])
        device.close()
        let cluster = 16384
        try checkRandomOperations(stack, model: original, steps: 400, seed: 1234, data: { length, step, _ in Self.pattern(length, seed: UInt64(step)) },
                                  discarded: { model, range in
            // Whole clusters read as the base again; partial ones keep what they hold.
            let first = (range.lowerBound + cluster - 1) / cluster
            let stop = range.upperBound == size ? (size + cluster - 1) / cluster : range.upperBound / cluster
            if first < stop {
                let a = first * cluster, b = min(stop * cluster, size)
                model.replaceSubrange(a..<b, with: original[a..<b])
            }
        })
        XCTAssertTrue(try fileBytes(base) == original, "the base is never written")
    }

    /// Many requests in flight at once (fast path over allocated clusters and slow path over
    /// new ones, on the worker threads): each reads back what it wrote.
    func testConcurrentRequests() throws {
        let size = 8 << 20
        let (base, _) = makeBase(size)
        let device = try DeviceRegistry.open(spec(base: base, overlay: "\(directory)/o.img", cluster: "64K", size: size))
        defer { device.close() }
        checkConcurrentRequests(device)
    }

    // MARK: Ordering

    /// What a second opening of the same files sees while the first is still open (as after a
    /// SIGKILL): a write to a new cluster is not in the map until a flush (the base shows), a
    /// flushed one is, and a FUA write to a new cluster is at once.
    func testMapReachesDiskOnlyAtFlushOrFUA() throws {
        let size = 1 << 20
        let (base, original) = makeBase(size)
        let stack = spec(base: base, overlay: "\(directory)/o.img", size: size)
        let first = try DeviceRegistry.open(stack)
        defer { first.close() }
        let a = Self.pattern(4096, seed: 1), b = Self.pattern(4096, seed: 2), c = Self.pattern(4096, seed: 3)
        try first.writeBytes(a, at: 0)
        func seen(_ offset: Int) throws -> [UInt8] {
            let second = try DeviceRegistry.open(stack) as! COWFilter
            defer { _ = second }   // not closed: closing would write its own (stale) map
            return try second.readBytes(4096, at: UInt64(offset))
        }
        XCTAssertTrue(try seen(0) == Array(original[0..<4096]), "unflushed: the base")
        try first.sync.flush()
        XCTAssertTrue(try seen(0) == a, "flushed")
        try first.writeBytes(b, at: 65536, fua: true)
        XCTAssertTrue(try seen(65536) == b, "FUA")
        try first.writeBytes(c, at: 131072 + 512)
        XCTAssertTrue(try seen(131072) == Array(original[131072..<135168]), "unflushed partial write: the base")
        try first.sync.flush()
        XCTAssertTrue(try seen(131072) == Array(original[131072..<131584]) + c[0..<3584], "flushed partial write, over the base's bytes")
    }

    // MARK: Discard

    /// Discarding whole clusters shows the base again and gives the overlay's space back at the
    /// next flush; a discard of part of a cluster leaves it; discarding past the last whole
    /// cluster of a disk whose size is not a multiple of it drops that cluster too.
    func testDiscardFallsThroughToTheBase() throws {
        let size = 4 << 20 | 1024
        let (base, original) = makeBase(size)
        let overlay = "\(directory)/o.img"
        let device = try DeviceRegistry.open(spec(base: base, overlay: overlay, cluster: "64K", size: size))
        defer { device.close() }
        let data = Self.pattern(size, seed: 5)
        try device.writeBytes(data, at: 0)
        try device.sync.flush()
        let full = allocatedBytes(overlay)
        XCTAssertGreaterThan(full, size - 1)
        try device.sync.discard(at: 65536, length: 2 << 20)
        try device.sync.discard(at: 3 << 20 | 512, length: 4096)            // part of a cluster: kept
        try device.sync.discard(at: 4 << 20, length: 1024)                   // the partial last cluster
        var expected = data
        expected.replaceSubrange(65536..<(65536 + (2 << 20)), with: original[65536..<(65536 + (2 << 20))])
        expected.replaceSubrange((4 << 20)..<size, with: original[(4 << 20)..<size])
        XCTAssertTrue(try device.readBytes(size, at: 0) == expected, "discarded clusters read as the base")
        try device.sync.flush()
        XCTAssertLessThanOrEqual(allocatedBytes(overlay), full - (2 << 20), "the space went back at the flush")
        // Written again after the discard: a partial write copies the base's cluster first.
        let patch = Self.pattern(512, seed: 6)
        try device.writeBytes(patch, at: 65536 + 1024)
        expected.replaceSubrange((65536 + 1024)..<(65536 + 1536), with: patch)
        XCTAssertTrue(try device.readBytes(size, at: 0) == expected)
    }

    // MARK: Commit

    /// `softdev commit` writes the overlay's clusters into the base (readonly=true dropped from
    /// the base's spec) and empties the overlay; the stack reads the same before and after, the
    /// base alone then reads what the stack did. --help says what it does.
    func testCommitFoldsTheOverlayIntoTheBase() throws {
        let size = 2 << 20 | 512
        let (base, original) = makeBase(size)
        let overlay = "\(directory)/o.img"
        let stack = spec(base: base, overlay: overlay, size: size)
        var device = try DeviceRegistry.open(stack)
        var expected = original
        for (offset, length) in [(0, 4096), (70_000 & ~511, 100_000 & ~511), (size - 1536, 1536)] {
            let bytes = Self.pattern(length, seed: UInt64(offset))
            try device.writeBytes(bytes, at: UInt64(offset))
            expected.replaceSubrange(offset..<offset + length, with: bytes)
        }
        device.close()
        var (status, output) = try Peers.run(try SoftDevBinary.path(), ["commit", stack])
        XCTAssertEqual(status, 0, output)
        XCTAssertTrue(output.contains("committed"), output)
        XCTAssertTrue(try fileBytes(base) == expected, "the base holds the overlay's writes")
        device = try DeviceRegistry.open(stack)
        XCTAssertEqual((device as! COWFilter).map.allocatedClusters(), [], "the overlay is empty")
        XCTAssertTrue(try device.readBytes(size, at: 0) == expected)
        device.close()
        (status, output) = try Peers.run(try SoftDevBinary.path(), ["commit", "--help"])
        XCTAssertEqual(status, 0, output)
        XCTAssertTrue(output.contains("--base") && output.contains("overlay"), output)
        (status, output) = try Peers.run(try SoftDevBinary.path(), ["commit", "file(path=\(base))"])
        XCTAssertNotEqual(status, 0)
        XCTAssertTrue(output.contains("cow(base="), output)
    }

    // MARK: Bad metadata and bad specs

    /// Truncated overlays, damaged header fields and map blocks, a base of another size: each an
    /// error naming the overlay file and the offset; a byte flipped anywhere in the header or the
    /// map never crashes and never opens.
    func testDamagedMetadataIsRefusedWithFileAndOffset() throws {
        let size = 1 << 20
        let (base, _) = makeBase(size)
        let overlay = "\(directory)/o.img"
        let stack = spec(base: base, overlay: overlay, size: size)
        let device = try DeviceRegistry.open(stack)
        try device.writeBytes(Self.pattern(8192, seed: 8), at: 16384)
        device.close()
        let image = try DamagedImage(path: overlay, spec: stack)
        let good = image.good
        func damaged(_ change: (inout [UInt8]) -> Void) -> String { image.open(change) }
        func check(_ message: String, _ fragments: [String], file: StaticString = #filePath, line: UInt = #line) {
            image.check(message, fragments, file: file, line: line)
        }
        check(damaged { $0 = Array($0.prefix(2048)) }, ["truncated", "offset 0"])
        check(damaged { $0 = Array($0.prefix(300_032)) }, ["truncated", "offset 300032"])
        check(damaged { $0[0] = 0x58 }, ["bad magic", "offset 0"])
        check(damaged { $0[16] ^= 1 }, ["checksum", "offset 4092"])
        check(damaged { $0[4096 + 4] ^= 0x10 }, ["cow map block 0", "checksum", "offset 8188"])
        check(damaged { $0.replaceSubrange(0..<4096, with: repeatElement(0, count: 4096)) }, ["wiped", "offset 0"])
        // A field that is wrong but sealed: the field's own offset.
        func resealed(_ at: Int, _ value: UInt32) -> String {
            damaged { bytes in
                var block = FormatBlock(bytes: Array(bytes[0..<4096]))
                block.put32(value, at)
                block.seal()
                bytes.replaceSubrange(0..<4096, with: block.bytes)
            }
        }
        check(resealed(8, 7), ["unknown version 7", "offset 8"])
        check(resealed(16, 12345), ["cluster size", "offset 16"])
        check(resealed(40, 9), ["offset 40"])
        let mapBlock = damaged { bytes in
            var block = FormatBlock(bytes: Array(bytes[4096..<8192]))
            block.bytes[4 + 4087] = 0x80   // a cluster far past the end
            block.seal()
            bytes.replaceSubrange(4096..<8192, with: block.bytes)
        }
        check(mapBlock, ["is marked but the overlay has", "offset \(4096 + 4 + 4087)"])
        // The base changed size.
        image.restore()
        truncate(base, off_t(size / 2))
        check(openError(stack), ["offset 24", "base"])
        truncate(base, off_t(size))
        // Every 61st byte of the header and map block flipped: an error, never a trap.
        for offset in stride(from: 0, to: 8192, by: 61) {
            var bytes = good
            bytes[offset] ^= 0x5A
            FileManager.default.createFile(atPath: overlay, contents: Data(bytes))
            XCTAssertFalse(openError(stack).isEmpty, "a flip at \(offset) opened")
        }
    }

    /// Spec errors name cow and what to do.
    func testSpecErrors() throws {
        let (base, _) = makeBase(1 << 20)
        XCTAssertTrue(openError("cow | memory(size=2M)").contains("cow: missing parameter 'base'"))
        XCTAssertTrue(openError("cow(base=\"file(path=\(base))\", cluster=12K) | memory(size=2M)").contains("power of two"))
        XCTAssertTrue(openError("cow(base=\"file(path=\(directory)/none)\") | memory(size=2M)").contains("cow: base="))
        let small = openError("cow(base=\"file(path=\(base))\") | memory(size=1M)")
        XCTAssertTrue(small.contains("needs") && small.contains("size="), small)
        let other = spec(base: base, overlay: "\(directory)/o.img", cluster: "16K", size: 1 << 20)
        try DeviceRegistry.open(other).close()
        XCTAssertTrue(openError(other.replacingOccurrences(of: "cluster=16K", with: "cluster=32K")).contains("not cluster=32768"))
    }

    /// The checksum is CRC-32C (the standard check value).
    func testCRC32C() {
        XCTAssertEqual(CRC32C.checksum(Array("123456789".utf8)[...]), 0xE306_9283)
    }
}
