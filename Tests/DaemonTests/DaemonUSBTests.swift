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

        let listed = AttachedDevice.all(store: store, backendDomain: 0).filter { $0.deviceClass == "usb" }
        XCTAssertEqual(listed.count, 1)
        XCTAssertTrue(listed[0].negotiated.contains("USB 2.0, 4 ports; port 1: keyboard; port 2: storage"), listed[0].negotiated)

        // Detach empties the port: the guest sees the stick go.
        XCTAssertEqual(try usb.detach(store: store, paths: paths, try usb.parseName("2"), timeoutSeconds: 5), .closed)
        try front.waitForPort(2, plugged: false)
        XCTAssertThrowsError(try usb.detach(store: store, paths: paths, try usb.parseName("2"), timeoutSeconds: 5))
        try front.close()
    }
}
