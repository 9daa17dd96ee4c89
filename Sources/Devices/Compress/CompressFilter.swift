import Core
import Glibc

/// `compress(size=..., chunk=64K, level=3) | DEVICE`: a device whose data is stored as zstd
/// chunks in a container on the device below: a ``FormatHeader``, a ``CompressMap`` of where
/// each chunk is, then the data area, handed out by ``CompressSpace``.
///
/// Crash safety: a chunk is never rewritten in place. A write makes the chunk's new version
/// (the old one decompressed, the write laid over it, compressed again; stored raw if it does
/// not shrink), writes it to free space, and only then points the map entry at it. Map blocks
/// reach the disk at a flush (flush the data, write the changed blocks, flush again) or a FUA
/// write, and the space of the versions they no longer point at is freed only after that.
/// So after a crash every entry on disk points at a whole chunk flushed before it, every write
/// acknowledged before the last completed flush reads back, and later ones read as the older
/// version.
///
/// - A chunk never written, or written with zeroes, is a hole: no space, reads as zeroes.
/// - Discard and write-zeroes make the chunks they cover whole into holes and zero the parts
///   of others; the space freed is discarded below (punched) after the next flush. The space
///   of a version a rewrite replaced is reused as it is, not punched.
/// - Every request runs under one lock, on the transport's worker threads (or the caller's
///   when it may wait); the last chunk read stays decompressed for the next read of it.
/// - The ratio reached (the bytes the chunks hold over the space they take) is in ``ratio``,
///   logged on close, and printed by `softdev bench --stacks` for a compress stack.
public final class CompressFilter: BlockFilter, @unchecked Sendable {
    public override var name: String { "compress" }
    static let format = FormatHeader.Kind(magic: "SDZSTDV1", name: "compress", unit: "chunk", entriesPerBlock: CompressMap.entriesPerBlock)
    let header: FormatHeader
    public let label: String
    private let size: UInt64
    private let chunkSize: UInt64
    private let lock = ConditionLock()
    /// Under `lock`, all of them.
    private var map: CompressMap
    private var space: CompressSpace
    private let codec: ZstdCodec
    /// A chunk's plain bytes (the cached chunk's, when `cached` says so), and its stored form.
    private let plain: AlignedMemory
    private let stored: AlignedMemory
    private var cached: UInt64?
    /// Stored versions no map on disk may point at after the next flush: freed then, and
    /// punched below when a hole replaced them (a rewrite's space is kept for reuse: writing
    /// into a punched hole costs the file system an allocation each time).
    private var superseded: [(offset: UInt64, bytes: UInt64, punch: Bool)] = []
    /// The plain bytes of the stored chunks, and the space they take (whole units).
    private var logicalBytes: UInt64 = 0
    private var storedBytes: UInt64 = 0
    /// Requests run on the transport's workers (they block on the device below).
    private let offload = BlockOffload()
    private var closed = false

    /// Opens the container on `next`; one whose header and map are all zeroes (a new file) is
    /// made here, of `virtualSize` bytes (default: the size of `next`) in `chunkSize` chunks
    /// (64 KiB). Errors about the container name its file and the offset of the bad field.
    public init(next: any BlockDevice, virtualSize requestedSize: UInt64? = nil, chunkSize requestedChunk: UInt64? = nil,
                level: Int32 = 3, label: String? = nil) throws(BlockError) {
        let label = label ?? next.formatLabel
        let below = next.geometry
        let (header, made) = try FormatHeader.open(on: next, kind: Self.format, label: label) { () throws(BlockError) in
            let header = FormatHeader(kind: Self.format, unitSize: UInt32(requestedChunk ?? 65536), virtualSize: requestedSize ?? below.size)
            guard header.dataOffset + UInt64(header.unitSize) <= below.size else {
                throw BlockError(.noSpace, "\(label): a compress container of \(header.virtualSize) bytes needs more than \(header.dataOffset + UInt64(header.unitSize)) bytes below, but the device is \(below.size) bytes")
            }
            return header
        }
        if !made {
            if let requestedSize, requestedSize != header.virtualSize {
                throw BlockError(.invalid, "\(label): the container holds \(header.virtualSize) bytes, not size=\(requestedSize)")
            }
            if let requestedChunk, requestedChunk != UInt64(header.unitSize) {
                throw BlockError(.invalid, "\(label): the container's chunks are \(header.unitSize) bytes, not chunk=\(requestedChunk)")
            }
            guard header.dataOffset < below.size else {
                throw FormatBlock.error(label, "truncated: the compress data area starts at offset \(header.dataOffset) but the device ends", at: below.size)
            }
        }
        var space = CompressSpace(start: header.dataOffset, end: below.size / CompressSpace.unit * CompressSpace.unit)
        map = try CompressMap(bytes: next.readFormatBlocks(at: header.mapOffset, count: header.mapBytes), header: header, space: &space, label: label)
        self.space = space
        self.header = header
        self.label = label
        chunkSize = UInt64(header.unitSize)
        size = header.virtualSize / UInt64(below.logicalBlockSize) * UInt64(below.logicalBlockSize)
        codec = try ZstdCodec(level: level)
        plain = try AlignedMemory(Int(chunkSize))
        stored = try AlignedMemory(CompressSpace.units(UInt64(ZstdCodec.bound(Int(chunkSize)))) * Int(CompressSpace.unit))
        super.init(next: next)
        for chunk in 0..<header.units where !map[chunk].isHole {
            logicalBytes += chunkLength(chunk)
            storedBytes += UInt64(CompressSpace.units(UInt64(map[chunk].length))) * CompressSpace.unit
        }
    }

