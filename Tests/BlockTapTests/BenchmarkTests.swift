import Bench
import BlockTap
import Devices
import Foundation
import XCTest

/// `softdev bench` measures what it says: every target answers every request of every workload
/// without error, and the ratio is computed against the C reference of the same workload.
/// (Speed itself is printed by `softdev bench`, never asserted here.)
final class BenchmarkTests: XCTestCase {
    func testEveryTargetServesEveryWorkload() throws {
        let workloads = [
            BlkifLoadGenerator.Workload(name: "4k randread qd32", blockSize: 4096, queueDepth: 32, random: true),
            BlkifLoadGenerator.Workload(name: "1m read qd2", blockSize: 1 << 20, queueDepth: 2, random: false),
            BlkifLoadGenerator.Workload(name: "4k randwrite qd8", blockSize: 4096, queueDepth: 8, random: true, write: true),
            BlkifLoadGenerator.Workload(name: "1m write qd2", blockSize: 1 << 20, queueDepth: 2, random: false, write: true),
        ]
        var bench = BlockBenchmark(targets: [.reference, .softdev(label: "softdev memory", spec: "memory(size=64M)")],
                                   workloads: workloads, seconds: 0.2, warmup: 0.05)
        bench.deviceSize = 64 << 20
        let rows = try bench.run()
        XCTAssertEqual(rows.map(\.workload), ["4k randread qd32", "4k randread qd32", "1m read qd2", "1m read qd2",
                                              "4k randwrite qd8", "4k randwrite qd8", "1m write qd2", "1m write qd2"])
        XCTAssertEqual(rows.map(\.target), Array(repeating: ["C reference null", "softdev memory"], count: 4).flatMap { $0 })
        for row in rows {
            XCTAssertGreaterThan(row.result.requests, 0, "\(row.workload) on \(row.target)")
            XCTAssertEqual(row.result.bytes, row.result.requests * UInt64(row.workload.hasPrefix("1m") ? 1 << 20 : 4096))
            // Measured in two halves (A B, B A) that add up to the whole row.
            XCTAssertGreaterThanOrEqual(row.result.seconds, bench.seconds, "\(row.workload) on \(row.target)")
        }
        // Each softdev row is compared with the reference of its own workload.
        XCTAssertNil(rows[0].ratioToReference)
        XCTAssertEqual(try XCTUnwrap(rows[3].ratioToReference) * rows[2].result.iops, rows[3].result.iops, accuracy: 1e-6 * rows[3].result.iops)
        XCTAssertEqual(try XCTUnwrap(rows[7].ratioToReference) * rows[6].result.iops, rows[7].result.iops, accuracy: 1e-6 * rows[7].result.iops)
        let table = BlockBenchmark.table(rows)
        XCTAssertTrue(table.contains("softdev memory") && table.contains("C reference null") && table.contains("vs C"), table)
    }

    /// The file device's rows beside fio's libaio on the same file, with the O_DIRECT setting the
    /// device got: reads and writes, each compared with fio's row of its own workload.
    func testTheFileDeviceIsMeasuredBesideFioOnTheSameFile() throws {
        _ = try NBDBenchmark.tool("fio", package: "fio")
        let path = "/var/tmp/softdev-bench-test-\(getpid()).img"
        try BenchmarkFile.fill(path, size: 16 << 20)
        defer { unlink(path) }
        let spec = "file(path=\(path), direct=auto)"
        let probe = try DeviceRegistry.open(spec)
        let direct = try XCTUnwrap(probe as? FileDevice).isDirect
        probe.close()
        var bench = BlockBenchmark(targets: [.fioLibaio(path: path, direct: direct, peerOf: "softdev file"),
                                             .softdev(label: "softdev file", spec: spec), .reference],
                                   workloads: [BenchmarkWorkload.standard[0], BenchmarkWorkload.standard[3]], seconds: 0.3, warmup: 0.05)
        bench.deviceSize = 16 << 20
        bench.file = path
        let rows = try bench.run()
        let fio = "fio libaio (\(direct ? "O_DIRECT" : "buffered"))"
        XCTAssertEqual(rows.map(\.workload), ["4k-randread-qd1", "4k-randread-qd1", "4k-randread-qd1",
                                              "4k-randwrite-qd1", "4k-randwrite-qd1", "4k-randwrite-qd1"])
        XCTAssertEqual(rows.map(\.target), [fio, "softdev file", "C reference null", fio, "softdev file", "C reference null"])
        for row in rows {
            XCTAssertGreaterThan(row.result.requests, 0, "\(row.workload) on \(row.target)")
            XCTAssertGreaterThan(row.result.iops, 0, "\(row.workload) on \(row.target)")
            // The C reference serves a null device: the file device is compared with fio alone.
            XCTAssertNil(row.ratioToReference, "\(row.workload) on \(row.target)")
        }
        for i in [1, 4] {
            XCTAssertEqual(try XCTUnwrap(rows[i].ratioToFio) * rows[i - 1].result.iops, rows[i].result.iops, accuracy: 1e-6 * rows[i].result.iops)
        }
        let table = BlockBenchmark.table(rows)
        XCTAssertTrue(table.contains("vs fio") && table.contains(fio), table)
    }

