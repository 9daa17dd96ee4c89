import ArgumentParser
import Bench
import Core
import Devices
import Foundation
import Glibc

/// `softdev bench`.
struct Bench: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Measure IOPS and MB/s through the whole blkif path and the NBD export, frames/s through the netif rings, URBs/s through the usbif rings, beside their peers.",
        discussion: """
            Runs 4 KiB random reads at queue depth 1, 32 and 256, 4 KiB random writes at queue depth 1 and 32, and \
            1 MiB sequential reads and writes (queue depth 4) from a local blkfront through the shared ring (2^4 \
            pages, persistent grants) to SoftDev's backend over the null and file devices, and, in the same run, to a \
            minimal C backend written with Xen's ring macros over a null device (the protocol's cost on this \
            machine), and fio's libaio engine on the file itself with the file device's O_DIRECT setting. "vs C" is \
            IOPS over the C backend's on the same workload, "vs fio" the file device's IOPS over fio's.
            With --nbd, the same workloads run through SoftDev's NBD export and nbdkit (memory and file plugins, the \
            file read and written through the page cache by both, synced after each write row) with fio's nbd \
            engine; "vs nbdkit" is IOPS over nbdkit's.
            Each row is measured in turns (--turns, two by default) that share its time, the targets in order, \
            then reversed, and so on, so that what one row leaves behind (dirty pages, a disk still writing a burst \
            back) and a neighbour's load fall on both sides of a ratio; on a noisy machine, more turns give a \
            steadier ratio.
            The write workloads overwrite the file's contents (a --file too).
            SoftDev's idle rings and connections poll for the next request before they sleep (--poll-us, as \
            `softdev serve`), and a ring with an O_DIRECT file's request in flight polls the file's completion \
            ring. The C backend polls with the same window, and so does the bench's guest (its blkfront watches its \
            ring for responses), so "vs C" is like for like either way. fio's libaio and nbdkit never poll: \
            --poll-us 0 compares the file device and the NBD export with them like for like (a Linux guest's \
            blkfront does not poll either).
            With --net, the netif rings instead: a local netfront sends frames as fast as it can (tx) or takes the \
            frames the backend side makes for every buffer it posts (rx), 64-byte, 1514-byte and 64 KiB TCPv4 GSO \
            frames, through SoftDev's netif backend over the `generator` device (which drops tx frames and makes rx \
            frames on the ring thread as buffers are posted, the same frame handed up as one run of copies, as pktgen's clone_skb) and through a minimal \
            C netif backend written with Xen's ring macros (rx frames from a template on its thread: the \
            protocol's cost on this machine); "vs C" is frames/s over the C backend's. While the ring rows run, \
            the guest's thread is on one CPU and the backends' threads on the others. \
            Run as root, --net then also measures the TAP path: two network namespaces (10.88.0.1/24 and \
            10.88.0.2/24) joined by SoftDev's `tap(name=a) | tap(name=b)` link (in the bench process, checksum and \
            TSO offloads on), by the Linux bridge over two veth pairs (the kernel's own path) and by a minimal C \
            forwarder between two TAPs with the same flags and offloads (a thread per direction, read() and \
            write()); rows are iperf3 TCP both ways (one stream, Gbit/s) and UDP with 64-byte datagrams at full \
            speed (packets/s received), "vs C" the rate over the C forwarder's. Not root, it says why and skips \
            them; --tap-only measures only them.
            With --usb, the usbif rings instead: a soft storage stick over a memory device, driven as Linux's \
            usb-storage drives it through xen-hcd, one Bulk-Only command at a time (a CBW, the data in bulk URBs \
            all in flight as far as the 16-slot ring allows, the CSW): READ(10) and WRITE(10) of 64 KiB and of \
            120 KiB (usb-storage's max_sectors 240) in URBs of 64 KiB (xen-hcd has no scatter-gather: one URB per \
            scatterlist entry, 64 KiB where the guest's pages are contiguous), and of 120 KiB in 4 KiB URBs (where \
            none are), and GET_DESCRIPTOR control transfers one at a time; from SoftDev's Swift usbfront and \
            from the C usbfront of the conformance suite (Xen's ring macros), each with its own guest and stick, \
            against the same Swift backend. There is no user-space usbif backend to compare with locally (QEMU's \
            qusb needs a device model and a libusb device), so the C row is the frontend side's cost, not a "vs C".
            Numbers depend on the machine and on what else runs on it: compare rows of one run.
            """)

    @Option(help: "Seconds to measure each workload on each backend.")
    var seconds: Double = 2

    @Option(help: ArgumentHelp("Turns each row is measured in, the targets in order, then reversed, and so on, each turn --seconds / turns long (an iperf3 turn at least 1 s): more turns spread a noisy neighbour more evenly over both sides of a ratio.",
                               valueName: "n"))
    var turns = 2

    @Option(help: "The file device's backing file (default: a scratch file in /var/tmp, filled with data, removed afterwards). The write workloads overwrite it.")
    var file: String?

    @Option(help: "Size of the scratch file (K, M, G).")
    var fileSize = "256M"

    @Option(help: "The file device's O_DIRECT setting: auto, on or off.")
    var direct = "auto"

    @Option(help: "Backends to measure through blkif, comma-separated: reference, null, fio (fio's libaio on the file), file.")
    var backends = "reference,null,fio,file"

    @Option(help: ArgumentHelp("Workloads to run, comma-separated, or all: \(BenchmarkWorkload.standard.map(\.name).joined(separator: ", ")) (4k-qd1, 4k-qd32, 4k-qd256 and 1m still name the reads); with --net, the netif rows: \(NetBenchmark.Workload.standard.map(\.key).joined(separator: ", ")), and the TAP rows: \(TapBenchmark.Workload.allCases.map(\.key).joined(separator: ", ")) (a list of ring rows alone leaves the TAP path out, and the other way round).",
                               valueName: "names"))
    var workloads = "all"

    @Flag(help: "Also measure the NBD export against nbdkit's memory and file plugins with fio's nbd engine (needs fio and nbdkit).")
    var nbd = false

    @Flag(help: "Measure only the NBD export against nbdkit.")
    var nbdOnly = false

    @Flag(help: "Measure only the network paths: the netif rings (SoftDev's netif backend over the generator device against the C reference netif backend, tx and rx) and, as root, the TAP path (SoftDev's tap|tap link against the Linux bridge and a C TAP forwarder, with iperf3).")
    var net = false

    @Flag(help: "Measure only the TAP path of --net (needs root, ip and iperf3).")
    var tapOnly = false

    @Flag(help: "Measure only the usbif rings: a soft storage stick over memory, Bulk-Only reads and writes of 64 KiB and 120 KiB (in 64 KiB and in 4 KiB URBs) one command at a time as usb-storage sends them, and control transfers, from the Swift and the C usbfront.")
    var usb = false

    @Option(name: .customLong("poll-us"), help: ArgumentHelp(
        "SoftDev's poll window for idle rings and NBD connections, in microseconds, as `softdev serve --poll-us` (0: never poll). The C reference backend gets the same window; nbdkit never polls.",
        valueName: "us"))
    var pollMicroseconds = AdaptivePoller.defaultMicroseconds

    @Option(parsing: .upToNextOption, help: ArgumentHelp(
        "Compare device stacks over the same base device through the NBD export and fio's nbd engine, e.g. --stacks 'file(path=X, direct=off)' 'crypt(keyfile=K) | file(path=X, direct=off)' (X from `softdev luks-format X --size 1G --keyfile K --zero`); a crypt | file stack also gets a row of qemu-nbd with qemu's luks driver on the same image. Replaces the other tables.",
        valueName: "spec"))
    var stacks: [String] = []

    @Flag(help: "With --stacks: leave out the qemu-nbd luks rows.")
    var noQemu = false

    @Option(help: ArgumentHelp("With --stacks: the data written, compressible (fio's buffer_compress_percentage=50) or incompressible (random, refilled each request); each stack's region is first written once with it, and a compress stack's ratio reached is printed. Default: fio's own buffers, no prefill.",
                               valueName: "kind"))
    var data: StackBenchmark.DataKind?

    func run() throws {
        guard (1...100).contains(turns) else { throw ValidationError("--turns \(turns): use 1 to 100") }
        // Interrupted (Ctrl-C, kill, a closed output), the bench removes what its runs left
        // outside the process: servers, scratch files, network namespaces.
        let trap = SignalTrap { BenchLeftovers.cleanUpAll() }
        defer { trap.cancel() }
        return try runChosen()
    }

    private func runChosen() throws {
        if usb { return try runUSB() }
        if net || tapOnly { return try runNet() }
        if !stacks.isEmpty { return try runStacks() }
        let wanted = Set(backends.split(separator: ",").map { $0.trimmingCharacters(in: .whitespaces) })
        let unknown = wanted.subtracting(["null", "file", "reference", "fio"])
        guard unknown.isEmpty else { throw ValidationError("--backends: unknown \(unknown.sorted().joined(separator: ", ")) (use reference, null, fio, file)") }
        guard seconds > 0 else { throw ValidationError("--seconds must be positive") }
        guard AdaptivePoller.microsecondRange.contains(pollMicroseconds) else { throw ValidationError("--poll-us \(pollMicroseconds): use 0 to 1000000 microseconds") }
        let picked: [BenchmarkWorkload]
        do { picked = try BenchmarkWorkload.select(workloads) } catch { throw ValidationError("\(error)") }
        // The file the file device (and nbdkit's file plugin) reads: --file, or a scratch file.
        let scratch = BenchLeftovers()
        defer { scratch.cleanUp() }
        let path: String
        if let file { path = file } else {
            guard let bytes = DeviceParameters.parseSize(fileSize), bytes >= 1 << 20 else {
                throw ValidationError("--file-size \(fileSize): use e.g. 256M (at least 1M)")
            }
            path = "/var/tmp/softdev-bench-\(getpid()).img"
            scratch.remove(atEnd: path)
            try BenchmarkFile.fill(path, size: bytes)
        }
        var st = stat()
        guard stat(path, &st) == 0 else { throw ValidationError("--file \(path): \(String(cString: strerror(errno)))") }
        guard (st.st_mode & S_IFMT) == S_IFREG, st.st_size >= 1 << 20 else {
            throw ValidationError("--file \(path): use a regular file of at least 1 MiB (its size sets the device size for every backend)")
        }
        // Every backend serves the same number of sectors, so random offsets spread alike.
        let size = UInt64(st.st_size) / 4096 * 4096
        if !nbdOnly {
            // Whether the file device gets O_DIRECT on this file (direct=auto: where the file
            // system has it), so that fio runs the same way and the header says which.
            let fileSpec = "file(path=\(path), direct=\(direct))"
            let probe = try DeviceRegistry.open(fileSpec)
            let isDirect = (probe as? FileDevice)?.isDirect ?? false
            probe.close()
            var targets: [BlockBenchmark.Target] = []
            if wanted.contains("reference") { targets.append(.reference) }
            if wanted.contains("null") { targets.append(.softdev(label: "softdev null", spec: "null(size=\(size))")) }
            if wanted.contains("fio") { targets.append(.fioLibaio(path: path, direct: isDirect, peerOf: "softdev file")) }
            if wanted.contains("file") { targets.append(.softdev(label: "softdev file", spec: fileSpec)) }
            try runBlkif(targets: targets, size: size, path: path, direct: isDirect, workloads: picked)
        }
        if nbd || nbdOnly { try runNBD(path: path, size: size, workloads: picked) }
    }

    /// Whether `path` starts with a LUKS header's magic.
    private static func holdsLUKSHeader(_ path: String) -> Bool {
        guard let handle = FileHandle(forReadingAtPath: path) else { return false }
        defer { try? handle.close() }
        return (try? handle.read(upToCount: LUKSHeader.magic.count)).map { [UInt8]($0) == LUKSHeader.magic } ?? false
    }

    /// The header's words for SoftDev's poll window.
    private static func polling(_ us: Int) -> String { us > 0 ? "SoftDev polls \(us) µs before sleeping" : "no polling" }
    private static func blkifPolling(_ us: Int) -> String {
        us > 0 ? "SoftDev, the C backend and the guest poll \(us) µs before sleeping" : "no polling"
    }

    private func runBlkif(targets: [BlockBenchmark.Target], size: UInt64, path: String, direct isDirect: Bool,
                          workloads: [BenchmarkWorkload]) throws {
        var bench = BlockBenchmark(targets: targets, workloads: workloads, seconds: seconds)
        bench.deviceSize = size
        bench.rounds = turns
        bench.pollMicroseconds = pollMicroseconds
        bench.file = path
        let fileSystem = BenchmarkFile.fileSystemType(path) ?? "an unknown file system"
        print("blkif, local hypervisor: ring order \(bench.ringPageOrder), 1 queue, persistent grants, \(seconds) s per row "
              + "in \(bench.rounds) turns, the targets in order then reversed (+\(bench.warmup) s warm-up each), device \(size >> 20) MiB; file device \(isDirect ? "O_DIRECT" : "buffered") on "
              + "\(fileSystem) (\(path)), fio libaio \(isDirect ? "O_DIRECT" : "buffered") on the same file"
              + (isDirect ? "" : ", file synced after each write row") + "; rings keep their records for a restart, as the daemon's; "
              + Self.blkifPolling(pollMicroseconds))
        let rows = try bench.run { row in
            Self.progress("  measured \(row.workload) on \(row.target)\n")
        }
        print(BlockBenchmark.table(rows))
    }

    /// A progress line on stderr. Not FileHandle's write, which traps when the reader has gone
    /// (`softdev bench 2>&1 | head`): the failed write is ignored here, and SIGPIPE ends the run
    /// through the TAP rows' trap, which removes their namespaces first.
    static func progress(_ line: String) {
        fputs(line, stderr)
    }

    /// `--net`: the netif rings, then the TAP path when it can run here; `--tap-only`: the TAP path.
    private func runNet() throws {
        FrameMemory.keepFreedMemory()   // as `softdev serve` does
        guard seconds > 0 else { throw ValidationError("--seconds must be positive") }
        guard AdaptivePoller.microsecondRange.contains(pollMicroseconds) else { throw ValidationError("--poll-us \(pollMicroseconds): use 0 to 1000000 microseconds") }
        // --workloads: ring rows, TAP rows, or both.
        let names = workloads.split(separator: ",").map { $0.trimmingCharacters(in: .whitespaces) }.filter { !$0.isEmpty }
        let tapNames = names.filter { $0.hasPrefix("tap-") }, ringNames = names.filter { !$0.hasPrefix("tap-") }
        let all = names == ["all"]
        let ringList = all ? "all" : ringNames.joined(separator: ","), tapList = all ? "all" : tapNames.joined(separator: ",")
        if !tapOnly && !ringList.isEmpty { try runRings(ringList) }
        if tapList.isEmpty && !all {
            if tapOnly { throw ValidationError("--tap-only: --workloads \(workloads) names no TAP row (\(TapBenchmark.Workload.allCases.map(\.key).joined(separator: ", ")))") }
            return
        }
        if let reason = TapBenchmark.unavailableReason() {
            if tapOnly { throw ValidationError("--tap-only: \(reason)") }
            print("\nTAP path: skipped: \(reason)")
            return
        }
        if !tapOnly && !ringList.isEmpty { print() }
        try runTap(tapList)
    }

    /// The netif rings: SoftDev's backend over the generator device against the C reference backend.
    private func runRings(_ list: String) throws {
        var bench = NetBenchmark(seconds: seconds)
        do { bench.workloads = try NetBenchmark.Workload.select(list) } catch { throw ValidationError("\(error)") }
        bench.rounds = turns
        bench.pollMicroseconds = pollMicroseconds
        print("netif, local hypervisor: 1 queue, split event channels, 256 rx buffers, \(seconds) s per row in \(bench.rounds) turns, "
              + "the targets in order then reversed (+\(bench.warmup) s warm-up each); the guest pushes tx in batches of what the ring "
              + "holds; rx frames come from the generator device (SoftDev: made on the ring thread as the guest posts buffers, one "
              + "frame handed up as a run of copies) or the C backend's generator (from a template, on its thread); "
              + NetBenchmark.placementNote + "; " + Self.blkifPolling(pollMicroseconds))
        let rows = try bench.run { row in
            Self.progress("  measured \(row.workload) on \(row.target)\n")
        }
        print(NetBenchmark.table(rows))
    }

    /// `--usb`: the usbif rings, a stick over memory, from the Swift and the C usbfront.
    private func runUSB() throws {
        guard seconds > 0 else { throw ValidationError("--seconds must be positive") }
        guard AdaptivePoller.microsecondRange.contains(pollMicroseconds) else { throw ValidationError("--poll-us \(pollMicroseconds): use 0 to 1000000 microseconds") }
        var bench = USBBenchmark(seconds: seconds)
        bench.rounds = turns
        bench.pollMicroseconds = pollMicroseconds
        print("usbif, local hypervisor: a soft storage stick (storage over memory, \(bench.stickBytes >> 20) MiB, high speed) per guest, "
              + "\(seconds) s per row in \(bench.rounds) turns, the frontends in order then reversed (+\(bench.warmup) s warm-up each); "
              + "one Bulk-Only command at a time (CBW, data URBs of 64 KiB, or 4 KiB in the /4K rows, up to 16 in flight, CSW), sequential LBAs; control: "
              + "GET_DESCRIPTOR(DEVICE) one at a time; the frontends sleep on the event channel; "
              + (pollMicroseconds > 0 ? "SoftDev polls \(pollMicroseconds) µs before sleeping" : "no polling"))
        let rows = try bench.run { row in
            Self.progress("  measured \(row.workload) from the \(row.frontend)\n")
        }
        print(USBBenchmark.table(rows))
    }

    /// The TAP path: SoftDev's tap|tap link against the Linux bridge and the C forwarder.
    private func runTap(_ list: String) throws {
        var bench = TapBenchmark(amount: .seconds(max(1, Int((seconds / Double(turns)).rounded()))))
        do { bench.workloads = try TapBenchmark.Workload.select(list) } catch { throw ValidationError("\(error)") }
        bench.rounds = turns
        guard case let .seconds(turn) = bench.amount else { return }
        print("TAP path, two network namespaces (10.88.0.1/24, 10.88.0.2/24): SoftDev's tap|tap link in this process, the Linux "
              + "bridge over two veth pairs, a C forwarder between two TAPs (a thread per direction); both TAP paths with "
              + "IFF_VNET_HDR and TUN_F_CSUM|TSO4|TSO6; iperf3 \(turn) s per turn, \(bench.rounds) turns per row, the paths in "
              + "order then reversed; TCP one stream, UDP 64-byte datagrams at full speed (-b 0), packets received")
        let rows = try bench.run { row in
            Self.progress("  measured \(row.workload) on \(row.path)\n")
        }
        print(TapBenchmark.table(rows))
    }

    /// The NBD export against nbdkit: our memory device against `nbdkit memory`, our file
    /// device against `nbdkit file` on the same file (both through the page cache).
    private func runNBD(path: String, size: UInt64, workloads: [BenchmarkWorkload]) throws {
        let runtime = max(1, Int(seconds.rounded()))
        var bench = NBDBenchmark(workloads: workloads, runtime: runtime, size: size, pollMicroseconds: pollMicroseconds)
        bench.rounds = turns
        let memory = try DeviceRegistry.open("memory(size=\(bench.size))")
        let fileDevice = try DeviceRegistry.open("file(path=\(path), direct=off)")
        try BenchmarkFile.warm(path)
        defer { memory.close(); fileDevice.close() }
        print("\nNBD, fio nbd engine over a unix socket: \(runtime) s per row in \(bench.rounds) turns, "
              + "nbdkit first then ours first (+1 s ramp each), \(bench.size >> 20) MiB; file: both "
              + "servers buffered (page cache) on \(BenchmarkFile.fileSystemType(path) ?? "an unknown file system"), file synced after "
              + "each write row; " + Self.polling(pollMicroseconds))
        let rows = try bench.run(pairs: [
            .init(name: "memory", device: memory, nbdkitPlugin: ["memory", "size=\(bench.size)"]),
            .init(name: "file", device: fileDevice, nbdkitPlugin: ["file", path], file: path),
        ]) { row in Self.progress("  measured \(row.workload) on \(row.server)\n") }
        print(NBDBenchmark.table(rows))
    }

    /// `--stacks`: each stack (and qemu's luks driver for a crypt | file stack) on the same
    /// workloads, through NBD, the first stack's MB/s the reference.
    private func runStacks() throws {
        let picked: [BenchmarkWorkload]
        do { picked = try BenchmarkWorkload.select(workloads == "all" ? StackBenchmark.defaultWorkloads.joined(separator: ",") : workloads) } catch {
            throw ValidationError("\(error)")
        }
        var targets: [StackBenchmark.Target] = []
        var qemu: [StackBenchmark.Target] = []
        var leftOut: [String] = []
        defer { targets.forEach { $0.device?.close() } }
        var offset: UInt64 = 0
        for spec in stacks {
            let device: any BlockDevice
            do { device = try DeviceRegistry.open(spec) } catch { throw ValidationError("--stacks \(spec): \(error)") }
            var bottom: any BlockDevice = device
            while let filter = bottom as? BlockFilter { bottom = filter.next }
            let file = bottom as? FileDevice
            targets.append(.init(label: spec, device: device, file: file?.path))
            if let crypt = device as? CryptFilter { offset = max(offset, crypt.payloadStart) }
            if !noQemu, let luks = StackBenchmark.luksImage(of: spec) {
                if let problem = StackBenchmark.qemuLuksProblem(keyfile: luks.keyfile) {
                    leftOut.append("qemu-nbd luks (same image): left out: \(problem)")
                    continue
                }
                qemu.append(.init(label: "qemu-nbd luks (same image)", qemuNBD: StackBenchmark.qemuLuks(image: luks.image, keyfile: luks.keyfile, direct: file?.isDirect ?? false),
                                  file: luks.image))
            }
        }
        // fio stays off the LUKS header: every target from the largest payload offset on. A LUKS
        // image named only as a plain file would have its header overwritten by the write rows.
        if offset == 0, let luks = targets.compactMap(\.file).first(where: Self.holdsLUKSHeader) {
            throw ValidationError("--stacks: \(luks) holds a LUKS volume and no crypt stack opens it: the write rows would overwrite its header; list its crypt stack too (its payload offset keeps every stack off the header), or use another file")
        }
        let smallest = targets.compactMap { $0.device?.geometry.size }.min() ?? 0
        guard smallest > offset + (16 << 20) else { throw ValidationError("--stacks: the devices are too small (at least 16 MiB past \(offset) bytes)") }
        let size = (smallest - offset) / (1 << 20) * (1 << 20)
        var bench = StackBenchmark(workloads: picked, milliseconds: Int(seconds * 1000), size: size, offset: offset, pollMicroseconds: pollMicroseconds)
        bench.rounds = turns
        if let data { bench.data = data.fioArguments; bench.prefill = true }
        let aesNI = ((try? String(contentsOfFile: "/proc/cpuinfo", encoding: .utf8)) ?? "").split(separator: "\n")
            .contains { $0.hasPrefix("flags") && $0.split(separator: " ").contains("aes") }
        print("stacks through the NBD export, fio's nbd engine on a unix socket: \(seconds) s per row in \(bench.rounds) turns (targets in order, then reversed; +0.5 s ramp each), "
              + "\(size >> 20) MiB from offset \(offset); qemu-nbd with the same O_DIRECT setting as the file device; write rows synced after; "
              + "CPU \(aesNI ? "with" : "without") AES-NI; " + (data.map { "\($0.rawValue) data (\($0.fioArguments.joined(separator: " "))), each region written once first; " } ?? "")
              + Self.polling(pollMicroseconds))
        let rows = try bench.run(targets: targets + qemu, progress: { row in
            Self.progress("  measured \(row.workload) on \(row.target)\n")
        }, leftOut: { target, reason in
            leftOut.append("\(target.label): left out: \(reason)")
            Self.progress("  \(target.label): left out: \(reason)\n")
        })
        print(StackBenchmark.table(rows))
        leftOut.forEach { print($0) }
        for target in targets {
            var device = target.device
            while let d = device, !(d is CompressFilter) { device = (d as? BlockFilter)?.next }
            if let compress = device as? CompressFilter { print("\(target.label): \(compress.ratioDescription)") }
        }
    }
}
extension StackBenchmark.DataKind: ExpressibleByArgument {}
