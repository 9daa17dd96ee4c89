import Core
import Glibc

/// What `softdev` does with a `timetravel` log outside a device: snapshots, the list of points,
/// rollback.
public enum TimeTravel {
    /// Marks the disk's present as the snapshot `name`, durably: through the log open in this
    /// process (the daemon's control socket lands here), else by opening the log (EBUSY if
    /// another process serves it: ask that one).
    public static func snapshot(log directory: String, name: String) throws(BlockError) {
        if let log = TimeTravelLog.opened(directory) { return try log.mark(name) }
        let log = try TimeTravelLog.acquire(directory, below: nil)
        defer { log.release() }
        try log.mark(name)
    }

    /// Forgets every record after `point`; the disk must not be served. Returns the record
    /// the disk now ends at.
    public static func rollback(log directory: String, to point: TimeTravelPoint) throws(BlockError) -> UInt64 {
        guard TimeTravelLog.opened(directory) == nil else {
            throw BlockError(.invalid, errno: EBUSY, "timetravel: log \(directory) is open in this process: detach the disk first")
        }
        let log = try TimeTravelLog.acquire(directory, below: nil)
        defer { log.release() }
        let sequence = try log.resolve(point)
        try log.rollback(to: sequence)
        return sequence
    }
}

/// A log's points as `softdev timetravel-points` lists them, read from the files without
/// taking the log (so it works while a daemon serves the disk: a record being appended is not
/// listed yet).
public struct TimeTravelReport: Sendable {
    public struct Snapshot: Sendable {
        public var name: String
        public var sequence: UInt64
        /// Nanoseconds since the epoch.
        public var time: UInt64
    }
    /// Records up to this one are folded into the base (the oldest readable point).
    public var baseSequence: UInt64
    public var lastSequence: UInt64
    public var firstTime: UInt64?
    public var lastTime: UInt64?
    public var records: Int
    public var segments: Int
    public var bytes: UInt64
    public var snapshots: [Snapshot]

    public static func read(log directory: String) throws(BlockError) -> TimeTravelReport {
        guard access(directory, F_OK) == 0 else { throw BlockError.system("timetravel: log \(directory)", errno: errno) }
        let state = try TimeTravelLog.readState(directory)
        var report = TimeTravelReport(baseSequence: state.base, lastSequence: state.base, firstTime: nil, lastTime: nil,
                                      records: 0, segments: 0, bytes: 0, snapshots: [])
        for entry in TimeTravelLog.segmentNames(directory) {
            let file = try FormatFile(directory + "/" + entry.name, readOnly: true)
            let scan = try TimeTravelSegmentScan(file, after: nil)
            report.segments += 1
            report.bytes += scan.validEnd
            for record in scan.records where record.sequence > state.base {
                report.records += 1
                if report.firstTime == nil { report.firstTime = record.time }
                report.lastTime = record.time
                report.lastSequence = max(report.lastSequence, record.sequence)
                if let name = scan.marks[record.sequence] { report.snapshots.append(Snapshot(name: name, sequence: record.sequence, time: record.time)) }
            }
        }
        return report
    }
}
