import CCrypto
import Core
import Glibc
import Synchronization

/// A content-addressed chunk store in a directory, shared by the disks (``CASDiskMap``s) that
/// name it: each distinct 4 KiB chunk any of them holds is stored once, under its SHA-256, with
/// a count of the blocks that name it, so that guests installed from one image share its blocks.
///
/// Files in the directory:
/// - `header`: magic, version, chunk size, the store's id (maps carry it). Held with an
///   exclusive `flock` while the store is open: one process serves a store.
/// - `chunks`: the chunks, slot `s` at `s * 4096`; a freed slot's space is punched out.
/// - `index`: the SHA-256 of the chunk in slot `s`, at `s * 32`.
/// - `disks`: the absolute paths of the store's maps, one per line, replaced atomically.
///
/// Crash safety, without a journal: (1) a chunk and its index entry are written before any map
/// entry names it, and a map's dirty entries reach its file only in a flush, after `chunks`
/// and `index` are made durable; (2) a slot a disk stops naming is *held* until that disk's
/// next flush has made the new entry durable, and only then reused. So a map file, whatever a
/// crash leaves of it, names only chunks that are durable and hold what it meant. At open the
/// counts are rebuilt from the maps; a slot no map names is garbage (a chunk written after the
/// last flush, or freed) and collected: punched out, the file's tail cut off.
final class ChunkStore: @unchecked Sendable {
    static let chunkSize = 4096
    static let magic = Array("SDCASSTR".utf8)
    static let version: UInt32 = 1

    let directory: String
    let id: [UInt8]
    private let header: FormatFile
    private let chunks: FormatFile
    private let index: FormatFile

    /// Guards everything below: reads share it, writes, flush snapshots and frees take it alone.
    let lock = ReadWriteLock()

    private struct Slot {
        var hash: ChunkHash
        /// Blocks of every disk, in memory, that name the slot.
        var references: UInt32
        /// Disks whose files may still name it (see ``CASDiskMap/dropped``).
        var holds: UInt32
    }
    private var slots: [Slot] = []
    private var slotOfHash: [ChunkHash: UInt32] = [:]
    private var freeSlots: [UInt32] = []
    /// Every disk of the store, by absolute path, loaded at open.
    private var disks: [String: CASDiskMap] = [:]
    /// A chunk's worth of memory for read-modify-write, used under the write lock.
    let scratch = UnsafeMutableRawPointer.allocate(byteCount: chunkSize, alignment: 4096)

    // MARK: Opening, shared within the process

    private static let open = Mutex<[String: (store: ChunkStore, users: Int)]>([:])

    /// The store in `directory`, made there if the directory is missing or empty; shared by
    /// every device of this process that names it. Each call is matched by ``release()``.
    static func acquire(_ directory: String) throws(BlockError) -> ChunkStore {
        try open.withLock { (stores) throws(BlockError) -> ChunkStore in
            let key = try absolute(directory, what: "cas: store")
            if let entry = stores[key] {
                stores[key] = (entry.store, entry.users + 1)
                return entry.store
            }
            let store = try ChunkStore(directory: key)
            stores[key] = (store, 1)
            return store
        }
    }

    /// Gives the store back; the last user unlocks it for other processes (and for a later
    /// open in this one, whoever still holds this object).
    func release() {
        ChunkStore.open.withLock { stores in
            guard let entry = stores[directory], entry.store === self else { return }
            if entry.users > 1 {
                stores[directory] = (self, entry.users - 1)
            } else {
                stores[directory] = nil
                flock(header.fd, LOCK_UN)
            }
        }
    }

