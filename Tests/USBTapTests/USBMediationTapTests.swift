import Core
import Devices
import Foundation
import TestPeers
import USBTap
import XCTest

/// `readonly-storage` and `interfaces` through the real tap: a Swift usbfront drives
/// ``BulkOnlyTestDevice``; what the guest sees and what reaches the device.
final class USBMediationTapTests: USBFilterTestCase {
    func testReadOnlyStorageRefusesWritesWithWriteProtectSense() throws {
        let device = BulkOnlyTestDevice()
        let before = device.memory
        let (front, _) = try connected(try USBReadOnlyStorageFilter(device: device))
        var bot = BulkOnly(front: front)
        // Reads pass.
        let read = try bot.run(Self.read10(1, 2), inLength: 1024)
        XCTAssertEqual(read.data?.data, Array(before[512..<1536]))
        XCTAssertEqual(BulkOnly.csw(read.csw)?.2, 0)
        // A WRITE(10) of two blocks: CBW and data taken, CSW failed with the full residue.
        let write = try bot.run(Self.write10(3, 2), out: [UInt8](repeating: 0xEE, count: 1024))
        XCTAssertEqual(write.cbw.status, .ok)
        XCTAssertEqual(write.data?.status, .ok)
        XCTAssertEqual(write.data?.actualLength, 1024)
        let csw = try XCTUnwrap(BulkOnly.csw(write.csw))
        XCTAssertEqual(csw.0, bot.tag); XCTAssertEqual(csw.1, 1024); XCTAssertEqual(csw.2, 1)
        // REQUEST SENSE, answered here: DATA PROTECT, WRITE PROTECTED.
        let sense = try bot.run([0x03, 0, 0, 0, 18, 0], inLength: 18)
        XCTAssertEqual(sense.data?.data.count, 18)
        XCTAssertEqual(sense.data.map { [$0.data[0], $0.data[2], $0.data[12], $0.data[13]] }, [0x70, 0x07, 0x27, 0x00])
        XCTAssertEqual(BulkOnly.csw(sense.csw).map { [$0.1, UInt32($0.2)] }, [0, 0])
        // The device saw neither the write nor the sense; its medium is unchanged.
        XCTAssertEqual(device.seenOpcodes, [0x28])
        XCTAssertEqual(device.memory, before)
        // MODE SENSE(6) and (10): the write-protect bit is set in the device's answer.
        let mode6 = try bot.run([0x1A, 0, 0x3F, 0, 4, 0], inLength: 4)
        XCTAssertEqual(mode6.data?.data, [3, 0, 0x80, 0])
        XCTAssertEqual(BulkOnly.csw(mode6.csw)?.2, 0)
        let mode10 = try bot.run([0x5A, 0, 0x3F, 0, 0, 0, 0, 0, 8, 0], inLength: 8)
        XCTAssertEqual(mode10.data?.data, [0, 6, 0, 0x80, 0, 0, 0, 0])
        // A REQUEST SENSE with no refusal before it goes to the device.
        _ = try bot.run([0x03, 0, 0, 0, 18, 0], inLength: 18)
        XCTAssertEqual(device.seenOpcodes, [0x28, 0x1A, 0x5A, 0x03])
        // Other writes: WRITE(16), UNMAP, ATA PASS-THROUGH never reach the device.
        for cdb in [[0x8A] + [UInt8](repeating: 0, count: 15), [0x42, 0, 0, 0, 0, 0, 0, 0, 24, 0], [0x85] + [UInt8](repeating: 0, count: 15)] {
            let r = try bot.run(cdb, out: [UInt8](repeating: 1, count: 24))
            XCTAssertEqual(BulkOnly.csw(r.csw)?.2, 1)
        }
        XCTAssertEqual(device.seenOpcodes, [0x28, 0x1A, 0x5A, 0x03])
        // A refused command with a data-IN stage (ATA PASS-THROUGH reading): the data stage
        // STALLs, then the failed CSW, then the write-protect sense.
        let ata = try bot.run([0x85, 0x08, 0x0e] + [UInt8](repeating: 0, count: 13), inLength: 512)
        XCTAssertEqual(ata.data?.status, .stall)
        XCTAssertEqual(BulkOnly.csw(ata.csw).map { [$0.1, UInt32($0.2)] }, [512, 1])
        XCTAssertEqual(try bot.run([0x03, 0, 0, 0, 18, 0], inLength: 18).data.map { $0.data[12] }, 0x27)
        XCTAssertEqual(device.seenOpcodes, [0x28, 0x1A, 0x5A, 0x03])
        // Not a CBW while a command is expected: STALLed, never seen by the device.
        XCTAssertEqual(try front.transfer(port: 1, device: 2, endpoint: 2, type: .bulk, isIn: false, data: [UInt8](repeating: 0, count: 512)).status,
                       .stall)
        XCTAssertEqual(device.memory, before)
        // A WRITE CBW in the second packet of a transfer, or sent as an interrupt URB to the
        // bulk OUT endpoint: STALLed, the device sees neither.
        var smuggled = [UInt8](repeating: 0, count: 1024)
        var hidden: [UInt8] = [0x55, 0x53, 0x42, 0x43, 9, 0, 0, 0, 0, 2, 0, 0, 0, 0, 10]
        hidden += Self.write10(0, 1) + [UInt8](repeating: 0, count: 6)
        smuggled.replaceSubrange(512..<543, with: hidden)
        XCTAssertEqual(try front.transfer(port: 1, device: 2, endpoint: 2, type: .bulk, isIn: false, data: smuggled).status, .stall)
        XCTAssertEqual(try front.transfer(port: 1, device: 2, endpoint: 2, type: .interrupt, isIn: false, data: hidden).status, .stall)
        XCTAssertEqual(device.seenOpcodes, [0x28, 0x1A, 0x5A, 0x03])
        // Still in step: a read works.
        XCTAssertEqual(BulkOnly.csw(try bot.run(Self.read10(0, 1), inLength: 512).csw)?.2, 0)
        XCTAssertEqual(device.memory, before)
        try front.close()
    }

