import Foundation
import TestPeers
import XCTest

/// The `softdev` binary as users run it, in separate processes: `serve --hypervisor local`
/// with a config disk, `guest` (its own process), `attach`, `list`, `detach`, and signals.
final class SoftDevCLITests: XCTestCase {
    var directory = ""
    var running: [Process] = []

    override func setUp() {
        directory = FileManager.default.temporaryDirectory.appendingPathComponent("softdev-cli-\(getpid())-\(UInt32.random(in: 0...UInt32.max))").path
        try? FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
    }

    override func tearDown() {
        for p in running where p.isRunning { p.terminate(); p.waitUntilExit() }
        try? FileManager.default.removeItem(atPath: directory)
    }

    private func binary() throws -> String { try SoftDevBinary.path() }

    /// Starts softdev with `arguments`; its stdout and stderr go to files in the directory.
    private func start(_ arguments: [String], log: String) throws -> Process {
        let p = try SoftDevBinary.launch(arguments, log: directory + "/" + log)
        running.append(p)
        return p
    }

    /// Runs softdev to the end; returns its exit status and output.
    @discardableResult
    private func softdev(_ arguments: [String]) throws -> (status: Int32, output: String) {
        try Peers.run(try binary(), arguments)
    }

    private func log(_ name: String) -> String { (try? String(contentsOfFile: directory + "/" + name, encoding: .utf8)) ?? "" }

    private func waitFor(_ what: String, timeout: Double = 20, _ condition: () throws -> Bool) throws {
        let end = Date().addingTimeInterval(timeout)
        while try !condition() {
            guard Date() < end else { throw TimedOut(what: what) }
            usleep(20_000)
        }
    }

    /// `softdev snapshot` on a timetravel disk a daemon serves goes through its control socket;
    /// `timetravel-points` lists it while the disk is served; `rollback` is refused until the
    /// daemon lets go, then forgets what came after the snapshot.
    func testTimetravelSnapshotThroughTheDaemonAndRollback() throws {
        let ttLog = directory + "/tt", config = directory + "/softdev.toml"
        try """
            hypervisor = "local"
            [nbd]
            listen = ["unix:\(directory)/nbd.sock"]
            [[export]]
            name = "tt"
            device = "timetravel(log=\(ttLog)) | memory(size=4M)"
            """.write(toFile: config, atomically: true, encoding: .utf8)
        let serve = try start(["serve", "--local-dir", directory + "/hv", "--config", config], log: "serve.log")
        try waitFor("serve to start") { self.log("serve.log").contains("serving on local as domain 0") }
        let snapshot = try softdev(["snapshot", "--hypervisor", "local", "--local-dir", directory + "/hv", ttLog, "before upgrade"])
        XCTAssertEqual(snapshot.status, 0, snapshot.output + log("serve.log"))
        XCTAssertTrue(snapshot.output.contains("snapshot before upgrade of"), snapshot.output)
        let again = try softdev(["snapshot", "--hypervisor", "local", "--local-dir", directory + "/hv", ttLog, "before upgrade"])
        XCTAssertNotEqual(again.status, 0)
        XCTAssertTrue(again.output.contains("already has a snapshot named before upgrade"), again.output)
        let points = try softdev(["timetravel-points", ttLog])
        XCTAssertEqual(points.status, 0, points.output)
        XCTAssertTrue(points.output.contains("snapshot before upgrade: record 1"), points.output)
        let busy = try softdev(["rollback", ttLog, "--snapshot", "before upgrade"])
        XCTAssertNotEqual(busy.status, 0)
        XCTAssertTrue(busy.output.contains("in use by another process"), busy.output)
        serve.terminate(); serve.waitUntilExit()
        let rollback = try softdev(["rollback", ttLog, "--seq", "0"])
        XCTAssertEqual(rollback.status, 0, rollback.output)
        XCTAssertTrue(try softdev(["timetravel-points", ttLog]).output.contains("records: 1 to 0 (0)"))
    }