    func testWorkloadsAreNamedAlikeForEveryTransportAndTheOldNamesStillWork() throws {
        XCTAssertEqual(BenchmarkWorkload.standard.map(\.name), ["4k-randread-qd1", "4k-randread-qd32", "4k-randread-qd256", "4k-randwrite-qd1",
                                                                "4k-randwrite-qd32", "1m-read", "1m-write"])
        XCTAssertEqual(BlkifLoadGenerator.Workload.standard, NBDBenchmark.Workload.standard)
        XCTAssertEqual(try BenchmarkWorkload.select("1m-write, 4k-qd1,1m").map(\.name), ["4k-randread-qd1", "1m-read", "1m-write"])
        XCTAssertEqual(try BenchmarkWorkload.select("all"), BenchmarkWorkload.standard)
        XCTAssertEqual(BenchmarkWorkload.standard.map(\.fioPattern), ["randread", "randread", "randread", "randwrite", "randwrite", "read", "write"])
        XCTAssertThrowsError(try BenchmarkWorkload.select("4k-randwrite-qd256")) { error in
            XCTAssertTrue("\(error)".contains("4k-randwrite-qd256"), "\(error)")
        }
    }

    func testWithoutTheReferenceThereIsNoRatio() throws {
        var bench = BlockBenchmark(targets: [.softdev(label: "softdev null", spec: "null(size=16M)")],
                                   workloads: [.init(name: "4k randread qd4", blockSize: 4096, queueDepth: 4, random: true)],
                                   seconds: 0.1, warmup: 0.01)
        bench.deviceSize = 16 << 20
        let rows = try bench.run()
        XCTAssertNil(rows[0].ratioToReference)
        XCTAssertTrue(BlockBenchmark.table(rows).hasSuffix(" -"), BlockBenchmark.table(rows))
    }

    /// A write row sends WRITEs: a device that refuses writes answers every one with an error,
    /// and the bench says so instead of printing a rate.
    func testAWriteWorkloadWritesSoAReadOnlyDeviceFailsIt() throws {
        let write = try XCTUnwrap(BenchmarkWorkload.standard.first { $0.name == "4k-randwrite-qd1" })
        var bench = BlockBenchmark(targets: [.softdev(label: "read-only", spec: "readonly | null(size=16M)")],
                                   workloads: [write], seconds: 0.1, warmup: 0.01)
        bench.deviceSize = 16 << 20
        XCTAssertThrowsError(try bench.run()) { error in
            XCTAssertTrue("\(error)".contains("read-only answered") && "\(error)".contains("4k-randwrite-qd1 with errors"), "\(error)")
        }
    }

    func testAWorkloadTooBigForTheFrontendIsRefused() throws {
        var bench = BlockBenchmark(targets: [.softdev(label: "x", spec: "null(size=1M)")],
                                   workloads: [.init(name: "odd", blockSize: 6000, queueDepth: 1, random: true)], seconds: 0.1)
        bench.deviceSize = 1 << 20
        XCTAssertThrowsError(try bench.run()) { error in
            XCTAssertTrue("\(error)".contains("block size 6000"), "\(error)")
        }
    }

    /// What a run leaves outside the process goes at its clean-up, and at the trap's
    /// (`cleanUpAll`) for every run not cleaned up yet: a server still running, a directory.
    func testLeftoversOfEveryRunGoAtTheCleanUp() throws {
        let directory = NSTemporaryDirectory() + "softdev-leftovers-\(getpid())"
        try FileManager.default.createDirectory(atPath: directory + "/sub", withIntermediateDirectories: true)
        let server = Process()
        server.executableURL = URL(fileURLWithPath: "/bin/sleep")
        server.arguments = ["600"]
        try server.run()
        let leftovers = BenchLeftovers()
        leftovers.watch(server)
        leftovers.remove(atEnd: directory)
        BenchLeftovers.cleanUpAll()
        XCTAssertFalse(server.isRunning, "the server was ended")
        XCTAssertFalse(FileManager.default.fileExists(atPath: directory), "the directory was removed")
        leftovers.cleanUp()   // idempotent
    }
}
