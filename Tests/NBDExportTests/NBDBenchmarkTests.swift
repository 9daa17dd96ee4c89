import Core
import Foundation
import NBDExport
import XCTest

/// The export against nbdkit with fio's nbd engine. Slow (a minute), so it runs only when
/// SOFTDEV_NBD_BENCH is set, best with `swift test -c release`; the table goes to stdout.
final class NBDBenchmarkTests: XCTestCase {
    func testBenchmarkAgainstNbdkit() throws {
        guard let seconds = ProcessInfo.processInfo.environment["SOFTDEV_NBD_BENCH"].flatMap(Int.init) else {
            // Still prove the fio plumbing works: one short job against our export alone.
            let bench = NBDBenchmark(workloads: [NBDBenchmark.Workload.standard[1]], runtime: 1, size: 64 << 20, compareWithNbdkit: false)
            let rows = try bench.run(device: SparseTestDevice(size: 64 << 20))
            XCTAssertEqual(rows.count, 1)
            XCTAssertGreaterThan(rows[0].iops, 0)
            return
        }
        let size: UInt64 = 1 << 30
        // SOFTDEV_NBD_BENCH_ONLY=0,2 picks workloads by their index in `standard`.
        let only = ProcessInfo.processInfo.environment["SOFTDEV_NBD_BENCH_ONLY"]?.split(separator: ",").compactMap { Int($0) }
        let workloads = only.map { $0.map { NBDBenchmark.Workload.standard[$0] } } ?? NBDBenchmark.Workload.standard
        let rows = try NBDBenchmark(workloads: workloads, runtime: seconds, size: size).run(device: SparseTestDevice(size: size))
        print(NBDBenchmark.table(rows))
        XCTAssertEqual(rows.count, 3 * workloads.count)
    }
}
