import Core

/// Where each chunk of a compress container is: one 16-byte entry per chunk in the
/// ``MetadataBlocks`` after the header (255 a block, from the block's content byte 0):
///
/// ```
///  0  offset of the stored chunk on the device below (0: a hole, which reads as zeroes)
///  8  stored length in bytes (the zstd frame, or the chunk itself when raw); bit 31: raw
///     (the chunk did not compress)
/// 12  CRC-32C of the stored bytes (a damaged chunk is an I/O error, never wrong data)
/// ```
/// A chunk is never rewritten in place: a new version goes to free space and the entry moves,
/// so an entry on disk always points at a whole, flushed chunk (``CompressFilter``).
/// Not locked: its filter's lock guards it.
struct CompressMap {
    struct Entry: Equatable {
        var offset: UInt64
        var length: UInt32
        var raw: Bool
        var checksum: UInt32
        static let hole = Entry(offset: 0, length: 0, raw: false, checksum: 0)
        var isHole: Bool { offset == 0 }
    }
    static let entryBytes = 16
    static let entriesPerBlock = MetadataBlocks.contentBytes / entryBytes

    private(set) var table: MetadataBlocks
    let chunks: UInt64

    /// Checks the map read at `header.mapOffset` and marks every stored chunk's space in
    /// `space`: an entry outside the data area, longer than its chunk, or over another chunk's
    /// space is an error naming the file and the entry's offset.
    init(bytes: [UInt8], header: FormatHeader, space: inout CompressSpace, label: String) throws(BlockError) {
        table = try MetadataBlocks(bytes: bytes, offset: header.mapOffset, label: label, what: "compress map")
        chunks = header.units
        let capacity = UInt64(Self.entriesPerBlock) * UInt64(table.blocks.count)
        for chunk in 0..<capacity {
            let entry = self[chunk]
            let (block, byte) = Self.place(chunk)
            let at = header.mapOffset + UInt64(block * MetadataBlocks.size + byte)
            func fail(_ what: String) -> BlockError { FormatBlock.error(label, "compress map entry of chunk \(chunk): \(what)", at: at) }
            if entry.isHole {
                guard entry.length == 0 && !entry.raw && entry.checksum == 0 else { throw fail("a hole with a length or checksum") }
                continue
            }
            guard chunk < chunks else { throw fail("past the last chunk (\(chunks))") }
            let chunkLength = min(UInt64(header.unitSize), header.virtualSize - chunk * UInt64(header.unitSize))
            guard entry.length > 0, UInt64(entry.length) <= chunkLength, !entry.raw || UInt64(entry.length) == chunkLength else {
                throw fail("stored length \(entry.length) does not fit a \(chunkLength)-byte chunk")
            }
            guard space.claim(entry.offset, bytes: UInt64(entry.length)) else {
                throw fail("offset \(entry.offset) is outside the data area or over another chunk's")
            }
        }
    }

    private static func place(_ chunk: UInt64) -> (block: Int, byte: Int) {
        (Int(chunk / UInt64(entriesPerBlock)), MetadataBlocks.contentStart + Int(chunk % UInt64(entriesPerBlock)) * entryBytes)
    }

    subscript(chunk: UInt64) -> Entry {
        get {
            let (block, byte) = Self.place(chunk)
            let b = FormatBlock(bytes: Array(table.blocks[block][byte..<byte + Self.entryBytes]))
            return Entry(offset: b.u64(0), length: b.u32(8) & 0x7FFF_FFFF, raw: b.u32(8) >> 31 != 0, checksum: b.u32(12))
        }
        set {
            let (block, byte) = Self.place(chunk)
            var b = FormatBlock(count: Self.entryBytes)
            b.put64(newValue.offset, 0); b.put32(newValue.length | (newValue.raw ? 1 << 31 : 0), 8); b.put32(newValue.checksum, 12)
            table.blocks[block].replaceSubrange(byte..<byte + Self.entryBytes, with: b.bytes)
            table.dirty.insert(block)
        }
    }

    mutating func takeDirty() -> [(index: Int, bytes: [UInt8])] { table.takeDirty() }
    mutating func failed(_ taken: [(index: Int, bytes: [UInt8])]) { table.failed(taken) }
}

/// The data area of a compress container in 4 KiB units, used or free: rebuilt at open from
/// the map, so space written after the last flush and not mapped is simply free again.
struct CompressSpace {
    static let unit: UInt64 = 4096
    let start: UInt64
    let end: UInt64
    private var used: [UInt64]
    private var cursor = 0
    private(set) var usedUnits = 0
    private var units: Int { Int((end - start) / Self.unit) }

    init(start: UInt64, end: UInt64) {
        self.start = start; self.end = end
        used = Array(repeating: 0, count: (Int((end - start) / Self.unit) + 63) / 64)
    }

    static func units(_ bytes: UInt64) -> Int { Int((bytes + unit - 1) / unit) }

    private func isUsed(_ i: Int) -> Bool { used[i >> 6] & (1 << UInt64(i & 63)) != 0 }
    private mutating func mark(_ first: Int, _ count: Int, _ value: Bool) {
        for i in first..<first + count {
            if value { used[i >> 6] |= 1 << UInt64(i & 63) } else { used[i >> 6] &= ~(1 << UInt64(i & 63)) }
        }
        usedUnits += value ? count : -count
    }

    /// Marks `[offset, offset+bytes)` used: false if it is outside the area, unaligned or
    /// already used.
    mutating func claim(_ offset: UInt64, bytes: UInt64) -> Bool {
        guard offset >= start, offset % Self.unit == 0, bytes > 0, offset + bytes <= end else { return false }
        let first = Int((offset - start) / Self.unit), count = Self.units(bytes)
        guard first + count <= units, !(first..<first + count).contains(where: isUsed) else { return false }
        mark(first, count, true)
        return true
    }

    /// `count` free units in a row, from where the last allocation ended (next fit), or nil
    /// when the area has no such run.
    mutating func allocate(_ count: Int) -> UInt64? {
        guard count > 0, count <= units else { return nil }
        var scanned = 0, i = cursor
        while scanned < units + count {
            if i + count > units { scanned += units - i; i = 0; continue }
            if let busy = (i..<i + count).last(where: isUsed) {
                scanned += busy - i + 1; i = busy + 1
                continue
            }
            mark(i, count, true)
            cursor = i + count
            return start + UInt64(i) * Self.unit
        }
        return nil
    }

    mutating func free(_ offset: UInt64, bytes: UInt64) {
        mark(Int((offset - start) / Self.unit), Self.units(bytes), false)
    }
}
