import BlockTap
import Core
import Daemon
import Foundation
import TestPeers
import XCTest
import XenStore

struct TimedOut: Error, CustomStringConvertible {
    let what: String
    var description: String { "timed out waiting for \(what)" }
}

/// The daemon on the local hypervisor it embeds: configured disks attached when their guest
/// appears, attach/detach while it runs, guests destroyed, NBD exports.
final class SoftDevDaemonTests: LocalDaemonTestCase {
    func waitUntil(_ what: String, timeout: Double = 10, _ condition: () -> Bool) throws {
        let end = monotonicSeconds() + timeout
        while !condition() {
            guard monotonicSeconds() < end else { throw TimedOut(what: what) }
            usleep(10_000)
        }
    }

    func testConfiguredDiskIsAttachedWhenItsGuestAppearsAndServesIO() throws {
        var config = ServeConfig()
        config.disks = [.init(domain: "web", vdev: try VirtualDisk("xvdb"), device: "memory(size=8M)")]
        let d = try startDaemon(config)
        XCTAssertEqual(d.hypervisor.kind, "local")
        let address = LocalHypervisorAddress(directory: directory)
        let other = try LocalHypervisor.createGuest(address, name: "other", pages: 4096)
        defer { other.destroy() }
        let guest = try LocalHypervisor.createGuest(address, name: "web", pages: 8192)
        defer { guest.destroy() }
        let fe = "/local/domain/\(guest.domainID)/device/vbd/51728"
        var attached = false
        for _ in 0..<500 where !attached { attached = (try? guest.store.read(fe + "/backend", transaction: .none)) != nil; if !attached { usleep(10_000) } }
        XCTAssertTrue(attached, "the daemon did not attach xvdb to 'web'")
        XCTAssertNil(try? other.store.read("/local/domain/\(other.domainID)/device/vbd", transaction: .none), "'other' got a disk")

        let front = try LocalBlockFrontend(hypervisor: guest, frontendPath: fe)
        XCTAssertEqual(front.sectors, 8 * 2048)
        let data = (0..<8192).map { UInt8(truncatingIfNeeded: $0 &* 7) }
        try front.write(sector: 100, data)
        XCTAssertEqual(try front.read(sector: 100, count: data.count), data)

        let listed = AttachedDevice.all(store: d.hypervisor.store, backendDomain: 0)
        XCTAssertEqual(listed.count, 1)
        XCTAssertEqual(listed.first?.domainName, "web")
        XCTAssertEqual(listed.first?.vdev, "xvdb")
        XCTAssertEqual(listed.first?.backendState, .connected)
        XCTAssertEqual(listed.first?.frontendNodes["feature-persistent"], "1")
        XCTAssertEqual(listed.first?.spec, "memory(size=8M)")
        // The vbd's counters, as a vif's and a USB controller's: reported every 2 s while
        // connected, and as the connection left them at disconnect.
        XCTAssertTrue(listed.first?.negotiated.hasPrefix("ring order ") ?? false, listed.first?.negotiated ?? "")
        XCTAssertTrue(listed.first?.negotiated.contains(", requests=") ?? false, listed.first?.negotiated ?? "")
        try front.close()
        let backendPath = "/local/domain/0/backend/\(BlockTapService.backendType)/\(guest.domainID)/51728"
        let statistics = (try? d.hypervisor.store.readString(backendPath + "/statistics")).flatMap { $0 }
        // At least the write and the read above.
        XCTAssertTrue(statistics?.hasPrefix("requests=") ?? false, statistics ?? "no statistics")
        XCTAssertTrue(statistics?.contains(" failed=0 events=") ?? false, statistics ?? "no statistics")
        let served = statistics.flatMap { $0.split(separator: " ").first?.split(separator: "=").last }.flatMap { UInt64($0) }
        XCTAssertGreaterThanOrEqual(served ?? 0, 2, statistics ?? "")
    }

