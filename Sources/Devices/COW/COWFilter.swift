import Core
import Glibc

/// `cow(base=SPEC) | DEVICE`: a copy-on-write overlay. Reads of clusters the overlay does not
/// hold come from the base (another stack, opened from SPEC and never written); writes go to
/// the overlay, the device below, whose layout is ``FormatHeader``, then ``COWMap``, then the
/// data, cluster i at a fixed place (so a sparse overlay file costs only what was written).
///
/// Crash safety: a cluster's bit is set in memory only once its data is written below, and the
/// map reaches the disk only at a flush, as: flush the data, write the changed map blocks,
/// flush again. So after a crash the map on disk covers only data that was flushed before it,
/// and every write acknowledged before the last completed flush reads back; a cluster first
/// written after it reads as the base did (its older contents), never as garbage. A FUA write
/// to a cluster not yet allocated on disk runs that flush sequence before it completes.
///
/// - The first write to a cluster copies the rest of the cluster from the base (the parts of
///   its first and last cluster that the write does not cover), then writes the data in one
///   piece. Allocating writes, flushes and discards are serialised (one lock); reads and
///   writes of clusters already allocated go straight down, with no lock held.
/// - Discard drops the clusters it covers whole from the overlay: they read as the base's data
///   again. Parts of clusters are left as they are (discard is advisory). The overlay's space is
///   given back (discard below) at the next flush, once the map that no longer points at it is
///   durable.
/// - The slow paths block on the devices below, so they run on the transport's worker threads
///   (or on the caller's thread when it may wait), and completions are never left to the transport's thread.
public final class COWFilter: BlockFilter, @unchecked Sendable {
    public override var name: String { "cow" }
    public let base: any BlockDevice
    let header: FormatHeader
    static let format = FormatHeader.Kind(magic: "SDCOWOV1", name: "cow", unit: "cluster", entriesPerBlock: COWMap.clustersPerBlock)
    let map: COWMap
    public let label: String
    private let size: UInt64
    private let clusterSize: UInt64
    private let dataOffset: UInt64
    private let blockSize: UInt32
    /// Allocating writes, flushes, discards and commit, one at a time.
    private let serial = ConditionLock()
    /// Clusters dropped since the last flush, whose space goes back after it (under `serial`).
    private var freed: Set<UInt64> = []
    /// The slow paths run on the transport's workers.
    private let offload = BlockOffload()
    private var closed = false

    /// Opens the overlay on `next` over `base`. An overlay whose header and map are all zeroes
    /// (a new file) is made here, with `clusterSize` (64 KiB by default). Errors about the
    /// overlay's metadata name its file and the offset of the bad field.
    public init(next: any BlockDevice, base: any BlockDevice, clusterSize requested: UInt64? = nil, label: String? = nil) throws(BlockError) {
        let label = label ?? next.formatLabel
        let below = next.geometry
        let (header, made) = try FormatHeader.open(on: next, kind: Self.format, label: label) { () throws(BlockError) in
            let header = FormatHeader(kind: Self.format, unitSize: UInt32(requested ?? 65536), virtualSize: base.geometry.size)
            guard below.size >= Self.requiredSize(header) else {
                throw BlockError(.noSpace, "\(label): a cow overlay of \(header.unitSize)-byte clusters for this \(base.geometry.size)-byte base needs \(Self.requiredSize(header)) bytes, but the device is \(below.size) bytes (e.g. file(path=..., size=\(Self.requiredSize(header))))")
            }
            return header
        }
        if !made {
            guard header.virtualSize == base.geometry.size else {
                throw FormatBlock.error(label, "cow header: the overlay was made for a \(header.virtualSize)-byte base but the base is \(base.geometry.size) bytes", at: UInt64(FormatHeader.Offset.virtualSize))
            }
            if let requested, requested != UInt64(header.unitSize) {
                throw BlockError(.invalid, "\(label): the overlay's clusters are \(header.unitSize) bytes, not cluster=\(requested)")
            }
            guard below.size >= Self.requiredSize(header) else {
                throw FormatBlock.error(label, "truncated: the cow data area needs \(Self.requiredSize(header)) bytes but the overlay ends", at: below.size)
            }
        }
        map = try COWMap(bytes: next.readFormatBlocks(at: header.mapOffset, count: header.mapBytes),
                         clusters: header.units, offset: header.mapOffset, label: label)
        self.header = header
        self.base = base
        self.label = label
        clusterSize = UInt64(header.unitSize)
        dataOffset = header.dataOffset
        blockSize = max(base.geometry.logicalBlockSize, below.logicalBlockSize)
        size = header.virtualSize / UInt64(blockSize) * UInt64(blockSize)
        super.init(next: next)
    }

