import Core

/// A table of 4 KiB metadata blocks on the device below a filter (cow's allocation bits,
/// compress's chunk map), changed in memory and written whole at a flush:
///
/// ```
///    0  the block's index (catches a block written to the wrong place)
///    4  the table's contents
/// 4092  CRC-32C of bytes 0..<4092
/// ```
/// An all-zero block (a new, sparse file) is an empty one; any other block whose checksum or
/// index is wrong is refused at open, naming the file and the offset.
struct MetadataBlocks {
    static let size = 4096
    /// Where the contents start in a block, and how many bytes they have.
    static let contentStart = 4
    static let contentBytes = size - 8

    var blocks: [[UInt8]]
    /// Blocks changed since they were last taken for the disk.
    var dirty: Set<Int> = []

    /// Checks `bytes` (the table, read from `offset`); `what` names it in errors ("cow map").
    init(bytes: [UInt8], offset: UInt64, label: String, what: String) throws(BlockError) {
        blocks = []
        for index in 0..<bytes.count / Self.size {
            let at = index * Self.size
            var block = FormatBlock(bytes: Array(bytes[at..<at + Self.size]))
            let place = offset + UInt64(at)
            if block.isZero {
                block.put32(UInt32(index), 0)
            } else if block.storedChecksum != block.computedChecksum {
                throw FormatBlock.error(label, "\(what) block \(index): checksum \(block.storedChecksum) does not match its contents' \(block.computedChecksum) (damaged)", at: place + UInt64(Self.size - 4))
            } else if block.u32(0) != UInt32(index) {
                throw FormatBlock.error(label, "\(what) block \(index) says it is block \(block.u32(0))", at: place)
            }
            blocks.append(block.bytes)
        }
    }

    /// The changed blocks, sealed for the disk; clean until ``failed(_:)`` says otherwise.
    mutating func takeDirty() -> [(index: Int, bytes: [UInt8])] {
        defer { dirty = [] }
        return dirty.sorted().map { index in
            var block = FormatBlock(bytes: blocks[index])
            block.seal()
            return (index, block.bytes)
        }
    }

    /// Writing these blocks failed: they are dirty again.
    mutating func failed(_ taken: [(index: Int, bytes: [UInt8])]) {
        for t in taken { dirty.insert(t.index) }
    }
}

extension BlockDevice {
    /// Writes the blocks `taken` from a table at `offset`.
    func writeMetadataBlocks(_ taken: [(index: Int, bytes: [UInt8])], tableAt offset: UInt64) throws(BlockError) {
        for block in taken {
            try writeFormatBlocks(block.bytes, at: offset + UInt64(block.index * MetadataBlocks.size))
        }
    }
}
