import Bench
import XCTest

/// `softdev bench --usb` in miniature: both frontends, Bulk-Only rows and a control row that add
/// up (CBW, data URBs, CSW: 3 per 64 KiB command, 4 per 120 KiB, 32 per 120 KiB in 4 KiB URBs
/// with at most 16 in flight; one per control transfer).
final class USBBenchmarkTests: XCTestCase {
    func testRowsFromBothFrontends() throws {
        let w = USBBenchmark.Workload.standard
        var bench = USBBenchmark(workloads: [w[0], w[3], w[4], w[6]],
                                 seconds: 0.2, warmup: 0.05)
        bench.stickBytes = 8 << 20
        let rows = try bench.run()
        XCTAssertEqual(rows.map(\.workload), ["read 64 KiB", "read 64 KiB", "write 120 KiB", "write 120 KiB", "read 120K/4K", "read 120K/4K",
                                               "control 18 B", "control 18 B"])
        XCTAssertEqual(rows.map(\.frontend), Array([[String]](repeating: ["Swift usbfront", "C usbfront"], count: 4).joined()))
        for (row, urbsPerCommand) in zip(rows, [3, 3, 4, 4, 32, 32, 1, 1] as [UInt64]) {
            XCTAssertGreaterThan(row.result.transfers, 0, "\(row.workload) \(row.frontend)")
            XCTAssertEqual(row.result.urbs, row.result.transfers * urbsPerCommand, "\(row.workload) \(row.frontend)")
        }
        XCTAssertEqual(rows[0].result.bytes, rows[0].result.transfers * 65536)
        let table = USBBenchmark.table(rows)
        XCTAssertTrue(table.hasPrefix("workload"), table)
        XCTAssertEqual(table.split(separator: "\n").count, 9, table)
    }
}