    func testDetachWhileRunningThenReattach() throws {
        let d = try startDaemon(ServeConfig())
        let address = LocalHypervisorAddress(directory: directory)
        let guest = try LocalHypervisor.createGuest(address, name: "g", pages: 8192)
        defer { guest.destroy() }
        let store = d.hypervisor.store
        let id = try XenbusToolstack.resolveDomain(store, "g")
        XCTAssertEqual(id, guest.domainID)
        XCTAssertThrowsError(try XenbusToolstack.resolveDomain(store, "nobody")) { error in
            XCTAssertTrue("\(error)".contains("no domain is named 'nobody' (running: 0"), "\(error)")
        }
        for round in 0..<2 {
            let paths = try BlockTapService.attach(store: store, guest: id, disk: try VirtualDisk("xvdc"), spec: "memory(size=4M)")
            XCTAssertThrowsError(try BlockTapService.attach(store: store, guest: id, disk: try VirtualDisk("xvdc"), spec: "null"),
                                 "a second xvdc must be refused")
            let front = try LocalBlockFrontend(hypervisor: guest, frontendPath: paths.frontendPath)
            try front.write(sector: 8, [UInt8](repeating: UInt8(round + 1), count: 4096))
            XCTAssertEqual(try front.read(sector: 8, count: 4096), [UInt8](repeating: UInt8(round + 1), count: 4096))
            // The guest lets go first (Linux does when the disk is not in use), so detach is clean.
            try front.close()
            XCTAssertEqual(try XenbusToolstack.detach(store, paths, timeoutSeconds: 10), .closed, "round \(round)")
            XCTAssertNil(try? store.read(paths.backendPath, transaction: .none))
            XCTAssertNil(try? store.read(paths.frontendPath, transaction: .none))
            XCTAssertTrue(AttachedDevice.all(store: store, backendDomain: 0).isEmpty)
        }
        XCTAssertEqual(d.host.count, 0)
    }

    func testDetachOfAGuestThatHoldsOnIsForcedAfterTheTimeout() throws {
        let d = try startDaemon(ServeConfig())
        let guest = try LocalHypervisor.createGuest(LocalHypervisorAddress(directory: directory), name: "stubborn", pages: 8192)
        defer { guest.destroy() }
        let store = d.hypervisor.store
        let paths = try BlockTapService.attach(store: store, guest: guest.domainID, disk: try VirtualDisk("xvda"), spec: "null(size=1M)")
        let front = try LocalBlockFrontend(hypervisor: guest, frontendPath: paths.frontendPath)
        // This frontend never answers Closing: detach must give up after its timeout and say so.
        XCTAssertEqual(try XenbusToolstack.detach(store, paths, timeoutSeconds: 0.5), .forced)
        try waitUntil("the daemon to unplug the device") { d.host.count == 0 }
        XCTAssertThrowsError(try XenbusToolstack.detach(store, paths, timeoutSeconds: 0.5)) { error in
            XCTAssertEqual(error as? XenStoreError, .noEntry(paths.backendPath))
        }
        _ = front
    }

    func testDestroyedGuestLosesItsDisksAndTheOtherGuestKeepsServing() throws {
        let d = try startDaemon(ServeConfig())
        let address = LocalHypervisorAddress(directory: directory)
        let a = try LocalHypervisor.createGuest(address, name: "a", pages: 8192)
        let b = try LocalHypervisor.createGuest(address, name: "b", pages: 8192)
        defer { b.destroy() }
        let store = d.hypervisor.store
        let pa = try BlockTapService.attach(store: store, guest: a.domainID, disk: try VirtualDisk("xvda"), spec: "memory(size=4M)")
        let pb = try BlockTapService.attach(store: store, guest: b.domainID, disk: try VirtualDisk("xvda"), spec: "memory(size=4M)")
        let fa = try LocalBlockFrontend(hypervisor: a, frontendPath: pa.frontendPath)
        let fb = try LocalBlockFrontend(hypervisor: b, frontendPath: pb.frontendPath)
        try fa.write(sector: 0, [UInt8](repeating: 1, count: 4096))
        a.destroy()
        try waitUntil("a's disk to be reaped") { d.host.count == 1 }
        XCTAssertNil(try? store.read(pa.backendPath, transaction: .none))
        let data = [UInt8](repeating: 9, count: 65536)
        try fb.write(sector: 64, data)
        XCTAssertEqual(try fb.read(sector: 64, count: data.count), data)
        XCTAssertEqual(AttachedDevice.all(store: store, backendDomain: 0).map(\.domain), [b.domainID])
        // Its memory is let go once its disk is unplugged, whichever came first.
        let table = try XCTUnwrap(d.hypervisor.grants as? LocalGrantTable)
        try waitUntil("a's memory to be released") { !table.domainsHeld.contains(a.domainID) }
        XCTAssertTrue(table.domainsHeld.contains(b.domainID))
        try fb.close()
    }

