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
        let workload = NBDBenchmark.Workload.standard[1]
        _ = try Peers.program("fio", package: "fio")
        // Without nbdkit (allowed outside CI) our export is measured alone.
        let haveNbdkit = try Peers.available("nbdkit", package: "nbdkit")
        let bench = NBDBenchmark(workloads: [workload], runtime: 1, size: size, compareWithNbdkit: haveNbdkit)
        let rows = try bench.run(pairs: [.init(name: "memory", device: SparseTestDevice(size: size), nbdkitPlugin: ["memory", "size=\(size)"])])
        XCTAssertEqual(rows.map(\.server), haveNbdkit ? ["nbdkit memory", "softdev memory"] : ["softdev memory"])
        for row in rows { XCTAssertGreaterThan(row.iops, 0, row.server) }
        if haveNbdkit {
            XCTAssertEqual(try XCTUnwrap(rows[1].ratioToPeer), rows[1].iops / rows[0].iops, accuracy: 1e-9)
            XCTAssertTrue(NBDBenchmark.table(rows).contains("vs nbdkit"))
        }
    }
}
