import CLibUSB
import Core
import Glibc

/// A libusb call that failed: the call and libusb's error code (`LIBUSB_ERROR_*`).
public struct LibUSBError: Error, Equatable, Sendable, CustomStringConvertible {
    public let call: String
    public let code: Int32
    public init(_ call: String, _ code: Int32) { self.call = call; self.code = code }
    /// libusb's name for the code, e.g. "LIBUSB_ERROR_ACCESS".
    public var name: String { String(cString: libusb_error_name(code)) }
    public var description: String { "\(call): \(name)" }

    public static let access = LIBUSB_ERROR_ACCESS.rawValue
    public static let busy = LIBUSB_ERROR_BUSY.rawValue
    public static let noDevice = LIBUSB_ERROR_NO_DEVICE.rawValue
    public static let notFound = LIBUSB_ERROR_NOT_FOUND.rawValue
    public static let pipe = LIBUSB_ERROR_PIPE.rawValue

    /// The status a device-level call (SET_CONFIGURATION, SET_INTERFACE, CLEAR_FEATURE) gives
    /// the guest when it fails: gone, or refused (a stall, as QEMU's host-libusb answers).
    var usbStatus: USBStatus { code == Self.noDevice ? .noDevice : .stall }
}

/// One device libusb enumerated: where it is and what it is.
public struct LibUSBDeviceInfo: Equatable, Sendable, CustomStringConvertible {
    public var bus: UInt8
    /// The port numbers from the root hub down (empty for a root hub).
    public var portPath: [UInt8]
    public var address: UInt8
    public var vendorID: UInt16
    public var productID: UInt16
    public var deviceClass: UInt8
    /// sysfs's name for it and USBGuard's via-port: "1-2", "3-1.4".
    public var busPort: String { "\(bus)-" + portPath.map { String(Int($0)) }.joined(separator: ".") }
    /// The usbfs node libusb opens.
    public var node: String { "/dev/bus/usb/" + Self.pad3(bus) + "/" + Self.pad3(address) }
    public var description: String { "\(USBDeviceIDPattern(vendor: vendorID, product: productID)) at \(busPort)" }
    static func pad3(_ v: UInt8) -> String { let s = String(v); return String(repeating: "0", count: 3 - s.count) + s }
}

/// A libusb context: the devices it sees and the event loop of their transfers. Enumeration
/// needs neither udevd nor hotplug: libusb reads sysfs (and usbfs) at each device list.
final class LibUSBContext: @unchecked Sendable {
    let raw: OpaquePointer

    init() throws(LibUSBError) {
        var context: OpaquePointer?
        let rc = libusb_init(&context)
        guard rc == 0, let context else { throw LibUSBError("libusb_init", rc) }
        raw = context
    }

    deinit { libusb_exit(raw) }

    /// Runs `body` over the devices present (hubs included), each with its description; the
    /// list is freed after (a device `body` opened keeps its own reference).
    func withDevices<T>(_ body: ([(device: OpaquePointer, info: LibUSBDeviceInfo)]) throws -> T) throws -> T {
        var list: UnsafeMutablePointer<OpaquePointer?>?
        let n = libusb_get_device_list(raw, &list)
        guard n >= 0, let list else { throw LibUSBError("libusb_get_device_list", Int32(truncatingIfNeeded: n)) }
        defer { libusb_free_device_list(list, 1) }
        var devices: [(OpaquePointer, LibUSBDeviceInfo)] = []
        for i in 0..<Int(n) {
            guard let device = list[i] else { continue }
            var d = libusb_device_descriptor()
            guard libusb_get_device_descriptor(device, &d) == 0 else { continue }
            var ports = [UInt8](repeating: 0, count: 8)
            let depth = libusb_get_port_numbers(device, &ports, Int32(ports.count))
            devices.append((device, LibUSBDeviceInfo(bus: libusb_get_bus_number(device), portPath: Array(ports.prefix(Int(max(0, depth)))),
                                                     address: libusb_get_device_address(device), vendorID: d.idVendor,
                                                     productID: d.idProduct, deviceClass: d.bDeviceClass)))
        }
        return try body(devices)
    }

    /// The devices present.
    func devices() throws -> [LibUSBDeviceInfo] { try withDevices { $0.map(\.info) } }

    /// Handles transfer completions for up to `seconds` (or until interrupted).
    func handleEvents(seconds: Int) {
        var tv = timeval(tv_sec: seconds, tv_usec: 0)
        _ = libusb_handle_events_timeout_completed(raw, &tv, nil)
    }