    func testASecondDaemonOnTheSameHypervisorIsRefused() throws {
        _ = try startDaemon(ServeConfig())
        let choice = HypervisorChoice(kind: .local, localAddress: LocalHypervisorAddress(directory: directory))
        XCTAssertThrowsError(try SoftDevDaemon(config: ServeConfig(), choice: choice, log: { _ in })) { error in
            XCTAssertTrue("\(error)".contains("another softdev serve (pid \(getpid()))"), "\(error)")
        }
    }

    func testADetachedConfiguredDiskStaysDetachedWhileItsGuestRuns() throws {
        var config = ServeConfig()
        config.disks = [.init(domain: "web", vdev: try VirtualDisk("xvdb"), device: "memory(size=8M)")]
        let d = try startDaemon(config)
        let address = LocalHypervisorAddress(directory: directory)
        let web = try LocalHypervisor.createGuest(address, name: "web", pages: 8192)
        defer { web.destroy() }
        let paths = XenbusDevicePaths(frontendDomain: web.domainID, frontendType: "vbd", backendType: BlockTapService.backendType,
                                      deviceID: 51728)
        try waitUntil("xvdb to be attached") { (try? d.hypervisor.store.read(paths.backendPath, transaction: .none)) != nil }
        XCTAssertEqual(try XenbusToolstack.detach(d.hypervisor.store, paths, timeoutSeconds: 5), .closed)
        // Another guest starting (@introduceDomain) must not bring it back.
        let other = try LocalHypervisor.createGuest(address, name: "other", pages: 4096)
        defer { other.destroy() }
        // Give the watch event time to arrive, then let the dispatcher finish what it queued.
        usleep(300_000)
        _ = d.host.inspect { _ in true }
        XCTAssertNil(try? d.hypervisor.store.read(paths.backendPath, transaction: .none), "a detached configured disk came back")
    }

    func testExportsAreServedOverNBD() throws {
        var config = ServeConfig()
        config.exports = [.init(name: "scratch", device: "memory(size=16M)", description: "for the test")]
        config.nbdListen = ["tcp:127.0.0.1:0"]
        let d = try startDaemon(config)
        let port = try XCTUnwrap(d.nbdListeners.first?.boundPort)
        let nbdinfo = try Peers.program("nbdinfo", package: "libnbd-bin")
        let p = Process()
        p.executableURL = URL(fileURLWithPath: nbdinfo)
        p.arguments = ["--size", "nbd://127.0.0.1:\(port)/scratch"]
        let out = Pipe()
        p.standardOutput = out
        try p.run()
        p.waitUntilExit()
        XCTAssertEqual(p.terminationStatus, 0)
        XCTAssertEqual(String(decoding: out.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self).trimmingCharacters(in: .whitespacesAndNewlines),
                       "\(16 << 20)")
    }

    func testExportWithAnUnknownDeviceFailsToStartAndSaysWhich() {
        var config = ServeConfig()
        config.exports = [.init(name: "bad", device: "file(path=/nonexistent/disk.img)")]
        config.nbdListen = ["tcp:127.0.0.1:0"]
        XCTAssertThrowsError(try startDaemon(config)) { error in
            XCTAssertTrue("\(error)".contains("export 'bad'"), "\(error)")
            XCTAssertTrue("\(error)".contains("/nonexistent/disk.img"), "\(error)")
        }
        daemon = nil
    }
}