    /// `path` made absolute (and its directory's symbolic links resolved), for the files that
    /// name each other.
    static func absolute(_ path: String, what: String) throws(BlockError) -> String {
        if let resolved = realpath(path, nil) { defer { Glibc.free(resolved) }; return String(cString: resolved) }
        // A file still to be made: its directory must exist.
        let slash = path.lastIndex(of: "/")
        let parent = slash.map { String(path[..<$0]) } ?? "."
        guard let resolved = realpath(parent.isEmpty ? "/" : parent, nil) else {
            throw BlockError.system("\(what) \(path): its directory \(parent)", errno: errno)
        }
        defer { Glibc.free(resolved) }
        let name = slash.map { String(path[path.index(after: $0)...]) } ?? path
        let base = String(cString: resolved)
        return (base == "/" ? "" : base) + "/" + name
    }

    private init(directory: String) throws(BlockError) {
        self.directory = directory
        if mkdir(directory, 0o700) != 0 && errno != EEXIST { throw BlockError.system("cas: store \(directory)", errno: errno) }
        let headerPath = directory + "/header"
        let fresh = access(headerPath, F_OK) != 0
        header = try FormatFile(headerPath, create: fresh)
        guard flock(header.fd, LOCK_EX | LOCK_NB) == 0 else {
            throw BlockError(.invalid, errno: EBUSY, "cas: store \(directory) is in use by another process (it holds \(headerPath) locked)")
        }
        if fresh {
            var bytes = [UInt8](repeating: 0, count: 512)
            bytes.replaceSubrange(0..<8, with: Self.magic)
            bytes.storeLE(Self.version, at: 8)
            bytes.storeLE(UInt32(Self.chunkSize), at: 12)
            var random = [UInt8](repeating: 0, count: 16)
            guard getrandom(&random, 16, 0) == 16 else { throw BlockError.system("cas: getrandom", errno: errno) }
            bytes.replaceSubrange(16..<32, with: random)
            try header.write(bytes, at: 0)
            try header.sync()
            try FormatFile.syncDirectory(of: headerPath)
        }
        let bytes = try header.read(count: 32, at: 0, what: "the cas store's header")
        guard Array(bytes[0..<8]) == Self.magic else { throw BlockError(.invalid, "\(headerPath): not a cas store (no SDCASSTR magic at offset 0)") }
        guard bytes.loadLE(UInt32.self, at: 8) == Self.version else {
            throw BlockError(.invalid, "\(headerPath): store version \(bytes.loadLE(UInt32.self, at: 8)) at offset 8 (this softdev reads version \(Self.version))")
        }
        guard bytes.loadLE(UInt32.self, at: 12) == UInt32(Self.chunkSize) else {
            throw BlockError(.invalid, "\(headerPath): chunk size \(bytes.loadLE(UInt32.self, at: 12)) at offset 12 (must be \(Self.chunkSize))")
        }
        id = Array(bytes[16..<32])
        chunks = try FormatFile(directory + "/chunks", create: true)
        index = try FormatFile(directory + "/index", create: true)
        try rebuild()
    }

    deinit {
        scratch.deallocate()
        flock(header.fd, LOCK_UN)
    }

