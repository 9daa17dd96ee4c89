import BlockTap
import Core
import Devices
import Foundation
import Glibc

/// `softdev bench`'s block part: the whole path (local blkfront -> shared ring -> BlockTap ->
/// device) on SoftDev's devices, and the same workloads in the same run through the C reference
/// backend (reference_backend.c, Xen's ring macros over a null device): the protocol's cost on
/// this machine, which the Swift backend is measured against. A file device is measured beside
/// fio's libaio engine on the same file with the same O_DIRECT setting (`fioLibaio`): what the
/// kernel gives a careful C program on that file, without any ring.
///
/// Each target gets its own guest with a ring of 2^4 pages and persistent grants; the targets
/// take turns workload by workload, so a noisy neighbour hurts all of them alike. Each workload
/// is measured in halves, the targets in order and then in reverse (A B, B A): what one row
/// leaves behind for the next (dirty pages, a disk still writing the last burst back, a warm or
/// cold cache) then falls on both sides of a ratio instead of always on the later one.
public struct BlockBenchmark {
    /// What a guest's disk is served by.
    public enum Target: Sendable, Equatable, CustomStringConvertible {
        /// SoftDev's blkif backend over a device stack (spec).
        case softdev(label: String, spec: String)
        /// The C reference backend over its null device.
        case reference
        /// fio's libaio engine on `path`, with O_DIRECT or through the page cache, as the peer
        /// of the SoftDev target labelled `peerOf` (a file device on the same file).
        case fioLibaio(path: String, direct: Bool, peerOf: String)

        public var description: String {
            switch self {
            case let .softdev(label, _): return label
            case .reference: return "C reference null"
            case let .fioLibaio(_, direct, _): return "fio libaio (\(direct ? "O_DIRECT" : "buffered"))"
            }
        }
    }

    public struct Row: Sendable {
        public var workload: String
        public var target: String
        public var result: BlkifLoadGenerator.Result
        /// This row's IOPS over the C reference's on the same workload (nil for the reference).
        public var ratioToReference: Double?
        /// A SoftDev row's IOPS over its fio peer's on the same workload (nil without a peer).
        public var ratioToFio: Double? = nil
    }

    public var targets: [Target]
    public var workloads: [BlkifLoadGenerator.Workload]
    public var seconds: Double
    /// Unmeasured time before each measurement (rings warm, grants mapped).
    public var warmup: Double
    /// Every target's device size (the C null device's too).
    public var deviceSize: UInt64
    public var ringPageOrder = Blkif.maxRingPageOrder
    /// SoftDev's ring threads' poll window (`BlkifBackendOptions.pollMicroseconds`), and the C
    /// reference backend's.
    public var pollMicroseconds = AdaptivePoller.defaultMicroseconds
    /// Whether SoftDev's rings keep their records (`RingRecoveryRecord`), as the daemon does.
    public var keepsRingRecords = true
    /// The file the file targets write, synced after every write row (outside the measured
    /// time): buffered writes then leave no dirty pages for the next row, another target's, to
    /// write back.
    public var file: String?
    /// Turns per workload, each of `seconds / rounds`, every second one in reverse order.
    public var rounds = 2

    public init(targets: [Target], workloads: [BlkifLoadGenerator.Workload] = BlkifLoadGenerator.Workload.standard,
                seconds: Double = 2, warmup: Double = 0.3, deviceSize: UInt64 = 1 << 30) {
        self.targets = targets; self.workloads = workloads; self.seconds = seconds; self.warmup = warmup; self.deviceSize = deviceSize
    }

    /// One guest and its disk, connected.
    private final class Attached {
        let target: Target
        let guest: LocalHypervisor
        let front: LocalBlockFrontend
        let reference: CReferenceBackendHarness?
        init(target: Target, guest: LocalHypervisor, front: LocalBlockFrontend, reference: CReferenceBackendHarness?) {
            self.target = target; self.guest = guest; self.front = front; self.reference = reference
        }
    }

