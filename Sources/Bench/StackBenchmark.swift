import Core
import Devices
import Foundation
import Glibc
import NBDExport

/// Device stacks over the same base device, side by side (`softdev bench --stacks`): each
/// stack is served by SoftDev's NBD export and measured with fio's nbd engine, and for each
/// `crypt(keyfile=K) | file(path=X)` stack, qemu's luks driver on the same image and key is
/// served by `qemu-nbd` and measured with the same fio jobs: the same client, the same
/// transport (NBD on a unix socket), the same file, the same O_DIRECT setting (qemu-nbd
/// `--cache=none --aio=native` when the file device uses O_DIRECT, else `--cache=writeback
/// --aio=threads`), so that the rows differ only by the server's data path.
///
/// fio works on `[offset, offset + size)` of every target: the offset keeps a stack's writes
/// off the LUKS header and key slots when the stack is the raw file under a `crypt`.
public struct StackBenchmark {
    public struct Target {
        public var label: String
        /// A SoftDev stack, or nil for a qemu-nbd target.
        public var device: (any BlockDevice)?
        public var qemuNBD: [String]?
        /// The file the target writes, synced after each write row.
        public var file: String?
        public init(label: String, device: (any BlockDevice)? = nil, qemuNBD: [String]? = nil, file: String? = nil) {
            self.label = label; self.device = device; self.qemuNBD = qemuNBD; self.file = file
        }
    }

    public struct Row: Sendable {
        public var workload: String
        public var target: String
        public var iops: Double
        public var megabytesPerSecond: Double
        /// MB/s over the first target's (the base device, as listed first).
        public var ratioToFirst: Double?
    }

    public var workloads: [BenchmarkWorkload]
    public var milliseconds: Int
    public var size: UInt64
    public var offset: UInt64
    public var pollMicroseconds: Int
    public var rounds = 2
    /// fio's options for the data written (``DataKind``); empty: fio's own buffers.
    public var data: [String] = []
    /// Write every target's region once with that data before the rows (reads then read it).
    public var prefill = false

    /// The data the write rows write: compressible (fio's buffer_compress_percentage, which
    /// zstd brings to about half) or incompressible (random, refilled for every request).
    public enum DataKind: String, CaseIterable, Sendable {
        case compressible, incompressible
        public var fioArguments: [String] {
            switch self {
            case .compressible: return ["--refill_buffers", "--buffer_compress_percentage=50", "--buffer_compress_chunk=4096"]
            case .incompressible: return ["--refill_buffers"]
            }
        }
    }

    public init(workloads: [BenchmarkWorkload], milliseconds: Int, size: UInt64, offset: UInt64, pollMicroseconds: Int) {
        self.workloads = workloads; self.milliseconds = milliseconds; self.size = size; self.offset = offset
        self.pollMicroseconds = pollMicroseconds
    }

    /// The workloads `--stacks` runs unless `--workloads` names others: 4 KiB random at queue
    /// depth 1 and 32, 1 MiB sequential, reads and writes.
    public static let defaultWorkloads = ["4k-randread-qd1", "4k-randread-qd32", "4k-randwrite-qd1", "4k-randwrite-qd32", "1m-read", "1m-write"]

    /// For a stack `crypt(keyfile=K, ...) | file(path=X, ...)`: K, X and the file's direct setting.
    public static func luksImage(of spec: String) -> (keyfile: String, image: String)? {
        guard let parsed = try? DeviceSpec(parsing: spec), parsed.elements.count == 2,
              parsed.elements[0].name == "crypt", parsed.elements[1].name == "file",
              let key = parsed.elements[0].parameters.first(where: { $0.key == "keyfile" })?.value,
              let path = parsed.elements[1].parameters.first(where: { $0.key == "path" })?.value else { return nil }
        return (key, path)
    }

    /// qemu-nbd's arguments for qemu's luks driver on `image` with the key file `keyfile`.
    public static func qemuLuks(image: String, keyfile: String, direct: Bool) -> [String] {
        ["--object", "secret,id=sec0,file=\(keyfile)", "--image-opts", "driver=luks,key-secret=sec0,file.filename=\(image)",
         "--cache=\(direct ? "none" : "writeback")", "--aio=\(direct ? "native" : "threads")", "--persistent", "--shared=4"]
    }

    /// Why a qemu-nbd target is left out of the rows (it would not serve), as qemu-nbd said it.
    public struct LeftOut: Error, CustomStringConvertible {
        public var reason: String
        public var description: String { reason }
    }

    /// Why qemu's luks driver cannot open a volume with the key file at `keyfile`, before
    /// qemu-nbd is tried: it takes only UTF-8 passphrases (`secret,file=` with
    /// `qcrypto_secret_lookup_as_utf8`), where cryptsetup and SoftDev take any bytes. Nil if
    /// the key is valid UTF-8 (or cannot be read here: qemu-nbd will say why).
    public static func qemuLuksProblem(keyfile: String) -> String? {
        guard let key = FileManager.default.contents(atPath: keyfile) else { return nil }
        guard String(validating: key, as: UTF8.self) == nil else { return nil }
        return "qemu's luks driver takes only UTF-8 passphrases, and the key file \(keyfile) is not valid UTF-8"
    }

