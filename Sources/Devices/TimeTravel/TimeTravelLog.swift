import Core
import Foundation
import Glibc
import Synchronization

/// The write log of a `timetravel` disk, in a directory: every write (and write-zeroes and
/// discard) appended as a record with a sequence number and a time, so that the disk can be
/// read as it was after any record: the paper's time-travel disk. The device below holds the
/// *base*: the disk as it was at `baseSequence`; the log holds everything since.
///
/// Files in the directory:
/// - `SEQUENCE.ttlog` segments (the first record's number, 16 hex digits): records in order
///   (``TimeTravelRecord``); a new segment every `segmentBytes`, the last one synced first.
/// - `state`: `base SEQ` (records up to SEQ are folded into the base) and, during a fold,
///   `folding SEQ`; replaced atomically.
/// - `lock`: held with `flock` by the one process that serves the log.
///
/// Crash safety: a write is appended whole before it is acknowledged, and a flush syncs the
/// segment (and the directory after a new segment). At open the segments are scanned; a
/// record torn by a crash ends the last segment (it is cut there); anywhere else it is damage,
/// reported with the file and offset. Retention folds the oldest segments into the base
/// (records replayed in order, the base flushed, `state` advanced, the segment deleted); a
/// fold cut short by a crash is replayed at open, which is harmless since replaying is
/// idempotent and no point older than the fold is readable any more.
final class TimeTravelLog: @unchecked Sendable {
    struct Options: Equatable, Sendable {
        /// Bytes per segment (the unit of retention).
        var segmentBytes: UInt64 = 64 << 20
        /// Fold segments whose newest record is older than this (seconds); nil: keep all.
        var keepSeconds: Double?
        /// Fold the oldest segments while the log is larger; nil: no bound.
        var maxBytes: UInt64?
    }

    let directory: String
    let options: Options
    /// The size of the disk (the device below's), once a device has opened the log.
    private var size: UInt64?
    private let lockFile: FormatFile
    private let lock = ReadWriteLock()

    private final class Segment {
        let id: UInt32
        let firstSequence: UInt64
        let file: FormatFile
        var size: UInt64
        var lastSequence: UInt64
        var lastTime: UInt64
        init(id: UInt32, firstSequence: UInt64, file: FormatFile, size: UInt64, lastSequence: UInt64, lastTime: UInt64) {
            self.id = id; self.firstSequence = firstSequence; self.file = file; self.size = size
            self.lastSequence = lastSequence; self.lastTime = lastTime
        }
    }

    /// A version of (some sectors of) a 4 KiB block: which record wrote them and where.
    private struct Version {
        var sequence: UInt64
        /// Where byte 0 of the block would be in the segment file (may be before the record).
        var location: Int64
        var segment: UInt32
        /// The older version of the block, or -1.
        var previous: Int32
        /// The block's sectors this version wrote.
        var sectors: UInt8
        var zeroes: Bool
    }

    static let block = 4096
    private static let sectorsPerBlock = block / 512

    // Under `lock`.
    private var segments: [Segment] = []
    private var segmentByID: [UInt32: Segment] = [:]
    private var nextSegmentID: UInt32 = 0
    private(set) var baseSequence: UInt64 = 0
    private(set) var lastSequence: UInt64 = 0
    /// Each record's sequence number and time, in order, for points given as a time.
    private var times: [(sequence: UInt64, time: UInt64)] = []
    private(set) var marks: [(name: String, sequence: UInt64, time: UInt64)] = []
    /// Each written block's newest version (blocks never written since the base: none).
    private var newest: [Int: Int32] = [:]
    private var versions: [Version] = []
    private var freeVersions: [Int32] = []
    /// The segment written since the last flush that is new (its name must be synced too).
    private var directoryDirty = false
    private var unsynced = false
    /// Points open as devices: no fold may pass the oldest.
    private var pins: [UInt64: Int] = [:]
    /// The device the live disk writes the base through (folds), set by the live filter.
    private var baseWriter: (any BlockDevice)?

    // MARK: Opening, shared within the process

    private static let open = Mutex<[String: (log: TimeTravelLog, users: Int)]>([:])