    public override var geometry: BlockGeometry {
        let below = next.geometry
        return BlockGeometry(size: size, logicalBlockSize: below.logicalBlockSize, physicalBlockSize: below.physicalBlockSize)
    }
    public override var capabilities: BlockCapabilities {
        next.capabilities.contains(.write) ? [.write, .flush, .fua, .discard, .writeZeroes] : []
    }
    /// Holes are the chunks that are: reported so that clients skip them (qemu-img, nbdcopy).
    public override func extents(at offset: UInt64, length: UInt64) throws(BlockError) -> [BlockExtent] {
        lock.lock()
        defer { lock.unlock() }
        var extents: [BlockExtent] = []
        var position = offset
        let end = min(offset + length, size)
        while position < end {
            let chunk = position / chunkSize
            let stop = min(end, (chunk + 1) * chunkSize)
            let hole = map[chunk].isHole
            if let last = extents.last, last.isHole == hole {
                extents[extents.count - 1].length += stop - position
            } else {
                extents.append(BlockExtent(offset: position, length: stop - position, isHole: hole, isZero: hole))
            }
            position = stop
        }
        return extents
    }
    /// Requests wait for the device below: its completions must not need this thread.
    public override func attachCompletionSource() -> BlockCompletionSource? { nil }

    /// What the container reached: the plain bytes of its stored chunks over the space they take.
    public var ratio: Double {
        let (logical, stored) = lock.withLock { (logicalBytes, storedBytes) }
        return stored == 0 ? 1 : Double(logical) / Double(stored)
    }
    /// The same, in words, e.g. "12.00 MiB in 3.10 MiB (ratio 3.87) in 192 chunks".
    public var ratioDescription: String {
        let (logical, stored, chunks) = lock.withLock { (logicalBytes, storedBytes, (0..<header.units).count { !map[$0].isHole }) }
        /// `value` with two decimals.
        func decimal(_ value: Double) -> String {
            let hundredths = Int((value * 100).rounded())
            let fraction = hundredths % 100
            return "\(hundredths / 100).\(fraction < 10 ? "0" : "")\(fraction)"
        }
        let ratio: Double = stored == 0 ? 1 : Double(logical) / Double(stored)
        return "\(decimal(Double(logical) / 1048576)) MiB in \(decimal(Double(stored) / 1048576)) MiB (ratio \(decimal(ratio))) in \(chunks) chunks"
    }

    private func chunkLength(_ chunk: UInt64) -> UInt64 { min(chunkSize, header.virtualSize - chunk * chunkSize) }

    public override func submit(_ request: BlockRequest, completion: BlockCompletion) {
        if request.operation != .flush {
            guard request.offset <= size, request.length <= size - request.offset else {
                return completion.complete(.failure(BlockError(.outOfRange, "compress: \(request.offset)+\(request.length) is past the end of the \(size)-byte device")))
            }
            if request.length == 0 { return completion.complete(.success) }
        }
        offload.serve(request, completion) { self.perform(request) }
    }

    private func perform(_ request: BlockRequest) -> BlockResult {
        lock.lock()
        defer { lock.unlock() }
        do throws(BlockError) {
            switch request.operation {
            case .read: try read(request)
            case .write: try write(request.offset, request.length, from: request.buffers)
            case .discard, .writeZeroes: try write(request.offset, request.length, from: nil)
            case .flush: try persist()
            }
            if request.fua && request.operation != .read { try persist() }
            return .success
        } catch {
            return .failure(error)
        }
    }

