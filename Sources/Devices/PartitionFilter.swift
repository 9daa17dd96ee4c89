import Core
import Glibc

/// `partition(partition=N)`: partition N of an MBR or GPT partition table on the device below,
/// served as a whole device (nbdkit's partition filter). Partitions are numbered from 1: an MBR's
/// primary partitions are 1 to 4 and its logical partitions (in an extended partition) 5 and
/// up, as Linux numbers them; a GPT's are its entries in order.
///
/// The table is read once, when the filter opens; the partition is then an `offset` window,
/// which refuses any request that would leave it.
///
/// ```swift
/// let root = try DeviceRegistry.open("partition(partition=2) | file(path=disk.img)")
/// ```
public enum PartitionTable {
    /// Where partition `number` lies on `device`, in bytes.
    public static func find(_ number: Int, on device: any BlockDevice) throws(BlockError) -> (start: UInt64, length: UInt64) {
        let sector = UInt64(device.geometry.logicalBlockSize)
        let mbr = try readBytes(device, at: 0, count: 512)
        guard mbr[510] == 0x55, mbr[511] == 0xAA else {
            throw BlockError(.invalid, "partition: the device has no partition table (no MBR signature at byte 510)")
        }
        let primaries = (0..<4).map { MBREntry(mbr, at: 446 + 16 * $0) }
        // A protective MBR (one entry of type 0xEE) says the real table is a GPT.
        let (start, count) = primaries.contains(where: { $0.type == 0xEE })
            ? try gpt(number, on: device, sector: sector)
            : try mbrPartition(number, primaries, on: device, sector: sector)
        let (startByte, lengthBytes) = (start.multipliedReportingOverflow(by: sector), count.multipliedReportingOverflow(by: sector))
        guard count > 0, !startByte.overflow, !lengthBytes.overflow, startByte.partialValue < device.geometry.size,
              lengthBytes.partialValue <= device.geometry.size - startByte.partialValue else {
            throw BlockError(.outOfRange, "partition: partition \(number) (sector \(start), \(count) sectors) lies outside the device")
        }
        return (startByte.partialValue, lengthBytes.partialValue)
    }

    private struct MBREntry {
        var type: UInt8
        /// In sectors, relative to the table that holds the entry (the disk, or an EBR).
        var start: UInt64
        var count: UInt64
        init(_ b: [UInt8], at o: Int) {
            type = b[o + 4]
            start = UInt64(littleEndian32(b, o + 8))
            count = UInt64(littleEndian32(b, o + 12))
        }
        var isExtended: Bool { [0x05, 0x0F, 0x85].contains(type) }
    }

    private static func mbrPartition(_ number: Int, _ primaries: [MBREntry], on device: any BlockDevice,
                                     sector: UInt64) throws(BlockError) -> (UInt64, UInt64) {
        if (1...4).contains(number) {
            let entry = primaries[number - 1]
            guard entry.type != 0 else { throw BlockError(.invalid, "partition: MBR partition \(number) is empty") }
            guard !entry.isExtended else {
                throw BlockError(.invalid, "partition: MBR partition \(number) is the extended partition; its logical partitions are 5 and up")
            }
            return (entry.start, entry.count)
        }
        guard let extended = primaries.first(where: \.isExtended) else {
            throw BlockError(.invalid, "partition: partition \(number) does not exist (the MBR has no extended partition, so only 1-4)")
        }
        // The logical partitions form a chain of EBRs: the first entry of each is a partition
        // relative to that EBR, the second points to the next EBR relative to the extended one.
        var ebr = extended.start
        var logical = 5
        while logical <= 128 {
            let table = try readBytes(device, at: ebr * sector, count: 512)
            guard table[510] == 0x55, table[511] == 0xAA else {
                throw BlockError(.invalid, "partition: the EBR at sector \(ebr) has no signature")
            }
            let entry = MBREntry(table, at: 446), link = MBREntry(table, at: 462)
            if logical == number {
                guard entry.type != 0 else { throw BlockError(.invalid, "partition: logical partition \(number) is empty") }
                return (ebr + entry.start, entry.count)
            }
            guard link.type != 0, link.start > 0 else { break }
            ebr = extended.start + link.start
            logical += 1
        }
        throw BlockError(.invalid, "partition: partition \(number) does not exist (the MBR has logical partitions 5-\(logical))")
    }

