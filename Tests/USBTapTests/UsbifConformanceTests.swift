import Bench
import CReference
import Core
import Devices
import Foundation
import Glibc
import USBTap
import XCTest

/// SoftDev's usbif backend driven by a usbfront written in C with Xen's own ring macros
/// (Sources/CReference/usbif_conformance.c), with a soft storage stick (port 1, over memory), a
/// soft keyboard (port 2) and the test-only loopback device for isochronous (port 3): each C
/// check is one assertion, by name.
final class UsbifConformanceTests: XCTestCase {
    static let checks = ["ring-sizes", "connect-events-with-speeds", "enumeration-address-virtualised", "control-standard-and-class",
                         "bulk-bot-inquiry", "bulk-bot-write-read-64k", "interrupt-keyboard-report", "unlink-answers-both",
                         "isochronous-descriptors-in-place", "unplug-and-plug-events", "responses-and-grants"]

    func testCUsbfrontAgainstTheSwiftBackend() throws {
        let lab = try USBLab()
        defer { lab.shutdown() }
        let stickBytes = 8 << 20
        lab.register(try XCTUnwrap(try DeviceRegistry.open("storage(device=\"memory(size=8M)\")", of: .usb) as? USBStorageDevice), as: "stick")
        let keyboard = try XCTUnwrap(try DeviceRegistry.open("keyboard", of: .usb) as? USBKeyboard)
        lab.register(keyboard, as: "keyboard")
        lab.register(try XCTUnwrap(try DeviceRegistry.open("keyboard", of: .usb) as? USBKeyboard), as: "keyboard2")
        lab.register(LoopbackDevice(), as: "iso")
        let (guest, paths) = try lab.guestWithController(ports: 8, plugged: [1: "stick", 2: "keyboard", 3: "iso"])
        let store = lab.backend.store
        let hands = CUSBConformanceFrontend.Hands(
            type: { text in (try? keyboard.type(text)) != nil },
            setPort: { port, spec in (try? store.write(paths.backendPath + "/port/\(port)", spec)) != nil })
        let layout = cref_usb_layout(storage_port: 1, keyboard_port: 2, iso_port: 3, ports: 8, storage_bytes: UInt64(stickBytes))
        let front = try CUSBConformanceFrontend(guest: guest, paths: paths, layout: layout, hands: hands)
        let results = front.runSuite()
        XCTAssertEqual(results.map(\.name), Self.checks)
        for r in results {
            XCTAssertTrue(r.passed, "\(r.name): \(r.message)")
            if getenv("SOFTDEV_TEST_LOG") != nil { print("\(r.name): \(r.passed ? "pass" : "FAIL") \(r.message)") }
        }
        XCTAssertEqual(try front.close(), 0, "grants the backend still held after it closed")
        guest.destroy()
    }
}
