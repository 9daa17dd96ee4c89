import CXen
import Core
import Daemon
import Foundation
import USBTap
import XCTest
import XenStore

/// The daemon's USB class on the local hypervisor it embeds: a controller created with its
/// first device, a second plugged into it, `softdev type` through the control socket, a port
/// emptied by detach, `softdev list`'s view.
final class DaemonUSBTests: LocalDaemonTestCase {
    func testKeyboardAndStickOnOneControllerTypedIntoThroughTheControlSocket() throws {
        let d = try startDaemon(ServeConfig())
        let guest = try LocalHypervisor.createGuest(LocalHypervisorAddress(directory: directory), name: "u", pages: 4096)
        defer { guest.destroy() }
        let store = d.hypervisor.store
        let usb = DeviceClass.usb
        let paths = try usb.attach(store: store, guest: guest.domainID, backendDomain: 0, try usb.parseName("1"), spec: "keyboard",
                                   settings: ["ports": "4"])
        try usb.attach(store: store, guest: guest.domainID, backendDomain: 0, try usb.parseName("port2"), spec: "storage(device=\"memory(size=4M)\")")
        XCTAssertThrowsError(try usb.attach(store: store, guest: guest.domainID, backendDomain: 0, try usb.parseName("2"), spec: "keyboard"))
        XCTAssertThrowsError(try usb.attach(store: store, guest: guest.domainID, backendDomain: 0, try usb.parseName("5"), spec: "keyboard"))

        let front = try LocalUSBFrontend(hypervisor: guest, frontendPath: paths.frontendPath)
        XCTAssertEqual(front.portCount, 4)
        try front.waitForPort(1)
        try front.waitForPort(2)
        XCTAssertEqual(front.portSpeeds[1], .full)
        XCTAssertEqual(front.portSpeeds[2], .high)
        _ = try front.enumerate(port: 1, address: 1)
        let (device, _) = try front.enumerate(port: 2, address: 2)
        XCTAssertEqual(device[4], 0)   // class in the interface: mass storage

        // softdev type: "a" is a press of usage 4 then a release.
        let press = try front.put(port: 1, device: 1, endpoint: 1, type: .interrupt, isIn: true, length: 8, interval: 10)
        try ControlSocket.request(path: ServeLock.controlPath(for: choice), ["type", "\(guest.domainID)", "1", Data("a".utf8).base64EncodedString()])
        XCTAssertEqual(try front.wait(press, isIn: true).data, [0, 0, 4, 0, 0, 0, 0, 0])
        let release = try front.put(port: 1, device: 1, endpoint: 1, type: .interrupt, isIn: true, length: 8, interval: 10)
        XCTAssertEqual(try front.wait(release, isIn: true).data, [0, 0, 0, 0, 0, 0, 0, 0])
        XCTAssertThrowsError(try ControlSocket.request(path: ServeLock.controlPath(for: choice),
                                                       ["type", "\(guest.domainID)", "2", Data("a".utf8).base64EncodedString()])) {
            XCTAssertTrue("\($0)".contains("not a keyboard"), "\($0)")
        }

        // softdev list: the controller, its counters (reported every 2 s) and its ports.
        var listed: [AttachedDevice] = []
        let end = monotonicSeconds() + 5
        repeat {
            listed = AttachedDevice.all(store: store, backendDomain: 0).filter { $0.deviceClass == "usb" }
            if listed.count == 1, listed[0].negotiated.contains(", urbs="), !listed[0].negotiated.contains("urbs=0 ") { break }
            usleep(50_000)
        } while monotonicSeconds() < end
        XCTAssertEqual(listed.count, 1)
        XCTAssertTrue(listed[0].negotiated.hasPrefix("USB 2.0, 4 ports, urbs="), listed[0].negotiated)
        XCTAssertFalse(listed[0].negotiated.contains("urbs=0 "), "the URBs above are counted: \(listed[0].negotiated)")
        XCTAssertTrue(listed[0].negotiated.contains(" spurious-events="), listed[0].negotiated)
        XCTAssertTrue(listed[0].negotiated.contains("; port 1: keyboard; port 2: storage"), listed[0].negotiated)

        // Detach empties the port: the guest sees the stick go.
        XCTAssertEqual(try usb.detach(store: store, paths: paths, try usb.parseName("2"), timeoutSeconds: 5), .closed)
        try front.waitForPort(2, plugged: false)
        XCTAssertThrowsError(try usb.detach(store: store, paths: paths, try usb.parseName("2"), timeoutSeconds: 5))
        try front.close()
    }