    /// Loads every disk, counts the references, reads the hashes of the chunks named, and
    /// collects the rest.
    private func rebuild() throws(BlockError) {
        let slotCount = Int(try chunks.size / UInt64(Self.chunkSize))
        let listed = try diskPaths()
        var kept: [String] = []
        for path in listed {
            guard access(path, F_OK) == 0 else { continue }   // a map removed: its chunks are garbage now
            disks[path] = try CASDiskMap.load(path, storeID: id, slots: slotCount)
            kept.append(path)
        }
        if kept != listed { try writeDiskPaths(kept) }
        var references = [UInt32](repeating: 0, count: slotCount)
        for disk in disks.values {
            for entry in disk.entries where entry != 0 { references[Int(entry - 1)] += 1 }
        }
        let indexSize = try index.size
        let hashes = try index.read(count: Int(min(indexSize, UInt64(slotCount) * UInt64(ChunkHash.byteCount))), at: 0, what: "the cas index")
        slots.reserveCapacity(slotCount)
        for s in 0..<slotCount {
            var hash = ChunkHash(of: scratch, count: 0)
            if references[s] > 0 {
                guard (s + 1) * ChunkHash.byteCount <= hashes.count else {
                    throw BlockError(.invalid, "\(directory)/index: the hash of chunk \(s) at offset \(s * ChunkHash.byteCount) is missing (the file ends at \(indexSize))")
                }
                hash = hashes.withUnsafeBytes { ChunkHash(loading: $0.baseAddress! + s * ChunkHash.byteCount) }
                if slotOfHash[hash] == nil { slotOfHash[hash] = UInt32(s) }
            }
            slots.append(Slot(hash: hash, references: references[s], holds: 0))
        }
        // Collect: the tail cut off, the rest punched out and reused lowest first.
        var end = slotCount
        while end > 0 && references[end - 1] == 0 { end -= 1 }
        if end < slotCount {
            slots.removeLast(slotCount - end)
            try chunks.truncate(UInt64(end) * UInt64(Self.chunkSize))
            try index.truncate(UInt64(end) * UInt64(ChunkHash.byteCount))
        }
        var s = end - 1
        while s >= 0 {
            if references[s] == 0 {
                var first = s
                while first > 0 && references[first - 1] == 0 { first -= 1 }
                chunks.punch(UInt64(first) * UInt64(Self.chunkSize), UInt64(s - first + 1) * UInt64(Self.chunkSize))
                for f in stride(from: s, through: first, by: -1) { freeSlots.append(UInt32(f)) }
                s = first - 1
            } else {
                s -= 1
            }
        }
        freeSlots.reverse()   // popLast gives the lowest free slot
    }

    private var disksPath: String { directory + "/disks" }

    private func diskPaths() throws(BlockError) -> [String] {
        guard access(disksPath, F_OK) == 0 else { return [] }
        let file = try FormatFile(disksPath, readOnly: true)
        let size = Int(try file.size)
        let bytes = try file.read(count: size, at: 0, what: "the list of disks")
        return String(decoding: bytes, as: UTF8.self).split(separator: "\n").map(String.init)
    }

    private func writeDiskPaths(_ paths: [String]) throws(BlockError) {
        try FormatFile.replace(disksPath, with: Array(paths.map { $0 + "\n" }.joined().utf8))
    }

    // MARK: Disks

    /// The disk whose map is `path` (made, `size` bytes, if it does not exist and `size` is
    /// given), marked open: one device at a time serves a disk.
    func openDisk(_ path: String, size: UInt64?) throws(BlockError) -> CASDiskMap {
        let key = try Self.absolute(path, what: "cas: map")
        return try lock.writing { () throws(BlockError) -> CASDiskMap in
            let disk: CASDiskMap
            if let known = disks[key] {
                disk = known
            } else if access(key, F_OK) == 0 {
                throw BlockError(.invalid, "cas: map \(key) exists but is not one of the store \(directory)'s disks (listed in \(disksPath))")
            } else {
                guard let size, size > 0 else {
                    throw BlockError(.invalid, "cas: map \(key) does not exist: give size= to make a new disk")
                }
                disk = try CASDiskMap.create(key, size: size, storeID: id)
                do throws(BlockError) { try writeDiskPaths(disks.keys.sorted() + [key]) } catch {
                    unlink(key); throw error
                }
                disks[key] = disk
            }
            if let size, size != disk.size {
                throw BlockError(.invalid, "cas: map \(key) is a \(disk.size)-byte disk, not \(size) bytes (leave size= out to open it)")
            }
            guard !disk.isOpen else { throw BlockError(.invalid, errno: EBUSY, "cas: map \(key) is already open in this process") }
            disk.isOpen = true
            return disk
        }
    }

    func closeDisk(_ disk: CASDiskMap) {
        lock.writing { disk.isOpen = false }
    }

    // MARK: Blocks (callers hold the lock: reading for `readChunk`, writing for the rest)

    /// Reads `block` of `disk` into `into` (a chunk's worth).
    func readChunk(_ disk: CASDiskMap, _ block: Int, into: UnsafeMutableRawPointer) throws(BlockError) {
        let entry = disk.entries[block]
        if entry == 0 { memset(into, 0, Self.chunkSize); return }
        try chunks.read(into, count: Self.chunkSize, at: (entry - 1) * UInt64(Self.chunkSize), what: "chunk \(entry - 1)")
    }

