import Core
import Devices
import Foundation
import XCTest

/// The filters that serve part of a device: `readonly`, `offset` and `partition`.
final class SliceFilterTests: XCTestCase {
    // MARK: readonly

    func testReadOnlyRefusesEveryWriteAndAdvertisesNoWrite() throws {
        let memory = MemoryDevice(size: 1 << 20)
        try memory.writePattern(4096, seed: 3, at: 0)
        let device = try DeviceRegistry.open("readonly | null(size=1M)")
        XCTAssertFalse(device.capabilities.contains(.write))
        let readonly = ReadOnlyFilter(next: memory)
        XCTAssertTrue(readonly.capabilities.isDisjoint(with: [.write, .fua, .discard, .writeZeroes, .flush]))
        XCTAssertEqual(try readonly.readBytes(4096, at: 0), TestBuffer.expected(4096, 3), "reads pass")
        let data = TestBuffer(count: 4096, pattern: 9)
        XCTAssertEqual(readonly.submitAndWait(readonly.writeRequest(data, at: 0)).errorCode, .readOnly)
        XCTAssertEqual(readonly.submitAndWait(BlockRequest(operation: .discard, offset: 0, length: 4096)).errorCode, .readOnly)
        XCTAssertEqual(readonly.submitAndWait(BlockRequest(operation: .writeZeroes, offset: 0, length: 4096)).errorCode, .readOnly)
        XCTAssertEqual(readonly.submitAndWait(BlockRequest(operation: .flush, offset: 0, length: 0)), .success)
        XCTAssertThrowsError(try readonly.writePattern(512, seed: 1, at: 0)) { XCTAssertEqual(($0 as? BlockError)?.code, .readOnly) }
        XCTAssertThrowsError(try readonly.sync.writeZeroes(at: 0, length: 512, mayDiscard: true))
        XCTAssertEqual(try memory.readBytes(4096, at: 0), TestBuffer.expected(4096, 3), "nothing reached the device")
    }

    // MARK: offset

    func testOffsetServesAWindowFromZero() throws {
        let memory = MemoryDevice(size: 4 << 20)
        let window = try OffsetFilter(next: memory, start: 1 << 20, length: 2 << 20)
        XCTAssertEqual(window.geometry.size, 2 << 20)
        try window.writePattern(4096, seed: 5, at: 0)
        let data = TestBuffer(count: 4096, pattern: 6)
        XCTAssertEqual(window.submitAndWait(window.writeRequest(data, at: (2 << 20) - 4096)), .success)
        XCTAssertEqual(try memory.readBytes(4096, at: 1 << 20), TestBuffer.expected(4096, 5), "offset 0 is byte 1M below")
        XCTAssertEqual(try memory.readBytes(4096, at: (3 << 20) - 4096), TestBuffer.expected(4096, 6))
        XCTAssertEqual(try window.readBytes(4096, at: 0), TestBuffer.expected(4096, 5))
        XCTAssertEqual(try window.extents(at: 0, length: 2 << 20), [
            BlockExtent(offset: 0, length: 65536, isHole: false, isZero: false),
            BlockExtent(offset: 65536, length: (2 << 20) - 2 * 65536, isHole: true, isZero: true),
            BlockExtent(offset: (2 << 20) - 65536, length: 65536, isHole: false, isZero: false),
        ], "extents are clipped to the window and start at 0")
    }

    func testOffsetRefusesRequestsThatLeaveTheWindow() throws {
        let memory = MemoryDevice(size: 4 << 20)
        let window = try OffsetFilter(next: memory, start: 1 << 20, length: 1 << 20)
        let data = TestBuffer(count: 8192, pattern: 1)
        XCTAssertEqual(window.submitAndWait(window.writeRequest(data, at: (1 << 20) - 4096)).errorCode, .outOfRange)
        XCTAssertThrowsError(try window.sync.discard(at: 1 << 20, length: 512))
        XCTAssertEqual(memory.allocatedChunks, 0, "nothing was written past the window")
    }