    /// The log in `directory` (made if missing), shared by the live disk and the points open
    /// in this process; `below` is the base device. Each call is matched by ``release()``.
    /// `below` may be nil for the commands that only read or cut the log (`softdev snapshot`,
    /// `rollback` on a disk nobody serves).
    static func acquire(_ directory: String, below: (any BlockDevice)?, options: Options = .init()) throws(BlockError) -> TimeTravelLog {
        try open.withLock { (logs) throws(BlockError) -> TimeTravelLog in
            let key = try ChunkStore.absolute(directory, what: "timetravel: log")
            if let entry = logs[key] {
                if let below {
                    try entry.log.lock.writing { () throws(BlockError) in
                        if let size = entry.log.size, size != below.geometry.size {
                            throw BlockError(.invalid, "timetravel: log \(key) is open over a \(size)-byte device, not \(below.geometry.size) bytes")
                        }
                        entry.log.size = below.geometry.size
                    }
                }
                logs[key] = (entry.log, entry.users + 1)
                return entry.log
            }
            let log = try TimeTravelLog(directory: key, below: below, options: options)
            logs[key] = (log, 1)
            return log
        }
    }

    /// Gives the log back; the last user unlocks it.
    func release() {
        TimeTravelLog.open.withLock { logs in
            guard let entry = logs[directory], entry.log === self else { return }
            if entry.users > 1 {
                logs[directory] = (self, entry.users - 1)
            } else {
                logs[directory] = nil
                flock(lockFile.fd, LOCK_UN)
            }
        }
    }

    /// The log open in this process in `directory`, if any (for `softdev snapshot` through
    /// the daemon's control socket).
    static func opened(_ directory: String) -> TimeTravelLog? {
        guard let key = try? ChunkStore.absolute(directory, what: "") else { return nil }
        return open.withLock { $0[key]?.log }
    }

    private init(directory: String, below: (any BlockDevice)?, options: Options) throws(BlockError) {
        self.directory = directory
        self.options = options
        size = below?.geometry.size
        if mkdir(directory, 0o700) != 0 && errno != EEXIST { throw BlockError.system("timetravel: log \(directory)", errno: errno) }
        lockFile = try FormatFile(directory + "/lock", create: true)
        guard flock(lockFile.fd, LOCK_EX | LOCK_NB) == 0 else {
            throw BlockError(.invalid, errno: EBUSY, "timetravel: log \(directory) is in use by another process (it holds \(directory)/lock locked)")
        }
        let state = try Self.readState(directory)
        baseSequence = state.base
        lastSequence = state.base
        try recover(folding: state.folding, below: below)
    }

    // MARK: State and recovery

    static func readState(_ directory: String) throws(BlockError) -> (base: UInt64, folding: UInt64?) {
        let path = directory + "/state"
        guard access(path, F_OK) == 0 else { return (0, nil) }
        let file = try FormatFile(path, readOnly: true)
        let text = String(decoding: try file.read(count: Int(try file.size), at: 0, what: "the state"), as: UTF8.self)
        var base: UInt64?, folding: UInt64?
        for line in text.split(separator: "\n") {
            let words = line.split(separator: " ")
            guard words.count == 2, let value = UInt64(words[1]) else { throw BlockError(.invalid, "\(path): cannot read '\(line)'") }
            switch words[0] {
            case "base": base = value
            case "folding": folding = value
            default: throw BlockError(.invalid, "\(path): unknown line '\(line)'")
            }
        }
        guard let base else { throw BlockError(.invalid, "\(path): no 'base' line") }
        return (base, folding)
    }

    private func writeState(folding: UInt64?) throws(BlockError) {
        var text = "base \(baseSequence)\n"
        if let folding { text += "folding \(folding)\n" }
        try FormatFile.replace(directory + "/state", with: Array(text.utf8))
    }

    /// The segment files, sorted by their first record.
    static func segmentNames(_ directory: String) -> [(name: String, first: UInt64)] {
        let names = (try? FileManager.default.contentsOfDirectory(atPath: directory)) ?? []
        return names.compactMap { name in
            guard name.hasSuffix(".ttlog"), let first = UInt64(name.dropLast(6), radix: 16) else { return nil }
            return (name, first)
        }.sorted { $0.first < $1.first }
    }

