import ArgumentParser
import Core
import Daemon
import Devices
import Foundation

/// `softdev snapshot LOG NAME`: names the present of a `timetravel` disk.
struct Snapshot: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Name the present state of a timetravel disk, to open later as timetravel(log=LOG, snapshot=NAME) | <base>.",
        discussion: """
            The mark is appended to the disk's log and synced. If a daemon (softdev serve) serves the disk, the mark \
            goes through its control socket (the hypervisor options say which daemon), so that it lands between the \
            guest's writes; otherwise softdev opens the log itself.
            Example: softdev snapshot /var/lib/softdev/g1.log before-upgrade
            """)

    @OptionGroup var hypervisorOptions: HypervisorOptions
    @Argument(help: "The disk's log directory (timetravel's log=).")
    var log: String
    @Argument(help: "The snapshot's name (1 to 255 bytes).")
    var name: String

    func run() throws {
        do {
            try TimeTravel.snapshot(log: log, name: name)
        } catch let error where error.errno == EBUSY {
            // Served by a daemon: ask it.
            let absolute = URL(fileURLWithPath: log).standardizedFileURL.path
            do {
                try ControlSocket.request(path: ServeLock.controlPath(for: hypervisorOptions.choice()),
                                          ["snapshot", Data(absolute.utf8).base64EncodedString(), Data(name.utf8).base64EncodedString()])
            } catch { throw CommandFailure(message: "\(log) is served by another process, and: \(error)") }
        } catch {
            throw CommandFailure(message: error.message)
        }
        print("snapshot \(name) of \(log)")
    }
}

/// `softdev timetravel-points LOG`: what a timetravel disk can show.
struct TimeTravelPoints: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "timetravel-points",
        abstract: "List the points a timetravel disk can be opened at: its records, their times and the snapshots.",
        discussion: "Reads the log's files without taking the log, so it works while the disk is served.")

    @Argument(help: "The disk's log directory (timetravel's log=).")
    var log: String

    func run() throws {
        let report: TimeTravelReport
        do { report = try TimeTravelReport.read(log: log) } catch { throw CommandFailure(message: error.message) }
        func time(_ ns: UInt64?) -> String {
            guard let ns else { return "-" }
            let date = Date(timeIntervalSince1970: Double(ns) / 1e9)
            return ISO8601DateFormatter().string(from: date) + String(format: " (%.3f)", Double(ns) / 1e9)
        }
        print("base: record \(report.baseSequence) (folded into the device below; the oldest point)")
        print("records: \(report.baseSequence + 1) to \(report.lastSequence) (\(report.records)), \(time(report.firstTime)) to \(time(report.lastTime))")
        print("log: \(report.segments) segments, \(report.bytes) bytes")
        for snapshot in report.snapshots {
            print("snapshot \(snapshot.name): record \(snapshot.sequence), \(time(snapshot.time))")
        }
    }
}

/// `softdev rollback LOG POINT`: forgets what a timetravel disk wrote after a point.
struct Rollback: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Roll a timetravel disk back to a point, forgetting every write after it (the disk must not be served).",
        discussion: "Example: softdev rollback /var/lib/softdev/g1.log --snapshot before-upgrade")

    @Argument(help: "The disk's log directory (timetravel's log=).")
    var log: String
    @Option(help: "A snapshot's name.")
    var snapshot: String?
    @Option(help: "A record number (softdev timetravel-points lists them).")
    var seq: UInt64?
    @Option(help: "A time: seconds since the epoch or YYYY-MM-DDTHH:MM:SSZ (the last record written at or before it).")
    var time: String?

    func run() throws {
        var points: [TimeTravelPoint] = []
        if let snapshot { points.append(.snapshot(snapshot)) }
        if let seq { points.append(.sequence(seq)) }
        if let time {
            guard let t = TimeTravelPoint.parseTime(time) else { throw ValidationError("--time \(time): use seconds since the epoch or YYYY-MM-DDTHH:MM:SSZ") }
            points.append(.time(t))
        }
        guard points.count == 1 else { throw ValidationError("give exactly one of --snapshot, --seq and --time") }
        do {
            let sequence = try TimeTravel.rollback(log: log, to: points[0])
            print("\(log) rolled back to record \(sequence) (\(points[0]))")
        } catch { throw CommandFailure(message: error.message) }
    }
}