    /// Runs every workload on every target; `progress` sees each row as it is measured.
    public func run(progress: (Row) -> Void = { _ in }) throws -> [Row] {
        let hypervisor = try BenchHypervisor(name: "softdev-bench")
        defer { hypervisor.stop() }
        let (directory, address, backend) = (hypervisor.directory, hypervisor.address, hypervisor.backend)
        let failures = BackendLog()
        var blkif = BlkifBackendOptions()
        blkif.pollMicroseconds = pollMicroseconds
        // Each ring keeps its record for a restarted daemon, as `softdev serve` does.
        if keepsRingRecords {
            let rings = directory + "/rings"
            mkdir(rings, 0o700)
            blkif.ringStateDirectory = rings
        }
        let service = BlockTapService.makeHost(hypervisor: backend, options: blkif, log: { failures.note($0) }) { spec, readOnly in
            try DeviceRegistry.open(spec, readOnly: readOnly)
        }
        try service.start()
        defer { service.stop() }

        var options = LocalBlockFrontend.Options()
        options.ringPageOrder = ringPageOrder
        options.persistentGrants = true
        options.bufferPages = workloads.map(\.bufferPages).max() ?? 512
        let guestPages = options.bufferPages + (1 << ringPageOrder) + 256

        var attached: [Attached] = []
        defer {
            for a in attached {
                try? a.front.close(timeoutSeconds: 2)
                a.reference?.stop()
                a.guest.destroy()
            }
        }
        // Each target's guest, by the target's index (nil for fio, which opens the file itself).
        var guests: [Attached?] = []
        for (index, target) in targets.enumerated() {
            if case .fioLibaio = target { guests.append(nil); continue }
            let guest = try LocalHypervisor.createGuest(address, name: "bench-\(index)", pages: guestPages)
            switch target {
            case let .softdev(_, spec):
                let paths = try BlockTapService.attach(store: backend.store, guest: guest.domainID, disk: try VirtualDisk("xvda"), spec: spec)
                do {
                    attached.append(Attached(target: target, guest: guest,
                                             front: try LocalBlockFrontend(hypervisor: guest, frontendPath: paths.frontendPath, options: options),
                                             reference: nil))
                } catch {
                    throw HarnessFailure("\(target): \(error)\(failures.last.map { " (backend: \($0))" } ?? "")")
                }
            case .reference:
                // A backend directory no service watches: the harness plays the backend.
                let paths = XenbusDevicePaths(frontendDomain: guest.domainID, backendDomain: backend.domainID, frontendType: "vbd",
                                              backendType: "cref-vbd", deviceID: 51712)
                try XenbusToolstack.attach(backend.store, paths, frontend: ["virtual-device": "51712", "device-type": "disk"],
                                           backend: ["params": "null", "mode": "w", "dev": "xvda", "type": "cref"])
                let harness = CReferenceBackendHarness(backend: backend, guest: guest, paths: paths, sectors: deviceSize / 512)
                harness.pollMicroseconds = pollMicroseconds   // like for like with SoftDev's rings
                try harness.advertise()
                let connected = DispatchSemaphore(value: 0)
                harness.connectInBackground { connected.signal() }
                let front = try LocalBlockFrontend(hypervisor: guest, frontendPath: paths.frontendPath, options: options)
                connected.wait()
                if let error = harness.connectError { throw HarnessFailure("C reference backend: \(error)") }
                attached.append(Attached(target: target, guest: guest, front: front, reference: harness))
            case .fioLibaio:
                continue
            }
            guests.append(attached.last)
        }

        var rows: [Row] = []
        for workload in workloads {
            var totals = [BlkifLoadGenerator.Result](repeating: .init(requests: 0, bytes: 0, seconds: 0, errors: 0), count: targets.count)
            for round in 0..<max(1, rounds) {
                for i in round % 2 == 0 ? Array(targets.indices) : targets.indices.reversed() {
                    let part = seconds / Double(max(1, rounds))
                    let result = try guests[i].map { try measure($0, workload, seconds: part) } ?? measureFio(targets[i], workload, seconds: part)
                    if workload.write, let file { try BenchmarkFile.sync(file) }
                    totals[i].add(result)
                }
            }
            let measured = Array(zip(targets, totals))
            let reference = measured.first { $0.0 == .reference }?.1
            var fio: [String: BlkifLoadGenerator.Result] = [:]
            for case let (.fioLibaio(_, _, peerOf), result) in measured { fio[peerOf] = result }
            for (target, result) in measured {
                var row = Row(workload: workload.name, target: "\(target)", result: result, ratioToReference: nil)
                if case .softdev = target {
                    // A device with fio as its peer (the file device) is compared with fio only:
                    // the C reference serves a null device, not that file.
                    if fio["\(target)"] == nil { row.ratioToReference = reference.map { result.iops / $0.iops } }
                    row.ratioToFio = fio["\(target)"].map { result.iops / $0.iops }
                }
                rows.append(row)
                progress(row)
            }
        }
        return rows
    }