    private func recover(folding: UInt64?, below: (any BlockDevice)?) throws(BlockError) {
        let names = Self.segmentNames(directory)
        for (number, entry) in names.enumerated() {
            let path = directory + "/" + entry.name
            let file = try FormatFile(path)
            let scan = try TimeTravelSegmentScan(file, after: nil)
            let isLast = number == names.count - 1
            if let reason = scan.stoppedBecause {
                guard isLast else { throw BlockError(.invalid, "\(path): damaged: \(reason) (only the last segment may end in a torn record)") }
                try file.truncate(scan.validEnd)
            }
            guard let first = scan.records.first else {
                // An empty segment (made just before a crash): nothing to keep.
                unlink(path); continue
            }
            guard first.sequence == entry.first else {
                throw BlockError(.invalid, "\(path): its first record is \(first.sequence), not \(entry.first) as its name says")
            }
            if scan.records.last!.sequence <= baseSequence && folding == nil {
                unlink(path); continue   // folded before a crash, not yet deleted
            }
            if let previous = segments.last {
                guard first.sequence == previous.lastSequence + 1 else {
                    throw BlockError(.invalid, "\(path): starts at record \(first.sequence) but the segment before ends at record \(previous.lastSequence)")
                }
            } else if first.sequence > baseSequence + 1 {
                throw BlockError(.invalid, "\(path): starts at record \(first.sequence): records \(baseSequence + 1) to \(first.sequence - 1) are missing")
            }
            let segment = Segment(id: nextSegmentID, firstSequence: first.sequence, file: file, size: scan.validEnd,
                                  lastSequence: scan.records.last!.sequence, lastTime: scan.records.last!.time)
            nextSegmentID += 1
            segments.append(segment)
            segmentByID[segment.id] = segment
            for record in scan.records where record.sequence > baseSequence || folding != nil {
                index(record, in: segment, name: scan.marks[record.sequence])
            }
            lastSequence = max(lastSequence, segment.lastSequence)
        }
        if let folding {
            // A fold a crash cut short: replay it whole.
            guard let below else {
                throw BlockError(.invalid, "timetravel: log \(directory): a fold into the base was cut short; open the disk (softdev serve) once to finish it")
            }
            baseWriter = below
            try fold(through: folding)
            baseWriter = nil
        }
    }

    // MARK: The index

    private func index(_ record: TimeTravelRecord, in segment: Segment, name: String?) {
        times.append((record.sequence, record.time))
        if record.kind == .mark {
            marks.append((name ?? "", record.sequence, record.time))
            return
        }
        let start = record.offset, end = record.offset + UInt64(record.length)
        var block = Int(start / UInt64(Self.block))
        while UInt64(block) * UInt64(Self.block) < end {
            let blockStart = UInt64(block) * UInt64(Self.block)
            let first = max(start, blockStart), last = min(end, blockStart + UInt64(Self.block))
            var sectors: UInt8 = 0
            for s in Int((first - blockStart) / 512)..<Int((last - blockStart) / 512) { sectors |= 1 << s }
            let version = Version(sequence: record.sequence, location: Int64(record.payloadPosition) + Int64(blockStart) - Int64(start),
                                  segment: segment.id, previous: newest[block] ?? -1, sectors: sectors, zeroes: record.kind == .zeroes)
            let slot: Int32
            if let free = freeVersions.popLast() { versions[Int(free)] = version; slot = free } else { versions.append(version); slot = Int32(versions.count - 1) }
            newest[block] = slot
            block += 1
        }
    }

    // MARK: Reading a point

