import Core
import Foundation
import NBDExport

/// The NBD export against nbdkit (its `memory` and `file` plugins) on the same workloads, with
/// the same client: fio's nbd engine (libnbd) on a unix socket. For `softdev bench`.
///
/// ```swift
/// let bench = NBDBenchmark(runtime: 5)
/// let rows = try bench.run(pairs: [.init(name: "memory", device: memory, nbdkitPlugin: ["memory", "size=1G"])])
/// print(NBDBenchmark.table(rows))
/// ```
public struct NBDBenchmark: Sendable {
    /// One fio job: the workloads are the blkif table's, with the same names.
    public typealias Workload = BenchmarkWorkload

    /// One measurement: a server on a workload.
    public struct Row: Sendable, Equatable {
        public var server: String
        public var workload: String
        public var iops: Double
        public var megabytesPerSecond: Double
        /// For a softdev row: IOPS over its nbdkit peer's on the same workload.
        public var ratioToPeer: Double?

        init(_ w: Workload, _ server: String, _ report: FioJob.Report) {
            self.server = server; workload = w.name; iops = report.iops; megabytesPerSecond = report.megabytesPerSecond
        }
    }

    /// A device stack behind SoftDev's export and the nbdkit plugin that does the same job,
    /// e.g. `memory` and `["memory", "size=1G"]`.
    public struct Pair: Sendable {
        public var name: String
        public var device: any BlockDevice
        public var nbdkitPlugin: [String]
        /// The file both servers write, if any: synced after each write row (outside the
        /// measured time), so that every row starts with no dirty pages and none pays for the
        /// writeback of the row before it (the other server's).
        public var file: String?
        public init(name: String, device: any BlockDevice, nbdkitPlugin: [String], file: String? = nil) {
            self.name = name; self.device = device; self.nbdkitPlugin = nbdkitPlugin; self.file = file
        }
    }

    /// Why a benchmark could not run (a missing tool names its Debian package).
    public struct Failure: Error, CustomStringConvertible {
        public let description: String
    }

    public var workloads: [Workload]
    /// Seconds per fio job.
    public var runtime: Int
    /// The part of each device fio touches (the nbdkit memory disk's size too).
    public var size: UInt64
    /// Also measure the nbdkit peers (false: our export only).
    public var compareWithNbdkit: Bool
    /// Our server's poll window for idle connections (`NBDServer.pollMicroseconds`).
    public var pollMicroseconds: Int
    /// Turns per workload and pair, each of `runtime / rounds` (and its own ramp), every second
    /// one with our export first (nbdkit, ours, ours, nbdkit): what one job leaves behind (dirty
    /// pages, writeback still under way) then falls on both rows of a pair.
    public var rounds = 2

    public init(workloads: [Workload] = Workload.standard, runtime: Int = 10, size: UInt64 = 1 << 30, compareWithNbdkit: Bool = true,
                pollMicroseconds: Int = AdaptivePoller.defaultMicroseconds) {
        self.workloads = workloads; self.runtime = runtime; self.size = size; self.compareWithNbdkit = compareWithNbdkit
        self.pollMicroseconds = pollMicroseconds
    }

    /// For each pair and workload: fio against nbdkit running the pair's plugin and against our
    /// export of the pair's device, one right after the other on the same unix socket kind, in
    /// `rounds` turns.
    public func run(pairs: [Pair], progress: (Row) -> Void = { _ in }) throws -> [Row] {
        _ = try Self.tool("fio", package: "fio")
        let nbdkit = compareWithNbdkit ? try Self.tool("nbdkit", package: "nbdkit") : ""
        // nbdkit and the sockets' directory go at the end, or when the bench is interrupted.
        let leftovers = BenchLeftovers()
        defer { leftovers.cleanUp() }
        let directory = try Self.temporaryDirectory()
        leftovers.remove(atEnd: directory)
        var rows: [Row] = []
        for pair in pairs {
            let socket = directory + "/softdev-\(pair.name).sock"
            let server = NBDServer(listen: .unix(path: socket), exports: [NBDExport(name: "", device: pair.device)], pollMicroseconds: pollMicroseconds)
            try server.start()
            defer { server.stop() }
            let ours = "nbd+unix:///?socket=\(socket)"
            guard compareWithNbdkit else {
                for w in workloads {
                    let row = Row(w, "softdev \(pair.name)", try measure(w, pair, uri: ours, milliseconds: runtime * 1000))
                    progress(row); rows.append(row)
                }
                continue
            }
            // Both servers run at once and each workload is measured on one right after the
            // other: a slow moment of a shared machine then falls on both rows of a pair.
            try withNbdkit(nbdkit, directory + "/nbdkit-\(pair.name).sock", pair.nbdkitPlugin, leftovers) { theirs in
                for w in workloads {
                    var theirTotal = FioJob.Report(), ourTotal = FioJob.Report()
                    let part = runtime * 1000 / max(1, rounds)
                    for round in 0..<max(1, rounds) {
                        for uri in round % 2 == 0 ? [theirs, ours] : [ours, theirs] {
                            let report = try measure(w, pair, uri: uri, milliseconds: part)
                            if uri == ours { ourTotal.add(report) } else { theirTotal.add(report) }
                        }
                    }
                    let peer = Row(w, "nbdkit \(pair.name)", theirTotal)
                    var mine = Row(w, "softdev \(pair.name)", ourTotal)
                    mine.ratioToPeer = peer.iops > 0 ? mine.iops / peer.iops : nil
                    for row in [peer, mine] { progress(row); rows.append(row) }
                }
            }
        }
        return rows
    }