    // MARK: Chunks (under `lock`)

    /// Puts chunk `chunk`'s plain bytes in `plain`.
    private func load(_ chunk: UInt64) throws(BlockError) {
        if cached == chunk { return }
        cached = nil
        let entry = map[chunk], length = Int(chunkLength(chunk))
        if entry.isHole {
            memset(plain.pointer, 0, length)
        } else {
            let units = CompressSpace.units(UInt64(entry.length))
            let vector = UnsafeMutablePointer<iovec>.allocate(capacity: 1)
            defer { vector.deallocate() }
            try next.sync.read(into: stored.slice(0, units * Int(CompressSpace.unit), vector: vector), at: entry.offset)
            guard CRC32C.checksum(UnsafeRawBufferPointer(start: stored.pointer, count: Int(entry.length))) == entry.checksum else {
                throw BlockError(.io, "\(label): chunk \(chunk) stored at offset \(entry.offset) fails its checksum (damaged)")
            }
            if entry.raw {
                memcpy(plain.pointer, stored.pointer, length)
            } else if !codec.decompress(stored.pointer, count: Int(entry.length), into: plain.pointer, expected: length) {
                throw BlockError(.io, "\(label): chunk \(chunk) stored at offset \(entry.offset) does not decompress to its \(length) bytes (damaged)")
            }
        }
        cached = chunk
    }

    private func read(_ request: BlockRequest) throws(BlockError) {
        var position = request.offset
        let end = request.offset + request.length
        while position < end {
            let chunk = position / chunkSize
            let start = chunk * chunkSize
            let stop = min(end, start + chunkLength(chunk))
            try load(chunk)
            request.buffers.copy(from: plain.pointer + Int(position - start), count: Int(stop - position), at: Int(position - request.offset))
            position = stop
        }
    }

    /// Writes `[offset, offset+length)` from `buffers`, or zeroes when nil: each chunk's new
    /// version stored anew, a chunk covered whole by zeroes made a hole.
    private func write(_ offset: UInt64, _ length: UInt64, from buffers: IOBuffers?) throws(BlockError) {
        var position = offset
        let end = offset + length
        while position < end {
            let chunk = position / chunkSize
            let start = chunk * chunkSize, chunkEnd = start + chunkLength(chunk)
            let stop = min(end, chunkEnd)
            let whole = position == start && stop == chunkEnd
            if whole && buffers == nil {
                try replace(chunk, with: .hole)
            } else {
                if !whole { try load(chunk) }
                cached = nil
                let at = plain.pointer + Int(position - start)
                if let buffers {
                    buffers.copy(to: at, count: Int(stop - position), at: Int(position - offset))
                } else {
                    memset(at, 0, Int(stop - position))
                }
                try store(chunk)
            }
            position = stop
        }
    }

    /// Stores `plain` as chunk `chunk`'s new version.
    private func store(_ chunk: UInt64) throws(BlockError) {
        let length = Int(chunkLength(chunk))
        if Self.isZero(plain.pointer, length) {
            try replace(chunk, with: .hole)
            cached = chunk
            return
        }
        var count = codec.compress(plain.pointer, count: length, into: stored.pointer, capacity: stored.count) ?? length
        var raw = false
        if CompressSpace.units(UInt64(count)) >= CompressSpace.units(UInt64(length)) {
            memcpy(stored.pointer, plain.pointer, length)
            count = length; raw = true
        }
        let units = CompressSpace.units(UInt64(count))
        memset(stored.pointer + count, 0, units * Int(CompressSpace.unit) - count)
        // Full: old versions wait for a flush to be freed; flushing early costs nothing in safety.
        var place = space.allocate(units)
        if place == nil && !superseded.isEmpty {
            try persist()
            place = space.allocate(units)
        }
        guard let offset = place else {
            throw BlockError(.noSpace, "compress: \(label) is full (\(space.usedUnits) of its 4 KiB units hold chunks or versions freed at the next flush)")
        }
        let vector = UnsafeMutablePointer<iovec>.allocate(capacity: 1)
        defer { vector.deallocate() }
        do throws(BlockError) {
            try next.sync.write(from: stored.slice(0, units * Int(CompressSpace.unit), vector: vector), at: offset, fua: false)
        } catch {
            space.free(offset, bytes: UInt64(count))
            throw error
        }
        let checksum = CRC32C.checksum(UnsafeRawBufferPointer(start: stored.pointer, count: count))
        try replace(chunk, with: CompressMap.Entry(offset: offset, length: UInt32(count), raw: raw, checksum: checksum))
        cached = chunk
    }