    /// Reads `[offset, offset + buffers.byteCount)` as the disk was after record `point`
    /// (UInt64.max: now), sectors no record wrote from `below`.
    func read(into buffers: IOBuffers, at offset: UInt64, point: UInt64, below: any BlockDevice) throws(BlockError) {
        let total = buffers.byteCount
        var bounce: UnsafeMutableRawPointer?
        defer { bounce?.deallocate() }
        try lock.reading { () throws(BlockError) in
            guard point >= baseSequence else {
                throw BlockError(.invalid, "timetravel: record \(point) is older than the log keeps (the base is at record \(baseSequence))")
            }
            // What comes from the base is read in runs as long as the device's offsets and the
            // caller's buffer are both contiguous (a disk the log does not cover is one read, not
            // one per block); a run is read when the next piece does not continue it, and at the end.
            var runOffset: UInt64 = 0, runDestination: UnsafeMutableRawPointer?, runLength = 0
            func readRun() throws(BlockError) {
                guard runLength > 0 else { return }
                var vector = iovec(iov_base: runDestination, iov_len: runLength)
                try withUnsafeMutablePointer(to: &vector) { (v) throws(BlockError) in
                    try below.sync.read(into: IOBuffers(v, count: 1), at: runOffset)
                }
                runLength = 0
            }
            try forEachChunk(of: Self.block, offset, total) { (block, within, n, position) throws(BlockError) in
                // Straight into the caller's buffer where the piece lies in one; else through a
                // bounce block, allocated the first time one is needed.
                let direct = buffers.contiguous(at: position, count: n).map { $0 - within }
                if direct == nil && bounce == nil { bounce = .allocate(byteCount: Self.block, alignment: 4096) }
                let destination = direct ?? bounce!
                let wanted = Self.sectorMask(within, n)
                var resolved: UInt8 = 0
                var slot = newest[block] ?? -1
                while slot >= 0 && resolved != wanted {
                    let version = versions[Int(slot)]
                    slot = version.previous
                    guard version.sequence <= point else { continue }
                    let take = version.sectors & wanted & ~resolved
                    guard take != 0 else { continue }
                    try Self.forEachRun(take) { (first, count) throws(BlockError) in
                        if version.zeroes {
                            memset(destination + first * 512, 0, count * 512)
                        } else {
                            try segmentByID[version.segment]!.file.read(destination + first * 512, count: count * 512,
                                                                        at: UInt64(version.location + Int64(first * 512)), what: "record \(version.sequence)'s data")
                        }
                    }
                    resolved |= take
                }
                let fromBase = wanted & ~resolved
                if fromBase != 0 {
                    try Self.forEachRun(fromBase) { (first, count) throws(BlockError) in
                        let at = UInt64(block * Self.block + first * 512), into = destination + first * 512
                        if runLength > 0 && direct != nil && at == runOffset + UInt64(runLength) && into == runDestination! + runLength {
                            runLength += count * 512
                            return
                        }
                        try readRun()
                        runOffset = at; runDestination = into; runLength = count * 512
                        // The bounce block is copied out below: its piece cannot wait for a run.
                        if direct == nil { try readRun() }
                    }
                }
                if direct == nil { buffers.copy(from: bounce! + within, count: n, at: position) }
            }
            try readRun()
        }
    }

    /// The sectors of a block that `[within, within + count)` covers.
    private static func sectorMask(_ within: Int, _ count: Int) -> UInt8 {
        var mask: UInt8 = 0
        for s in (within / 512)..<((within + count) / 512) { mask |= 1 << s }
        return mask
    }

    /// Calls `body` with each run of set bits in `mask`: its first sector and length.
    private static func forEachRun(_ mask: UInt8, _ body: (Int, Int) throws(BlockError) -> Void) throws(BlockError) {
        var s = 0
        while s < sectorsPerBlock {
            guard mask & (1 << s) != 0 else { s += 1; continue }
            var e = s
            while e < sectorsPerBlock && mask & (1 << e) != 0 { e += 1 }
            try body(s, e - s)
            s = e
        }
    }

    // MARK: Writing

    /// Appends a data record of `buffers` at `offset` (or zeroes of `length` bytes when
    /// `buffers` is nil) and indexes it; with `durable`, syncs before returning.
    func append(_ buffers: IOBuffers?, at offset: UInt64, length: UInt64, durable: Bool) throws(BlockError) {
        try lock.writing { () throws(BlockError) in
            var remaining = length, at = offset, position = 0
            // A record holds at most 1 GiB; larger writes become several.
            while remaining > 0 {
                let n = min(remaining, 1 << 30)
                try appendRecord(kind: buffers == nil ? .zeroes : .data, offset: at, length: UInt32(n), payload: buffers, payloadPosition: position)
                remaining -= n; at += n; position += Int(n)
            }
            if durable { try syncLocked() }
        }
    }

