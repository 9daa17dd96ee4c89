import Core
import Glibc
import Synchronization

/// `memory(size=...)`: a sparse RAM disk. Storage is allocated 64 KiB at a time on first write,
/// so a large, mostly empty disk costs little; holes read as zeroes, discard and write-zeroes
/// give whole chunks back, and `extents` reports exactly which chunks hold data.
///
/// Chunks are found through a two-level table (a directory of pages of 4096 chunk pointers,
/// 256 MiB each), so that a terabyte device costs a 32 KiB directory, and `extents` skips an
/// empty 256 MiB page in one step. One lock guards the table and the data; it is held only for
/// the copies of one request, and several connections may share the device (multi-conn).
public final class MemoryDevice: SynchronousBlockDevice, @unchecked Sendable {
    public let name = "memory"
    public let geometry: BlockGeometry
    public let capabilities: BlockCapabilities = .all

    static let chunkSize = 64 * 1024
    static let chunksPerPage = 4096
    typealias Page = UnsafeMutablePointer<UnsafeMutableRawPointer?>

    /// Guards `directory`, the pages and the chunks.
    private let lock = Mutex(())
    private var directory: [Page?]
    /// Zeroed memory of a given size, or nil when there is none: calloc, or a test's stand-in
    /// that fails on demand. A device larger than the host's memory is allowed (it is sparse),
    /// so running out is a client's doing and must be an error of that request, never a trap.
    private let allocate: @Sendable (Int) -> UnsafeMutableRawPointer?

    public convenience init(size: UInt64) {
        self.init(size: size, allocate: { calloc(1, $0) })
    }

    /// `allocate` returns zeroed memory that `free` releases, or nil when none is left.
    init(size: UInt64, allocate: @escaping @Sendable (Int) -> UnsafeMutableRawPointer?) {
        self.allocate = allocate
        geometry = BlockGeometry(size: size)
        let chunks = (size + UInt64(Self.chunkSize) - 1) / UInt64(Self.chunkSize)
        directory = Array(repeating: nil, count: Int((chunks + UInt64(Self.chunksPerPage) - 1) / UInt64(Self.chunksPerPage)))
    }

    deinit { close() }

    /// Every request is done at once under the lock (no other thread, no system call).
    public func immediateResult(of request: BlockRequest) -> BlockResult? { performSynchronously(request) }

    /// The number of 64 KiB chunks that hold data (for tests and statistics).
    public var allocatedChunks: Int {
        lock.withLock { _ in
            directory.reduce(0) { count, page in
                guard let page else { return count }
                return count + (0..<Self.chunksPerPage).filter { page[$0] != nil }.count
            }
        }
    }

    // MARK: Chunks (called with the lock held)

    private func chunk(_ index: Int) -> UnsafeMutableRawPointer? {
        directory[index / Self.chunksPerPage]?[index % Self.chunksPerPage]
    }

    /// The chunk, allocated if need be; nil when the host has no memory left for it.
    private func allocateChunk(_ index: Int) -> UnsafeMutableRawPointer? {
        if let chunk = chunk(index) { return chunk }
        let pageIndex = index / Self.chunksPerPage
        let page: Page
        if let existing = directory[pageIndex] {
            page = existing
        } else {
            // Zeroed: every chunk pointer starts nil.
            guard let memory = allocate(Self.chunksPerPage * MemoryLayout<UnsafeMutableRawPointer?>.stride) else { return nil }
            page = memory.bindMemory(to: UnsafeMutableRawPointer?.self, capacity: Self.chunksPerPage)
            directory[pageIndex] = page
        }
        // Zeroed: the parts not written read as zeroes.
        guard let chunk = allocate(Self.chunkSize) else { return nil }
        page[index % Self.chunksPerPage] = chunk
        return chunk
    }

    private func freeChunk(_ index: Int) {
        guard let page = directory[index / Self.chunksPerPage], let chunk = page[index % Self.chunksPerPage] else { return }
        free(chunk)
        page[index % Self.chunksPerPage] = nil
    }

    /// Calls `body(deviceOffset, memory, length)` for each piece of `buffers` placed at `offset`,
    /// split at chunk boundaries.
    private func forEachPiece(_ buffers: IOBuffers, at offset: UInt64,
                              _ body: (UInt64, UnsafeMutableRawPointer, Int) -> Void) {
        var position = offset
        for buffer in buffers {
            var done = 0
            while done < buffer.count {
                let room = Self.chunkSize - Int(position % UInt64(Self.chunkSize))
                let length = min(room, buffer.count - done)
                body(position, buffer.baseAddress! + done, length)
                done += length
                position += UInt64(length)
            }
        }
    }

    // MARK: Operations

