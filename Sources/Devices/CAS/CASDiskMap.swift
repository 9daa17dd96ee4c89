import Core
import Glibc

/// One disk of a ``ChunkStore``: which chunk each 4 KiB block of the disk holds. Its file is a
/// 4 KiB header then one little-endian 64-bit entry per block: 0 for a block never written (or
/// discarded, or all zeroes: it reads as zeroes), else the chunk's slot in the store plus one.
///
/// The entries in memory run ahead of the file: a write changes the entry here and marks it
/// dirty; a flush writes the dirty entries only after the chunks they name are durable (see
/// ``ChunkStore/flush(_:)``), so the file never names a chunk that a crash could lose.
final class CASDiskMap: @unchecked Sendable {
    static let headerBytes = 4096
    static let magic = Array("SDCASMAP".utf8)
    static let version: UInt32 = 1

    let path: String
    let file: FormatFile
    /// The disk's size in bytes, a multiple of the chunk size.
    let size: UInt64
    var blocks: Int { Int(size / UInt64(ChunkStore.chunkSize)) }

    // Under the store's lock.
    var entries: [UInt64]
    /// Blocks whose entry changed since the last flush.
    var dirty = Set<Int>()
    /// Slots this disk stopped naming since its last flush: its file may still name them, so
    /// they are not reused before that flush (``ChunkStore``'s holds).
    var dropped: [UInt32] = []
    /// A device has the disk open (one at a time).
    var isOpen = false

    /// Flushes of this disk, one at a time: a second flush must not return before the first's
    /// entries are durable.
    let flushing = ConditionLock()

    private init(path: String, file: FormatFile, size: UInt64, entries: [UInt64]) {
        self.path = path; self.file = file; self.size = size; self.entries = entries
    }

    /// A new map of `size` bytes (rounded up to whole chunks) for the store `storeID`, durable
    /// before it returns; `path` must not exist.
    static func create(_ path: String, size: UInt64, storeID: [UInt8]) throws(BlockError) -> CASDiskMap {
        let chunk = UInt64(ChunkStore.chunkSize)
        let size = (size + chunk - 1) / chunk * chunk
        let file = try FormatFile(path, create: true, exclusive: true)
        var header = [UInt8](repeating: 0, count: headerBytes)
        header.replaceSubrange(0..<8, with: magic)
        header.storeLE(version, at: 8)
        header.storeLE(UInt32(ChunkStore.chunkSize), at: 12)
        header.storeLE(size, at: 16)
        header.replaceSubrange(24..<40, with: storeID)
        try file.write(header, at: 0)
        try file.truncate(UInt64(headerBytes) + size / chunk * 8)
        try file.sync()
        try FormatFile.syncDirectory(of: path)
        return CASDiskMap(path: path, file: file, size: size, entries: Array(repeating: 0, count: Int(size / chunk)))
    }

    /// Reads the map at `path`, checking that it belongs to the store `storeID` and that every
    /// entry names one of its `slots` chunks; errors name the file and the offset at fault.
    static func load(_ path: String, storeID: [UInt8], slots: Int) throws(BlockError) -> CASDiskMap {
        let file = try FormatFile(path)
        let header = try file.read(count: headerBytes, at: 0, what: "the cas map's header")
        guard Array(header[0..<8]) == magic else {
            throw BlockError(.invalid, "\(path): not a cas map (no SDCASMAP magic at offset 0)")
        }
        guard header.loadLE(UInt32.self, at: 8) == version else {
            throw BlockError(.invalid, "\(path): cas map version \(header.loadLE(UInt32.self, at: 8)) at offset 8 (this softdev reads version \(version))")
        }
        guard header.loadLE(UInt32.self, at: 12) == UInt32(ChunkStore.chunkSize) else {
            throw BlockError(.invalid, "\(path): chunk size \(header.loadLE(UInt32.self, at: 12)) at offset 12 (must be \(ChunkStore.chunkSize))")
        }
        let size = header.loadLE(UInt64.self, at: 16)
        guard size % UInt64(ChunkStore.chunkSize) == 0, size <= 1 << 50 else {
            throw BlockError(.invalid, "\(path): disk size \(size) at offset 16 is not a multiple of \(ChunkStore.chunkSize) or too large")
        }
        guard Array(header[24..<40]) == storeID else {
            throw BlockError(.invalid, "\(path): belongs to another cas store (store id at offset 24 differs)")
        }
        let count = Int(size / UInt64(ChunkStore.chunkSize))
        let bytes = try file.read(count: count * 8, at: UInt64(headerBytes), what: "the cas map's entries")
        var entries = [UInt64](repeating: 0, count: count)
        for i in 0..<count {
            entries[i] = bytes.loadLE(UInt64.self, at: i * 8)
            guard entries[i] <= UInt64(slots) else {
                throw BlockError(.invalid, "\(path): the entry of block \(i) at offset \(headerBytes + 8 * i) names chunk \(entries[i] - 1), past the store's \(slots) chunks")
            }
        }
        return CASDiskMap(path: path, file: file, size: size, entries: entries)
    }

    /// Writes the entries of `blocks` (sorted) with their `values`, runs of neighbours at once.
    func writeEntries(_ blocks: [Int], _ values: [UInt64]) throws(BlockError) {
        var start = 0
        while start < blocks.count {
            var end = start + 1
            while end < blocks.count && blocks[end] == blocks[end - 1] + 1 { end += 1 }
            var run = [UInt8](repeating: 0, count: 8 * (end - start))
            for i in start..<end { run.storeLE(values[i], at: 8 * (i - start)) }
            try file.write(run, at: UInt64(Self.headerBytes + 8 * blocks[start]))
            start = end
        }
    }
}

extension Array where Element == UInt8 {
    /// `value` little-endian at byte `offset`.
    mutating func storeLE<T: FixedWidthInteger>(_ value: T, at offset: Int) {
        withUnsafeMutableBytes { $0.storeBytes(of: value.littleEndian, toByteOffset: offset, as: T.self) }
    }
    /// The little-endian `T` at byte `offset`.
    func loadLE<T: FixedWidthInteger>(_ type: T.Type, at offset: Int) -> T {
        withUnsafeBytes { T(littleEndian: $0.loadUnaligned(fromByteOffset: offset, as: T.self)) }
    }
}