    /// Starts qemu-nbd with `arguments` on the unix socket `socket` and waits until it serves
    /// (it greets a client: qemu-nbd makes the socket before it opens the image, and exits if
    /// that fails, so a socket alone proves nothing). Throws ``LeftOut`` with qemu-nbd's own
    /// message if it exits or does not serve within 30 s (its PBKDF2 alone may take seconds).
    public static func startQemuNBD(_ arguments: [String], socket: String) throws -> Process {
        let p = Process()
        p.executableURL = URL(fileURLWithPath: try NBDBenchmark.tool("qemu-nbd", package: "qemu-utils"))
        p.arguments = ["--socket=\(socket)"] + arguments
        p.standardOutput = FileHandle.nullDevice
        let errors = Pipe()
        p.standardError = errors
        try p.run()
        func failed(_ what: String) -> LeftOut {
            if p.isRunning { p.terminate() }
            p.waitUntilExit()
            let said = String(decoding: errors.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
                .trimmingCharacters(in: .whitespacesAndNewlines)
            return LeftOut(reason: said.isEmpty ? "qemu-nbd \(what)" : "qemu-nbd \(what): \(said)")
        }
        let deadline = Date().addingTimeInterval(30)
        while Date() < deadline {
            guard p.isRunning else { throw failed("exited with status \(p.terminationStatus)") }
            if Self.greets(socket) { return p }
            usleep(10_000)
        }
        throw failed("did not serve on \(socket) within 30 s")
    }

    /// Whether an NBD server greets a client on the unix socket at `path` (its first 8 bytes
    /// are NBDMAGIC); a connection alone may sit in the backlog of a server still opening.
    private static func greets(_ path: String) -> Bool {
        let fd = Glibc.socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { return false }
        defer { Glibc.close(fd) }
        var address = sockaddr_un()
        address.sun_family = sa_family_t(AF_UNIX)
        let bytes = Array(path.utf8)
        guard bytes.count < MemoryLayout.size(ofValue: address.sun_path) else { return false }
        withUnsafeMutableBytes(of: &address.sun_path) { $0.copyBytes(from: bytes) }
        let connected = withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) == 0 }
        }
        guard connected else { return false }
        var timeout = timeval(tv_sec: 0, tv_usec: 200_000)
        _ = setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &timeout, socklen_t(MemoryLayout<timeval>.size))
        var magic = [UInt8](repeating: 0, count: 8)
        return recv(fd, &magic, 8, Int32(MSG_WAITALL)) == 8 && magic == Array("NBDMAGIC".utf8)
    }

    /// Every workload on every target, in `rounds` turns (the targets in order, then reversed).
    /// A qemu-nbd target that does not serve is left out of the rows: `leftOut` is told why,
    /// and the others are measured.
    public func run(targets: [Target], progress: (Row) -> Void = { _ in },
                    leftOut: (Target, String) -> Void = { _, _ in }) throws -> [Row] {
        // qemu-nbd and the sockets' directory go at the end, or when the bench is interrupted.
        let leftovers = BenchLeftovers()
        let directory = try NBDBenchmark.temporaryDirectory()
        leftovers.remove(atEnd: directory)
        var uris: [String] = []
        var servers: [NBDServer] = []
        var served: [Target] = []
        defer {
            servers.forEach { $0.stop() }
            leftovers.cleanUp()
        }
        for (index, target) in targets.enumerated() {
            let socket = "\(directory)/t\(index).sock"
            if let device = target.device {
                let server = NBDServer(listen: .unix(path: socket), exports: [NBDExport(name: "", device: device)], pollMicroseconds: pollMicroseconds)
                try server.start()
                servers.append(server)
            } else if let arguments = target.qemuNBD {
                do {
                    leftovers.watch(try Self.startQemuNBD(arguments, socket: socket))
                } catch let failure as LeftOut {
                    leftOut(target, failure.reason)
                    continue
                }
            }
            served.append(target)
            uris.append("nbd+unix:///?socket=\(socket)")
        }
        let targets = served
        if prefill {
            for uri in uris { try FioJob.fill(engine: ["--ioengine=nbd", "--uri=\(uri)", "--offset=\(offset)"], size: size, data: data) }
        }
        var rows: [Row] = []
        for w in workloads {
            var totals = Array(repeating: FioJob.Report(), count: targets.count)
            let part = milliseconds / max(1, rounds)
            for round in 0..<max(1, rounds) {
                let order = round % 2 == 0 ? Array(targets.indices) : targets.indices.reversed()
                for i in order {
                    totals[i].add(try FioJob.run(engine: ["--ioengine=nbd", "--uri=\(uris[i])", "--offset=\(offset)"] + data, workload: w,
                                                 size: size, runtimeMilliseconds: part, rampMilliseconds: 500))
                    if w.write, let file = targets[i].file { try BenchmarkFile.sync(file) }
                }
            }
            for (i, total) in totals.enumerated() {
                let row = Row(workload: w.name, target: targets[i].label, iops: total.iops, megabytesPerSecond: total.megabytesPerSecond,
                              ratioToFirst: i == 0 || totals[0].megabytesPerSecond == 0 ? nil : total.megabytesPerSecond / totals[0].megabytesPerSecond)
                progress(row); rows.append(row)
            }
        }
        return rows
    }

    /// The rows as a table: workload, target, IOPS, MB/s, MB/s over the first target's.
    public static func table(_ rows: [Row]) -> String {
        BenchmarkTable.render(["workload", "target", "IOPS", "MB/s", "vs first"], rows.map { r in
            [r.workload, r.target, String(format: "%.0f", r.iops), String(format: "%.1f", r.megabytesPerSecond),
             r.ratioToFirst.map { String(format: "%.2f", $0) } ?? ""]
        }, widths: [18, max(24, (rows.map(\.target.count).max() ?? 0) + 1), 10, 10, 9])
    }
}
