/// The standard requests of chapter 9 of the USB spec, answered once for every device by the
/// tap that serves it (as QEMU's usb core and host-libusb do): descriptors from the device's
/// `descriptors`, the address kept here (a guest's SET_ADDRESS never reaches a device: the
/// tap's port translates it), configuration and interface settings passed to the device and
/// remembered, status and halt. One value per plugged device, used from the tap's thread.
public struct USBStandardRequests: Sendable {
    public static let getStatus: UInt8 = 0, clearFeature: UInt8 = 1, setFeature: UInt8 = 3, setAddress: UInt8 = 5
    public static let getDescriptor: UInt8 = 6, setDescriptor: UInt8 = 7, getConfiguration: UInt8 = 8
    public static let setConfiguration: UInt8 = 9, getInterface: UInt8 = 10, setInterface: UInt8 = 11

    /// The address the guest gave the device (0 until SET_ADDRESS, and after a reset).
    public private(set) var address: UInt8 = 0
    /// bConfigurationValue in force (0: unconfigured).
    public private(set) var configuration: UInt8 = 0
    /// Alternate setting per interface.
    public private(set) var alternates: [UInt8: UInt8] = [:]
    /// Halted endpoints (number | 0x80 for IN).
    public private(set) var halted: Set<UInt8> = []

    public init() {}

    /// Back to the default state (a port reset).
    public mutating func reset() {
        address = 0; configuration = 0; alternates = [:]; halted = []
    }

    /// Answers `urb` if it is a standard request the tap handles (completing it) and returns
    /// true; false: the device gets it (class and vendor requests, other endpoints, the
    /// standard requests a device must see, such as a HID report descriptor it did not list).
    public mutating func handle(_ urb: URB, device: any USBDevice) -> Bool {
        guard urb.type == .control, urb.endpoint == 0, let setup = urb.setup, setup.kind == .standard else { return false }
        let d = device.descriptors
        switch (setup.request, setup.recipient) {
        case (Self.getDescriptor, _) where setup.isIn:
            let type = UInt8(setup.value >> 8), index = UInt8(setup.value & 0xff)
            var answer: [UInt8]?
            switch (type, setup.recipient) {
            case (1, .device): answer = d.device
            case (2, .device): answer = Int(index) < d.configurations.count ? d.configurations[Int(index)] : nil
            case (3, .device): answer = stringDescriptor(index, d)
            case (6, .device):
                // Device qualifier: what the device would be at the other speed; only a
                // high-speed capable device has one.
                guard device.speed == .high, d.device.count >= 18 else { answer = nil; break }
                answer = [10, 6, d.device[2], d.device[3], d.device[4], d.device[5], d.device[6], d.device[7], d.device[17], 0]
            default:
                if setup.recipient == .interface, let own = d.interfaceDescriptors[UInt8(truncatingIfNeeded: setup.index)]?[setup.value] {
                    answer = own
                } else if let other = d.others[setup.value] {
                    answer = other
                } else if setup.recipient != .device { return false }
            }
            guard let answer else { urb.complete(.stall); return true }
            urb.complete(in: Array(answer.prefix(Int(setup.length))))
        case (Self.setAddress, .device):
            guard setup.value <= 127 else { urb.complete(.stall); return true }
            address = UInt8(setup.value)
            urb.complete(.ok)
        case (Self.getConfiguration, .device):
            urb.complete(in: [configuration])
        case (Self.setConfiguration, .device):
            let value = UInt8(truncatingIfNeeded: setup.value)
            guard value == 0 || d.configuration(value: value) != nil else { urb.complete(.stall); return true }
            let status = device.setConfiguration(value)
            if status == .ok { configuration = value; alternates = [:]; halted = [] }
            urb.complete(status)
        case (Self.getInterface, .interface):
            guard configuration != 0 else { urb.complete(.stall); return true }
            urb.complete(in: [alternates[UInt8(truncatingIfNeeded: setup.index)] ?? 0])
        case (Self.setInterface, .interface):
            let interface = UInt8(truncatingIfNeeded: setup.index), alternate = UInt8(truncatingIfNeeded: setup.value)
            guard configuration != 0,
                  d.interfaces(configuration: configuration).contains(where: { $0.number == interface && $0.alternate == alternate }) else {
                urb.complete(.stall); return true
            }
            let status = device.setInterface(interface, alternate: alternate)
            if status == .ok { alternates[interface] = alternate }
            urb.complete(status)
        case (Self.getStatus, .device):
            let selfPowered = (d.configuration(value: configuration) ?? d.configurations.first).map { $0.count > 7 && $0[7] & 0x40 != 0 } ?? false
            urb.complete(in: [selfPowered ? 1 : 0, 0])
        case (Self.getStatus, .interface):
            urb.complete(in: [0, 0])
        case (Self.getStatus, .endpoint):
            // Halted by SET_FEATURE(ENDPOINT_HALT), or by the device itself (a stall it keeps).
            let ep = UInt8(truncatingIfNeeded: setup.index)
            let isHalted = halted.contains(ep) || device.isHalted(endpoint: ep & 0x0f, isIn: ep & 0x80 != 0)
            urb.complete(in: [isHalted ? 1 : 0, 0])
        case (Self.clearFeature, .endpoint) where setup.value == 0:   // ENDPOINT_HALT
            let ep = UInt8(truncatingIfNeeded: setup.index)
            let status = device.clearHalt(endpoint: ep & 0x0f, isIn: ep & 0x80 != 0)
            if status == .ok { halted.remove(ep) }
            urb.complete(status)
        case (Self.setFeature, .endpoint) where setup.value == 0:
            halted.insert(UInt8(truncatingIfNeeded: setup.index))
            urb.complete(.ok)
        case (Self.clearFeature, .device), (Self.setFeature, .device):
            // DEVICE_REMOTE_WAKEUP: nothing to do; TEST_MODE is refused.
            urb.complete(setup.value == 1 ? .ok : .stall)
        default:
            return false
        }
        return true
    }

    private func stringDescriptor(_ index: UInt8, _ d: USBDescriptors) -> [UInt8]? {
        if index == 0 { return [4, 3, 0x09, 0x04] }   // US English
        guard let s = d.strings[index] else { return nil }
        let units = Array(s.utf16.prefix(126))
        var out: [UInt8] = [UInt8(2 + 2 * units.count), 3]
        for u in units { out += [UInt8(u & 0xff), UInt8(u >> 8)] }
        return out
    }
}
