import Bench
import Core
import Foundation
import NBDExport
import TestPeers
import XCTest

/// The fio plumbing of `softdev bench`'s NBD part: rows for our export and nbdkit's, the ratio
/// taken against the peer of the same workload. (Speed is printed by `softdev bench`, never
/// asserted here.)
final class NBDBenchmarkTests: XCTestCase {
    func testOurExportAndTheNbdkitPeerAreMeasuredSideBySide() throws {
        let size: UInt64 = 64 << 20
        // A read and a write row: every server serves both.
        let workloads = NBDBenchmark.Workload.standard.filter { ["4k-randread-qd32", "4k-randwrite-qd32"].contains($0.name) }
        _ = try Peers.program("fio", package: "fio")
        // Without nbdkit (allowed outside CI) our export is measured alone.
        let haveNbdkit = try Peers.available("nbdkit", package: "nbdkit")
        let bench = NBDBenchmark(workloads: workloads, runtime: 1, size: size, compareWithNbdkit: haveNbdkit)
        let rows = try bench.run(pairs: [.init(name: "memory", device: SparseTestDevice(size: size), nbdkitPlugin: ["memory", "size=\(size)"])])
        let servers = haveNbdkit ? ["nbdkit memory", "softdev memory"] : ["softdev memory"]
        XCTAssertEqual(rows.map(\.server), servers + servers)
        XCTAssertEqual(rows.map(\.workload), workloads.flatMap { w in servers.map { _ in w.name } })
        for row in rows { XCTAssertGreaterThan(row.iops, 0, "\(row.workload) on \(row.server)") }
        if haveNbdkit {
            XCTAssertEqual(try XCTUnwrap(rows[1].ratioToPeer), rows[1].iops / rows[0].iops, accuracy: 1e-9)
            XCTAssertEqual(try XCTUnwrap(rows[3].ratioToPeer), rows[3].iops / rows[2].iops, accuracy: 1e-9)
            XCTAssertTrue(NBDBenchmark.table(rows).contains("vs nbdkit"))
        }
    }
}
