import Bench
import XCTest

/// `softdev bench --usb` in miniature: both frontends, a read row and a control row, rows that
/// add up (three URBs per 64 KiB command: CBW, data, CSW; one per control transfer).
final class USBBenchmarkTests: XCTestCase {
    func testRowsFromBothFrontends() throws {
        var bench = USBBenchmark(workloads: [USBBenchmark.Workload.standard[0], USBBenchmark.Workload.standard[3], USBBenchmark.Workload.standard[4]],
                                 seconds: 0.2, warmup: 0.05)
        bench.stickBytes = 8 << 20
        let rows = try bench.run()
        XCTAssertEqual(rows.map(\.workload), ["read 64 KiB", "read 64 KiB", "write 120 KiB", "write 120 KiB", "control 18 B", "control 18 B"])
        XCTAssertEqual(rows.map(\.frontend), ["Swift usbfront", "C usbfront", "Swift usbfront", "C usbfront", "Swift usbfront", "C usbfront"])
        for (row, urbsPerCommand) in zip(rows, [3, 3, 4, 4, 1, 1] as [UInt64]) {
            XCTAssertGreaterThan(row.result.transfers, 0, "\(row.workload) \(row.frontend)")
            XCTAssertEqual(row.result.urbs, row.result.transfers * urbsPerCommand, "\(row.workload) \(row.frontend)")
        }
        XCTAssertEqual(rows[0].result.bytes, rows[0].result.transfers * 65536)
        let table = USBBenchmark.table(rows)
        XCTAssertTrue(table.hasPrefix("workload"), table)
        XCTAssertEqual(table.split(separator: "\n").count, 7, table)
    }
}