    /// Appends a mark named `name` and syncs: a named point (`softdev snapshot`).
    func mark(_ name: String) throws(BlockError) {
        guard !name.isEmpty, name.utf8.count <= 255, !name.contains("\n") else {
            throw BlockError(.invalid, "timetravel: a snapshot name is 1 to 255 bytes with no newline")
        }
        try lock.writing { () throws(BlockError) in
            guard !marks.contains(where: { $0.name == name }) else { throw BlockError(.invalid, "timetravel: log \(directory) already has a snapshot named \(name)") }
            let bytes = Array(name.utf8)
            let memory = UnsafeMutableRawPointer.allocate(byteCount: bytes.count, alignment: 1)
            defer { memory.deallocate() }
            memory.copyMemory(from: bytes, byteCount: bytes.count)
            var vector = iovec(iov_base: memory, iov_len: bytes.count)
            try withUnsafeMutablePointer(to: &vector) { (v) throws(BlockError) in
                try appendRecord(kind: .mark, offset: 0, length: UInt32(bytes.count), payload: IOBuffers(v, count: 1), payloadPosition: 0)
            }
            marks[marks.count - 1].name = name
            try syncLocked()
        }
    }

    private func appendRecord(kind: TimeTravelRecord.Kind, offset: UInt64, length: UInt32, payload: IOBuffers?, payloadPosition: Int) throws(BlockError) {
        let segment = try currentSegment()
        let payloadBytes = kind == .zeroes ? 0 : length
        var record = TimeTravelRecord(kind: kind, sequence: lastSequence + 1, time: TimeTravelRecord.now(), offset: offset,
                                      length: length, payloadBytes: payloadBytes, position: segment.size)
        if kind == .mark { record.length = payloadBytes }
        let header = record.header { crc in
            var crc = crc
            if let payload, payloadBytes > 0 { Self.forEachPiece(payload, from: payloadPosition, count: Int(payloadBytes)) { crc = CRC32C.update(crc, $0, $1) } }
            return crc
        }
        do throws(BlockError) {
            try segment.file.write(header, at: record.position)
            var at = record.payloadPosition
            if let payload, payloadBytes > 0 {
                var failure: BlockError?
                Self.forEachPiece(payload, from: payloadPosition, count: Int(payloadBytes)) { pointer, count in
                    guard failure == nil else { return }
                    do throws(BlockError) { try segment.file.write(pointer, count: count, at: at) } catch { failure = error }
                    at += UInt64(count)
                }
                if let failure { throw failure }
            }
        } catch {
            // Not appended: cut off what was written, so that the next record follows the last.
            try? segment.file.truncate(record.position)
            throw error
        }
        segment.size += record.totalBytes
        segment.lastSequence = record.sequence
        segment.lastTime = record.time
        lastSequence = record.sequence
        unsynced = true
        index(record, in: segment, name: kind == .mark ? "" : nil)
    }

    /// Calls `body` with each contiguous piece of `[from, from + count)` of `buffers`.
    private static func forEachPiece(_ buffers: IOBuffers, from start: Int, count: Int, _ body: (UnsafeRawPointer, Int) -> Void) {
        var skip = start, left = count
        for b in buffers where left > 0 {
            if skip >= b.count { skip -= b.count; continue }
            let n = min(b.count - skip, left)
            body(b.baseAddress! + skip, n)
            left -= n; skip = 0
        }
    }

    /// The segment to append to: the last, or a new one when it is full (the full one synced
    /// first, so that only the last segment can end in a torn record).
    private func currentSegment() throws(BlockError) -> Segment {
        if let last = segments.last, last.size < options.segmentBytes { return last }
        if let last = segments.last {
            try last.file.sync()
            try foldForRetention()
        }
        let first = lastSequence + 1
        let name = String(first, radix: 16)
        let path = directory + "/" + String(repeating: "0", count: 16 - name.count) + name + ".ttlog"
        let file = try FormatFile(path, create: true)
        try file.truncate(0)
        let segment = Segment(id: nextSegmentID, firstSequence: first, file: file, size: 0, lastSequence: lastSequence, lastTime: 0)
        nextSegmentID += 1
        segments.append(segment)
        segmentByID[segment.id] = segment
        directoryDirty = true
        return segment
    }

