import Synchronization

/// The four kinds of USB transfer, numbered as usbif's pipe and the USB spec number them.
public enum USBTransferType: UInt8, Sendable, CustomStringConvertible {
    case isochronous = 0, interrupt = 1, control = 2, bulk = 3
    public var description: String { ["isochronous", "interrupt", "control", "bulk"][Int(rawValue)] }
}

/// A device's speed as usbif's connection ring reports it (no SuperSpeed in usbif).
public enum USBSpeed: UInt8, Sendable, CustomStringConvertible {
    case low = 1, full = 2, high = 3
    public var description: String { ["", "low", "full", "high"][Int(rawValue)] }
}

/// How a URB ended: 0 or a negative Linux errno, the values usbif and USB/IP carry.
public struct USBStatus: RawRepresentable, Equatable, Hashable, Sendable, CustomStringConvertible {
    public let rawValue: Int32
    public init(rawValue: Int32) { self.rawValue = rawValue }
    public static let ok = USBStatus(rawValue: 0)
    /// No device on the port, or it went away.
    public static let noDevice = USBStatus(rawValue: -19)
    /// A malformed request.
    public static let invalid = USBStatus(rawValue: -22)
    /// The endpoint stalled (or the device refused a control request).
    public static let stall = USBStatus(rawValue: -32)
    /// A transfer failed on the wire; also a URB cancelled by an unlink (QEMU's -EPROTO).
    public static let ioError = USBStatus(rawValue: -71)
    /// The device sent more than the buffer holds.
    public static let babble = USBStatus(rawValue: -75)
    /// The controller is going away.
    public static let shutdown = USBStatus(rawValue: -108)
    /// Cancelled by an unlink: what usbif's frontend gets for the URB it unlinked.
    public static let cancelled = ioError
    public var description: String {
        switch self {
        case .ok: return "ok"
        case .noDevice: return "ENODEV"
        case .invalid: return "EINVAL"
        case .stall: return "stall"
        case .ioError: return "EPROTO"
        case .babble: return "EOVERFLOW"
        case .shutdown: return "ESHUTDOWN"
        default: return "errno \(-rawValue)"
        }
    }
}

/// A control transfer's 8-byte setup packet.
public struct USBSetup: Equatable, Sendable, CustomStringConvertible {
    public var requestType: UInt8
    public var request: UInt8
    public var value: UInt16
    public var index: UInt16
    public var length: UInt16

    public init(requestType: UInt8, request: UInt8, value: UInt16, index: UInt16, length: UInt16) {
        self.requestType = requestType; self.request = request; self.value = value; self.index = index; self.length = length
    }
    /// From the 8 bytes on the wire (little-endian fields).
    public init(_ b: [UInt8]) {
        precondition(b.count >= 8)
        self.init(requestType: b[0], request: b[1], value: UInt16(b[2]) | UInt16(b[3]) << 8,
                  index: UInt16(b[4]) | UInt16(b[5]) << 8, length: UInt16(b[6]) | UInt16(b[7]) << 8)
    }
    public var bytes: [UInt8] {
        [requestType, request, UInt8(value & 0xff), UInt8(value >> 8), UInt8(index & 0xff), UInt8(index >> 8),
         UInt8(length & 0xff), UInt8(length >> 8)]
    }

    public enum Kind: UInt8, Sendable { case standard = 0, `class` = 1, vendor = 2, reserved = 3 }
    public enum Recipient: UInt8, Sendable { case device = 0, interface = 1, endpoint = 2, other = 3 }
    /// Data flows device-to-host.
    public var isIn: Bool { requestType & 0x80 != 0 }
    public var kind: Kind { Kind(rawValue: (requestType >> 5) & 3)! }
    public var recipient: Recipient { Recipient(rawValue: min(requestType & 0x1f, 3))! }

    public var description: String {
        "setup(\(String(requestType, radix: 16)) \(String(request, radix: 16)) value=\(String(value, radix: 16)) index=\(index) length=\(length))"
    }
}