    /// Makes a `handleEvents` in progress on another thread return now.
    func interruptEvents() { libusb_interrupt_event_handler(raw) }
}

/// The raw descriptors of an open device, as the bus gives them: what the tap answers
/// GET_DESCRIPTOR from.
enum LibUSBDescriptorReader {
    /// The device descriptor (libusb's copy), each configuration's whole blob and the strings
    /// the descriptors name. The configurations come from sysfs's `descriptors` (what the
    /// kernel read at enumeration, and what USBGuard hashes; no bus traffic) when `sysfs`
    /// (the device's directory) has them, else from GET_DESCRIPTOR through `handle`.
    static func read(device: OpaquePointer, handle: OpaquePointer, sysfs: String?) throws(LibUSBError) -> USBDescriptors {
        var d = libusb_device_descriptor()
        let rc = libusb_get_device_descriptor(device, &d)
        guard rc == 0 else { throw LibUSBError("libusb_get_device_descriptor", rc) }
        var configurations: [[UInt8]] = []
        if let sysfs, let raw = readFile(sysfs + "/descriptors") {
            configurations = USBHostDescriptors.split(raw).configurations
        }
        for index in UInt8(configurations.count)..<max(UInt8(configurations.count), d.bNumConfigurations) {
            // The 9-byte header first: its wTotalLength says how long the whole blob is.
            var head = [UInt8](repeating: 0, count: 9)
            let n = libusb_get_descriptor(handle, UInt8(LIBUSB_DT_CONFIG.rawValue), index, &head, Int32(head.count))
            guard n >= 4 else { throw LibUSBError("GET_DESCRIPTOR(configuration \(index))", n < 0 ? n : LIBUSB_ERROR_IO.rawValue) }
            var blob = [UInt8](repeating: 0, count: max(9, Int(head[2]) | Int(head[3]) << 8))
            let m = libusb_get_descriptor(handle, UInt8(LIBUSB_DT_CONFIG.rawValue), index, &blob, Int32(blob.count))
            guard m >= 9 else { throw LibUSBError("GET_DESCRIPTOR(configuration \(index))", m < 0 ? m : LIBUSB_ERROR_IO.rawValue) }
            configurations.append(Array(blob.prefix(Int(m))))
        }
        let deviceBytes = USBHostDescriptors.deviceDescriptor(d)
        var strings: [UInt8: [UInt8]] = [:]
        let indexes = USBHostDescriptors.stringIndexes(device: deviceBytes, configurations: configurations)
        if !indexes.isEmpty {
            // The first language the device offers (index 0 lists them), US English if none.
            var buffer = [UInt8](repeating: 0, count: 255)
            let n = libusb_get_string_descriptor(handle, 0, 0, &buffer, Int32(buffer.count))
            let language = n >= 4 ? UInt16(buffer[2]) | UInt16(buffer[3]) << 8 : 0x0409
            for index in indexes {
                let m = libusb_get_string_descriptor(handle, index, language, &buffer, Int32(buffer.count))
                if m >= 2 { strings[index] = Array(buffer.prefix(Int(m))) }
            }
        }
        return USBHostDescriptors.descriptors(device: deviceBytes, configurations: configurations, strings: strings)
    }

    /// A small binary file's bytes (sysfs caps `descriptors` at 64 KiB).
    static func readFile(_ path: String) -> [UInt8]? {
        guard let f = fopen(path, "rb") else { return nil }
        defer { fclose(f) }
        var bytes: [UInt8] = []
        var chunk = [UInt8](repeating: 0, count: 4096)
        while true {
            let n = fread(&chunk, 1, chunk.count, f)
            bytes += chunk[0..<n]
            if n < chunk.count { break }
        }
        return bytes.isEmpty ? nil : bytes
    }
}

/// How libusb's results become the tap's statuses (as QEMU's host-libusb maps them, with
/// `.cancelled` for a transfer an unlink cancelled).
enum LibUSBStatus {
    static func urbStatus(_ status: libusb_transfer_status) -> USBStatus {
        switch status {
        case LIBUSB_TRANSFER_COMPLETED: return .ok
        case LIBUSB_TRANSFER_STALL: return .stall
        case LIBUSB_TRANSFER_NO_DEVICE: return .noDevice
        case LIBUSB_TRANSFER_OVERFLOW: return .babble
        case LIBUSB_TRANSFER_CANCELLED: return .cancelled
        default: return .ioError   // TIMED_OUT, ERROR
        }
    }