    /// Makes `block` of `disk` hold the chunk at `data`: an existing chunk with its hash, or a
    /// new one written to a free slot; all zeroes is no chunk at all.
    func put(_ disk: CASDiskMap, _ block: Int, _ data: UnsafeRawPointer) throws(BlockError) {
        var entry: UInt64 = 0
        if !Self.isZero(data) {
            let hash = ChunkHash(of: data, count: Self.chunkSize)
            if let slot = slotOfHash[hash] {
                if disk.entries[block] == UInt64(slot) + 1 { return }   // the same data again
                slots[Int(slot)].references += 1
                entry = UInt64(slot) + 1
            } else {
                let slot = try store(data, hash: hash)
                entry = UInt64(slot) + 1
            }
        }
        set(disk, block, entry)
    }

    /// Makes `block` of `disk` read as zeroes (no chunk).
    func clear(_ disk: CASDiskMap, _ block: Int) { set(disk, block, 0) }

    private func set(_ disk: CASDiskMap, _ block: Int, _ entry: UInt64) {
        let old = disk.entries[block]
        guard old != entry else { return }
        disk.entries[block] = entry
        disk.dirty.insert(block)
        if old != 0 {
            let slot = Int(old - 1)
            slots[slot].references -= 1
            slots[slot].holds += 1
            disk.dropped.append(UInt32(slot))
        }
    }

    /// Writes a new chunk and its hash to a free slot (or a new one at the end).
    private func store(_ data: UnsafeRawPointer, hash: ChunkHash) throws(BlockError) -> UInt32 {
        let slot = freeSlots.popLast() ?? UInt32(slots.count)
        do throws(BlockError) {
            try chunks.write(data, count: Self.chunkSize, at: UInt64(slot) * UInt64(Self.chunkSize))
            try index.write(hash.bytes, at: UInt64(slot) * UInt64(ChunkHash.byteCount))
        } catch {
            if Int(slot) < slots.count { freeSlots.append(slot) }
            throw error
        }
        let entry = Slot(hash: hash, references: 1, holds: 0)
        if Int(slot) == slots.count { slots.append(entry) } else { slots[Int(slot)] = entry }
        slotOfHash[hash] = slot
        return slot
    }

    static func isZero(_ data: UnsafeRawPointer) -> Bool {
        let words = data.assumingMemoryBound(to: UInt64.self)
        for i in 0..<(chunkSize / 8) where words[i] != 0 { return false }
        return true
    }

    // MARK: Flush

    /// Makes every write to `disk` acknowledged before the call durable: the chunks and the
    /// index first, then the disk's dirty entries, then the slots it stopped naming are free.
    func flush(_ disk: CASDiskMap) throws(BlockError) {
        disk.flushing.lock(); defer { disk.flushing.unlock() }
        let (blocks, values, dropped) = lock.writing { () -> ([Int], [UInt64], [UInt32]) in
            let blocks = disk.dirty.sorted()
            let dropped = disk.dropped
            disk.dirty.removeAll(keepingCapacity: true)
            disk.dropped.removeAll(keepingCapacity: true)
            return (blocks, blocks.map { disk.entries[$0] }, dropped)
        }
        if blocks.isEmpty && dropped.isEmpty { return }
        do throws(BlockError) {
            try chunks.sync()
            try index.sync()
            try disk.writeEntries(blocks, values)
            try disk.file.sync()
        } catch {
            // Not durable: the next flush tries again with these (and their holds stay).
            lock.writing {
                disk.dirty.formUnion(blocks)
                disk.dropped.append(contentsOf: dropped)
            }
            throw error
        }
        lock.writing {
            for slot in dropped {
                let s = Int(slot)
                slots[s].holds -= 1
                if slots[s].references == 0 && slots[s].holds == 0 { free(slot) }
            }
        }
    }