/// One packet of an isochronous URB, as usb_iso_packet_descriptor lays it out (16 bytes on
/// the wire): where it is in the buffer, how long, and how it went.
public struct USBIsoPacket: Equatable, Sendable {
    public var offset: UInt32
    public var length: UInt32
    public var actualLength: UInt32
    public var status: Int32
    public init(offset: UInt32, length: UInt32, actualLength: UInt32 = 0, status: Int32 = 0) {
        self.offset = offset; self.length = length; self.actualLength = actualLength; self.status = status
    }
}

/// Where a URB's completion goes: the tap that took it from a guest (or a test).
public protocol URBCompletionSink: AnyObject, Sendable {
    func completed(_ urb: URB)
}

/// A USB request block: one transfer to or from one endpoint of a device, as a guest's host
/// controller driver submits it. The transport owns `buffer` (OUT: the data to send; IN: room
/// for what comes back) until the URB completes; the device fills `actualLength` (and the ISO
/// packets' results) and calls `complete` exactly once, from any thread.
public final class URB: @unchecked Sendable {
    /// Endpoint number, 0-15 (0: the control endpoint).
    public let endpoint: UInt8
    /// Device-to-host.
    public let isIn: Bool
    public let type: USBTransferType
    /// The setup packet of a control transfer.
    public let setup: USBSetup?
    /// The data: `buffer.count` is the transfer length.
    public let buffer: UnsafeMutableRawBufferPointer
    /// An isochronous URB's packets, results filled by the device.
    public var isoPackets: [USBIsoPacket]
    /// A short IN transfer is an error (URB_SHORT_NOT_OK).
    public let shortNotOK: Bool
    /// Polling interval of an interrupt or isochronous endpoint, in (micro)frames.
    public let interval: UInt16
    /// Bytes transferred, set by the device before `complete`.
    public var actualLength = 0
    /// Isochronous: the frame the transfer started in; errors among the packets.
    public var startFrame: UInt16 = 0
    public var errorCount: Int32 = 0
    /// The transport's name for it (a ring slot).
    public let tag: Int
    public private(set) var status = USBStatus.ok
    private let sink: any URBCompletionSink
    private let done = Atomic<Bool>(false)

    public init(endpoint: UInt8, isIn: Bool, type: USBTransferType, setup: USBSetup? = nil, buffer: UnsafeMutableRawBufferPointer,
                isoPackets: [USBIsoPacket] = [], shortNotOK: Bool = false, interval: UInt16 = 0, tag: Int, sink: any URBCompletionSink) {
        self.endpoint = endpoint; self.isIn = isIn; self.type = type; self.setup = setup; self.buffer = buffer
        self.isoPackets = isoPackets; self.shortNotOK = shortNotOK; self.interval = interval; self.tag = tag; self.sink = sink
    }

    /// Ends the URB with `status` (`actualLength` says how much moved). Only the first call
    /// counts: a device that completes twice does not answer the guest twice.
    public func complete(_ status: USBStatus) {
        guard !done.exchange(true, ordering: .acquiringAndReleasing) else { return }
        self.status = status
        if actualLength > buffer.count { actualLength = buffer.count }
        sink.completed(self)
    }

    /// Completes an IN transfer with `bytes` (cut to the buffer, babble if longer).
    public func complete(in bytes: [UInt8]) {
        let n = min(bytes.count, buffer.count)
        if n > 0 { buffer.copyBytes(from: bytes[0..<n]) }
        actualLength = n
        complete(bytes.count > buffer.count ? .babble : .ok)
    }

    public var isCompleted: Bool { done.load(ordering: .acquiring) }

    /// "bulk IN ep1 512 bytes".
    public var summary: String {
        "\(type) \(isIn ? "IN" : "OUT") ep\(endpoint) \(buffer.count) bytes" + (setup.map { " \($0)" } ?? "")
    }
}
