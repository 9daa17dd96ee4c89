import CXen
import Core
import Foundation
import USBTap
import XCTest
import XenStore

/// A Swift usbfront and the usbif backend on the local hypervisor: connection events,
/// enumeration with the standard requests answered by the tap, every transfer type, unlink,
/// hot-plug.
final class UsbifEndToEndTests: XCTestCase {
    var lab: USBLab!
    override func setUpWithError() throws { lab = try USBLab() }
    override func tearDown() { lab.shutdown() }

    func connected(_ device: LoopbackDevice, port: Int = 1) throws -> (LocalUSBFrontend, XenbusDevicePaths) {
        lab.register(device, as: "loop-\(port)")
        let (guest, paths) = try lab.guestWithController(plugged: [port: "loop-\(port)"])
        let front = try LocalUSBFrontend(hypervisor: guest, frontendPath: paths.frontendPath)
        try front.waitForPort(port)
        return (front, paths)
    }

    func testEnumerationIsAnsweredByTheTapAndTheAddressIsVirtual() throws {
        let device = LoopbackDevice()
        let (front, _) = try connected(device)
        XCTAssertEqual(front.portSpeeds[1], .high)
        XCTAssertEqual(front.connectionEvents.map { "\($0.port):\($0.speed)" }, ["1:3"])
        let (d, config) = try front.enumerate(port: 1, address: 7)
        XCTAssertEqual(d, device.descriptors.device)
        XCTAssertEqual(config, device.descriptors.configurations[0])
        XCTAssertEqual(device.configurations, [1])
        // Neither SET_ADDRESS nor the descriptors reached the device: the tap answered them.
        XCTAssertEqual(device.standardSeen, [])
        // The strings, in UTF-16 as the spec says.
        let product = try front.control(port: 1, device: 7, USBSetup(requestType: 0x80, request: 6, value: 0x0302, index: 0x0409, length: 255))
        XCTAssertEqual(product.data, [18, 3] + Array("Loopback".utf16.flatMap { [UInt8($0 & 0xff), UInt8($0 >> 8)] }))
        // The old address is gone; the new one works.
        XCTAssertEqual(try front.control(port: 1, device: 3, USBSetup(requestType: 0x80, request: 0x42, value: 0, index: 0, length: 16)).status,
                       .noDevice)
        let hello = try front.control(port: 1, device: 7, USBSetup(requestType: 0xc0, request: 0x42, value: 0, index: 0, length: 16))
        XCTAssertEqual(hello.data, Array("hello".utf8))
        // GET_STATUS, GET_CONFIGURATION.
        XCTAssertEqual(try front.control(port: 1, device: 7, USBSetup(requestType: 0x80, request: 8, value: 0, index: 0, length: 1)).data, [1])
        // A request to address 0 again is a port reset: the device is told, and re-enumerates.
        _ = try front.enumerate(port: 1, address: 9)
        XCTAssertEqual(device.resets, 1)
        try front.close()
    }

    func testBulkRoundTripOf64KiB() throws {
        let device = LoopbackDevice()
        let (front, _) = try connected(device)
        _ = try front.enumerate(port: 1, address: 2)
        let data = (0..<65536).map { UInt8(truncatingIfNeeded: $0 &* 13 &+ 1) }
        let out = try front.transfer(port: 1, device: 2, endpoint: 2, type: .bulk, isIn: false, data: data)
        XCTAssertEqual(out.status, .ok)
        XCTAssertEqual(out.actualLength, 65536)
        let back = try front.transfer(port: 1, device: 2, endpoint: 1, type: .bulk, isIn: true, length: 65536)
        XCTAssertEqual(back.status, .ok)
        XCTAssertEqual(back.data, data)
        // A short IN: 100 bytes stored, a 512-byte buffer.
        _ = try front.transfer(port: 1, device: 2, endpoint: 2, type: .bulk, isIn: false, data: Array(data.prefix(100)))
        let short = try front.transfer(port: 1, device: 2, endpoint: 1, type: .bulk, isIn: true, length: 512)
        XCTAssertEqual(short.actualLength, 100)
        XCTAssertEqual(short.data, Array(data.prefix(100)))
        try front.close()
    }