    /// The least the overlay device must hold: the header, the map, a place for every cluster.
    static func requiredSize(_ header: FormatHeader) -> UInt64 { header.dataOffset + header.virtualSize }

    public override var geometry: BlockGeometry {
        BlockGeometry(size: size, logicalBlockSize: blockSize,
                      physicalBlockSize: max(base.geometry.physicalBlockSize, next.geometry.physicalBlockSize, blockSize))
    }
    public override var capabilities: BlockCapabilities {
        next.capabilities.contains(.write) ? [.write, .flush, .fua, .discard, .writeZeroes] : []
    }
    /// All data: a hole in the overlay is the base's data, not zeroes.
    public override func extents(at offset: UInt64, length: UInt64) throws(BlockError) -> [BlockExtent] {
        [BlockExtent(offset: offset, length: length, isHole: false, isZero: false)]
    }
    /// The slow paths wait for the devices below: their completions must not need this thread.
    public override func attachCompletionSource() -> BlockCompletionSource? { nil }

    /// The clusters `[offset, offset+length)` touches (length > 0).
    private func clusters(_ offset: UInt64, _ length: UInt64) -> ClosedRange<UInt64> {
        (offset / clusterSize)...((offset + length - 1) / clusterSize)
    }

    public override func submit(_ request: BlockRequest, completion: BlockCompletion) {
        if request.operation != .flush {
            guard request.offset <= size, request.length <= size - request.offset else {
                return completion.complete(.failure(BlockError(.outOfRange, "cow: \(request.offset)+\(request.length) is past the end of the \(size)-byte device")))
            }
            if request.length == 0 { return completion.complete(.success) }
        }
        switch request.operation {
        case .read:
            switch map.allocation(clusters(request.offset, request.length)) {
            case .all:
                var down = request
                down.offset += dataOffset
                return next.submit(down, completion: completion)
            case .none:
                return base.submit(request, completion: completion)
            case .mixed:
                break
            }
        case .write:
            let range = clusters(request.offset, request.length)
            if map.allocation(range) == .all && (!request.fua || map.isDurable(range)) {
                var down = request
                down.offset += dataOffset
                return next.submit(down, completion: completion)
            }
        default:
            break
        }
        offload.serve(request, completion) { self.perform(request) }
    }

    /// The slow paths, on a thread that may block.
    private func perform(_ request: BlockRequest) -> BlockResult {
        do throws(BlockError) {
            switch request.operation {
            case .read: try readMixed(request)
            case .write: try locked { () throws(BlockError) in try write(request.buffers, at: request.offset, length: request.length, fua: request.fua) }
            case .writeZeroes: try writeZeroes(request)
            case .discard: serial.withLock { discard(request.offset, request.length) }
            case .flush: try locked { () throws(BlockError) in try persist() }
            }
            return .success
        } catch {
            return .failure(error)
        }
    }

    private func locked<T>(_ body: () throws(BlockError) -> T) throws(BlockError) -> T {
        serial.lock()
        defer { serial.unlock() }
        return try body()
    }

    // MARK: Reads

