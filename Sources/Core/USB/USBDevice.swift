/// A device's descriptors as the bus reads them: the device descriptor, each configuration's
/// whole blob (configuration, interfaces, class-specific and endpoint descriptors, in order, as
/// GET_DESCRIPTOR(CONFIGURATION) returns them) and its strings.
public struct USBDescriptors: Equatable, Sendable {
    /// The 18-byte device descriptor.
    public var device: [UInt8]
    /// Configuration blobs, in index order (GET_DESCRIPTOR's index, not bConfigurationValue).
    public var configurations: [[UInt8]]
    /// String descriptors by index (index 0, the language list, is answered as US English).
    public var strings: [UInt8: String]
    /// Other descriptors a device answers to GET_DESCRIPTOR by (type << 8 | index), asked of the
    /// device (or of an interface that has none of its own by that key).
    public var others: [UInt16: [UInt8]]
    /// Class and vendor descriptors of each interface (by bInterfaceNumber), answered to
    /// GET_DESCRIPTOR with the interface as recipient and its number in wIndex: the HID
    /// descriptor (0x2100) and report descriptor (0x2200) of a HID interface. Kept per interface
    /// so that a filter hiding an interface hides them too.
    public var interfaceDescriptors: [UInt8: [UInt16: [UInt8]]]

    public init(device: [UInt8], configurations: [[UInt8]], strings: [UInt8: String] = [:], others: [UInt16: [UInt8]] = [:],
                interfaceDescriptors: [UInt8: [UInt16: [UInt8]]] = [:]) {
        self.device = device; self.configurations = configurations; self.strings = strings; self.others = others
        self.interfaceDescriptors = interfaceDescriptors
    }

    public var vendorID: UInt16 { device.count >= 10 ? UInt16(device[8]) | UInt16(device[9]) << 8 : 0 }
    public var productID: UInt16 { device.count >= 12 ? UInt16(device[10]) | UInt16(device[11]) << 8 : 0 }
    /// bDeviceClass, bDeviceSubClass, bDeviceProtocol.
    public var deviceClass: (UInt8, UInt8, UInt8) { device.count >= 7 ? (device[4], device[5], device[6]) : (0, 0, 0) }
    /// bMaxPacketSize0.
    public var maxPacketSize0: Int { device.count >= 8 ? Int(device[7]) : 8 }
    /// The string the device descriptor names at `offset` (14 manufacturer, 15 product, 16 serial).
    public func string(at offset: Int) -> String? { device.count > offset ? strings[device[offset]] : nil }

    /// The configuration whose bConfigurationValue is `value`.
    public func configuration(value: UInt8) -> [UInt8]? { configurations.first { $0.count >= 6 && $0[5] == value } }

    /// The descriptors in `blob` (a configuration), each as (type, bytes); a malformed length ends the walk.
    public static func walk(_ blob: [UInt8]) -> [(type: UInt8, bytes: ArraySlice<UInt8>)] {
        var out: [(UInt8, ArraySlice<UInt8>)] = []
        var i = 0
        while i + 2 <= blob.count {
            let length = Int(blob[i])
            guard length >= 2, i + length <= blob.count else { break }
            out.append((blob[i + 1], blob[i..<(i + length)]))
            i += length
        }
        return out
    }

    /// The interfaces of configuration `value` as (number, alternate, class, subclass, protocol).
    public func interfaces(configuration value: UInt8) -> [(number: UInt8, alternate: UInt8, class: UInt8, subclass: UInt8, protocol: UInt8)] {
        guard let blob = configuration(value: value) else { return [] }
        return Self.walk(blob).compactMap { d in
            guard d.type == 4, d.bytes.count >= 9 else { return nil }
            let b = Array(d.bytes)
            return (b[2], b[3], b[5], b[6], b[7])
        }
    }
}

/// What a device tells the port it is plugged into, from any thread.
public protocol USBPortEvents: AnyObject, Sendable {
    /// The device is gone (a host device unplugged): the port reports a disconnect.
    func deviceRemoved()
}