    func testInterruptWaitsAndUnlinkAnswersBoth() throws {
        let device = LoopbackDevice()
        let (front, _) = try connected(device)
        _ = try front.enumerate(port: 1, address: 2)
        let id = try front.put(port: 1, device: 2, endpoint: 3, type: .interrupt, isIn: true, length: 8, interval: 4)
        let waited = monotonicSeconds() + 2
        while device.pending == 0 && monotonicSeconds() < waited { usleep(1000) }
        XCTAssertEqual(device.pending, 1)
        XCTAssertTrue(device.press([0, 0, 4, 0, 0, 0, 0, 0]))
        let key = try front.wait(id, isIn: true)
        XCTAssertEqual(key.data, [0, 0, 4, 0, 0, 0, 0, 0])
        // Unlink a pending interrupt: the unlink gets 0, the URB its own (cancelled) response.
        let pendingID = try front.put(port: 1, device: 2, endpoint: 3, type: .interrupt, isIn: true, length: 8, interval: 4)
        while device.pending == 0 && monotonicSeconds() < waited + 2 { usleep(1000) }
        let unlinkID = try front.unlink(pendingID, port: 1)
        XCTAssertEqual(try front.wait(unlinkID).status, .ok)
        XCTAssertEqual(try front.wait(pendingID, isIn: true).status, .cancelled)
        XCTAssertEqual(device.cancelled, 1)
        try front.close()
    }

    /// A device that cancels its waiting URBs in `reset` (on the ring thread) does not leave
    /// the port counting them: unplugged later, it is closed.
    func testPortResetCancellingURBsKeepsTheInFlightCount() throws {
        let first = LoopbackDevice()
        let (front, paths) = try connected(first)
        _ = try front.enumerate(port: 1, address: 2)
        let pendingID = try front.put(port: 1, device: 2, endpoint: 3, type: .interrupt, isIn: true, length: 8, interval: 4)
        XCTAssertTrue(eventually { first.pending == 1 })
        _ = try front.enumerate(port: 1, address: 3)
        XCTAssertEqual(try front.wait(pendingID, isIn: true).status, .cancelled)
        XCTAssertEqual(first.resets, 1)
        try lab.unplug(1, of: paths, front: front)
        XCTAssertTrue(eventually { first.closed })
        try front.close()
    }

    func testIsochronousPacketsAreFilledInPlace() throws {
        let device = LoopbackDevice()
        let (front, _) = try connected(device)
        _ = try front.enumerate(port: 1, address: 2)
        let packets = (0..<8).map { USBIsoPacket(offset: UInt32($0 * 1024), length: 1024) }
        let r = try front.transfer(port: 1, device: 2, endpoint: 4, type: .isochronous, isIn: true, length: 8192, isoPackets: packets)
        XCTAssertEqual(r.status, .ok)
        XCTAssertEqual(r.isoPackets.map { $0.actualLength }, [UInt32](repeating: 512, count: 8))
        XCTAssertEqual(Array(r.data[1024..<1028]), [16, 17, 18, 19])
        try front.close()
    }

    func testHotPlugAndUnplugWhileConnected() throws {
        let first = LoopbackDevice(), second = LoopbackDevice(serial: "0002")
        let (front, paths) = try connected(first)
        lab.register(second, as: "second")
        try lab.backend.store.write(paths.backendPath + "/port/3", "second")
        try front.waitForPort(3)
        XCTAssertEqual(Set(front.portSpeeds.keys), [1, 3])
        _ = try front.enumerate(port: 3, address: 4)
        let serial = try front.control(port: 3, device: 4, USBSetup(requestType: 0x80, request: 6, value: 0x0303, index: 0x0409, length: 255))
        XCTAssertEqual(serial.data.count, 10)
        // Unplug: a disconnect event, URBs to the port fail, the device is closed.
        try lab.backend.store.write(paths.backendPath + "/port/3", "")
        try front.waitForPort(3, plugged: false)
        XCTAssertEqual(try front.control(port: 3, device: 4, USBSetup(requestType: 0x80, request: 8, value: 0, index: 0, length: 1)).status,
                       .noDevice)
        let end = monotonicSeconds() + 2
        while !second.closed && monotonicSeconds() < end { usleep(1000) }
        XCTAssertTrue(second.closed)
        // A device that reports its own removal (a host device pulled out) is unplugged too.
        _ = try front.enumerate(port: 1, address: 2)
        first.port?.deviceRemoved()
        try front.waitForPort(1, plugged: false)
        try front.close()
    }
}