    public func read(into buffers: IOBuffers, at offset: UInt64) throws(BlockError) {
        lock.withLock { _ in
            forEachPiece(buffers, at: offset) { position, memory, length in
                let index = Int(position / UInt64(Self.chunkSize))
                if let chunk = chunk(index) {
                    memcpy(memory, chunk + Int(position % UInt64(Self.chunkSize)), length)
                } else {
                    memset(memory, 0, length)
                }
            }
        }
    }

    /// A write the host has no memory for fails with ENOSPC (the pieces before it are written,
    /// as a disk that fills up part way), and the device goes on serving.
    public func write(from buffers: IOBuffers, at offset: UInt64, fua: Bool) throws(BlockError) {
        let failedAt: UInt64? = lock.withLock { _ in
            var failedAt: UInt64?
            forEachPiece(buffers, at: offset) { position, memory, length in
                guard failedAt == nil else { return }
                guard let chunk = allocateChunk(Int(position / UInt64(Self.chunkSize))) else { failedAt = position; return }
                memcpy(chunk + Int(position % UInt64(Self.chunkSize)), memory, length)
            }
            return failedAt
        }
        if let failedAt {
            throw BlockError(.noSpace, "memory: no host memory left for the write at offset \(failedAt)")
        }
    }

    /// Discarded ranges read back as zeroes, so discard is write-zeroes.
    public func discard(at offset: UInt64, length: UInt64) throws(BlockError) {
        zero(at: offset, length: length)
    }

    public func writeZeroes(at offset: UInt64, length: UInt64, mayDiscard: Bool) throws(BlockError) {
        zero(at: offset, length: length)
    }

    /// Frees the chunks the range covers; zeroes the covered part of the others and frees them
    /// too if that leaves them all zero, so that `extents` stays exact.
    private func zero(at offset: UInt64, length: UInt64) {
        let chunkSize = UInt64(Self.chunkSize)
        lock.withLock { _ in
            var position = offset
            let end = offset + length
            while position < end {
                let index = Int(position / chunkSize)
                let start = Int(position % chunkSize)
                let count = Int(min(chunkSize - UInt64(start), end - position))
                if let chunk = chunk(index) {
                    if count == Self.chunkSize {
                        freeChunk(index)
                    } else {
                        memset(chunk + start, 0, count)
                        if isZero(chunk, count: Self.chunkSize) { freeChunk(index) }
                    }
                }
                position += UInt64(count)
            }
        }
    }

    private func isZero(_ memory: UnsafeRawPointer, count: Int) -> Bool {
        // Compare the first word, then the buffer with itself shifted by one word: equal only
        // if every word equals the first (the trick nbdkit's is_zero uses, at memcmp speed).
        let word = MemoryLayout<UInt64>.size
        return memory.loadUnaligned(as: UInt64.self) == 0 && memcmp(memory, memory + word, count - word) == 0
    }

    /// Data for allocated chunks and holes for the rest, merged into runs.
    public func extents(at offset: UInt64, length: UInt64) throws(BlockError) -> [BlockExtent] {
        let chunkSize = UInt64(Self.chunkSize)
        let pageSpan = chunkSize * UInt64(Self.chunksPerPage)
        let end = min(offset + length, geometry.size)
        return lock.withLock { _ in
            var extents: [BlockExtent] = []
            func add(_ start: UInt64, _ stop: UInt64, hole: Bool) {
                if let last = extents.last, last.isHole == hole {
                    extents[extents.count - 1].length = stop - last.offset
                } else {
                    extents.append(BlockExtent(offset: start, length: stop - start, isHole: hole, isZero: hole))
                }
            }
            var position = offset
            while position < end {
                let next: UInt64
                if directory[Int(position / pageSpan)] == nil {
                    next = min((position / pageSpan + 1) * pageSpan, end)
                    add(position, next, hole: true)
                } else {
                    next = min((position / chunkSize + 1) * chunkSize, end)
                    add(position, next, hole: chunk(Int(position / chunkSize)) == nil)
                }
                position = next
            }
            return extents
        }
    }

    public func close() {
        lock.withLock { _ in
            for case let page? in directory {
                for i in 0..<Self.chunksPerPage { free(page[i]) }
                free(page)
            }
            for i in directory.indices { directory[i] = nil }
        }
    }
}

extension MemoryDevice {
    public static let descriptor = DeviceDescriptor(
        name: "memory", kind: .device,
        summary: "A sparse RAM disk: 64 KiB chunks allocated on first write, lost when the process exits.",
        parameters: [
            DeviceParameter("size", required: true, "Size of the device, e.g. 512M or 1T (a multiple of 512)."),
        ],
        open: { parameters, _ throws(DeviceSpecError) in
            MemoryDevice(size: try parameters.requiredSize("size"))
        })
}
