import CLibUSB
import Core
@testable import Devices
import XCTest

/// `host(...)` without a device (this machine's kernel may have no USB at all): naming the
/// device, the "no device matches" error, the status mapping, the descriptors from raw bytes,
/// the transfers' buffers, and the registry. Real transfers are the Xen lab's.
final class USBHostDeviceTests: XCTestCase {
    /// A SanDisk-like stick as sysfs's `descriptors` holds it: device, then one configuration
    /// (mass storage, bulk IN 0x81 and OUT 0x02, 512 bytes).
    static let stickDevice: [UInt8] = [18, 1, 0x00, 0x02, 0, 0, 0, 64, 0x81, 0x07, 0x67, 0x55, 0x00, 0x01, 1, 2, 3, 1]
    static let stickConfiguration: [UInt8] = [9, 2, 32, 0, 1, 1, 4, 0x80, 50,
                                              9, 4, 0, 0, 2, 8, 6, 0x50, 5,
                                              7, 5, 0x81, 2, 0, 2, 0,
                                              7, 5, 0x02, 2, 0, 2, 0]

    static func stringDescriptor(_ s: String) -> [UInt8] {
        let units = Array(s.utf16)
        return [UInt8(2 + 2 * units.count), 3] + units.flatMap { [UInt8($0 & 0xff), UInt8($0 >> 8)] }
    }

    func spec(_ text: String) -> DeviceSpecError? {
        do { _ = try DeviceRegistry.open(text, of: .usb); return nil } catch { return error }
    }

    // MARK: Naming the device

    func testIdAndBusPortParse() throws {
        let byID = try USBHostMatch.parse(id: "0781:5567", bus: nil, port: nil)
        XCTAssertEqual(byID.id, USBDeviceIDPattern(vendor: 0x0781, product: 0x5567))
        XCTAssertNil(byID.bus)
        XCTAssertEqual(byID.description, "host(id=0781:5567)")
        XCTAssertEqual(try USBHostMatch.parse(id: "AbC:1", bus: nil, port: nil).id, USBDeviceIDPattern(vendor: 0xabc, product: 1))

        let byPort = try USBHostMatch.parse(id: nil, bus: "3", port: "1.4")
        XCTAssertEqual(byPort.bus, 3)
        XCTAssertEqual(byPort.portPath, [1, 4])
        XCTAssertEqual(byPort.description, "host(bus=3, port=1.4)")

        let info = LibUSBDeviceInfo(bus: 3, portPath: [1, 4], address: 7, vendorID: 0x0781, productID: 0x5567, deviceClass: 0)
        XCTAssertEqual(info.busPort, "3-1.4")
        XCTAssertEqual(info.node, "/dev/bus/usb/003/007")
        XCTAssertTrue(byPort.matches(info))
        XCTAssertTrue(byID.matches(info))
        XCTAssertFalse(try USBHostMatch.parse(id: "0781:5567", bus: "3", port: "1").matches(info), "all given must match")
    }

    func testBadNamesAreRefusedWithWhatToWrite() {
        func message(_ id: String?, _ bus: String?, _ port: String?) -> String {
            do { _ = try USBHostMatch.parse(id: id, bus: bus, port: port); return "" } catch { return error.message }
        }
        XCTAssertTrue(message("0781", nil, nil).contains("not VID:PID in hex"))
        XCTAssertTrue(message("0781:55677", nil, nil).contains("not VID:PID in hex"))
        XCTAssertTrue(message("g781:5567", nil, nil).contains("not VID:PID in hex"))
        XCTAssertTrue(message(nil, "1", nil).contains("bus= and port= go together"))
        XCTAssertTrue(message(nil, nil, "2").contains("bus= and port= go together"))
        XCTAssertTrue(message(nil, "0", "2").contains("not a bus number"))
        XCTAssertTrue(message(nil, "1", "0").contains("not a port path"))
        XCTAssertTrue(message(nil, "1", "1..2").contains("not a port path"))
        XCTAssertTrue(message(nil, "1", "1.2.3.4.5.6.7.8").contains("at most 7 levels"))
        XCTAssertTrue(message(nil, nil, nil).contains("name the device by id=VID:PID or by bus=B, port=P"))
    }

