import Core

/// The descriptors of SoftDev's soft USB devices, built the one way: a device descriptor
/// naming strings 1 (manufacturer), 2 (product) and 3 (serial), and one configuration of one
/// interface whose class-specific descriptors and endpoints follow it.
enum USBDescriptorBuilder {
    /// pid.codes' vendor ID for open-source devices; SoftDev uses its test product IDs.
    static let vendorID: UInt16 = 0x1209

    struct Endpoint {
        var address: UInt8, type: USBTransferType, maxPacket: UInt16, interval: UInt8
    }

    static func make(productID: UInt16, maxPacket0: UInt8, interfaceClass: (UInt8, UInt8, UInt8), classDescriptors: [UInt8] = [],
                     endpoints: [Endpoint], maxPowerMilliamps: Int, manufacturer: String, product: String, serial: String?,
                     interfaceDescriptors: [UInt8: [UInt16: [UInt8]]] = [:]) -> USBDescriptors {
        let device: [UInt8] = [18, 1, 0x00, 0x02, 0, 0, 0, maxPacket0, UInt8(vendorID & 0xff), UInt8(vendorID >> 8),
                               UInt8(productID & 0xff), UInt8(productID >> 8), 0x00, 0x01, 1, 2, serial == nil ? 0 : 3, 1]
        var config: [UInt8] = [9, 2, 0, 0, 1, 1, 0, 0x80, UInt8(min(255, maxPowerMilliamps / 2))]
        config += [9, 4, 0, 0, UInt8(endpoints.count), interfaceClass.0, interfaceClass.1, interfaceClass.2, 0]
        config += classDescriptors
        for e in endpoints {
            config += [7, 5, e.address, attributes(e.type), UInt8(e.maxPacket & 0xff), UInt8(e.maxPacket >> 8), e.interval]
        }
        config[2] = UInt8(config.count & 0xff); config[3] = UInt8(config.count >> 8)
        var strings: [UInt8: String] = [1: manufacturer, 2: product]
        if let serial { strings[3] = serial }
        return USBDescriptors(device: device, configurations: [config], strings: strings, interfaceDescriptors: interfaceDescriptors)
    }

    /// An endpoint descriptor's bmAttributes transfer type (USB 2.0 table 9-13: control 0,
    /// isochronous 1, bulk 2, interrupt 3), which is not usbif's pipe numbering (`rawValue`).
    static func attributes(_ type: USBTransferType) -> UInt8 {
        switch type {
        case .control: return 0
        case .isochronous: return 1
        case .bulk: return 2
        case .interrupt: return 3
        }
    }
}

extension Array where Element == URB {
    /// Takes `urb` out of a device's list of waiting URBs; false if it is not there (done already).
    mutating func removeURB(_ urb: URB) -> Bool {
        guard let i = firstIndex(where: { $0 === urb }) else { return false }
        remove(at: i)
        return true
    }
}