    func testOffsetSpecDefaultsAndErrors() throws {
        XCTAssertEqual(try DeviceRegistry.open("offset(offset=1M) | memory(size=4M)").geometry.size, 3 << 20, "range defaults to the rest")
        XCTAssertEqual(try DeviceRegistry.open("offset(range=1M) | memory(size=4M)").geometry.size, 1 << 20)
        XCTAssertEqual(specError("offset(offset=3M, range=2M) | memory(size=4M)"),
                       "offset: the window 3145728+2097152 goes past the end of the 4194304-byte device below")
        XCTAssertEqual(specError("offset(offset=100) | memory(size=4M)"), "offset: offset '100' must be a multiple of 512 bytes")
        XCTAssertEqual(specError("offset(offset=4M) | memory(size=4M)"),
                       "offset: the window 4194304+0 goes past the end of the 4194304-byte device below")
    }

    // MARK: partition

    /// A disk with an MBR: 1 at sector 2048 (1 MiB), 2 empty, 3 extended from 6 MiB holding
    /// logical 5 at 7 MiB and 6 at 9 MiB, each 1 MiB long.
    func mbrDisk() throws -> MemoryDevice {
        let disk = MemoryDevice(size: 16 << 20)
        var mbr = [UInt8](repeating: 0, count: 512)
        mbr.setMBREntry(0, type: 0x83, start: 2048, count: 2048)
        mbr.setMBREntry(2, type: 0x05, start: 12288, count: 8192)
        mbr[510] = 0x55; mbr[511] = 0xAA
        try disk.writeBytes(mbr, at: 0)
        var ebr1 = [UInt8](repeating: 0, count: 512)
        ebr1.setMBREntry(0, type: 0x83, start: 2048, count: 2048)      // 12288 + 2048 = sector 14336 (7 MiB)
        ebr1.setMBREntry(1, type: 0x05, start: 4096, count: 4096)      // next EBR at 12288 + 4096 = 16384 (8 MiB)
        ebr1[510] = 0x55; ebr1[511] = 0xAA
        try disk.writeBytes(ebr1, at: 12288 * 512)
        var ebr2 = [UInt8](repeating: 0, count: 512)
        ebr2.setMBREntry(0, type: 0x83, start: 2048, count: 2048)      // 16384 + 2048 = 18432 (9 MiB)
        ebr2[510] = 0x55; ebr2[511] = 0xAA
        try disk.writeBytes(ebr2, at: 16384 * 512)
        for (seed, mib) in [(1, 1), (5, 7), (6, 9)] as [(UInt8, UInt64)] { try disk.writePattern(4096, seed: seed, at: mib << 20) }
        return disk
    }

    func testPartitionFindsMBRPrimaryAndLogicalPartitions() throws {
        let disk = try mbrDisk()
        for (number, seed) in [(1, 1), (5, 5), (6, 6)] as [(Int, UInt8)] {
            let partition = try PartitionFilter.open(next: disk, partition: number)
            XCTAssertEqual(partition.name, "partition")
            XCTAssertEqual(partition.geometry.size, 1 << 20)
            XCTAssertEqual(try partition.readBytes(4096, at: 0), TestBuffer.expected(4096, seed), "partition \(number)")
        }
        let first = try PartitionFilter.open(next: disk, partition: 1)
        try first.writePattern(512, seed: 9, at: (1 << 20) - 512)
        XCTAssertEqual(try disk.readBytes(512, at: (2 << 20) - 512), TestBuffer.expected(512, 9))
        XCTAssertThrowsError(try first.writePattern(1024, seed: 9, at: (1 << 20) - 512), "a write may not leave the partition")
        XCTAssertEqual(partitionError(disk, 2), "partition: MBR partition 2 is empty")
        XCTAssertEqual(partitionError(disk, 3), "partition: MBR partition 3 is the extended partition; its logical partitions are 5 and up")
        XCTAssertEqual(partitionError(disk, 7), "partition: partition 7 does not exist (the MBR has logical partitions 5-6)")
        XCTAssertEqual(partitionError(MemoryDevice(size: 1 << 20), 1),
                       "partition: the device has no partition table (no MBR signature at byte 510)")
    }