    func testNoMatchListsWhatIsPresentAndHubsAreNeverTaken() throws {
        let match = try USBHostMatch.parse(id: "0781:5567", bus: nil, port: nil)
        XCTAssertEqual((try? match.select(from: [])).map { _ in "" }, nil)
        do { _ = try match.select(from: []); XCTFail() } catch {
            XCTAssertEqual(error.message, "host(id=0781:5567): no USB device matches; libusb sees none "
                           + "(no USB controller, or no sysfs at /sys/bus/usb and usbfs at /dev/bus/usb)")
        }
        let present = [
            LibUSBDeviceInfo(bus: 1, portPath: [], address: 1, vendorID: 0x1d6b, productID: 0x0002, deviceClass: 9),   // root hub
            LibUSBDeviceInfo(bus: 1, portPath: [2], address: 3, vendorID: 0x046d, productID: 0xc52b, deviceClass: 0),
            LibUSBDeviceInfo(bus: 2, portPath: [1, 3], address: 4, vendorID: 0x0781, productID: 0x5567, deviceClass: 0),
            LibUSBDeviceInfo(bus: 2, portPath: [1, 4], address: 5, vendorID: 0x0781, productID: 0x5567, deviceClass: 0),
        ]
        do { _ = try USBHostMatch.parse(id: "1d6b:0002", bus: nil, port: nil).select(from: present); XCTFail() } catch {
            XCTAssertEqual(error.message, "host(id=1d6b:0002): no USB device matches; present: 046d:c52b at 1-2, 0781:5567 at 2-1.3, 0781:5567 at 2-1.4")
        }
        do { _ = try match.select(from: present); XCTFail() } catch {
            XCTAssertEqual(error.message, "host(id=0781:5567): 2 devices match (2-1.3, 2-1.4); add bus= and port=")
        }
        XCTAssertEqual(try USBHostMatch.parse(id: "0781:5567", bus: "2", port: "1.4").select(from: present).address, 5)
        XCTAssertEqual(try USBHostMatch.parse(id: nil, bus: "1", port: "2").select(from: present).vendorID, 0x046d)
    }

    /// What libusb really enumerates here: on a machine without USB an empty list, and the
    /// error says so; elsewhere the devices present are listed.
    func testOpeningAnAbsentDeviceSaysWhatLibusbSees() throws {
        let present = try LibUSBContext().devices()
        guard let error = spec("host(id=fffe:fffd)") else { return XCTFail("no device should be fffe:fffd") }
        XCTAssertTrue(error.message.hasPrefix("host(id=fffe:fffd): no USB device matches; "), error.message)
        if present.filter({ $0.deviceClass != 9 }).isEmpty {
            XCTAssertTrue(error.message.contains("libusb sees none"), error.message)
        } else {
            XCTAssertTrue(error.message.contains("present: "), error.message)
        }
        XCTAssertEqual(spec("host(bus=1)")?.message, "host: bus= and port= go together (the device at 1-2 is bus=1, port=2)")
    }

    // MARK: Statuses