    /// Makes every record appended so far durable.
    func sync() throws(BlockError) {
        try lock.writing { () throws(BlockError) in try syncLocked() }
    }

    private func syncLocked() throws(BlockError) {
        guard unsynced || directoryDirty, let last = segments.last else { return }
        try last.file.sync()
        if directoryDirty { try FormatFile.syncDirectory(of: last.file.path); directoryDirty = false }
        unsynced = false
    }

    // MARK: Retention

    /// Folds the oldest whole segments (never the last, never past an open point) while the
    /// log is over `maxBytes` or their newest record is older than `keepSeconds`.
    private func foldForRetention() throws(BlockError) {
        guard options.keepSeconds != nil || options.maxBytes != nil, baseWriter != nil else { return }
        let now = TimeTravelRecord.now()
        var total = segments.reduce(0) { $0 + $1.size }
        var through: UInt64?
        for segment in segments.dropLast() {
            let tooOld = options.keepSeconds.map { Double(now &- segment.lastTime) / 1e9 > $0 } ?? false
            let tooBig = options.maxBytes.map { total > $0 } ?? false
            guard tooOld || tooBig, pins.keys.min().map({ segment.lastSequence < $0 }) ?? true else { break }
            through = segment.lastSequence
            total -= segment.size
        }
        if let through { try fold(through: through) }
    }

    /// Folds every record up to `through` (the end of a segment) into the base: replayed in
    /// order through the base writer, the base flushed, `state` advanced, the segments deleted.
    private func fold(through: UInt64) throws(BlockError) {
        guard let writer = baseWriter else { return }
        try writeState(folding: through)
        var buffer = [UInt8]()
        for segment in segments where segment.lastSequence <= through {
            let scan = try TimeTravelSegmentScan(segment.file, after: nil)
            for record in scan.records where record.kind != .mark {
                if record.kind == .zeroes {
                    try writer.sync.writeZeroes(at: record.offset, length: UInt64(record.length), mayDiscard: false)
                    continue
                }
                if buffer.count < Int(record.length) { buffer = [UInt8](repeating: 0, count: Int(record.length)) }
                let result = buffer.withUnsafeMutableBytes { b -> Result<Void, BlockError> in
                    do throws(BlockError) {
                        try segment.file.read(b.baseAddress!, count: Int(record.length), at: record.payloadPosition, what: "record \(record.sequence)")
                        var vector = iovec(iov_base: b.baseAddress, iov_len: Int(record.length))
                        try withUnsafeMutablePointer(to: &vector) { (v) throws(BlockError) in
                            try writer.sync.write(from: IOBuffers(v, count: 1), at: record.offset, fua: false)
                        }
                    } catch { return .failure(error) }
                    return .success(())
                }
                try result.get()
            }
        }
        try writer.sync.flush()
        baseSequence = max(baseSequence, through)
        try writeState(folding: nil)
        // Forget the folded segments: their versions are the oldest of each block's chain.
        let gone = Set(segments.filter { $0.lastSequence <= through }.map(\.id))
        for segment in segments where gone.contains(segment.id) { unlink(segment.file.path); segmentByID[segment.id] = nil }
        segments.removeAll { gone.contains($0.id) }
        for (block, head) in newest {
            var slot = head, keep: Int32 = -1
            while slot >= 0 {
                let version = versions[Int(slot)]
                if gone.contains(version.segment) {
                    if keep >= 0 { versions[Int(keep)].previous = -1 } else { newest[block] = nil }
                    // The rest of the chain is older still: all folded.
                    var drop = slot
                    while drop >= 0 { let next = versions[Int(drop)].previous; freeVersions.append(drop); drop = next }
                    break
                }
                keep = slot
                slot = version.previous
            }
        }
        times.removeAll { $0.sequence <= through }
        marks.removeAll { $0.sequence <= through }
    }