    /// A read over clusters of both kinds: each run from where it lives, through one buffer.
    private func readMixed(_ request: BlockRequest) throws(BlockError) {
        let memory = try AlignedMemory(Int(request.length))
        let vector = UnsafeMutablePointer<iovec>.allocate(capacity: 1)
        defer { vector.deallocate() }
        let end = request.offset + request.length
        var position = request.offset
        while position < end {
            let allocated = map.isAllocated(position / clusterSize)
            var runEnd = min(end, (position / clusterSize + 1) * clusterSize)
            while runEnd < end && map.isAllocated(runEnd / clusterSize) == allocated { runEnd = min(end, runEnd + clusterSize) }
            let piece = memory.slice(Int(position - request.offset), Int(runEnd - position), vector: vector)
            if allocated {
                try next.sync.read(into: piece, at: dataOffset + position)
            } else {
                try base.sync.read(into: piece, at: position)
            }
            position = runEnd
        }
        request.buffers.copy(from: memory.pointer, count: Int(request.length))
    }

    // MARK: Writes (under `serial`)

    /// A write that allocates (or must be durable with its map): the first and last clusters'
    /// uncovered parts from the base if they are new, the data in one piece, then the bits.
    private func write(_ buffers: IOBuffers, at offset: UInt64, length: UInt64, fua: Bool) throws(BlockError) {
        let range = clusters(offset, length)
        let end = offset + length
        if !map.isAllocated(range.lowerBound) { try copyFromBase(range.lowerBound * clusterSize, offset) }
        if !map.isAllocated(range.upperBound) { try copyFromBase(end, min((range.upperBound + 1) * clusterSize, size)) }
        var down = BlockRequest(operation: .write, offset: dataOffset + offset, length: length, buffers: buffers)
        down.callerMayWait = false
        try next.submitAndWait(down).get()
        map.set(range)
        if fua { try persist() }
    }

    /// The base's `[from, to)` into the overlay, at the same place.
    private func copyFromBase(_ from: UInt64, _ to: UInt64) throws(BlockError) {
        guard from < to else { return }
        let memory = try AlignedMemory(Int(to - from))
        try base.sync.read(into: memory.buffers, at: from)
        try next.sync.write(from: memory.buffers, at: dataOffset + from, fua: false)
    }

    /// Zero buffers written 1 MiB at a time (a zero cluster still hides the base's data).
    private func writeZeroes(_ request: BlockRequest) throws(BlockError) {
        let chunk = UInt64(1 << 20)
        let zeroes = try AlignedMemory(Int(min(chunk, request.length)))
        memset(zeroes.pointer, 0, zeroes.count)
        let vector = UnsafeMutablePointer<iovec>.allocate(capacity: 1)
        defer { vector.deallocate() }
        var done: UInt64 = 0
        while done < request.length {
            let n = min(chunk, request.length - done)
            let last = done + n == request.length
            try locked { () throws(BlockError) in
                try write(zeroes.slice(0, Int(n), vector: vector), at: request.offset + done, length: n, fua: request.fua && last)
            }
            done += n
        }
    }

    /// Drops the clusters `[offset, offset+length)` covers whole (the last cluster of the disk
    /// counts as whole up to the end); they read as the base's again.
    private func discard(_ offset: UInt64, _ length: UInt64) {
        let end = offset + length
        let first = (offset + clusterSize - 1) / clusterSize
        let stop = end == size ? header.units : end / clusterSize
        guard first < stop else { return }
        map.clear(first...(stop - 1))
        freed.formUnion(first..<stop)
    }

    // MARK: Flush (under `serial`)

    /// Data below durable, then the changed map blocks, durable too; then the space of dropped
    /// clusters goes back.
    private func persist() throws(BlockError) {
        let flushes = next.capabilities.contains(.flush)
        let taken = map.takeDirty()
        do throws(BlockError) {
            if flushes { try next.sync.flush() }
            guard !taken.isEmpty else { return }
            try next.writeMetadataBlocks(taken, tableAt: header.mapOffset)
            if flushes { try next.sync.flush() }
        } catch {
            map.failed(taken)
            throw error
        }
        map.persisted(taken)
        releaseFreed()
    }