    private func free(_ slot: UInt32) {
        let hash = slots[Int(slot)].hash
        if slotOfHash[hash] == slot { slotOfHash[hash] = nil }
        freeSlots.append(slot)
        chunks.punch(UInt64(slot) * UInt64(Self.chunkSize), UInt64(Self.chunkSize))
    }

    // MARK: Reports

    struct Statistics: Sendable, Equatable {
        /// Chunks stored (slots in use).
        var chunks: Int
        /// Blocks of all disks that name a chunk.
        var references: Int
        var disks: Int
        var storedBytes: UInt64 { UInt64(chunks) * UInt64(ChunkStore.chunkSize) }
        var logicalBytes: UInt64 { UInt64(references) * UInt64(ChunkStore.chunkSize) }
        /// The share of the disks' data that deduplication saved (0 when nothing is stored).
        var savings: Double { logicalBytes == 0 ? 0 : 1 - Double(storedBytes) / Double(logicalBytes) }
    }

    var statistics: Statistics {
        lock.reading {
            var stats = Statistics(chunks: 0, references: 0, disks: disks.count)
            for slot in slots where slot.references > 0 {
                stats.chunks += 1
                stats.references += Int(slot.references)
            }
            return stats
        }
    }

    /// Each disk's path, size and blocks in use.
    var diskSummaries: [(path: String, size: UInt64, blocksInUse: Int)] {
        lock.reading { disks.values.sorted { $0.path < $1.path }.map { ($0.path, $0.size, $0.entries.count { $0 != 0 }) } }
    }

    /// Reads every chunk a disk names and checks it against its hash: the store's own check
    /// (`softdev cas-info --verify`). Returns a line per damaged chunk.
    func verify() throws(BlockError) -> [String] {
        let buffer = UnsafeMutableRawPointer.allocate(byteCount: Self.chunkSize, alignment: 4096)
        defer { buffer.deallocate() }
        return try lock.reading { () throws(BlockError) -> [String] in
            var damaged: [String] = []
            for (s, slot) in slots.enumerated() where slot.references > 0 {
                try chunks.read(buffer, count: Self.chunkSize, at: UInt64(s) * UInt64(Self.chunkSize), what: "chunk \(s)")
                let actual = ChunkHash(of: buffer, count: Self.chunkSize)
                if actual != slot.hash {
                    damaged.append("\(directory)/chunks: chunk \(s) at offset \(s * Self.chunkSize) has SHA-256 \(actual), the index says \(slot.hash) (named by \(slot.references) blocks)")
                }
            }
            return damaged
        }
    }
}

/// What `softdev cas-info` prints: a store's disks, its chunks and what deduplication saved,
/// and with `verify`, every chunk a disk names checked against its hash. Opening the store
/// collects the chunks no disk names, as every open does.
public struct CASStoreReport: Sendable {
    public struct Disk: Sendable {
        public var path: String
        public var size: UInt64
        public var blocksInUse: Int
    }
    public var disks: [Disk]
    public var chunks: Int
    public var references: Int
    public var storedBytes: UInt64
    public var logicalBytes: UInt64
    public var savings: Double
    /// One line per damaged chunk (empty unless verified and damaged).
    public var damaged: [String]

    public static func read(store directory: String, verify: Bool) throws(BlockError) -> CASStoreReport {
        guard access(directory + "/header", F_OK) == 0 else { throw BlockError(.invalid, "\(directory) is not a cas store (no header file)") }
        let store = try ChunkStore.acquire(directory)
        defer { store.release() }
        let stats = store.statistics
        return CASStoreReport(disks: store.diskSummaries.map { Disk(path: $0.path, size: $0.size, blocksInUse: $0.blocksInUse) },
                              chunks: stats.chunks, references: stats.references, storedBytes: stats.storedBytes,
                              logicalBytes: stats.logicalBytes, savings: stats.savings, damaged: verify ? try store.verify() : [])
    }
}