    func testPartitionFindsGPTPartitions() throws {
        let disk = MemoryDevice(size: 16 << 20)
        var mbr = [UInt8](repeating: 0, count: 512)
        mbr.setMBREntry(0, type: 0xEE, start: 1, count: 32767)
        mbr[510] = 0x55; mbr[511] = 0xAA
        try disk.writeBytes(mbr, at: 0)
        var header = [UInt8](repeating: 0, count: 512)
        header.replaceSubrange(0..<8, with: Array("EFI PART".utf8))
        header.setLittleEndian(2, at: 72, bytes: 8)    // entries from LBA 2
        header.setLittleEndian(128, at: 80, bytes: 4)  // 128 entries
        header.setLittleEndian(128, at: 84, bytes: 4)  // of 128 bytes
        try disk.writeBytes(header, at: 512)
        var entries = [UInt8](repeating: 0, count: 512)
        for (i, first, last) in [(0, 2048, 6143), (1, 10240, 12287)] as [(Int, UInt64, UInt64)] {
            entries[i * 128] = 0xAF  // any non-zero type GUID
            entries.setLittleEndian(first, at: i * 128 + 32, bytes: 8)
            entries.setLittleEndian(last, at: i * 128 + 40, bytes: 8)
        }
        try disk.writeBytes(entries, at: 1024)
        try disk.writePattern(4096, seed: 2, at: 5 << 20)

        let second = try PartitionFilter.open(next: disk, partition: 2)
        XCTAssertEqual(second.geometry.size, 1 << 20)
        XCTAssertEqual(try second.readBytes(4096, at: 0), TestBuffer.expected(4096, 2))
        XCTAssertEqual(try PartitionFilter.open(next: disk, partition: 1).geometry.size, 2 << 20)
        XCTAssertEqual(partitionError(disk, 3), "partition: GPT partition 3 is empty")
        XCTAssertEqual(partitionError(disk, 129), "partition: partition 129 does not exist (the GPT has 128 entries)")
    }

    func testPartitionThroughTheSpecOnAnImageFile() throws {
        let path = makeTemporaryDirectory(self) + "/disk.img"
        let file = try FileDevice(path: path, options: .init(createSize: 16 << 20))
        let disk = try mbrDisk()
        let image = try disk.readBytes(16 << 20, at: 0)
        try file.writeBytes(image, at: 0)
        file.close()
        let device = try DeviceRegistry.open("partition(partition=5) | file(path=\(path))")
        defer { device.close() }
        XCTAssertEqual(try device.readBytes(4096, at: 0), TestBuffer.expected(4096, 5))
        XCTAssertEqual(specError("partition | memory(size=1M)"), "partition: missing parameter 'partition'")
        XCTAssertEqual(specError("partition(partition=x) | memory(size=1M)"),
                       "partition: partition 'x' is not a whole number from 1 to 1024")
    }

    private func partitionError(_ disk: any BlockDevice, _ number: Int) -> String? {
        do { _ = try PartitionFilter.open(next: disk, partition: number); return nil } catch { return error.message }
    }
}

/// The message of the error `spec` fails to open with, nil if it opens.
func specError(_ spec: String) -> String? {
    do { try DeviceRegistry.open(spec).close(); return nil } catch { return error.message }
}

extension [UInt8] {
    mutating func setLittleEndian(_ value: UInt64, at offset: Int, bytes: Int) {
        for i in 0..<bytes { self[offset + i] = UInt8(truncatingIfNeeded: value >> (8 * UInt64(i))) }
    }
    /// MBR partition entry `index` (0-3) of the table in this 512-byte sector.
    mutating func setMBREntry(_ index: Int, type: UInt8, start: UInt32, count: UInt32) {
        let o = 446 + 16 * index
        self[o + 4] = type
        setLittleEndian(UInt64(start), at: o + 8, bytes: 4)
        setLittleEndian(UInt64(count), at: o + 12, bytes: 4)
    }
}

extension BlockDevice {
    /// Writes `bytes` at `offset` synchronously (a multiple of 512 bytes).
    func writeBytes(_ bytes: [UInt8], at offset: UInt64) throws {
        let buffer = TestBuffer(count: bytes.count)
        bytes.withUnsafeBytes { buffer.buffers.copy(from: $0.baseAddress!, count: bytes.count) }
        try withExtendedLifetime(buffer) { try sync.write(from: buffer.buffers, at: offset, fua: false) }
    }
}
