import Core
import Devices
import Foundation
import USBTap
import XCTest

/// `keyboard` through a real usbif round trip.
final class USBKeyboardTests: XCTestCase {
    var lab: USBLab!
    override func setUpWithError() throws { lab = try USBLab() }
    override func tearDown() { lab.shutdown() }

    func plugged() throws -> (USBKeyboard, LocalUSBFrontend, [UInt8]) {
        let keyboard = try XCTUnwrap(try DeviceRegistry.open("keyboard", of: .usb) as? USBKeyboard)
        lab.register(keyboard, as: "kbd")
        let (guest, paths) = try lab.guestWithController(plugged: [2: "kbd"])
        let front = try LocalUSBFrontend(hypervisor: guest, frontendPath: paths.frontendPath)
        try front.waitForPort(2)
        let (_, config) = try front.enumerate(port: 2, address: 3)
        return (keyboard, front, config)
    }

    func interruptIn(_ front: LocalUSBFrontend) throws -> UInt16 {
        try front.put(port: 2, device: 3, endpoint: 1, type: .interrupt, isIn: true, length: 8, interval: 10)
    }

    func testEnumeratesAndAnswersHIDRequests() throws {
        let (keyboard, front, config) = try plugged()
        XCTAssertEqual(front.portSpeeds[2], .full)
        let descriptors = USBDescriptors.walk(config).map { ($0.type, Array($0.bytes)) }
        XCTAssertEqual(descriptors.map(\.0), [2, 4, 0x21, 5])
        XCTAssertEqual(Array(descriptors[1].1[5...7]), [3, 1, 1])
        XCTAssertEqual(descriptors[2].1, [9, 0x21, 0x11, 0x01, 0, 1, 0x22, 63, 0])
        XCTAssertEqual(descriptors[3].1, [7, 5, 0x81, 3, 8, 0, 10])
        // The report descriptor, asked of the interface as usbhid does, answered by the tap.
        let report = try front.control(port: 2, device: 3, USBSetup(requestType: 0x81, request: 6, value: 0x2200, index: 0, length: 63 + 64))
        XCTAssertEqual(report.status, .ok)
        XCTAssertEqual(report.data, USBKeyboard.reportDescriptor)
        XCTAssertEqual(report.data.count, 63)
        // SET_IDLE, SET_PROTOCOL(boot), SET_REPORT (Caps Lock), GET_REPORT, an unknown request.
        func control(_ type: UInt8, _ request: UInt8, _ value: UInt16, length: UInt16 = 0, data: [UInt8] = []) throws -> LocalUSBFrontend.Result {
            try front.control(port: 2, device: 3, USBSetup(requestType: type, request: request, value: value, index: 0, length: length), data: data)
        }
        XCTAssertEqual(try control(0x21, 0x0A, 0).status, .ok)
        XCTAssertEqual(try control(0x21, 0x0B, 0).status, .ok)
        XCTAssertEqual(try control(0xA1, 0x03, 0, length: 1).data, [0])
        XCTAssertEqual(try control(0x21, 0x09, 0x0200, length: 1, data: [0x02]).status, .ok)
        XCTAssertEqual(keyboard.leds, 0x02)
        XCTAssertEqual(try control(0xA1, 0x01, 0x0100, length: 8).data, [0, 0, 0, 0, 0, 0, 0, 0])
        XCTAssertEqual(try control(0x21, 0x55, 0).status, .stall)
        try front.close()
    }

    func testTypedTextArrivesAsPressAndReleaseReports() throws {
        let (keyboard, front, _) = try plugged()
        // A URB waits before anything is typed.
        let first = try interruptIn(front)
        XCTAssertThrowsError(try front.wait(first, isIn: true, timeoutSeconds: 0.2))
        try keyboard.type("Hi!\n")
        let release: [UInt8] = [0, 0, 0, 0, 0, 0, 0, 0]
        let expected: [[UInt8]] = [
            [0x02, 0, 0x0B, 0, 0, 0, 0, 0], release,   // shift + h
            [0, 0, 0x0C, 0, 0, 0, 0, 0], release,      // i
            [0x02, 0, 0x1E, 0, 0, 0, 0, 0], release,   // shift + 1
            [0, 0, 0x28, 0, 0, 0, 0, 0], release,      // Enter
        ]
        var got = [try front.wait(first, isIn: true).data]
        for _ in 1..<expected.count { got.append(try front.wait(try interruptIn(front), isIn: true).data) }
        XCTAssertEqual(got, expected)
        XCTAssertEqual(keyboard.queuedReports, 0)
        // An unknown character names itself and queues nothing.
        XCTAssertThrowsError(try keyboard.type("aé")) { error in
            XCTAssertTrue("\(error)".contains("é"), "\(error)")
        }
        XCTAssertEqual(keyboard.queuedReports, 0)
        try keyboard.type("a-Z ")
        XCTAssertEqual(keyboard.queuedReports, 8)
        XCTAssertEqual(try front.wait(try interruptIn(front), isIn: true).data, [0, 0, 0x04, 0, 0, 0, 0, 0])
        // A port reset (a request to address 0) drops the queued keys.
        _ = try front.enumerate(port: 2, address: 4)
        XCTAssertEqual(keyboard.queuedReports, 0)
        try front.close()
    }

    /// A host polls a keyboard's interrupt endpoint once per bInterval (10 ms): typed text must
    /// not reach the guest faster, whatever the guest's URBs do. (Answered at once, a typed
    /// string arrived within microseconds, more input events than an evdev reader's buffer holds:
    /// the lab's reader lost all but "hel".)
    func testReportsComeNoFasterThanThePollingInterval() throws {
        let (keyboard, front, _) = try plugged()
        try keyboard.type("abcd")
        var times: [Double] = []
        var reports: [[UInt8]] = []
        for _ in 0..<8 {
            reports.append(try front.wait(try interruptIn(front), isIn: true).data)
            times.append(monotonicSeconds())
        }
        XCTAssertEqual(reports.enumerated().filter { $0.offset % 2 == 0 }.map { $0.element[2] }, [0x04, 0x05, 0x06, 0x07])
        let gaps = zip(times.dropFirst(), times).map { $0 - $1 }
        XCTAssertGreaterThanOrEqual(times.last! - times.first!, 0.069, "8 reports in \(times.last! - times.first!) s; gaps \(gaps)")
        XCTAssertEqual(keyboard.queuedReports, 0)
        try front.close()
    }

    func testUnlinkOfAPendingInterruptURB() throws {
        let (keyboard, front, _) = try plugged()
        let pending = try interruptIn(front)
        let unlink = try front.unlink(pending, port: 2)
        XCTAssertEqual(try front.wait(unlink).status, .ok)
        XCTAssertEqual(try front.wait(pending, isIn: true).status, .cancelled)
        // The next URB gets the next key.
        try keyboard.type("x")
        XCTAssertEqual(try front.wait(try interruptIn(front), isIn: true).data, [0, 0, 0x1B, 0, 0, 0, 0, 0])
        try front.close()
    }
}