    /// A transfer libusb refused to submit.
    static func submitStatus(_ code: Int32) -> USBStatus {
        switch code {
        case LIBUSB_ERROR_NO_DEVICE.rawValue: return .noDevice
        case LIBUSB_ERROR_PIPE.rawValue: return .stall
        case LIBUSB_ERROR_INVALID_PARAM.rawValue: return .invalid
        default: return .ioError
        }
    }

    /// USBSpeed from `libusb_get_device_speed`: nil for SuperSpeed and faster (usbif has no
    /// SuperSpeed) and for an unknown speed.
    static func speed(_ speed: Int32) -> USBSpeed? {
        switch speed {
        case Int32(LIBUSB_SPEED_LOW.rawValue): return .low
        case Int32(LIBUSB_SPEED_FULL.rawValue): return .full
        case Int32(LIBUSB_SPEED_HIGH.rawValue): return .high
        default: return nil
        }
    }
}

/// Raw descriptor bytes (as libusb, usbfs and the bus give them) into ``USBDescriptors``:
/// pure functions, so that a test can feed a device's bytes without the device.
enum USBHostDescriptors {
    /// The 18 bytes of the device descriptor from libusb's parsed copy (its fields in host
    /// order, written back little-endian).
    static func deviceDescriptor(_ d: libusb_device_descriptor) -> [UInt8] {
        func le(_ v: UInt16) -> [UInt8] { [UInt8(v & 0xff), UInt8(v >> 8)] }
        return [d.bLength, d.bDescriptorType] + le(d.bcdUSB) + [d.bDeviceClass, d.bDeviceSubClass, d.bDeviceProtocol, d.bMaxPacketSize0]
            + le(d.idVendor) + le(d.idProduct) + le(d.bcdDevice) + [d.iManufacturer, d.iProduct, d.iSerialNumber, d.bNumConfigurations]
    }

    /// The string indexes the descriptors name (iManufacturer, iProduct, iSerialNumber,
    /// each iConfiguration and iInterface), once each, in order; 0 (none) left out.
    static func stringIndexes(device: [UInt8], configurations: [[UInt8]]) -> [UInt8] {
        var indexes: [UInt8] = device.count >= 17 ? [device[14], device[15], device[16]] : []
        for blob in configurations {
            for d in USBDescriptors.walk(blob) {
                let b = d.bytes.startIndex
                if d.type == 2 && d.bytes.count >= 7 { indexes.append(d.bytes[b + 6]) }
                if d.type == 4 && d.bytes.count >= 9 { indexes.append(d.bytes[b + 8]) }
            }
        }
        var seen = Set<UInt8>()
        return indexes.filter { $0 != 0 && seen.insert($0).inserted }
    }

    /// A string descriptor's text (bLength, 3, UTF-16LE); nil if it is not one.
    static func string(fromDescriptor bytes: [UInt8]) -> String? {
        guard bytes.count >= 2, bytes[1] == 3 else { return nil }
        let end = min(bytes.count, Int(bytes[0])) & ~1
        guard end >= 2 else { return nil }
        let units = stride(from: 2, to: end, by: 2).map { UInt16(bytes[$0]) | UInt16(bytes[$0 + 1]) << 8 }
        return String(decoding: units, as: UTF16.self)
    }

    /// The device descriptor, each configuration cut to its wTotalLength (a blob that is not
    /// a configuration descriptor is left out) and the strings decoded.
    static func descriptors(device: [UInt8], configurations: [[UInt8]], strings: [UInt8: [UInt8]]) -> USBDescriptors {
        let configs = configurations.compactMap { blob -> [UInt8]? in
            guard blob.count >= 9, blob[0] >= 9, blob[1] == 2 else { return nil }
            let total = Int(blob[2]) | Int(blob[3]) << 8
            return Array(blob.prefix(max(9, total)))
        }
        return USBDescriptors(device: Array(device.prefix(18)), configurations: configs,
                              strings: strings.compactMapValues { string(fromDescriptor: $0) })
    }

    /// A sysfs `descriptors` file (or a usbfs node's read): the device descriptor, then each
    /// configuration's whole blob, back to back.
    static func split(_ raw: [UInt8]) -> (device: [UInt8], configurations: [[UInt8]]) {
        guard raw.count >= 18 else { return (raw, []) }
        var configurations: [[UInt8]] = []
        var i = 18
        while i + 4 <= raw.count {
            let total = Int(raw[i + 2]) | Int(raw[i + 3]) << 8
            guard raw[i + 1] == 2, total >= 9, i + total <= raw.count else { break }
            configurations.append(Array(raw[i..<(i + total)]))
            i += total
        }
        return (Array(raw.prefix(18)), configurations)
    }
}