    func testServeGuestAttachListDetachAcrossProcesses() throws {
        let local = ["--hypervisor", "local", "--local-dir", directory + "/hv"]
        let config = directory + "/softdev.toml"
        try """
            hypervisor = "local"
            [[disk]]
            domain = "g1"
            vdev = "xvdb"
            device = "stats | memory(size=16M)"
            """.write(toFile: config, atomically: true, encoding: .utf8)
        let serve = try start(["serve", "--local-dir", directory + "/hv", "--config", config], log: "serve.log")
        try waitFor("serve to start") { self.log("serve.log").contains("serving on local as domain 0") }

        let guest = try start(["guest", "g1", "--local-dir", directory + "/hv", "--disks", "2", "--check", "--hold", "-1"], log: "guest.log")
        try waitFor("g1 to get its configured disk") { self.log("guest.log").contains("guest g1: domain") }
        let attach = try softdev(["attach"] + local + ["g1", "block", "xvdc", "memory(size=8M)"])
        XCTAssertEqual(attach.status, 0, attach.output)
        XCTAssertTrue(attach.output.contains("attached xvdc to domain"), attach.output)
        try waitFor("both disks checked") { self.log("guest.log").components(separatedBy: "check ok").count == 3 }

        let again = try softdev(["attach"] + local + ["g1", "block", "xvdc", "null(size=1M)"])
        XCTAssertNotEqual(again.status, 0)
        XCTAssertTrue(again.output.contains("already has a disk xvdc"), again.output)
        let typo = try softdev(["attach"] + local + ["g1", "block", "xvdd", "memroy(size=8M)"])
        XCTAssertNotEqual(typo.status, 0)
        XCTAssertTrue(typo.output.contains("unknown device 'memroy'"), typo.output)
        // The daemon cannot open it: attach says why, fails, and leaves nothing behind.
        let missing = directory + "/no-such-dir/disk.img"
        let refused = try softdev(["attach"] + local + ["g1", "block", "xvdd", "file(path=\(missing))"])
        XCTAssertNotEqual(refused.status, 0, refused.output)
        XCTAssertTrue(refused.output.contains("softdev serve refused disk xvdd of domain") && refused.output.contains(missing), refused.output)
        XCTAssertFalse(refused.output.contains("attached xvdd"), refused.output)
        let usbRefused = try softdev(["attach"] + local + ["g1", "usb", "1", "storage(device=\"file(path=\(missing))\")"])
        XCTAssertNotEqual(usbRefused.status, 0, usbRefused.output)
        XCTAssertTrue(usbRefused.output.contains("softdev serve refused USB device 1 of domain"), usbRefused.output)
        let usb = try softdev(["attach"] + local + ["g1", "usb", "1", "keyboard"])
        XCTAssertEqual(usb.status, 0, usb.output)
        XCTAssertTrue(usb.output.contains("attached 1 to domain") && usb.output.contains("(1209:0002 full speed)"), usb.output)
        let nobody = try softdev(["attach"] + local + ["g9", "block", "xvdd", "null(size=1M)"])
        XCTAssertTrue(nobody.output.contains("no domain is named 'g9'"), nobody.output)

        let list = try softdev(["list"] + local)
        XCTAssertEqual(list.status, 0, list.output)
        let lines = list.output.split(separator: "\n").filter { $0.contains("(g1)") && $0.contains(" block ") }
        XCTAssertEqual(lines.count, 2, list.output)
        XCTAssertTrue(lines.allSatisfy { $0.contains("Connected  Connected") && $0.contains("ring order 4, 1 queue, persistent on") }, list.output)
        XCTAssertTrue(list.output.contains("stats | memory(size=16M)"), list.output)

        let detach = try softdev(["detach"] + local + ["g1", "xvdc", "--timeout", "10"])
        XCTAssertEqual(detach.status, 0, detach.output)
        XCTAssertEqual(detach.output, "detached xvdc from domain 1\n")
        try waitFor("the guest to let go of xvdc") { self.log("guest.log").contains("xvdc: the backend closed it") }
        let after = try softdev(["list"] + local)
        XCTAssertFalse(after.output.contains("xvdc"), after.output)
        XCTAssertTrue(after.output.contains("xvdb"), after.output)

        // The guest ends: its configured disk is reaped with it.
        guest.terminate()
        guest.waitUntilExit()
        XCTAssertEqual(guest.terminationStatus, 0, log("guest.log"))
        try waitFor("g1's disks to be reaped") { try self.softdev(["list"] + local).output.contains("no soft devices attached") }

        serve.terminate()
        serve.waitUntilExit()
        XCTAssertEqual(serve.terminationStatus, 0, log("serve.log"))
        XCTAssertTrue(log("serve.log").contains("stopped"), log("serve.log"))
    }

    func testCommandsExplainWhatIsWrong() throws {
        let noHypervisor = try softdev(["list", "--hypervisor", "local", "--local-dir", directory + "/none"])
        XCTAssertNotEqual(noHypervisor.status, 0)
        XCTAssertTrue(noHypervisor.output.contains("no local hypervisor at \(directory)/none"), noHypervisor.output)
        let badConfig = directory + "/bad.toml"
        try "hypervisor = \"local\"\n[[disk]]\ndomain = \"x\"\nvdev = \"xvda\"\n".write(toFile: badConfig, atomically: true, encoding: .utf8)
        let serve = try softdev(["serve", "--local-dir", directory + "/hv", "--config", badConfig])
        XCTAssertNotEqual(serve.status, 0)
        XCTAssertTrue(serve.output.contains("[[disk]] #1: device is missing"), serve.output)
        let badType = try softdev(["attach", "--hypervisor", "local", "--local-dir", directory, "g", "scsi", "xvda", "null(size=1M)"])
        XCTAssertTrue(badType.output.contains("unknown device type 'scsi': use block or net or usb"), badType.output)
        let badVif = try softdev(["attach", "--hypervisor", "local", "--local-dir", directory, "g", "net", "xvda", "null"])
        XCTAssertTrue(badVif.output.contains("'xvda' is not a vif number"), badVif.output)
        let wrongClass = try softdev(["attach", "--hypervisor", "local", "--local-dir", directory, "g", "net", "0", "file(path=/tmp/x)"])
        XCTAssertTrue(wrongClass.output.contains("file is a block device, not a net device"), wrongClass.output)
        let export = try softdev(["serve", "--local-dir", directory + "/hv", "--export", "=null(size=1M)"])
        XCTAssertTrue(export.output.contains("expected NAME=SPEC"), export.output)
    }

    func testServeRejectsABadLogLevelAndMetricsAddress() throws {
        let level = try softdev(["serve", "--local-dir", directory + "/hv", "--log-level", "loud"])
        XCTAssertNotEqual(level.status, 0)
        XCTAssertTrue(level.output.contains("--log-level = \"loud\": use one of trace, debug, info, notice, warning, error, critical"), level.output)
        let metrics = try softdev(["serve", "--local-dir", directory + "/hv", "--metrics", "9464"])
        XCTAssertNotEqual(metrics.status, 0)
        XCTAssertTrue(metrics.output.contains("--metrics = \"9464\": expected HOST:PORT"), metrics.output)
    }
}