    func testInterfacesHidesTheKeyboard() throws {
        let device = BulkOnlyTestDevice()
        let (front, configuration) = try connected(USBInterfacesFilter(next: device, allow: [USBInterfaceClassPattern(8, 6, 0x50)]))
        // The configuration as the guest reads it: one interface, two endpoints, 32 bytes.
        XCTAssertEqual(configuration.count, 32)
        XCTAssertEqual(Array(configuration[0..<5]), [9, 2, 32, 0, 1])
        XCTAssertEqual(USBDescriptors.walk(configuration).map(\.type), [2, 4, 5, 5])
        XCTAssertEqual(Array(configuration[9..<18]), [9, 4, 0, 0, 2, 8, 6, 0x50, 0])
        // The HID report descriptor is gone too.
        XCTAssertEqual(try front.control(port: 1, device: 2, USBSetup(requestType: 0x81, request: 6, value: 0x2200, index: 1, length: 63)).status,
                       .stall)
        // URBs to the hidden endpoint, SET_INTERFACE and class requests to the hidden interface: STALL.
        XCTAssertEqual(try front.transfer(port: 1, device: 2, endpoint: 3, type: .interrupt, isIn: true, length: 8).status, .stall)
        XCTAssertEqual(try front.control(port: 1, device: 2, USBSetup(requestType: 0x01, request: 11, value: 0, index: 1, length: 0)).status,
                       .stall)
        XCTAssertEqual(try front.control(port: 1, device: 2, USBSetup(requestType: 0x21, request: 0x0A, value: 0, index: 1, length: 0)).status,
                       .stall, "SET_IDLE to the keyboard")
        XCTAssertEqual(try front.transfer(port: 1, device: 2, endpoint: 3, type: .interrupt, isIn: false, data: [1]).status, .stall,
                       "the keyboard's endpoint number the other way")
        // Standard requests aimed at the hidden interface or its endpoint pass the filter now
        // (the tap would answer them): GET_STATUS, GET_INTERFACE, SET_FEATURE(HALT) STALL.
        for setup in [USBSetup(requestType: 0x81, request: 0, value: 0, index: 1, length: 2), USBSetup(requestType: 0x81, request: 10, value: 0, index: 1, length: 1),
                      USBSetup(requestType: 0x82, request: 0, value: 0, index: 0x83, length: 2), USBSetup(requestType: 0x02, request: 3, value: 0, index: 0x83, length: 0)] {
            XCTAssertEqual(try front.control(port: 1, device: 2, setup).status, .stall, "\(setup)")
        }
        XCTAssertEqual(try front.control(port: 1, device: 2, USBSetup(requestType: 0x81, request: 0, value: 0, index: 0, length: 2)).data, [0, 0],
                       "GET_STATUS of the storage interface")
        XCTAssertEqual(device.keyboardURBs, 0)
        XCTAssertTrue(device.classRequests.isEmpty)
        // The report descriptor belongs to interface 1: hidden with it, kept when it is allowed.
        XCTAssertNil(USBInterfacesFilter(next: device, allow: [USBInterfaceClassPattern(8, 6, 0x50)]).descriptors.interfaceDescriptors[1])
        XCTAssertEqual(USBInterfacesFilter(next: device, allow: [USBInterfaceClassPattern(3, nil, nil)]).descriptors.interfaceDescriptors[1]?[0x2200]?.count, 63)
        // The storage interface works: GET MAX LUN, a read.
        XCTAssertEqual(try front.control(port: 1, device: 2, USBSetup(requestType: 0xA1, request: 0xFE, value: 0, index: 0, length: 1)).data, [0])
        var bot = BulkOnly(front: front)
        XCTAssertEqual(BulkOnly.csw(try bot.run(Self.read10(0, 1), inLength: 512).csw)?.2, 0)
        // Stacked over readonly-storage, from a spec's parameters.
        let descriptor = try XCTUnwrap(DeviceRegistry.descriptor(named: "interfaces", of: .usb))
        let spec = try DeviceSpec(parsing: #"interfaces(allow="08:06:50,03:*:*") | readonly-storage | policy(rules=/etc/softdev/usb.rules, via-port=1-2) | x"#)
        XCTAssertEqual(spec.elements.map(\.name), ["interfaces", "readonly-storage", "policy", "x"])
        XCTAssertEqual(spec.elements[0].parameters.first?.value, "08:06:50,03:*:*")
        let stacked = try descriptor.open(DeviceParameters(device: "interfaces", values: ["allow": "08:06:50,03:*:*"]), device) as! any USBDevice
        XCTAssertEqual(stacked.descriptors, device.descriptors, "both interfaces allowed: unchanged")
        XCTAssertThrowsError(try descriptor.open(DeviceParameters(device: "interfaces", values: ["allow": "08:*:50"]), device)) { e in
            XCTAssertEqual("\(e)", "interfaces: allow: expected * as the protocol after a * subclass in '08:*:50' (USBGuard refuses cc:*:pp)")
        }
        try front.close()
    }

    /// A class descriptor belongs to its interface: the tap answers the HID report descriptor
    /// asked of interface 1 (the keyboard), and leaves the same request of interface 0 (the
    /// storage, which has none) to the device, with or without the interfaces filter above.
    func testClassDescriptorsAreAnsweredPerInterface() throws {
        let device = BulkOnlyTestDevice()
        let (front, _) = try connected(device)
        func report(_ interface: UInt16) throws -> LocalUSBFrontend.Result {
            try front.control(port: 1, device: 2, USBSetup(requestType: 0x81, request: 6, value: 0x2200, index: interface, length: 255))
        }
        XCTAssertEqual(try report(1).data.count, 63)
        XCTAssertTrue(device.classRequests.isEmpty, "answered by the tap")
        XCTAssertEqual(try report(0).data, [], "the storage interface has no report descriptor")
        XCTAssertEqual(device.classRequests.map(\.value), [0x2200], "its request went to the device")
        try front.close()
    }

    /// `interfaces` judges what is hidden against the configuration in force: interface 0 is a
    /// stick in configuration 1 and a keyboard in configuration 2 (endpoint 0x81 in both). The
    /// allowed stick must not make the keyboard reachable after the guest's SET_CONFIGURATION(2),
    /// and the keyboard hidden in configuration 2 must not make the stick's SET_INTERFACE fail in 1.
    /// Before any configuration (after a reset) only endpoint 0 is reachable.
    func testInterfacesHidesPerConfiguration() throws {
        let device = TwoConfigurationTestDevice()
        let (front, configuration) = try connected(USBInterfacesFilter(next: device, allow: [USBInterfaceClassPattern(8, 6, 0x50)]))
        XCTAssertEqual(configuration[5], 1)
        XCTAssertEqual(USBDescriptors.walk(configuration).map(\.type), [2, 4, 5, 5])
        func control(_ requestType: UInt8, _ request: UInt8, value: UInt16 = 0, index: UInt16 = 0, length: UInt16 = 0) throws -> USBStatus {
            try front.control(port: 1, device: 2, USBSetup(requestType: requestType, request: request, value: value, index: index, length: length)).status
        }
        XCTAssertEqual(try control(0x01, 11, value: 0, index: 0), .ok, "SET_INTERFACE(0, 0) of the allowed stick")
        XCTAssertEqual(try front.transfer(port: 1, device: 2, endpoint: 1, type: .bulk, isIn: true, length: 13).status, .ok)
        XCTAssertEqual(device.seen, ["bulk 81 in configuration 1"])

        // Configuration 2 has the keyboard alone: the guest may set it, and reaches nothing in it.
        let second = try front.control(port: 1, device: 2, USBSetup(requestType: 0x80, request: 6, value: 0x0201, index: 0, length: 64)).data
        XCTAssertEqual(Array(second.prefix(5)), [9, 2, 9, 0, 0], "configuration 2 as the guest sees it: no interface")
        XCTAssertEqual(try control(0x00, 9, value: 2), .ok)
        XCTAssertEqual(try front.transfer(port: 1, device: 2, endpoint: 1, type: .interrupt, isIn: true, length: 8).status, .stall)
        XCTAssertEqual(try front.transfer(port: 1, device: 2, endpoint: 1, type: .bulk, isIn: true, length: 13).status, .stall)
        XCTAssertEqual(try control(0x21, 0x0A, index: 0), .stall, "SET_IDLE to the keyboard")
        XCTAssertEqual(try control(0x81, 0, index: 0, length: 2), .stall, "GET_STATUS of the keyboard interface")
        XCTAssertEqual(try control(0x01, 11, value: 0, index: 0), .stall, "SET_INTERFACE(0, 0) of the keyboard")
        XCTAssertEqual(try control(0x02, 1, value: 0, index: 0x81), .stall, "CLEAR_FEATURE(HALT) of the keyboard's endpoint")
        XCTAssertEqual(device.seen, ["bulk 81 in configuration 1"], "nothing reached the keyboard")

        // Back to 1: the stick again.
        XCTAssertEqual(try control(0x00, 9, value: 1), .ok)
        XCTAssertEqual(try front.transfer(port: 1, device: 2, endpoint: 1, type: .bulk, isIn: true, length: 13).status, .ok)
        // A port reset: unconfigured, so no endpoint but 0 until SET_CONFIGURATION.
        XCTAssertEqual(try front.control(port: 1, device: 0, USBSetup(requestType: 0x00, request: 5, value: 3, index: 0, length: 0)).status, .ok)
        XCTAssertEqual(try front.transfer(port: 1, device: 3, endpoint: 1, type: .bulk, isIn: true, length: 13).status, .stall)
        XCTAssertEqual(device.seen, ["bulk 81 in configuration 1", "bulk 81 in configuration 1"])
        try front.close()
    }
}

extension USBMediationTapTests {
    /// `readonly-storage` cannot be stepped around: configuration 1 has two Bulk-Only
    /// interfaces (OUT 2 and OUT 4), configuration 2 a third on OUT 6. A WRITE(10) on the second
    /// interface's endpoint, or a SET_CONFIGURATION to 2 (whose storage interface the filter
    /// does not parse), never reaches the device.
    func testReadOnlyStorageCannotBeSteppedAroundByAnotherInterfaceOrConfiguration() throws {
        func bot(_ number: UInt8, _ inEP: UInt8, _ outEP: UInt8) -> [UInt8] {
            [9, 4, number, 0, 2, 8, 6, 0x50, 0, 7, 5, inEP, 2, 0, 2, 0, 7, 5, outEP, 2, 0, 2, 0]
        }
        let one = [9, 2, 55, 0, 2, 1, 0, 0x80, 50] + bot(0, 0x81, 0x02) + bot(1, 0x83, 0x04)
        let two = [9, 2, 32, 0, 1, 2, 0, 0x80, 50] + bot(0, 0x85, 0x06)
        let device = TwoConfigurationTestDevice(configurations: [one, two])
        let (front, _) = try connected(try USBReadOnlyStorageFilter(device: device))
        var cbw: [UInt8] = [0x55, 0x53, 0x42, 0x43, 1, 0, 0, 0, 0, 2, 0, 0, 0, 0, 10]
        cbw += Self.write10(0, 1) + [UInt8](repeating: 0, count: 6)
        XCTAssertEqual(try front.transfer(port: 1, device: 2, endpoint: 4, type: .bulk, isIn: false, data: cbw).status, .stall)
        XCTAssertEqual(try front.control(port: 1, device: 2, USBSetup(requestType: 0x00, request: 9, value: 2, index: 0, length: 0)).status,
                       .stall)
        XCTAssertEqual(device.seen, [], "no WRITE reached the device")
        XCTAssertEqual(try front.control(port: 1, device: 2, USBSetup(requestType: 0x00, request: 9, value: 1, index: 0, length: 0)).status,
                       .ok)
        try front.close()
    }
}

/// A device with two configurations (by default: they share interface 0 and endpoint 0x81, a
/// mass-storage interface with bulk 0x81 and 0x02 in configuration 1, a HID keyboard with
/// interrupt 0x81 in 2). It records every URB and class request it gets, with the
/// configuration it was in, and answers each with zeros.
final class TwoConfigurationTestDevice: USBDevice, @unchecked Sendable {
    let name = "two-configurations"
    let speed = USBSpeed.high
    let descriptors: USBDescriptors
    static let storageThenKeyboard: [[UInt8]] = [
        [9, 2, 32, 0, 1, 1, 0, 0x80, 50, 9, 4, 0, 0, 2, 8, 6, 0x50, 0, 7, 5, 0x81, 2, 0, 2, 0, 7, 5, 0x02, 2, 0, 2, 0],
        [9, 2, 34, 0, 1, 2, 0, 0x80, 50, 9, 4, 0, 0, 1, 3, 1, 1, 0, 9, 0x21, 0x11, 0x01, 0, 1, 0x22, 63, 0, 7, 5, 0x81, 3, 8, 0, 10]]
    init(configurations: [[UInt8]] = storageThenKeyboard) {
        descriptors = USBDescriptors(device: [18, 1, 0x00, 0x02, 0, 0, 0, 64, 0x34, 0x12, 0x02, 0x50, 0x00, 0x01, 0, 0, 0,
                                              UInt8(configurations.count)], configurations: configurations)
    }
    private let lock = NSLock()
    private var configuration: UInt8 = 0
    private var log: [String] = []
    var seen: [String] { lock.withLock { log } }

    func submit(_ urb: URB) {
        lock.withLock {
            let what = urb.setup.map { "control \(String($0.requestType, radix: 16)) \(String($0.request, radix: 16))" }
                ?? "\(urb.type) \(String(urb.endpoint | (urb.isIn ? 0x80 : 0), radix: 16))"
            log.append("\(what) in configuration \(configuration)")
        }
        urb.complete(in: [UInt8](repeating: 0, count: min(urb.buffer.count, 8)))
    }

    func setConfiguration(_ value: UInt8) -> USBStatus {
        lock.withLock { configuration = value }
        return .ok
    }
}