    /// The rows as a table: workload, server, IOPS, MB/s, ratio to the nbdkit peer.
    public static func table(_ rows: [Row]) -> String {
        BenchmarkTable.render(["workload", "server", "IOPS", "MB/s", "vs nbdkit"], rows.map { r in
            [r.workload, r.server, String(format: "%.0f", r.iops), String(format: "%.1f", r.megabytesPerSecond),
             r.ratioToPeer.map { String(format: "%.2f", $0) } ?? ""]
        }, widths: [20, 18, 10, 10, 10])
    }

    private func measure(_ w: Workload, _ pair: Pair, uri: String, milliseconds: Int) throws -> FioJob.Report {
        let report = try FioJob.run(engine: ["--ioengine=nbd", "--uri=\(uri)"], workload: w, size: size,
                                    runtimeMilliseconds: milliseconds, rampMilliseconds: 1000)
        if w.write, let file = pair.file { try BenchmarkFile.sync(file) }
        return report
    }

    /// Starts nbdkit in the foreground on `socket`, runs `body` with its URI, stops it.
    private func withNbdkit<T>(_ nbdkit: String, _ socket: String, _ plugin: [String], _ leftovers: BenchLeftovers,
                               _ body: (String) throws -> T) throws -> T {
        let p = Process()
        p.executableURL = URL(fileURLWithPath: nbdkit)
        p.arguments = ["-f", "-U", socket] + plugin
        p.standardOutput = FileHandle.nullDevice
        try p.run()
        leftovers.watch(p)
        defer {
            leftovers.forget(p)
            if p.isRunning { p.terminate() }
            p.waitUntilExit()
        }
        // nbdkit creates the socket once it is ready to accept.
        var waited = 0
        while !FileManager.default.fileExists(atPath: socket) {
            guard p.isRunning, waited < 500 else { throw Failure(description: "nbdkit \(plugin.joined(separator: " ")) did not start") }
            usleep(10_000); waited += 1
        }
        return try body("nbd+unix:///?socket=\(socket)")
    }

    public static func tool(_ name: String, package: String) throws -> String {
        for dir in ["/usr/bin", "/usr/sbin", "/usr/local/bin"] where access("\(dir)/\(name)", X_OK) == 0 {
            return "\(dir)/\(name)"
        }
        throw Failure(description: "\(name) is not installed: apt-get install \(package)")
    }

    public static func temporaryDirectory() throws -> String {
        var template = Array("/tmp/softdev-bench.XXXXXX".utf8CString)
        guard let d = mkdtemp(&template) else { throw Failure(description: "mkdtemp failed") }
        return String(cString: d)
    }

    /// Runs a program to its end. Its stderr goes to a file, not a second pipe: reading two
    /// pipes one after the other stalls a child that fills the other one. The file is unlinked
    /// as soon as it is made, so that an interrupted bench leaves none behind.
    public static func execute(_ path: String, _ arguments: [String]) throws -> (Int32, String, String) {
        let p = Process()
        p.executableURL = URL(fileURLWithPath: path)
        p.arguments = arguments
        let out = Pipe()
        var template = Array("/tmp/softdev-bench-stderr.XXXXXX".utf8CString)
        let fd = mkstemp(&template)
        guard fd >= 0 else { throw Failure(description: "cannot create a file for \(path)'s stderr in /tmp: \(String(cString: strerror(errno)))") }
        unlink(template)
        let err = FileHandle(fileDescriptor: fd, closeOnDealloc: true)
        p.standardOutput = out
        p.standardError = err
        try p.run()
        let o = out.fileHandleForReading.readDataToEndOfFile()
        p.waitUntilExit()
        lseek(fd, 0, SEEK_SET)
        let e = err.readDataToEndOfFile()
        return (p.terminationStatus, String(decoding: o, as: UTF8.self), String(decoding: e, as: UTF8.self))
    }
}