    // MARK: Points

    /// Where the live disk writes folds; nil when it closes.
    func setBaseWriter(_ device: (any BlockDevice)?) throws(BlockError) {
        try lock.writing { () throws(BlockError) in
            if device != nil && baseWriter != nil { throw BlockError(.invalid, errno: EBUSY, "timetravel: log \(directory) is already open as a live disk in this process") }
            baseWriter = device
        }
    }

    /// The record a point names: a snapshot's, a record number's, or the last at or before a
    /// time (ns since the epoch); checked against what the log keeps.
    func resolve(_ point: TimeTravelPoint) throws(BlockError) -> UInt64 {
        try lock.reading { () throws(BlockError) -> UInt64 in
            let sequence: UInt64
            switch point {
            case .snapshot(let name):
                guard let mark = marks.first(where: { $0.name == name }) else {
                    throw BlockError(.invalid, "timetravel: log \(directory) has no snapshot named \(name) (softdev timetravel-points lists them)")
                }
                sequence = mark.sequence
            case .sequence(let n):
                sequence = n
            case .time(let t):
                var low = 0, high = times.count   // the first record after t
                while low < high { let mid = (low + high) / 2; if times[mid].time <= t { low = mid + 1 } else { high = mid } }
                sequence = low == 0 ? baseSequence : times[low - 1].sequence
            }
            guard sequence >= baseSequence, sequence <= lastSequence else {
                throw BlockError(.invalid, "timetravel: record \(sequence) is not in the log \(directory), which keeps records \(baseSequence) to \(lastSequence)")
            }
            return sequence
        }
    }

    /// Forgets every record after `sequence` (the disk must not be open: no live disk, no
    /// point): the segments after it deleted, the one holding it cut after it, then synced.
    func rollback(to sequence: UInt64) throws(BlockError) {
        try lock.writing { () throws(BlockError) in
            guard baseWriter == nil, pins.isEmpty else { throw BlockError(.invalid, errno: EBUSY, "timetravel: log \(directory) is open: stop serving the disk before a rollback") }
            for segment in segments.reversed() where segment.lastSequence > sequence {
                if segment.firstSequence > sequence {
                    unlink(segment.file.path)
                    segments.removeLast()
                } else {
                    let scan = try TimeTravelSegmentScan(segment.file, after: nil)
                    guard let record = scan.records.first(where: { $0.sequence == sequence }) else {
                        throw BlockError(.invalid, "\(segment.file.path): record \(sequence) is not where the index says")
                    }
                    try segment.file.truncate(record.position + record.totalBytes)
                    try segment.file.sync()
                }
            }
            if let last = segments.last { try FormatFile.syncDirectory(of: last.file.path) }
            lastSequence = sequence
        }
    }

    /// Keeps folds from passing `sequence` while a device shows it.
    func pin(_ sequence: UInt64) { lock.writing { pins[sequence, default: 0] += 1 } }
    func unpin(_ sequence: UInt64) {
        lock.writing {
            if let n = pins[sequence], n > 1 { pins[sequence] = n - 1 } else { pins[sequence] = nil }
        }
    }
}

/// A point of a `timetravel` disk's history.
public enum TimeTravelPoint: Equatable, Sendable, CustomStringConvertible {
    case snapshot(String)
    /// After this record.
    case sequence(UInt64)
    /// Nanoseconds since the epoch: after the last record written at or before it.
    case time(UInt64)

    public var description: String {
        switch self {
        case .snapshot(let name): return "snapshot \(name)"
        case .sequence(let n): return "record \(n)"
        case .time(let t): return "time \(Double(t) / 1e9)"
        }
    }

    /// A time as `softdev` takes it: seconds since the epoch (`1764446400.5`) or UTC
    /// `2026-11-29T20:00:00Z`.
    public static func parseTime(_ text: String) -> UInt64? {
        if let seconds = Double(text), seconds >= 0 { return UInt64(seconds * 1e9) }
        guard let date = ISO8601DateFormatter().date(from: text), date.timeIntervalSince1970 >= 0 else { return nil }
        return UInt64(date.timeIntervalSince1970 * 1e9)
    }
}