    /// Points the map at `entry`; the old version's space is freed after the next flush.
    private func replace(_ chunk: UInt64, with entry: CompressMap.Entry) throws(BlockError) {
        let old = map[chunk]
        if old == entry { return }
        if !old.isHole {
            superseded.append((old.offset, UInt64(old.length), entry.isHole))
            logicalBytes -= chunkLength(chunk)
            storedBytes -= UInt64(CompressSpace.units(UInt64(old.length))) * CompressSpace.unit
        }
        if !entry.isHole {
            logicalBytes += chunkLength(chunk)
            storedBytes += UInt64(CompressSpace.units(UInt64(entry.length))) * CompressSpace.unit
        }
        map[chunk] = entry
        if cached == chunk { cached = nil }
    }

    private static func isZero(_ p: UnsafeRawPointer, _ count: Int) -> Bool {
        let words = p.assumingMemoryBound(to: UInt64.self)
        for i in 0..<count / 8 where words[i] != 0 { return false }
        for i in (count / 8 * 8)..<count where p.load(fromByteOffset: i, as: UInt8.self) != 0 { return false }
        return true
    }

    // MARK: Flush (under `lock`)

    /// The data below durable, then the changed map blocks, durable too; then the versions
    /// they no longer point at are freed and discarded below.
    private func persist() throws(BlockError) {
        let flushes = next.capabilities.contains(.flush)
        let taken = map.takeDirty()
        do throws(BlockError) {
            if flushes { try next.sync.flush() }
            if !taken.isEmpty {
                try next.writeMetadataBlocks(taken, tableAt: header.mapOffset)
                if flushes { try next.sync.flush() }
            }
        } catch {
            map.failed(taken)
            throw error
        }
        let freed = superseded
        superseded = []
        for f in freed { space.free(f.offset, bytes: f.bytes) }
        guard next.capabilities.contains(.discard) else { return }
        for f in freed where f.punch {
            let bytes = UInt64(CompressSpace.units(f.bytes)) * CompressSpace.unit
            _ = next.submitAndWait(BlockRequest(operation: .discard, offset: f.offset, length: bytes))
        }
    }

    /// Runs what is queued, makes the map durable, logs the ratio reached, closes the device below.
    public override func close() {
        let first = lock.withLock { () -> Bool in
            defer { closed = true }
            return !closed
        }
        guard first else { return }
        offload.waitUntilIdle()
        if next.capabilities.contains(.write) {
            lock.lock()
            do throws(BlockError) { try persist() } catch {
                fputs("softdev: compress: \(label): the map could not be written at close: \(error)\n", stderr)
            }
            lock.unlock()
        }
        fputs("softdev: compress: \(label): \(ratioDescription)\n", stderr)
        super.close()
    }
}

extension CompressFilter {
    public static let descriptor = DeviceDescriptor(
        name: "compress", kind: .filter,
        summary: "Stores the data as zstd-compressed chunks in a container on the device below (crash-safe map; holes read as zeroes; discard frees space); the ratio reached is logged on close.",
        parameters: [
            DeviceParameter("size", "The size it presents, when the container is made (default: the device below's size)."),
            DeviceParameter("chunk", "The unit compressed: a power of two from 4K to 2M (default 64K); used when the container is made."),
            DeviceParameter("level", "zstd's level, 1 (fastest) to 19 (default 3)."),
        ],
        open: { parameters, next throws(DeviceSpecError) in
            let size = try parameters.size("size")
            let chunk = try parameters.size("chunk", multipleOf: 4096)
            if let chunk, !FormatHeader.isValidUnitSize(chunk) {
                throw DeviceSpecError("compress: chunk '\(parameters.string("chunk")!)' is not a power of two from 4K to 2M")
            }
            let level = try parameters.integer("level", in: Int32(1)...Int32(19)) ?? 3
            return try DeviceSpecError.opening { () throws(BlockError) in
                do throws(BlockError) {
                    return try CompressFilter(next: next!, virtualSize: size, chunkSize: chunk, level: level)
                } catch {
                    throw BlockError(error.code, errno: error.errno, "compress: \(error.message)")
                }
            }
        })
}
