import Bench
import Foundation
import XCTest

/// `softdev bench --net` measures what it says: every row, both ways, on both backends, with
/// frames counted and the ratio taken against the C reference of the same row. (Speed itself
/// is printed by `softdev bench --net`, never asserted here.)
final class NetBenchmarkTests: XCTestCase {
    func testEveryRowComesOutOnBothBackends() throws {
        var bench = NetBenchmark(seconds: 0.2, warmup: 0.02)
        bench.pollMicroseconds = 20
        let rows = try bench.run()
        let names = NetBenchmark.Workload.standard.map(\.name)
        XCTAssertEqual(rows.map(\.workload), names.flatMap { [$0, $0] })
        XCTAssertEqual(rows.map(\.target), Array(repeating: ["C reference", "softdev generator"], count: names.count).flatMap { $0 })
        for (row, workload) in zip(rows, names.flatMap { [$0, $0] }.map { n in NetBenchmark.Workload.standard.first { $0.name == n }! }) {
            XCTAssertGreaterThan(row.result.frames, 0, "\(row.workload) on \(row.target)")
            XCTAssertGreaterThan(row.result.framesPerSecond, 0, "\(row.workload) on \(row.target)")
            XCTAssertGreaterThan(row.result.gigabitsPerSecond, 0, "\(row.workload) on \(row.target)")
            XCTAssertEqual(row.result.errors, 0, "\(row.workload) on \(row.target)")
            XCTAssertGreaterThanOrEqual(row.result.seconds, bench.seconds, "\(row.workload) on \(row.target)")
            if workload.direction == .tx {
                XCTAssertEqual(row.result.bytes, row.result.frames * UInt64(workload.frameSize), "\(row.workload) on \(row.target)")
            }
        }
        for i in stride(from: 0, to: rows.count, by: 2) {
            XCTAssertNil(rows[i].ratioToReference)
            let ratio = try XCTUnwrap(rows[i + 1].ratioToReference)
            XCTAssertEqual(ratio * rows[i].result.framesPerSecond, rows[i + 1].result.framesPerSecond,
                           accuracy: 1e-6 * rows[i + 1].result.framesPerSecond)
        }
        let table = NetBenchmark.table(rows)
        XCTAssertTrue(table.contains("frames/s") && table.contains("Gbit/s") && table.contains("vs C"), table)
        if getenv("SOFTDEV_TEST_LOG") != nil { print(table) }
    }
}