    /// A guest that breaks its URB ring (random bytes, then an impossible producer index) loses
    /// its controller alone: the daemon keeps serving another guest's stick, and a new guest.
    func testAHostileGuestLosesItsControllerAlone() throws {
        let d = try startDaemon(ServeConfig())
        let address = LocalHypervisorAddress(directory: directory)
        let usb = DeviceClass.usb
        let store = d.hypervisor.store
        func stick(_ name: String) throws -> (LocalHypervisor, LocalUSBFrontend, XenbusDevicePaths) {
            let guest = try LocalHypervisor.createGuest(address, name: name, pages: 4096)
            let paths = try usb.attach(store: store, guest: guest.domainID, backendDomain: 0, try usb.parseName("1"),
                                       spec: "storage(device=\"memory(size=1M)\")", settings: ["ports": "2"])
            let front = try LocalUSBFrontend(hypervisor: guest, frontendPath: paths.frontendPath)
            try front.waitForPort(1)
            _ = try front.enumerate(port: 1, address: 3)
            return (guest, front, paths)
        }
        /// TEST UNIT READY: the CBW, then a CSW with status 0.
        func testUnitReady(_ front: LocalUSBFrontend) throws {
            var cbw = [UInt8](repeating: 0, count: 31)
            cbw[0...3] = [0x55, 0x53, 0x42, 0x43]; cbw[4] = 7; cbw[14] = 6
            XCTAssertEqual(try front.transfer(port: 1, device: 3, endpoint: 2, type: .bulk, isIn: false, data: cbw).status, .ok)
            let csw = try front.transfer(port: 1, device: 3, endpoint: 1, type: .bulk, isIn: true, length: 13)
            XCTAssertEqual(csw.data.count, 13)
            XCTAssertEqual(csw.data.prefix(4), [0x55, 0x53, 0x42, 0x53])
            XCTAssertEqual(csw.data.last, 0)
        }
        let (good, goodFront, _) = try stick("good")
        defer { good.destroy() }
        let (bad, badFront, badPaths) = try stick("bad")
        defer { bad.destroy() }
        var rng = SystemRandomNumberGenerator()
        for _ in 0..<8 {
            var r = usbif_urb_request()
            withUnsafeMutableBytes(of: &r) { b in for i in 0..<b.count { b[i] = UInt8.random(in: 0...255, using: &rng) } }
            _ = try? badFront.putHostile(r)
        }
        badFront.urbRing.shared.assumingMemoryBound(to: UInt32.self).pointee = badFront.urbRing.size &+ 40
        badFront.channel.notify()
        _ = try badFront.connection.waitForBackend([.closing, .closed], timeoutSeconds: 5)
        XCTAssertTrue(try store.readString(badPaths.backendPath + "/error")?.contains("impossible") ?? false)
        try testUnitReady(goodFront)
        let (late, lateFront, _) = try stick("late")
        defer { late.destroy() }
        try testUnitReady(lateFront)
        try testUnitReady(goodFront)
        try goodFront.close()
        try lateFront.close()
    }

    /// `softdev attach` with a daemon serving waits for its answer, for every class alike: a
    /// stack the daemon cannot open is refused with its reason and taken away again (a new
    /// controller removed, a port of one that was there emptied), so the same attach can be made
    /// once the cause is fixed; a stack it serves is reported served, even for a paused guest
    /// whose frontend has not appeared.
    func testAttachWaitsForTheDaemonAndReportsARefusal() throws {
        let d = try startDaemon(ServeConfig())
        let guest = try LocalHypervisor.createGuest(LocalHypervisorAddress(directory: directory), name: "w", pages: 4096)
        defer { guest.destroy() }
        let store = d.hypervisor.store
        let missing = directory + "/no-such-dir/stick.img"
        func refusal(_ c: DeviceClass, _ name: String, _ spec: String, settings: [String: String] = [:]) -> String {
            do {
                _ = try c.attachServed(store: store, guest: guest.domainID, backendDomain: 0, try c.parseName(name), spec: spec,
                                       settings: settings, timeoutSeconds: 10)
                return "served"
            } catch { return "\(error)" }
        }
        func exists(_ path: String) -> Bool { (try? store.read(path, transaction: .none)) != nil }

        // USB, the controller created by this attach: refused, and gone again.
        let usb = DeviceClass.usb
        let controller = usb.paths(guest: guest.domainID, backendDomain: 0, try usb.parseName("1"))
        let first = refusal(usb, "1", "storage(device=\"file(path=\(missing))\")", settings: ["ports": "4"])
        XCTAssertTrue(first.hasPrefix("softdev serve refused USB device 1 of domain \(guest.domainID): "), first)
        XCTAssertTrue(first.contains(missing) && first.hasSuffix("Nothing is attached: fix the cause and attach again"), first)
        XCTAssertFalse(exists(controller.backendPath))
        XCTAssertFalse(exists(controller.frontendPath))

        // Served: the port's device named, before any frontend.
        let (paths, served) = try usb.attachServed(store: store, guest: guest.domainID, backendDomain: 0, try usb.parseName("1"),
                                                   spec: "keyboard", settings: ["ports": "4"], timeoutSeconds: 10)
        XCTAssertEqual(paths, controller)
        XCTAssertEqual(served, "1209:0002 full speed")
        // A port of the existing controller: refused and emptied; the keyboard stays.
        let second = refusal(usb, "2", "storage(device=\"file(path=\(missing))\")")
        XCTAssertTrue(second.contains("softdev serve refused USB device 2") && second.contains(missing), second)
        XCTAssertEqual(try store.readString(paths.backendPath + "/port/2"), "")
        XCTAssertEqual(try store.readString(paths.backendPath + "/port/1"), "keyboard")
        XCTAssertEqual(refusal(usb, "2", "storage(device=\"memory(size=1M)\")"), "served", "the same port again, fixed")

        // A disk: the same reading of the same kind of answer.
        let block = DeviceClass.block
        let disk = refusal(block, "xvdb", "file(path=\(missing))")
        XCTAssertTrue(disk.hasPrefix("softdev serve refused disk xvdb of domain \(guest.domainID): ") && disk.contains(missing), disk)
        XCTAssertFalse(exists(block.paths(guest: guest.domainID, backendDomain: 0, try block.parseName("xvdb")).backendPath))
        XCTAssertEqual(refusal(block, "xvdb", "memory(size=1M)"), "served")
    }
}