    /// A warmed-up measurement of one workload through a guest's ring.
    private func measure(_ a: Attached, _ workload: BlkifLoadGenerator.Workload, seconds: Double) throws -> BlkifLoadGenerator.Result {
        let generator = try BlkifLoadGenerator(front: a.front, workload: workload)
        generator.pollMicroseconds = pollMicroseconds
        _ = try generator.run(seconds: warmup)
        let result = try generator.run(seconds: seconds)
        if result.errors > 0 {
            throw HarnessFailure("\(a.target) answered \(result.errors) of \(workload.name) with errors")
        }
        return result
    }

    /// fio's libaio engine on the file, for as long as a ring's row (its ramp as the warm-up).
    private func measureFio(_ target: Target, _ workload: BlkifLoadGenerator.Workload, seconds: Double) throws -> BlkifLoadGenerator.Result {
        guard case let .fioLibaio(path, direct, _) = target else { throw HarnessFailure("\(target) has no guest") }
        let r = try FioJob.run(engine: ["--ioengine=libaio", "--filename=\(path)", "--direct=\(direct ? 1 : 0)"], workload: workload,
                               size: deviceSize, runtimeMilliseconds: Int(seconds * 1000), rampMilliseconds: Int(warmup * 1000))
        return BlkifLoadGenerator.Result(requests: r.requests, bytes: r.bytes, seconds: r.seconds, errors: 0)
    }

    /// The rows as a table: workload, backend, IOPS, MB/s, ratio to the C reference, ratio to
    /// fio on the same file.
    public static func table(_ rows: [Row]) -> String {
        var lines = [pad(["workload", "backend", "IOPS", "MB/s", "vs C", "vs fio"])]
        var lastWorkload = ""
        for row in rows {
            let iops = row.result.iops >= 10_000 ? String(format: "%.1fk", row.result.iops / 1000) : String(format: "%.0f", row.result.iops)
            lines.append(pad([row.workload == lastWorkload ? "" : row.workload, row.target, iops,
                              String(format: "%.1f", row.result.megabytesPerSecond),
                              row.ratioToReference.map { String(format: "%.2f", $0) } ?? (row.target == "\(Target.reference)" ? "1.00" : "-"),
                              row.ratioToFio.map { String(format: "%.2f", $0) } ?? (row.target.hasPrefix("fio ") ? "1.00" : "-")]))
            lastWorkload = row.workload
        }
        return lines.joined(separator: "\n")
    }

    private static func pad(_ cells: [String]) -> String {
        let widths = [20, 22, 10, 10, 6, 7]
        return zip(cells, widths).enumerated().map { i, pair in
            let (cell, width) = pair
            let space = String(repeating: " ", count: max(0, width - cell.count))
            return i < 2 ? cell + space : space + cell   // numbers right-aligned
        }.joined(separator: " ")
    }
}

extension BlkifLoadGenerator.Result {
    /// Adds another measurement of the same workload on the same target (a second half).
    fileprivate mutating func add(_ other: Self) {
        requests += other.requests; bytes += other.bytes; seconds += other.seconds; errors += other.errors
    }
}

/// The backend's last log line, to explain a target that would not connect.
private final class BackendLog: @unchecked Sendable {
    private let lock = NSLock()
    private var line: String?
    func note(_ s: String) { lock.lock(); line = s; lock.unlock() }
    var last: String? { lock.lock(); defer { lock.unlock() }; return line }
}