    func testTransferStatusesMapAsHostLibusbDoes() {
        XCTAssertEqual(LibUSBStatus.urbStatus(LIBUSB_TRANSFER_COMPLETED), .ok)
        XCTAssertEqual(LibUSBStatus.urbStatus(LIBUSB_TRANSFER_STALL), .stall)
        XCTAssertEqual(LibUSBStatus.urbStatus(LIBUSB_TRANSFER_NO_DEVICE), .noDevice)
        XCTAssertEqual(LibUSBStatus.urbStatus(LIBUSB_TRANSFER_OVERFLOW), .babble)
        XCTAssertEqual(LibUSBStatus.urbStatus(LIBUSB_TRANSFER_CANCELLED), .cancelled)
        XCTAssertEqual(LibUSBStatus.urbStatus(LIBUSB_TRANSFER_TIMED_OUT), .ioError)
        XCTAssertEqual(LibUSBStatus.urbStatus(LIBUSB_TRANSFER_ERROR), .ioError)
        XCTAssertEqual(LibUSBStatus.submitStatus(LIBUSB_ERROR_NO_DEVICE.rawValue), .noDevice)
        XCTAssertEqual(LibUSBStatus.submitStatus(LIBUSB_ERROR_PIPE.rawValue), .stall)
        XCTAssertEqual(LibUSBStatus.submitStatus(LIBUSB_ERROR_IO.rawValue), .ioError)
        XCTAssertEqual(LibUSBError("libusb_claim_interface(0)", LibUSBError.busy).description, "libusb_claim_interface(0): LIBUSB_ERROR_BUSY")
        XCTAssertEqual(LibUSBError("x", LibUSBError.noDevice).usbStatus, .noDevice)
        XCTAssertEqual(LibUSBError("x", LibUSBError.pipe).usbStatus, .stall)
        XCTAssertEqual(LibUSBStatus.speed(Int32(LIBUSB_SPEED_HIGH.rawValue)), .high)
        XCTAssertEqual(LibUSBStatus.speed(Int32(LIBUSB_SPEED_LOW.rawValue)), .low)
        XCTAssertNil(LibUSBStatus.speed(Int32(LIBUSB_SPEED_SUPER.rawValue)), "usbif has no SuperSpeed")
    }

    // MARK: Descriptors

    func testDeviceDescriptorFromLibusbsStructure() {
        var d = libusb_device_descriptor()
        d.bLength = 18; d.bDescriptorType = 1; d.bcdUSB = 0x0200; d.bMaxPacketSize0 = 64
        d.idVendor = 0x0781; d.idProduct = 0x5567; d.bcdDevice = 0x0100
        d.iManufacturer = 1; d.iProduct = 2; d.iSerialNumber = 3; d.bNumConfigurations = 1
        XCTAssertEqual(USBHostDescriptors.deviceDescriptor(d), Self.stickDevice)
    }

    func testRawDescriptorsBecomeTheTapsDescriptorsAndThePolicysAttributes() throws {
        // sysfs `descriptors`: the device, then the configuration; trailing junk is not a configuration.
        let (device, configurations) = USBHostDescriptors.split(Self.stickDevice + Self.stickConfiguration + [9, 4])
        XCTAssertEqual(device, Self.stickDevice)
        XCTAssertEqual(configurations, [Self.stickConfiguration])
        XCTAssertEqual(USBHostDescriptors.stringIndexes(device: device, configurations: configurations), [1, 2, 3, 4, 5])

        let strings: [UInt8: [UInt8]] = [1: Self.stringDescriptor("SanDisk"), 2: Self.stringDescriptor("Cruzer Blade"),
                                         3: Self.stringDescriptor("4C530001"), 4: Self.stringDescriptor("Config"),
                                         5: [2, 2] /* not a string descriptor */]
        // A GET_DESCRIPTOR answer longer than wTotalLength is cut to it.
        let d = USBHostDescriptors.descriptors(device: device, configurations: [Self.stickConfiguration + [0, 0, 0]], strings: strings)
        XCTAssertEqual(d.device, Self.stickDevice)
        XCTAssertEqual(d.configurations, [Self.stickConfiguration])
        XCTAssertEqual(d.strings, [1: "SanDisk", 2: "Cruzer Blade", 3: "4C530001", 4: "Config"])
        XCTAssertEqual(d.vendorID, 0x0781)
        XCTAssertEqual(d.interfaces(configuration: 1).map(\.class), [8])

        let a = USBDeviceAttributes(descriptors: d, viaPort: "2-1.4")
        XCTAssertEqual(a.name, "Cruzer Blade")
        XCTAssertEqual(a.serial, "4C530001")
        XCTAssertEqual(a.viaPort, "2-1.4")
        XCTAssertEqual(a.interfaces, [USBInterfaceClass(8, 6, 0x50)])
        let policy = try USBPolicy(parsing: "allow id 0781:5567 serial \"4C530001\" via-port \"2-1.4\" with-interface 08:06:50")
        XCTAssertEqual(policy.evaluate(a).target, .allow)

        XCTAssertEqual(USBHostDescriptors.string(fromDescriptor: Self.stringDescriptor("é✓")), "é✓")
        XCTAssertEqual(USBHostDescriptors.string(fromDescriptor: [7, 3, 0x41, 0, 0x42, 0, 0x43]), "AB", "an odd bLength drops the half unit")
        XCTAssertNil(USBHostDescriptors.string(fromDescriptor: [4, 2, 0x41, 0]))
    }

