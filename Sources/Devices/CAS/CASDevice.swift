import Core
import Glibc
import Synchronization

/// `cas(store=DIR, map=FILE, size=...)`: a content-addressable disk, the paper's "content
/// addressable storage": its 4 KiB blocks are chunks of a ``ChunkStore`` named by their
/// SHA-256, stored once however many blocks of however many disks hold them (guests cloned
/// from one image share its blocks; blocks of zeroes take no space at all), counted, and
/// collected when no block names them any more.
///
/// - Writes of part of a block read the block, change it and store the result (a new chunk).
/// - Flush makes the chunks durable, then the map (see ``ChunkStore`` for why that order makes
///   the map crash-safe); FUA is a write then a flush. Close flushes.
/// - Discard and write-zeroes of whole blocks drop the blocks' chunks (they read as zeroes,
///   and a chunk no block names is freed after the next flush); write-zeroes of part of a
///   block writes the zeroes.
/// - Extents report blocks with no chunk as holes.
/// - The work runs on the caller's thread where it may wait (a blkif ring's), else on a few
///   threads of the device's (the store's files are read and written through the page cache).
public final class CASDevice: SynchronousBlockDevice, @unchecked Sendable {
    public let name = "cas"
    public let geometry: BlockGeometry
    public let capabilities: BlockCapabilities
    let store: ChunkStore
    let disk: CASDiskMap
    /// Requests run on the transport's workers (the store's files may block).
    private let offload = BlockOffload()
    private let closed = Atomic<Bool>(false)
    private static let chunk = ChunkStore.chunkSize

    /// Opens the disk `map` of the store in `store` (both made when missing; a new disk needs
    /// `size`).
    public init(store directory: String, map: String, size: UInt64? = nil, readOnly: Bool = false) throws(BlockError) {
        let store = try ChunkStore.acquire(directory)
        do throws(BlockError) {
            disk = try store.openDisk(map, size: size)
        } catch {
            store.release(); throw error
        }
        self.store = store
        geometry = BlockGeometry(size: disk.size, logicalBlockSize: 512, physicalBlockSize: UInt32(ChunkStore.chunkSize))
        capabilities = readOnly ? [.extents, .multiConn] : [.write, .flush, .fua, .discard, .writeZeroes, .extents, .multiConn]
    }

    public func submit(_ request: BlockRequest, completion: BlockCompletion) {
        offload.serve(request, completion) { self.performSynchronously(request) }
    }

    /// The store's chunks, references and savings (shared by every disk of the store).
    var statistics: ChunkStore.Statistics { store.statistics }

    public func read(into buffers: IOBuffers, at offset: UInt64) throws(BlockError) {
        let total = buffers.byteCount
        var bounce: UnsafeMutableRawPointer?
        defer { bounce?.deallocate() }
        try store.lock.reading { () throws(BlockError) in
            try forEachChunk(of: Self.chunk, offset, total) { (block, within, n, position) throws(BlockError) in
                if within == 0 && n == Self.chunk, let direct = buffers.contiguous(at: position, count: n) {
                    try store.readChunk(disk, block, into: direct)
                } else {
                    if bounce == nil { bounce = .allocate(byteCount: Self.chunk, alignment: 4096) }
                    try store.readChunk(disk, block, into: bounce!)
                    buffers.copy(from: bounce! + within, count: n, at: position)
                }
            }
        }
    }

    public func write(from buffers: IOBuffers, at offset: UInt64, fua: Bool) throws(BlockError) {
        guard capabilities.contains(.write) else { throw BlockError(.readOnly, "cas(map=\(disk.path)): opened with readonly=true") }
        let total = buffers.byteCount
        try store.lock.writing { () throws(BlockError) in
            try forEachChunk(of: Self.chunk, offset, total) { (block, within, n, position) throws(BlockError) in
                if within == 0 && n == Self.chunk, let direct = buffers.contiguous(at: position, count: n) {
                    try store.put(disk, block, direct)
                } else {
                    // Part of a block (or a block split between buffers): read, change, store.
                    if n < Self.chunk { try store.readChunk(disk, block, into: store.scratch) }
                    buffers.copy(to: store.scratch + within, count: n, at: position)
                    try store.put(disk, block, store.scratch)
                }
            }
        }
        if fua { try store.flush(disk) }
    }

    public func flush() throws(BlockError) {
        try store.flush(disk)
    }

    public func discard(at offset: UInt64, length: UInt64) throws(BlockError) {
        guard capabilities.contains(.write) else { throw BlockError(.readOnly, "cas(map=\(disk.path)): opened with readonly=true") }
        // Whole blocks only: discard may leave data, and part of a block keeps its chunk.
        let chunk = UInt64(Self.chunk)
        let first = (offset + chunk - 1) / chunk, end = (offset + length) / chunk
        guard first < end else { return }
        store.lock.writing { for block in Int(first)..<Int(end) { store.clear(disk, block) } }
    }

    public func writeZeroes(at offset: UInt64, length: UInt64, mayDiscard: Bool) throws(BlockError) {
        guard capabilities.contains(.write) else { throw BlockError(.readOnly, "cas(map=\(disk.path)): opened with readonly=true") }
        try store.lock.writing { () throws(BlockError) in
            try forEachChunk(of: Self.chunk, offset, Int(length)) { (block, within, n, _) throws(BlockError) in
                if n == Self.chunk {
                    store.clear(disk, block)
                } else {
                    try store.readChunk(disk, block, into: store.scratch)
                    memset(store.scratch + within, 0, n)
                    try store.put(disk, block, store.scratch)
                }
            }
        }
    }

    public func extents(at offset: UInt64, length: UInt64) throws(BlockError) -> [BlockExtent] {
        let chunk = UInt64(Self.chunk)
        let end = min(offset + length, geometry.size)
        guard offset < end else { return [] }
        return store.lock.reading {
            var extents: [BlockExtent] = []
            var at = offset
            while at < end {
                let hole = disk.entries[Int(at / chunk)] == 0
                var next = (at / chunk + 1) * chunk
                while next < end && (disk.entries[Int(next / chunk)] == 0) == hole { next += chunk }
                next = min(next, end)
                extents.append(BlockExtent(offset: at, length: next - at, isHole: hole, isZero: hole))
                at = next
            }
            return extents
        }
    }

    /// Flushes what is dirty, then gives the disk and the store back.
    public func close() {
        guard !closed.exchange(true, ordering: .acquiringAndReleasing) else { return }
        offload.waitUntilIdle()
        try? store.flush(disk)
        store.closeDisk(disk)
        store.release()
    }
}

extension CASDevice {
    public static let descriptor = DeviceDescriptor(
        name: "cas", kind: .device,
        summary: "A content-addressable disk: 4 KiB blocks stored once by SHA-256 in a store that several disks share (dedup across guests), counted and collected.",
        parameters: [
            DeviceParameter("store", required: true, "The store's directory (made on first use); one process serves a store, any number of its disks."),
            DeviceParameter("map", required: true, "The disk's map file: which chunk each block holds (made with size= on first use)."),
            DeviceParameter("size", "The size of a new disk, e.g. 10G (rounded up to 4 KiB); if given for an existing disk it must match."),
            DeviceParameter("readonly", "true to refuse writes (default false)."),
        ],
        open: { parameters, _ throws(DeviceSpecError) in
            let store = try parameters.required("store"), map = try parameters.required("map")
            let size = try parameters.size("size"), readOnly = try parameters.bool("readonly", default: false)
            return try DeviceSpecError.opening { () throws(BlockError) in
                try CASDevice(store: store, map: map, size: size, readOnly: readOnly)
            }
        })
}
