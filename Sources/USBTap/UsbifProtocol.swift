import CXen
import Core

/// usbif's URB ring (io/usbif.h): 148-byte requests, 16-byte responses; one page holds 16.
public enum UsbifURBRing: RingTypes {
    public typealias Request = usbif_urb_request
    public typealias Response = usbif_urb_response
    public static var entrySize: Int { MemoryLayout<usbif_urb_sring_entry>.size }
}

/// usbif's connection ring: the frontend posts dummy requests, the backend answers one per
/// plug or unplug with the port and the speed (0: unplugged).
public enum UsbifConnRing: RingTypes {
    public typealias Request = usbif_conn_request
    public typealias Response = usbif_conn_response
    public static var entrySize: Int { MemoryLayout<usbif_conn_sring_entry>.size }
}

/// Numbers fixed by io/usbif.h and by what Linux's xen-hcd expects.
public enum Usbif {
    public static let maxSegments = Int(USBIF_MAX_SEGMENTS_PER_REQUEST)
    public static let maxPorts = Int(USBIF_MAX_PORTNR)
    public static let shortNotOK = UInt16(USBIF_SHORT_NOT_OK)
    public static let speedNone = UInt8(USBIF_SPEED_NONE)

    /// The fields of a request's `pipe`.
    public struct Pipe: Equatable, Sendable {
        public var port: Int
        public var isUnlink: Bool
        public var isIn: Bool
        public var device: UInt8
        public var endpoint: UInt8
        public var type: USBTransferType
        public init(_ pipe: UInt32) {
            port = Int(pipe & UInt32(USBIF_PIPE_PORT_MASK))
            isUnlink = pipe & UInt32(USBIF_PIPE_UNLINK) != 0
            isIn = pipe & UInt32(USBIF_PIPE_DIR) != 0
            device = UInt8((pipe >> UInt32(USBIF_PIPE_DEV_SHIFT)) & UInt32(USBIF_PIPE_DEV_MASK))
            endpoint = UInt8((pipe >> UInt32(USBIF_PIPE_EP_SHIFT)) & UInt32(USBIF_PIPE_EP_MASK))
            type = USBTransferType(rawValue: UInt8((pipe >> UInt32(USBIF_PIPE_TYPE_SHIFT)) & UInt32(USBIF_PIPE_TYPE_MASK)))!
        }
        public init(port: Int, isIn: Bool, device: UInt8, endpoint: UInt8, type: USBTransferType, isUnlink: Bool = false) {
            self.port = port; self.isIn = isIn; self.device = device; self.endpoint = endpoint; self.type = type; self.isUnlink = isUnlink
        }
        public var rawValue: UInt32 {
            UInt32(port) & UInt32(USBIF_PIPE_PORT_MASK) | (isUnlink ? UInt32(USBIF_PIPE_UNLINK) : 0) | (isIn ? UInt32(USBIF_PIPE_DIR) : 0)
                | UInt32(device & 0x7f) << UInt32(USBIF_PIPE_DEV_SHIFT) | UInt32(endpoint & 0xf) << UInt32(USBIF_PIPE_EP_SHIFT)
                | UInt32(type.rawValue) << UInt32(USBIF_PIPE_TYPE_SHIFT)
        }
    }

    /// The 16 segments of a request, as an array.
    public static func segments(_ r: usbif_urb_request) -> [usbif_request_segment] {
        withUnsafeBytes(of: r.seg) { Array($0.bindMemory(to: usbif_request_segment.self)) }
    }
    /// A request's setup packet (a control URB).
    public static func setup(_ r: usbif_urb_request) -> USBSetup {
        USBSetup(withUnsafeBytes(of: r.u.ctrl) { Array($0) })
    }
}
