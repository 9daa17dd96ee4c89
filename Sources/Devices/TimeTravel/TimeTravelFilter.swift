import Core
import Glibc
import Synchronization

/// `timetravel(log=DIR) | <base>`: a time-travelling disk (the paper's "time-travel block
/// devices"): every write, write-zeroes and discard is appended to a log (``TimeTravelLog``)
/// instead of the device below, so the disk can be read as it was after any of them: at a
/// named snapshot (`softdev snapshot`), a record number, or a time.
///
/// - The live disk (no point given) reads the newest data: the log's, else the base's.
/// - `timetravel(log=DIR, snapshot=NAME) | <base>` (or `seq=N`, or `time=T`) is that point,
///   read-only, in the same process as the live disk (e.g. exported over NBD while the guest
///   runs) or alone when no one serves the log; while it is open, retention keeps its records.
/// - `softdev rollback DIR POINT` (the disk not served) forgets every record after a point.
/// - Retention (`keep=`, `max-log=`) folds the oldest segments into the base.
/// - Flush syncs the log (the base is written only by folds, which flush it); FUA syncs after
///   the write. Extents are not passed up (the log may hold data over a hole below).
public final class TimeTravelFilter: BlockFilter, @unchecked Sendable {
    public override var name: String { "timetravel" }
    let log: TimeTravelLog
    /// The record shown, or nil for the live disk.
    public let point: UInt64?
    /// Requests run on the transport's workers (the log's files may block).
    private let offload = BlockOffload()
    private let closed = Atomic<Bool>(false)

    init(next: any BlockDevice, log directory: String, point: TimeTravelPoint? = nil,
                options: TimeTravelLog.Options = .init()) throws(BlockError) {
        let log = try TimeTravelLog.acquire(directory, below: next, options: options)
        var shown: UInt64?
        do throws(BlockError) {
            if let point {
                let sequence = try log.resolve(point)
                log.pin(sequence)
                shown = sequence
            } else {
                try log.setBaseWriter(next)
            }
        } catch {
            log.release(); throw error
        }
        self.log = log
        self.point = shown
        super.init(next: next)
    }

    public override var capabilities: BlockCapabilities {
        point != nil ? [] : [.write, .flush, .fua, .discard, .writeZeroes, .multiConn]
    }

    public override func extents(at offset: UInt64, length: UInt64) throws(BlockError) -> [BlockExtent] {
        [BlockExtent(offset: offset, length: length, isHole: false, isZero: false)]
    }

    public override func submit(_ request: BlockRequest, completion: BlockCompletion) {
        if point != nil && request.operation != .read {
            return completion.complete(.failure(BlockError(.readOnly, "timetravel: \(request.operation) on a point of the past (read-only)")))
        }
        offload.serve(request, completion) { self.perform(request) }
    }

    private func perform(_ request: BlockRequest) -> BlockResult {
        do throws(BlockError) {
            switch request.operation {
            case .read: try log.read(into: request.buffers, at: request.offset, point: point ?? .max, below: next)
            case .write: try log.append(request.buffers, at: request.offset, length: request.length, durable: request.fua)
            case .writeZeroes, .discard: try log.append(nil, at: request.offset, length: request.length, durable: request.fua)
            case .flush: try log.sync()
            }
            return .success
        } catch {
            return .failure(error)
        }
    }

    public override func close() {
        guard !closed.exchange(true, ordering: .acquiringAndReleasing) else { return }
        offload.waitUntilIdle()
        if let point { log.unpin(point) } else { try? log.sync(); try? log.setBaseWriter(nil) }
        log.release()
        super.close()
    }
}

extension TimeTravelFilter {
    public static let descriptor = DeviceDescriptor(
        name: "timetravel", kind: .filter,
        summary: "A time-travelling disk: every write logged, so the disk can be read as it was at a snapshot, a record or a time; the device below is the base.",
        parameters: [
            DeviceParameter("log", required: true, "The log's directory (made on first use); one process serves it."),
            DeviceParameter("snapshot", "Show the disk at this snapshot (softdev snapshot), read-only."),
            DeviceParameter("seq", "Show the disk after this record number, read-only."),
            DeviceParameter("time", "Show the disk as it was at this time (seconds since the epoch, or 2026-11-29T20:00:00Z), read-only."),
            DeviceParameter("keep", "Retention: fold records older than this into the base (e.g. 3600s, 90m, 24h, 7d). Default: keep all."),
            DeviceParameter("max-log", "Retention: fold the oldest records into the base while the log is larger (e.g. 10G)."),
            DeviceParameter("segment", "Bytes per log segment, the unit of retention (default 64M)."),
        ],
        open: { parameters, next throws(DeviceSpecError) in
            let directory = try parameters.required("log")
            let points = ["snapshot", "seq", "time"].filter { parameters.string($0) != nil }
            guard points.count <= 1 else { throw DeviceSpecError("timetravel: give at most one of snapshot=, seq= and time=") }
            var point: TimeTravelPoint?
            if let name = parameters.string("snapshot") { point = .snapshot(name) }
            if let text = parameters.string("seq") {
                guard let n = UInt64(text) else { throw DeviceSpecError("timetravel: seq '\(text)' is not a record number") }
                point = .sequence(n)
            }
            if let text = parameters.string("time") {
                guard let t = TimeTravelPoint.parseTime(text) else {
                    throw DeviceSpecError("timetravel: time '\(text)' is not seconds since the epoch or YYYY-MM-DDTHH:MM:SSZ")
                }
                point = .time(t)
            }
            var options = TimeTravelLog.Options()
            if let keep = parameters.string("keep") {
                guard let seconds = parseDuration(keep) else { throw DeviceSpecError("timetravel: keep '\(keep)' is not a duration (e.g. 90m, 24h, 7d)") }
                options.keepSeconds = seconds
            }
            options.maxBytes = try parameters.size("max-log")
            if let segment = try parameters.size("segment") { options.segmentBytes = segment }
            let below = next!
            return try DeviceSpecError.opening { () throws(BlockError) in
                try TimeTravelFilter(next: below, log: directory, point: point, options: options)
            }
        })

    /// `90`, `90s`, `15m`, `24h`, `7d`: seconds.
    static func parseDuration(_ text: String) -> Double? {
        let units: [Character: Double] = ["s": 1, "m": 60, "h": 3600, "d": 86400]
        if let unit = text.last, let scale = units[unit], let value = Double(text.dropLast()), value >= 0 { return value * scale }
        if let value = Double(text), value >= 0 { return value }
        return nil
    }
}
