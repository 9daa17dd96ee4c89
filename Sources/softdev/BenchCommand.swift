import ArgumentParser
import Bench
import Devices
import Foundation
import Glibc

/// `softdev bench`.
struct Bench: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Measure IOPS and MB/s through the whole blkif path, beside the C reference backend.",
        discussion: """
            Runs 4 KiB random reads at queue depth 1, 32 and 256 and 1 MiB sequential reads from a local blkfront \
            through the shared ring (2^4 pages, persistent grants) to SoftDev's backend over the null and file \
            devices, and, in the same run, to a minimal C backend written with Xen's ring macros over a null device \
            (the protocol's cost on this machine). "vs C" is IOPS over the C backend's on the same workload.
            Numbers depend on the machine and on what else runs on it: compare rows of one run.
            """)

    @Option(help: "Seconds to measure each workload on each backend.")
    var seconds: Double = 2

    @Option(help: "The file device's backing file (default: a scratch file in /var/tmp, filled with data, removed afterwards).")
    var file: String?

    @Option(help: "Size of the scratch file (K, M, G).")
    var fileSize = "256M"

    @Option(help: "The file device's O_DIRECT setting: auto, on or off.")
    var direct = "auto"

    @Option(help: "Backends to measure, comma-separated: null, file, reference.")
    var backends = "reference,null,file"

    func run() throws {
        let wanted = Set(backends.split(separator: ",").map { $0.trimmingCharacters(in: .whitespaces) })
        let unknown = wanted.subtracting(["null", "file", "reference"])
        guard unknown.isEmpty else { throw ValidationError("--backends: unknown \(unknown.sorted().joined(separator: ", ")) (use null, file, reference)") }
        guard seconds > 0 else { throw ValidationError("--seconds must be positive") }
        var scratch: String?
        defer { if let scratch { unlink(scratch) } }
        var size: UInt64 = 1 << 30
        var targets: [BlockBenchmark.Target] = []
        if wanted.contains("reference") { targets.append(.reference) }
        if wanted.contains("null") { targets.append(.softdev(label: "softdev null", spec: "null(size=\(size))")) }
        if wanted.contains("file") {
            let path: String
            if let file { path = file } else {
                guard let bytes = DeviceParameters.parseSize(fileSize), bytes >= 1 << 20 else { throw ValidationError("--file-size \(fileSize): use e.g. 256M (at least 1M)") }
                path = "/var/tmp/softdev-bench-\(getpid()).img"
                try fillScratchFile(path, bytes: bytes)
                scratch = path
            }
            var st = stat()
            guard stat(path, &st) == 0 else { throw ValidationError("--file \(path): \(String(cString: strerror(errno)))") }
            if st.st_size > 0 { size = min(size, UInt64(st.st_size)) }
            targets.append(.softdev(label: "softdev file", spec: "file(path=\(path), direct=\(direct))"))
        }
        var bench = BlockBenchmark(targets: targets, seconds: seconds)
        // Every backend serves the same number of sectors, so random offsets spread alike.
        bench.deviceSize = size
        if let i = bench.targets.firstIndex(where: { $0.description == "softdev null" }) {
            bench.targets[i] = .softdev(label: "softdev null", spec: "null(size=\(size))")
        }
        print("blkif, local hypervisor: ring order \(bench.ringPageOrder), 1 queue, persistent grants, \(seconds) s per row, device \(size >> 20) MiB")
        let rows = try bench.run { row in
            FileHandle.standardError.write(Data("  measured \(row.workload) on \(row.target)\n".utf8))
        }
        print(BlockBenchmark.table(rows))
    }

    /// Writes `bytes` of non-zero data so reads hit allocated blocks, not holes.
    private func fillScratchFile(_ path: String, bytes: UInt64) throws {
        let fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o600)
        guard fd >= 0 else { throw ValidationError("cannot create \(path): \(String(cString: strerror(errno)))") }
        defer { close(fd) }
        let chunk = 1 << 20
        let buffer = UnsafeMutableRawPointer.allocate(byteCount: chunk, alignment: 4096)
        defer { buffer.deallocate() }
        for i in 0..<chunk { buffer.storeBytes(of: UInt8(truncatingIfNeeded: i &* 31 &+ 1), toByteOffset: i, as: UInt8.self) }
        var written: UInt64 = 0
        while written < bytes {
            let n = write(fd, buffer, Int(min(UInt64(chunk), bytes - written)))
            guard n > 0 else { throw ValidationError("cannot write \(path): \(String(cString: strerror(errno)))") }
            written += UInt64(n)
        }
        fsync(fd)
    }
}
