import Core
import Devices
import Foundation
import USBTap
import XCTest
import XenStore

/// A host device is judged before it is claimed: the backend opens a port's stack (which
/// describes a host device and lets a policy judge it), claims it only once the whole stack
/// is admitted, and plugs it after. A refused stack is closed without a claim, so dom0's
/// drivers keep the device; the reason is in `port-error/N`, a served port in `port-device/N`,
/// both before the guest's frontend connects.
final class USBAdmissionTests: XCTestCase {
    /// Stands in for `host(...)`: a passed-through device that records what is done to it.
    final class FakeHostDevice: USBPassthroughDevice, @unchecked Sendable {
        let name = "host"
        let speed = USBSpeed.high
        let descriptors = USBDescriptors(
            device: [18, 1, 0, 2, 0, 0, 0, 64, 0x34, 0x12, 0x78, 0x56, 0, 1, 1, 2, 3, 1],
            configurations: [[9, 2, 32, 0, 1, 1, 0, 0x80, 50, 9, 4, 0, 0, 2, 8, 6, 0x50, 0, 7, 5, 0x81, 2, 0, 2, 0, 7, 5, 0x02, 2, 0, 2, 0]],
            strings: [1: "SoftDev", 2: "Stick", 3: "0001"])
        let busPort = "1-2"
        var attributes: USBDeviceAttributes { USBDeviceAttributes(descriptors: descriptors, viaPort: busPort) }
        let busy: Bool
        private let lock = NSLock()
        private var log: [String] = []
        var events: [String] { lock.withLock { log } }
        init(busy: Bool = false) { self.busy = busy }

        func submit(_ urb: URB) { urb.complete(.stall) }
        func claim() throws {
            lock.withLock { log.append("claim") }
            if busy { throw DeviceSpecError("host(id=1234:5678): 1234:5678 at 1-2: cannot claim it: it is busy") }
        }
        func attach(to port: (any USBPortEvents)?) { lock.withLock { log.append(port == nil ? "unplug" : "plug") } }
        func close() { lock.withLock { log.append("close") } }
    }

    func testARefusedHostDeviceIsNeverClaimed() throws {
        let lab = try USBLab()
        defer { lab.shutdown() }
        let policy = try USBPolicy(parsing: "allow id 1234:5678 via-port \"1-2\" serial \"0001\"\nblock id 1234:5678\n", file: "usb.rules")
        let blockAll = try USBPolicy(parsing: "# nothing is allowed\n", file: "none.rules")
        let byDaemon = FakeHostDevice(), byFilter = FakeHostDevice(), allowed = FakeHostDevice(), busy = FakeHostDevice(busy: true)
        // As the daemon opens a port: the stack, then the policy on the host device below it.
        lab.register(as: "daemon-blocked") { let stack = USBInterfacesFilter(next: byDaemon, allow: [USBInterfaceClassPattern(8, nil, nil)]); try blockAll.admit(stack); return stack }
        // `policy(rules=...) | host(...)`: the filter judges while the stack opens.
        lab.register(as: "filter-blocked") { try USBPolicyFilter(next: byFilter, policy: blockAll, viaPort: "1-2") }
        lab.register(as: "allowed") { try policy.admit(allowed); return allowed }
        lab.register(as: "busy") { try policy.admit(busy); return busy }

        // A paused guest: no frontend yet, and the daemon has answered for every port already.
        let (guest, paths) = try lab.guestWithController(plugged: [1: "daemon-blocked", 2: "filter-blocked", 3: "allowed", 4: "busy"])
        defer { guest.destroy() }
        let store = lab.backend.store
        func node(_ key: String) -> String? { (try? store.readString(paths.backendPath + "/" + key)).flatMap { $0 } }
        XCTAssertTrue(eventually { node("port-error/4") != nil && node("port-device/3") != nil })
        XCTAssertEqual(node("port-error/1"), "the host device 1234:5678 \"Stick\" at 1-2 is blocked by the implicit default "
                       + "(no rule of none.rules matches it); if a guest may have it, add an allow rule for it to none.rules")
        XCTAssertTrue(node("port-error/2")?.hasPrefix("policy(rules=none.rules): the device 1234:5678 \"Stick\" is blocked by the implicit default") ?? false,
                      node("port-error/2") ?? "no port-error/2")
        XCTAssertEqual(node("port-device/3"), "1234:5678 high speed")
        XCTAssertNil(node("port-error/3"))
        XCTAssertEqual(node("port-error/4"), "host(id=1234:5678): 1234:5678 at 1-2: cannot claim it: it is busy")
        XCTAssertEqual(byDaemon.events, ["close"], "blocked by the daemon's policy: closed, never claimed")
        XCTAssertEqual(byFilter.events, [], "blocked by the filter while the stack opened: never claimed (the registry closes it)")
        XCTAssertEqual(allowed.events, ["claim"], "allowed: claimed before any frontend")
        XCTAssertEqual(busy.events, ["claim", "close"])

        // The frontend connects: the allowed device alone is plugged.
        let front = try LocalUSBFrontend(hypervisor: guest, frontendPath: paths.frontendPath)
        try front.waitForPort(3)
        XCTAssertTrue(eventually { allowed.events == ["claim", "plug"] }, "\(allowed.events)")
        XCTAssertEqual(Set(front.portSpeeds.keys), [3])
        XCTAssertEqual(byDaemon.events, ["close"])
        XCTAssertEqual(busy.events, ["claim", "close"])

        // Emptied, the port forgets its outcome; the device is closed once.
        try lab.unplug(3, of: paths, front: front)
        XCTAssertTrue(eventually { node("port-device/3") == nil && allowed.events.last == "close" }, "\(allowed.events)")
        try front.close()
    }

    /// A frontend that disconnects takes its ports' devices with it: `port-device/N` goes with
    /// them, and comes back when the next frontend connects and the stack is opened again.
    func testAPortServesNothingBetweenTwoFrontends() throws {
        let lab = try USBLab()
        defer { lab.shutdown() }
        let device = FakeHostDevice()
        lab.register(as: "allowed") { device }
        let (guest, paths) = try lab.guestWithController(plugged: [3: "allowed"])
        defer { guest.destroy() }
        let store = lab.backend.store
        func node(_ key: String) -> String? { (try? store.readString(paths.backendPath + "/" + key)).flatMap { $0 } }
        let front = try LocalUSBFrontend(hypervisor: guest, frontendPath: paths.frontendPath)
        try front.waitForPort(3)
        XCTAssertEqual(node("port-device/3"), "1234:5678 high speed")
        try front.close()
        XCTAssertTrue(eventually { node("port-device/3") == nil && device.events.last == "close" }, "\(device.events) \(node("port-device/3") ?? "-")")
        // The guest's driver starts over (as xen-hcd does when it is loaded again).
        try guest.store.write(paths.frontendPath + "/state", "\(XenbusDeviceState.initialising.rawValue)")
        XCTAssertTrue(eventually { node("state") == "\(XenbusDeviceState.initWait.rawValue)" }, "the backend waits for the new frontend")
        let again = try LocalUSBFrontend(hypervisor: guest, frontendPath: paths.frontendPath)
        try again.waitForPort(3)
        XCTAssertTrue(eventually { node("port-device/3") == "1234:5678 high speed" && device.events.last == "plug" }, "\(device.events)")
        XCTAssertEqual(device.events.filter { $0 == "claim" }.count, 2, "opened and claimed again: \(device.events)")
        try again.close()
    }
}