/// A soft USB device: its descriptors, and its endpoints. The standard requests (descriptors,
/// address, configuration, interface, status, halt) are answered once for every device by the
/// tap (``USBStandardRequests``), which tells the device what changed through the `set...`
/// calls; they pass down the stack first (`submitStandard`), so that filters see them.
/// Everything else (class and vendor control requests, every other endpoint) comes to
/// `submit`. A filter stacks over any device, soft or passed through (``USBFilter``).
public protocol USBDevice: SoftDevice {
    var speed: USBSpeed { get }
    var descriptors: USBDescriptors { get }
    /// A URB for the device: complete it exactly once, now or later, from any thread. A URB
    /// that waits for the device (an interrupt IN until a key is pressed) simply stays.
    func submit(_ urb: URB)
    /// A standard request (chapter 9, on endpoint 0) on its way to the tap, which answers it
    /// (`tap` returns true) at the bottom of the stack: a filter sees it here (to record it, or
    /// to STALL one aimed at what it hides) and passes it on, synchronously, on the caller's
    /// thread. A device lets the tap answer and takes what the tap leaves (`submit`).
    func submitStandard(_ urb: URB, tap: (URB) -> Bool)
    /// Whether the device itself halted endpoint `endpoint` in direction `isIn` (a stick after an
    /// invalid CBW): GET_STATUS(ENDPOINT) reports it.
    func isHalted(endpoint: UInt8, isIn: Bool) -> Bool
    /// The guest unlinked `urb`: complete it soon with `.cancelled` (or as it ends anyway).
    func cancel(_ urb: URB)
    /// SET_CONFIGURATION (0: unconfigured).
    func setConfiguration(_ value: UInt8) -> USBStatus
    /// SET_INTERFACE.
    func setInterface(_ interface: UInt8, alternate: UInt8) -> USBStatus
    /// CLEAR_FEATURE(ENDPOINT_HALT) of endpoint `endpoint` in direction `isIn`.
    func clearHalt(endpoint: UInt8, isIn: Bool) -> USBStatus
    /// A port reset: back to the default state (unconfigured, address 0), URBs in flight cancelled.
    func reset()
    /// The port the device is plugged into, for device-initiated events; nil when unplugged.
    func attach(to port: (any USBPortEvents)?)
    /// Takes hold of what serving the device needs, once its stack is opened and admitted (a
    /// policy judged what it is) and before it is plugged: a host device detaches the kernel's
    /// drivers and claims its interfaces here, so that opening it, to read what it is, touches
    /// nothing its host uses. The tap's backend calls it once per opened stack; throwing refuses
    /// the device (the error says why and what to do). A soft device has nothing to take.
    func claim() throws
}

extension USBDevice {
    public func submitStandard(_ urb: URB, tap: (URB) -> Bool) { if !tap(urb) { submit(urb) } }
    public func isHalted(endpoint: UInt8, isIn: Bool) -> Bool { false }
    public func cancel(_ urb: URB) {}
    public func setConfiguration(_ value: UInt8) -> USBStatus { .ok }
    public func setInterface(_ interface: UInt8, alternate: UInt8) -> USBStatus { alternate == 0 ? .ok : .stall }
    public func clearHalt(endpoint: UInt8, isIn: Bool) -> USBStatus { .ok }
    public func reset() {}
    public func attach(to port: (any USBPortEvents)?) {}
    public func claim() throws {}
    public func close() {}
}

/// A device that stacks over another, soft or passed through: everything passes to `next`
/// unless overridden (descriptors rewritten, URBs refused or answered, each logged).
open class USBFilter: USBDevice, @unchecked Sendable {
    public let next: any USBDevice
    public init(next: any USBDevice) { self.next = next }
    open var name: String { "filter" }
    open var speed: USBSpeed { next.speed }
    open var descriptors: USBDescriptors { next.descriptors }
    open func submit(_ urb: URB) { next.submit(urb) }
    open func submitStandard(_ urb: URB, tap: (URB) -> Bool) { next.submitStandard(urb, tap: tap) }
    open func isHalted(endpoint: UInt8, isIn: Bool) -> Bool { next.isHalted(endpoint: endpoint, isIn: isIn) }
    open func cancel(_ urb: URB) { next.cancel(urb) }
    open func setConfiguration(_ value: UInt8) -> USBStatus { next.setConfiguration(value) }
    open func setInterface(_ interface: UInt8, alternate: UInt8) -> USBStatus { next.setInterface(interface, alternate: alternate) }
    open func clearHalt(endpoint: UInt8, isIn: Bool) -> USBStatus { next.clearHalt(endpoint: endpoint, isIn: isIn) }
    open func reset() { next.reset() }
    open func attach(to port: (any USBPortEvents)?) { next.attach(to: port) }
    open func claim() throws { try next.claim() }
    open func close() { next.close() }
}

extension SoftDeviceClass {
    /// USB devices: ``USBDevice``, served over usbif.
    public static let usb = SoftDeviceClass("usb")
}
