import Bench
import Devices
import Foundation
import Glibc
import TestPeers
import XCTest

/// The TAP path of `softdev bench --net`, briefly: every path and every row measured (a few
/// megabytes each, one turn), every number positive. Speed is not checked here.
final class TapBenchmarkTests: XCTestCase {
    func testEveryRowMeasuresSomething() throws {
        if getuid() != 0 { print("skipping: the TAP bench needs root"); throw XCTSkip("the TAP bench needs root") }
        _ = try Peers.program("iperf3", package: "iperf3")
        _ = try Peers.program("ip", package: "iproute2")
        if let reason = TapBenchmark.unavailableReason() { print("skipping: \(reason)"); throw XCTSkip(reason) }
        var bench = TapBenchmark(amount: .bytes(4 << 20))
        bench.rounds = 1
        let rows = try bench.run()
        print(TapBenchmark.table(rows))
        XCTAssertEqual(rows.count, TapBenchmark.Workload.allCases.count * TapBenchmark.Path.allCases.count)
        for row in rows {
            XCTAssertGreaterThan(row.result.bytes, 0, "\(row.workload) on \(row.path)")
            XCTAssertGreaterThan(row.result.packets, 0, "\(row.workload) on \(row.path)")
            XCTAssertGreaterThan(row.rate, 0, "\(row.workload) on \(row.path)")
            if row.path != .reference { XCTAssertNotNil(row.ratioToReference, "\(row.workload) on \(row.path)") }
        }
        let tag = String(getpid())
        let namespaces = try Peers.run("/usr/bin/env", ["ip", "netns", "list"]).output
        XCTAssertFalse(namespaces.contains("sdtb\(tag)-"), "the bench removed its namespaces: \(namespaces)")
        let links = try Peers.run("/usr/bin/env", ["ip", "link", "show"]).output
        XCTAssertFalse(links.contains("tb\(tag)"), "and its interfaces: \(links)")
    }

    /// `--workloads` names the TAP rows by key, beside the ring rows; unknown keys are refused.
    func testTheTAPRowsAreNamedInWorkloads() throws {
        XCTAssertEqual(try TapBenchmark.Workload.select("tap-udp-64, tap-tcp-ab"), [.tcpForward, .udp64])
        XCTAssertEqual(try TapBenchmark.Workload.select("all"), TapBenchmark.Workload.allCases)
        XCTAssertThrowsError(try TapBenchmark.Workload.select("tap-tcp")) { error in
            XCTAssertTrue("\(error)".contains("tap-tcp-ab, tap-tcp-ba, tap-udp-64"), "\(error)")
        }
    }
}
