import BlockTap
import Core
import Foundation
import Synchronization
import TestPeers
import XCTest

/// `softdev serve` killed (SIGKILL: an OOM kill, a crash, an upgrade gone wrong) and started
/// again while its guests' disks are Connected: the new daemon picks each ring up where the
/// killed one left it. Every request consumed and not answered is served, no response is lost
/// or sent twice, and the guest's I/O goes on with its data intact, on a busy disk and an idle
/// one. The local hypervisor runs in this process, so that it outlives the daemon as Xen does.
final class DaemonRestartTests: XCTestCase {
    var directory = ""
    var server: LocalHypervisorServer?
    var daemons: [Process] = []

    override func setUp() {
        directory = FileManager.default.temporaryDirectory.appendingPathComponent("softdev-restart-\(getpid())-\(UInt32.random(in: 0...UInt32.max))").path
        try? FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
    }

    override func tearDown() {
        for p in daemons where p.isRunning { kill(p.processIdentifier, SIGKILL); p.waitUntilExit() }
        server?.stop()
        try? FileManager.default.removeItem(atPath: directory)
    }

    private func serve(log: String) throws -> Process {
        let p = try SoftDevBinary.launch(["serve", "--hypervisor", "local", "--local-dir", directory + "/hv"], log: directory + "/" + log)
        daemons.append(p)
        try waitFor("the daemon to serve (\(log))") { self.log(log).contains("serving on") }
        return p
    }

    private func log(_ name: String) -> String { (try? String(contentsOfFile: directory + "/" + name, encoding: .utf8)) ?? "" }

    private func waitFor(_ what: String, timeout: Double = 30, _ condition: () throws -> Bool) throws {
        let end = monotonicSeconds() + timeout
        while try !condition() {
            guard monotonicSeconds() < end else { throw TimedOut(what: what) }
            usleep(10_000)
        }
    }

    /// What the writer thread did.
    final class Writer: @unchecked Sendable {
        let rounds = Atomic<Int>(0)
        let stop = Atomic<Bool>(false)
        let lock = NSLock()
        var failure: String?
    }

    func testADaemonKilledMidIOIsStartedAgainAndItsGuestCarriesOn() throws {
        let address = LocalHypervisorAddress(directory: directory + "/hv")
        server = try LocalHypervisorServer(address: address)
        try server!.start()
        let first = try serve(log: "serve1.log")

        let guest = try LocalHypervisor.createGuest(address, name: "g", pages: 4096)
        let store = guest.store
        let toolstack = try LocalHypervisor.connectBackend(address)
        let attach = { (vdev: String, spec: String) throws in
            try BlockTapService.attach(store: toolstack.store, guest: guest.domainID, disk: try VirtualDisk(vdev), spec: spec).frontendPath
        }
        var options = LocalBlockFrontend.Options()
        options.ringPageOrder = 4
        // Each write spends 300 ms in the busy disk's device: the kill lands while one is there.
        let busyPath = try attach("xvda", "delay(delay-write=300ms) | file(path=\(directory)/busy.img, size=16M)")
        let busy = try LocalBlockFrontend(hypervisor: guest, frontendPath: busyPath, options: options)
        let idle = try LocalBlockFrontend(hypervisor: guest, frontendPath: try attach("xvdb", "file(path=\(directory)/idle.img, size=4M)"))
        let marker = [UInt8]((0..<4096).map { UInt8(truncatingIfNeeded: $0 &* 7 &+ 1) })
        try idle.write(sector: 8, marker)

        // The guest writes one of four 256 KiB patterns at a different place each round and
        // reads it back, without end.
        let writer = Writer()
        let patterns = (0..<4).map { p in [UInt8]((0..<(256 << 10)).map { UInt8(truncatingIfNeeded: $0 &* 31 &+ p) }) }
        let thread = try PosixThread("the guest's writer") {
            var n = 0
            while !writer.stop.load(ordering: .relaxed) {
                n += 1
                let pattern = patterns[n % 4]
                let sector = UInt64(n % 32) * 512
                do {
                    try busy.write(sector: sector, pattern)
                    let back = try busy.read(sector: sector, count: pattern.count)
                    guard back == pattern else {
                        let at = (0..<min(back.count, pattern.count)).first { back[$0] != pattern[$0] } ?? -1
                        writer.lock.withLock { writer.failure = "round \(n): read back other data than written (from byte \(at): \(back[max(0, at)...].prefix(8)) not \(pattern[max(0, at)...].prefix(8)))" }
                        return
                    }
                } catch {
                    writer.lock.withLock { writer.failure = "round \(n): \(error)" }
                    return
                }
                writer.rounds.store(n, ordering: .relaxed)
            }
        }
        defer { writer.stop.store(true, ordering: .relaxed); thread.join() }

        try waitFor("the guest's I/O to run") {
            if let failure = writer.lock.withLock({ writer.failure }) { throw TimedOut(what: "nothing: \(failure)") }
            return writer.rounds.load(ordering: .relaxed) >= 3
        }
        // A round just ended: the next write is in the device for the next 300 ms.
        let seen = writer.rounds.load(ordering: .relaxed)
        try waitFor("a round to end") { writer.rounds.load(ordering: .relaxed) > seen }
        usleep(100_000)
        kill(first.processIdentifier, SIGKILL)
        first.waitUntilExit()
        let killedAt = writer.rounds.load(ordering: .relaxed)
        _ = try serve(log: "serve2.log")
        try waitFor("the guest's I/O to go on after the restart") {
            if let failure = writer.lock.withLock({ writer.failure }) { throw TimedOut(what: "nothing: \(failure)") }
            return writer.rounds.load(ordering: .relaxed) >= killedAt + 5
        }
        writer.stop.store(true, ordering: .relaxed)
        thread.join()
        XCTAssertNil(writer.lock.withLock { writer.failure })
        XCTAssertEqual(log("serve2.log").components(separatedBy: "resumed after a restart").count - 1, 2,
                       "both disks resumed:\n" + log("serve2.log"))
        XCTAssertTrue(log("serve2.log").split(separator: "\n").contains { $0.contains("1 request the killed daemon left unanswered served again") && $0.contains("51712") },
                      "the write the killed daemon held was served again:\n" + log("serve2.log"))
        XCTAssertEqual(try idle.read(sector: 8, count: 4096), marker, "the idle disk reads what it held")
        try idle.write(sector: 16, marker)
        XCTAssertEqual(try idle.read(sector: 16, count: 4096), marker, "and takes new writes")
        XCTAssertEqual(XenbusDeviceState.read(store, busy.frontendPath + "/state"), .connected)
    }
}