    // MARK: Transfers' buffers

    final class Sink: URBCompletionSink, @unchecked Sendable {
        func completed(_ urb: URB) {}
    }

    func testControlTransferCarriesTheSetupInFrontAndCopiesInDataBack() throws {
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: 64, alignment: 8)
        defer { buffer.deallocate() }
        let setup = USBSetup(requestType: 0xa1, request: 0xfe, value: 0, index: 0, length: 1)   // GET_MAX_LUN
        let urb = URB(endpoint: 0, isIn: true, type: .control, setup: setup, buffer: UnsafeMutableRawBufferPointer(rebasing: buffer[0..<1]),
                      tag: 0, sink: Sink())
        let t = try XCTUnwrap(libusb_alloc_transfer(0))
        defer { libusb_free_transfer(t) }
        let own = try XCTUnwrap(HostTransfer.prepare(t, for: urb, handle: nil, callback: nil))
        defer { own.deallocate() }
        XCTAssertEqual(t.pointee.type, UInt8(LIBUSB_TRANSFER_TYPE_CONTROL.rawValue))
        XCTAssertEqual(t.pointee.length, 9)
        XCTAssertEqual(Array(UnsafeBufferPointer(start: t.pointee.buffer, count: 8)), setup.bytes)
        own[8] = 3
        t.pointee.status = LIBUSB_TRANSFER_COMPLETED
        t.pointee.actual_length = 1
        XCTAssertEqual(HostTransfer.results(of: t, ownBuffer: own, into: urb), .ok)
        XCTAssertEqual(urb.actualLength, 1)
        XCTAssertEqual(urb.buffer[0], 3)

        let out = URB(endpoint: 0, isIn: false, type: .control, setup: USBSetup(requestType: 0x21, request: 9, value: 0x200, index: 0, length: 1),
                      buffer: UnsafeMutableRawBufferPointer(rebasing: buffer[0..<1]), tag: 1, sink: Sink())
        buffer[0] = 0x02   // Caps Lock
        let t2 = try XCTUnwrap(libusb_alloc_transfer(0))
        defer { libusb_free_transfer(t2) }
        let own2 = try XCTUnwrap(HostTransfer.prepare(t2, for: out, handle: nil, callback: nil))
        defer { own2.deallocate() }
        XCTAssertEqual(Array(UnsafeBufferPointer(start: own2, count: 9)), [0x21, 9, 0, 2, 0, 0, 1, 0, 0x02])

