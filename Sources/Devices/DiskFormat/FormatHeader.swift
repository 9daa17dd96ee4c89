import Core

/// The first 4 KiB of a filter's own format on the device below (a cow overlay, a compress
/// container): what it was made for and where its parts are. Written once, when it is made,
/// and only read after; little-endian, closed by a CRC-32C.
///
/// ```
///   0  magic (8 bytes)         24  virtual size
///   8  version (1)             32  map offset (4096)
///  12  header size (4096)      40  map blocks (``MetadataBlocks``)
///  16  unit size (the cluster  48  data offset
///      or chunk)               56  units
///  20  flags (0)             4092  CRC-32C of bytes 0..<4092
/// ```
struct FormatHeader: Equatable {
    /// What distinguishes one format from another.
    struct Kind: Equatable {
        var magic: String
        /// For messages: "cow", "compress".
        var name: String
        /// For messages: "cluster", "chunk".
        var unit: String
        /// Map entries one ``MetadataBlocks`` block holds.
        var entriesPerBlock: Int
    }

    static let size = 4096
    static let version: UInt32 = 1
    enum Offset {
        static let version = 8, headerSize = 12, unitSize = 16, flags = 20, virtualSize = 24
        static let mapOffset = 32, mapBlocks = 40, dataOffset = 48, units = 56, checksum = 4092
    }

    let kind: Kind
    var unitSize: UInt32
    var virtualSize: UInt64

    var units: UInt64 { (virtualSize + UInt64(unitSize) - 1) / UInt64(unitSize) }
    var mapOffset: UInt64 { UInt64(Self.size) }
    var mapBlocks: UInt64 { (units + UInt64(kind.entriesPerBlock) - 1) / UInt64(kind.entriesPerBlock) }
    var mapBytes: Int { Int(mapBlocks) * MetadataBlocks.size }
    /// After the map, aligned to a unit (at least 64 KiB), so that data stays aligned.
    var dataOffset: UInt64 {
        let end = mapOffset + UInt64(mapBytes)
        let align = max(UInt64(unitSize), 65536)
        return (end + align - 1) / align * align
    }

    static func isValidUnitSize(_ size: UInt64) -> Bool { size >= 4096 && size <= 2 << 20 && size & (size - 1) == 0 }

    init(kind: Kind, unitSize: UInt32, virtualSize: UInt64) { self.kind = kind; self.unitSize = unitSize; self.virtualSize = virtualSize }

    var encoded: [UInt8] {
        var block = FormatBlock(count: Self.size)
        block.bytes.replaceSubrange(0..<8, with: Array(kind.magic.utf8))
        block.put32(Self.version, Offset.version)
        block.put32(UInt32(Self.size), Offset.headerSize)
        block.put32(unitSize, Offset.unitSize)
        block.put64(virtualSize, Offset.virtualSize)
        block.put64(mapOffset, Offset.mapOffset)
        block.put64(mapBlocks, Offset.mapBlocks)
        block.put64(dataOffset, Offset.dataOffset)
        block.put64(units, Offset.units)
        block.seal()
        return block.bytes
    }

    /// Parses and checks a header of `kind`; each error names `label` and the offset of the bad field.
    init(parsing bytes: [UInt8], kind: Kind, label: String) throws(BlockError) {
        let block = FormatBlock(bytes: bytes)
        func fail(_ offset: Int, _ what: String) -> BlockError { FormatBlock.error(label, "\(kind.name) header: \(what)", at: UInt64(offset)) }
        guard Array(bytes[0..<8]) == Array(kind.magic.utf8) else { throw fail(0, "bad magic (not a \(kind.name) image)") }
        guard block.storedChecksum == block.computedChecksum else {
            throw fail(Offset.checksum, "checksum \(block.storedChecksum) does not match the header's \(block.computedChecksum) (damaged)")
        }
        let version = block.u32(Offset.version)
        guard version == Self.version else { throw fail(Offset.version, "unknown version \(version)") }
        guard block.u32(Offset.headerSize) == UInt32(Self.size) else { throw fail(Offset.headerSize, "header size \(block.u32(Offset.headerSize)) is not \(Self.size)") }
        let unit = block.u32(Offset.unitSize)
        guard Self.isValidUnitSize(UInt64(unit)) else { throw fail(Offset.unitSize, "\(kind.unit) size \(unit) is not a power of two from 4K to 2M") }
        guard block.u32(Offset.flags) == 0 else { throw fail(Offset.flags, "unknown flags \(block.u32(Offset.flags))") }
        self.kind = kind
        unitSize = unit
        virtualSize = block.u64(Offset.virtualSize)
        guard virtualSize > 0, virtualSize <= 1 << 50 else { throw fail(Offset.virtualSize, "virtual size \(virtualSize) is out of range") }
        for (offset, stored, expected) in [(Offset.mapOffset, block.u64(Offset.mapOffset), mapOffset),
                                           (Offset.mapBlocks, block.u64(Offset.mapBlocks), mapBlocks),
                                           (Offset.dataOffset, block.u64(Offset.dataOffset), dataOffset),
                                           (Offset.units, block.u64(Offset.units), units)] where stored != expected {
            throw fail(offset, "\(stored) does not follow from the \(kind.unit) and virtual sizes (\(expected) does)")
        }
    }
}

extension FormatHeader {
    /// The header of `kind` on `device`, and whether it was made now. A device whose header
    /// and map are all zeroes (a new file) is given `fresh()`'s header, written and flushed
    /// (nothing else to order: one with no header is made again on the next open); a zero
    /// header over a map that is not is refused (a wiped header, not a new file).
    static func open(on device: any BlockDevice, kind: Kind, label: String,
                     fresh: () throws(BlockError) -> FormatHeader) throws(BlockError) -> (header: FormatHeader, made: Bool) {
        let size = device.geometry.size
        guard size >= UInt64(Self.size) else {
            throw FormatBlock.error(label, "truncated: the \(kind.name) header needs \(Self.size) bytes but the device is \(size) bytes long", at: 0)
        }
        let first = try device.readFormatBlocks(at: 0, count: Self.size)
        guard first.allSatisfy({ $0 == 0 }) else { return (try FormatHeader(parsing: first, kind: kind, label: label), false) }
        let header = try fresh()
        let map = try device.readFormatBlocks(at: header.mapOffset, count: header.mapBytes)
        guard map.allSatisfy({ $0 == 0 }) else {
            throw FormatBlock.error(label, "\(kind.name) header: all zeroes but a map follows it (the header was wiped?); refusing to make a new one over it", at: 0)
        }
        try device.writeFormatBlocks(header.encoded, at: 0)
        if device.capabilities.contains(.flush) { try device.sync.flush() }
        return (header, true)
    }
}