    private static func gpt(_ number: Int, on device: any BlockDevice, sector: UInt64) throws(BlockError) -> (UInt64, UInt64) {
        let header = try readBytes(device, at: sector, count: 92)
        guard header[0..<8].elementsEqual("EFI PART".utf8) else {
            throw BlockError(.invalid, "partition: a protective MBR but no GPT header at sector 1")
        }
        let entriesLBA = littleEndian64(header, 72)
        let entryCount = Int(littleEndian32(header, 80))
        let entrySize = Int(littleEndian32(header, 84))
        guard entrySize >= 128, entrySize % 8 == 0, entrySize <= 4096, entryCount <= 1024 else {
            throw BlockError(.invalid, "partition: the GPT header is malformed (\(entryCount) entries of \(entrySize) bytes)")
        }
        guard number <= entryCount else {
            throw BlockError(.invalid, "partition: partition \(number) does not exist (the GPT has \(entryCount) entries)")
        }
        let (position, overflow) = entriesLBA.multipliedReportingOverflow(by: sector)
        guard !overflow, position < device.geometry.size else {
            throw BlockError(.invalid, "partition: the GPT's entries at sector \(entriesLBA) lie outside the device")
        }
        let entry = try readBytes(device, at: position + UInt64((number - 1) * entrySize), count: 128)
        guard entry[0..<16].contains(where: { $0 != 0 }) else {
            throw BlockError(.invalid, "partition: GPT partition \(number) is empty")
        }
        let first = littleEndian64(entry, 32), last = littleEndian64(entry, 40)  // last is inclusive
        guard last >= first else { throw BlockError(.invalid, "partition: GPT partition \(number) ends before it starts") }
        return (first, last - first + 1)
    }

    /// `count` bytes at `offset`, read in whole logical blocks through aligned memory (the
    /// device may be a file opened with O_DIRECT).
    private static func readBytes(_ device: any BlockDevice, at offset: UInt64, count: Int) throws(BlockError) -> [UInt8] {
        let block = UInt64(device.geometry.logicalBlockSize)
        let start = offset - offset % block
        let length = Int((offset + UInt64(count) + block - 1) / block * block - start)
        guard start + UInt64(length) <= device.geometry.size else {
            throw BlockError(.invalid, "partition: the partition table points past the end of the device (byte \(offset))")
        }
        var memory: UnsafeMutableRawPointer?
        guard posix_memalign(&memory, 4096, length) == 0, let memory else { throw BlockError(.io, errno: ENOMEM, "partition: out of memory") }
        defer { free(memory) }
        var vector = iovec(iov_base: memory, iov_len: length)
        try withUnsafeMutablePointer(to: &vector) { (v) throws(BlockError) in try device.sync.read(into: IOBuffers(v, count: 1), at: start) }
        let skip = Int(offset - start)
        return Array(UnsafeRawBufferPointer(start: memory + skip, count: count))
    }

    private static func littleEndian32(_ b: [UInt8], _ o: Int) -> UInt32 {
        (0..<4).reduce(0) { $0 | UInt32(b[o + $1]) << (8 * $1) }
    }
    private static func littleEndian64(_ b: [UInt8], _ o: Int) -> UInt64 {
        (0..<8).reduce(0) { $0 | UInt64(b[o + $1]) << (8 * $1) }
    }
}

/// The `partition` filter: an `OffsetFilter` named "partition" over the partition's bytes.
public enum PartitionFilter {
    public static func open(next: any BlockDevice, partition: Int) throws(BlockError) -> OffsetFilter {
        let (start, length) = try PartitionTable.find(partition, on: next)
        return try OffsetFilter(next: next, start: start, length: length, name: "partition")
    }

    public static let descriptor = DeviceDescriptor(
        name: "partition", kind: .filter,
        summary: "Serves one partition of an MBR or GPT partition table on the device below as a whole device.",
        parameters: [
            DeviceParameter("partition", required: true,
                            "The partition number from 1: MBR primaries 1-4, logical 5 and up; GPT entries in order."),
        ],
        open: { parameters, next throws(DeviceSpecError) in
            _ = try parameters.required("partition")
            let number: Int = try parameters.integer("partition", in: 1...1024)!
            return try DeviceSpecError.opening { () throws(BlockError) in try PartitionFilter.open(next: next!, partition: number) }
        })
}
