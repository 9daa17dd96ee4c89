import Bench
import BlockTap
import XCTest

/// `softdev bench` measures what it says: every target answers every request of every workload
/// without error, and the ratio is computed against the C reference of the same workload.
/// (Speed itself is printed by `softdev bench`, never asserted here.)
final class BenchmarkTests: XCTestCase {
    func testEveryTargetServesEveryWorkload() throws {
        let workloads = [
            BlkifLoadGenerator.Workload(name: "4k randread qd32", blockSize: 4096, queueDepth: 32, random: true),
            BlkifLoadGenerator.Workload(name: "1m read qd2", blockSize: 1 << 20, queueDepth: 2, random: false),
        ]
        var bench = BlockBenchmark(targets: [.reference, .softdev(label: "softdev memory", spec: "memory(size=64M)")],
                                   workloads: workloads, seconds: 0.2, warmup: 0.05)
        bench.deviceSize = 64 << 20
        let rows = try bench.run()
        XCTAssertEqual(rows.map(\.workload), ["4k randread qd32", "4k randread qd32", "1m read qd2", "1m read qd2"])
        XCTAssertEqual(rows.map(\.target), ["C reference null", "softdev memory", "C reference null", "softdev memory"])
        for row in rows {
            XCTAssertGreaterThan(row.result.requests, 0, "\(row.workload) on \(row.target)")
            XCTAssertEqual(row.result.bytes, row.result.requests * UInt64(row.workload.hasPrefix("1m") ? 1 << 20 : 4096))
        }
        // Each softdev row is compared with the reference of its own workload.
        XCTAssertNil(rows[0].ratioToReference)
        XCTAssertEqual(try XCTUnwrap(rows[3].ratioToReference) * rows[2].result.iops, rows[3].result.iops, accuracy: 1e-6 * rows[3].result.iops)
        let table = BlockBenchmark.table(rows)
        XCTAssertTrue(table.contains("softdev memory") && table.contains("C reference null") && table.contains("vs C"), table)
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

    func testAWorkloadTooBigForTheFrontendIsRefused() throws {
        var bench = BlockBenchmark(targets: [.softdev(label: "x", spec: "null(size=1M)")],
                                   workloads: [.init(name: "odd", blockSize: 6000, queueDepth: 1, random: true)], seconds: 0.1)
        bench.deviceSize = 1 << 20
        XCTAssertThrowsError(try bench.run()) { error in
            XCTAssertTrue("\(error)".contains("block size 6000"), "\(error)")
        }
    }
}