        let short = URB(endpoint: 0, isIn: true, type: .control, setup: USBSetup(requestType: 0x80, request: 6, value: 0x100, index: 0, length: 18),
                        buffer: UnsafeMutableRawBufferPointer(rebasing: buffer[0..<8]), tag: 2, sink: Sink())
        XCTAssertThrowsError(try HostTransfer.prepare(t2, for: short, handle: nil, callback: nil), "wLength beyond the buffer")
    }

    /// A passed-through device's halts are its own: GET_STATUS(ENDPOINT) and SET_FEATURE(HALT)
    /// go to the device (the tap's copy would say "not halted" of a bulk endpoint the device
    /// stalled), as a control transfer with the guest's setup; the rest stays the tap's.
    func testEndpointStatusAndHaltGoToTheDevice() throws {
        let getStatus = USBSetup(requestType: 0x82, request: 0, value: 0, index: 0x81, length: 2)
        let setHalt = USBSetup(requestType: 0x02, request: 3, value: 0, index: 0x02, length: 0)
        XCTAssertTrue(USBHostDevice.deviceAnswers(getStatus))
        XCTAssertTrue(USBHostDevice.deviceAnswers(setHalt))
        for setup in [USBSetup(requestType: 0x02, request: 1, value: 0, index: 0x81, length: 0),   // CLEAR_FEATURE(HALT): libusb_clear_halt
                      USBSetup(requestType: 0x82, request: 0, value: 0, index: 0x80, length: 2),   // endpoint 0
                      USBSetup(requestType: 0x80, request: 0, value: 0, index: 0, length: 2),      // GET_STATUS(DEVICE)
                      USBSetup(requestType: 0x81, request: 0, value: 0, index: 0, length: 2),      // GET_STATUS(INTERFACE)
                      USBSetup(requestType: 0x00, request: 9, value: 1, index: 0, length: 0),      // SET_CONFIGURATION
                      USBSetup(requestType: 0xa2, request: 0, value: 0, index: 0x81, length: 2)] { // a class request
            XCTAssertFalse(USBHostDevice.deviceAnswers(setup), "\(setup)")
        }
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: 2, alignment: 8)
        defer { buffer.deallocate() }
        let urb = URB(endpoint: 0, isIn: true, type: .control, setup: getStatus, buffer: buffer, tag: 0, sink: Sink())
        let t = try XCTUnwrap(libusb_alloc_transfer(0))
        defer { libusb_free_transfer(t) }
        let own = try XCTUnwrap(HostTransfer.prepare(t, for: urb, handle: nil, callback: nil))
        defer { own.deallocate() }
        XCTAssertEqual(Array(UnsafeBufferPointer(start: t.pointee.buffer, count: 8)), getStatus.bytes)
        own[8] = 1   // the device says: halted
        own[9] = 0
        t.pointee.status = LIBUSB_TRANSFER_COMPLETED
        t.pointee.actual_length = 2
        XCTAssertEqual(HostTransfer.results(of: t, ownBuffer: own, into: urb), .ok)
        XCTAssertEqual(Array(buffer), [1, 0])
    }

    func testBulkUsesTheTapsBufferInPlace() throws {
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: 512, alignment: 8)
        defer { buffer.deallocate() }
        let urb = URB(endpoint: 1, isIn: true, type: .bulk, buffer: buffer, tag: 0, sink: Sink())
        let t = try XCTUnwrap(libusb_alloc_transfer(0))
        defer { libusb_free_transfer(t) }
        XCTAssertNil(try HostTransfer.prepare(t, for: urb, handle: nil, callback: nil))
        XCTAssertEqual(t.pointee.endpoint, 0x81)
        XCTAssertEqual(UnsafeMutableRawPointer(t.pointee.buffer), buffer.baseAddress)
        XCTAssertEqual(t.pointee.length, 512)
        t.pointee.status = LIBUSB_TRANSFER_STALL
        t.pointee.actual_length = 13
        XCTAssertEqual(HostTransfer.results(of: t, ownBuffer: nil, into: urb), .stall)
        XCTAssertEqual(urb.actualLength, 13)
    }

    func testIsochronousPacketsMoveBetweenOffsetsAndLibusbsBackToBackLayout() throws {
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: 64, alignment: 8)
        defer { buffer.deallocate() }
        buffer.initializeMemory(as: UInt8.self, repeating: 0)
        // Packets at offsets 0 and 32, 16 bytes each (the guest's layout, with a gap).
        let packets = [USBIsoPacket(offset: 0, length: 16), USBIsoPacket(offset: 32, length: 16)]
        let urb = URB(endpoint: 4, isIn: true, type: .isochronous, buffer: buffer, isoPackets: packets, tag: 0, sink: Sink())
        let t = try XCTUnwrap(libusb_alloc_transfer(2))
        defer { libusb_free_transfer(t) }
        let own = try XCTUnwrap(HostTransfer.prepare(t, for: urb, handle: nil, callback: nil))
        defer { own.deallocate() }
        XCTAssertEqual(t.pointee.endpoint, 0x84)
        XCTAssertEqual(t.pointee.length, 32)
        XCTAssertEqual(t.pointee.num_iso_packets, 2)
        XCTAssertEqual(softdev_libusb_iso_packet(t, 1).pointee.length, 16)
        // The device sent 4 bytes in packet 0 and 16 in packet 1; libusb's buffer has each at its own slot.
        for i in 0..<4 { own[i] = 0xa0 + UInt8(i) }
        for i in 0..<16 { own[16 + i] = 0xb0 + UInt8(i) }
        t.pointee.status = LIBUSB_TRANSFER_COMPLETED
        softdev_libusb_iso_packet(t, 0).pointee.actual_length = 4
        softdev_libusb_iso_packet(t, 0).pointee.status = LIBUSB_TRANSFER_COMPLETED
        softdev_libusb_iso_packet(t, 1).pointee.actual_length = 16
        softdev_libusb_iso_packet(t, 1).pointee.status = LIBUSB_TRANSFER_COMPLETED
        XCTAssertEqual(HostTransfer.results(of: t, ownBuffer: own, into: urb), .ok)
        XCTAssertEqual(Array(buffer[0..<5]), [0xa0, 0xa1, 0xa2, 0xa3, 0])
        XCTAssertEqual(Array(buffer[32..<48]), (0..<16).map { 0xb0 + UInt8($0) })
        XCTAssertEqual(urb.isoPackets.map(\.actualLength), [4, 16])
        XCTAssertEqual(urb.actualLength, 48, "up to the end of the last packet's data, which the tap copies back")
        XCTAssertEqual(urb.errorCount, 0)

        // OUT: gathered from the offsets into libusb's layout.
        for i in 0..<16 { buffer[i] = UInt8(i); buffer[32 + i] = 0x80 + UInt8(i) }
        let out = URB(endpoint: 5, isIn: false, type: .isochronous, buffer: buffer, isoPackets: packets, tag: 1, sink: Sink())
        let t2 = try XCTUnwrap(libusb_alloc_transfer(2))
        defer { libusb_free_transfer(t2) }
        let own2 = try XCTUnwrap(HostTransfer.prepare(t2, for: out, handle: nil, callback: nil))
        defer { own2.deallocate() }
        XCTAssertEqual(Array(UnsafeBufferPointer(start: own2, count: 32)), (0..<16).map { UInt8($0) } + (0..<16).map { 0x80 + UInt8($0) })
    }

    // MARK: Registry

    func testHostIsAUSBDeviceOfTheRegistry() throws {
        let d = try XCTUnwrap(DeviceRegistry.usbDevices.first { $0.name == "host" })
        XCTAssertEqual(d.kind, .device)
        XCTAssertEqual(d.deviceClass, .usb)
        XCTAssertEqual(d.parameters.map(\.name), ["id", "bus", "port"])
        XCTAssertNoThrow(try DeviceRegistry.check("log(logfile=/tmp/x) | host(id=0781:5567)", of: .usb))
        XCTAssertNoThrow(try DeviceRegistry.check("host(bus=1, port=1.4)", of: .usb))
        XCTAssertThrowsError(try DeviceRegistry.check("host(vid=0781)", of: .usb))
        XCTAssertThrowsError(try DeviceRegistry.check("host(id=0781:5567)", of: .block), "a USB device is not a block device")
    }
}