    /// Discards below the clusters dropped before the last flush that are still unallocated
    /// (their map is durable, so no bit points at them); failures only cost space.
    private func releaseFreed() {
        defer { freed = [] }
        guard next.capabilities.contains(.discard) else { return }
        var runs: [(UInt64, UInt64)] = []
        for c in freed.sorted() where !map.isAllocated(c) {
            if let last = runs.last, last.0 + last.1 == c { runs[runs.count - 1].1 += 1 } else { runs.append((c, 1)) }
        }
        for (first, count) in runs {
            let start = first * clusterSize
            let end = min((first + count) * clusterSize, size)
            guard start < end else { continue }
            _ = next.submitAndWait(BlockRequest(operation: .discard, offset: dataOffset + start, length: end - start))
        }
    }

    // MARK: Commit and close

    /// Folds the overlay into the base (`softdev commit`): every allocated cluster written to
    /// the base, the base flushed, then the overlay emptied (its map durable, its space given
    /// back). The base must be writable. If this stops half way, the overlay still holds every
    /// cluster and the commit can run again.
    public func commit() throws(BlockError) -> (clusters: Int, bytes: UInt64) {
        guard base.capabilities.contains(.write) else {
            throw BlockError(.readOnly, "cow: the base is read-only; open it writable to commit into it (softdev commit --base SPEC)")
        }
        return try locked { () throws(BlockError) in
            let allocated = map.allocatedClusters()
            let memory = try AlignedMemory(Int(clusterSize))
            let vector = UnsafeMutablePointer<iovec>.allocate(capacity: 1)
            defer { vector.deallocate() }
            var bytes: UInt64 = 0
            for c in allocated {
                let start = c * clusterSize
                let n = min(clusterSize, size - start)
                let piece = memory.slice(0, Int(n), vector: vector)
                try next.sync.read(into: piece, at: dataOffset + start)
                try base.sync.write(from: piece, at: start, fua: false)
                bytes += n
            }
            if base.capabilities.contains(.flush) { try base.sync.flush() }
            for c in allocated { map.clear(c...c) }
            freed.formUnion(allocated)
            try persist()
            return (allocated.count, bytes)
        }
    }

    /// Runs what is queued, makes the map durable, closes the overlay and the base.
    public override func close() {
        let first = serial.withLock { () -> Bool in
            defer { closed = true }
            return !closed
        }
        guard first else { return }
        offload.waitUntilIdle()
        if next.capabilities.contains(.write) {
            do throws(BlockError) { try locked { () throws(BlockError) in try persist() } } catch {
                fputs("softdev: cow: \(label): the map could not be written at close: \(error)\n", stderr)
            }
        }
        base.close()
        super.close()
    }
}

extension COWFilter {
    public static let descriptor = DeviceDescriptor(
        name: "cow", kind: .filter,
        summary: "A copy-on-write overlay: reads the base where the overlay (the device below) holds nothing, writes only to the overlay; crash-safe map; `softdev commit` folds it into the base.",
        parameters: [
            DeviceParameter("base", required: true, "The base, a device stack in double quotes, never written: base=\"file(path=base.img, readonly=true)\"."),
            DeviceParameter("cluster", "The unit a first write copies from the base: a power of two from 4K to 2M (default 64K); used when the overlay is made."),
        ],
        open: { parameters, next throws(DeviceSpecError) in
            let spec = try parameters.required("base")
            let cluster = try parameters.size("cluster", multipleOf: 4096)
            if let cluster, !FormatHeader.isValidUnitSize(cluster) {
                throw DeviceSpecError("cow: cluster '\(parameters.string("cluster")!)' is not a power of two from 4K to 2M")
            }
            let base: any BlockDevice
            do throws(DeviceSpecError) { base = try DeviceRegistry.open(spec) } catch { throw DeviceSpecError("cow: base=\"\(spec)\": \(error.message)") }
            do throws(DeviceSpecError) {
                return try DeviceSpecError.opening { () throws(BlockError) in
                    do throws(BlockError) {
                        return try COWFilter(next: next!, base: base, clusterSize: cluster)
                    } catch {
                        throw BlockError(error.code, errno: error.errno, "cow: \(error.message)")
                    }
                }
            } catch {
                base.close()
                throw error
            }
        })
}
