import Core

/// Linux's `virtio_net_hdr` (10 bytes, little-endian), which a TAP opened with `IFF_VNET_HDR`
/// puts before every frame both ways, and its mapping to and from ``FrameOffload``.
///
/// Guest → TAP (``fromGuest(_:)``): `.partial(start, offset)` → `NEEDS_CSUM` with
/// `csum_start`/`csum_offset`; a TCP segment → `gso_type` TCPV4/TCPV6 with `gso_size` and
/// `hdr_len` (all headers); `.validated` → `DATA_VALID`, which tun ignores on write (its
/// `virtio_net_hdr_to_skb` reads only `NEEDS_CSUM` and the GSO fields, so the skb stays
/// CHECKSUM_NONE and the kernel checks the checksum itself): harmless and honest.
///
/// TAP → guest (``offload(frameLength:)``): `NEEDS_CSUM` → `.partial`, `DATA_VALID` →
/// `.validated`, TCPV4/TCPV6 → a segmentation; the ECN bit, the UDP types and unknown ones
/// (never enabled by ``TapDevice``) make the frame a drop.
public struct VirtioNetHeader: Equatable, Sendable {
    public static let size = 10
    // flags
    public static let needsChecksum: UInt8 = 1
    public static let dataValid: UInt8 = 2
    // gso_type
    public static let gsoNone: UInt8 = 0
    public static let gsoTCPv4: UInt8 = 1
    public static let gsoUDP: UInt8 = 3
    public static let gsoTCPv6: UInt8 = 4
    public static let gsoUDPL4: UInt8 = 5
    public static let gsoECN: UInt8 = 0x80

    public var flags: UInt8
    public var gsoType: UInt8
    /// `hdr_len`: the headers' length before the payload of a GSO frame.
    public var headerLength: UInt16
    public var gsoSize: UInt16
    public var checksumStart: UInt16
    public var checksumOffset: UInt16

    public init(flags: UInt8 = 0, gsoType: UInt8 = 0, headerLength: UInt16 = 0, gsoSize: UInt16 = 0,
                checksumStart: UInt16 = 0, checksumOffset: UInt16 = 0) {
        self.flags = flags; self.gsoType = gsoType; self.headerLength = headerLength; self.gsoSize = gsoSize
        self.checksumStart = checksumStart; self.checksumOffset = checksumOffset
    }

    /// Decodes the first ten bytes of `bytes` (which must hold them).
    public init(_ bytes: UnsafeRawBufferPointer) {
        precondition(bytes.count >= Self.size)
        func le16(_ o: Int) -> UInt16 { UInt16(bytes[o]) | UInt16(bytes[o + 1]) << 8 }
        self.init(flags: bytes[0], gsoType: bytes[1], headerLength: le16(2), gsoSize: le16(4),
                  checksumStart: le16(6), checksumOffset: le16(8))
    }

    /// Encodes the header into the first ten bytes of `bytes`.
    public func write(to bytes: UnsafeMutableRawBufferPointer) {
        precondition(bytes.count >= Self.size)
        func le16(_ o: Int, _ v: UInt16) { bytes[o] = UInt8(v & 0xff); bytes[o + 1] = UInt8(v >> 8) }
        bytes[0] = flags; bytes[1] = gsoType
        le16(2, headerLength); le16(4, gsoSize); le16(6, checksumStart); le16(8, checksumOffset)
    }

    /// The ten bytes.
    public var bytes: [UInt8] {
        var b = [UInt8](repeating: 0, count: Self.size)
        b.withUnsafeMutableBytes { write(to: $0) }
        return b
    }

    /// The header a frame from the guest is written with; nil if the frame must be dropped (a
    /// GSO frame whose headers do not parse as TCP over the IP version its kind says). A GSO
    /// frame the sender did not mark partial gets its pseudo-header sum written and
    /// `NEEDS_CSUM` (as netback does), so `frame` may change.
    public static func fromGuest(_ frame: inout EthernetFrame) -> VirtioNetHeader? {
        var header = VirtioNetHeader()
        if let gso = frame.offload.segmentation {
            guard let h = FrameHeaders(frame), h.transportProtocol == FrameHeaders.tcp, !h.isFragment,
                  h.network == (gso.kind == .tcpv4 ? .ipv4 : .ipv6), gso.size > 0,
                  h.headerLength <= Int(UInt16.max) else { return nil }
            if case .partial = frame.offload.checksum {} else {
                guard FrameChecksum.preparePartial(&frame, headers: h) else { return nil }
            }
            header.gsoType = gso.kind == .tcpv4 ? gsoTCPv4 : gsoTCPv6
            header.gsoSize = gso.size
            header.headerLength = UInt16(h.headerLength)
        }
        switch frame.offload.checksum {
        case .none: break
        case .validated: header.flags = dataValid
        case let .partial(start, offset):
            header.flags = needsChecksum
            header.checksumStart = start
            header.checksumOffset = offset
        }
        return header
    }

    /// The offload of a frame of `frameLength` bytes read after this header; nil if the frame
    /// must be dropped (ECN, UDP or unknown GSO, a GSO size of 0, a checksum outside the frame).
    public func offload(frameLength: Int) -> FrameOffload? {
        var offload = FrameOffload()
        switch gsoType {
        case Self.gsoNone: break
        case Self.gsoTCPv4 where gsoSize > 0: offload.segmentation = .init(kind: .tcpv4, size: gsoSize)
        case Self.gsoTCPv6 where gsoSize > 0: offload.segmentation = .init(kind: .tcpv6, size: gsoSize)
        default: return nil
        }
        if flags & Self.needsChecksum != 0 {
            guard Int(checksumStart) + Int(checksumOffset) + 2 <= frameLength else { return nil }
            offload.checksum = .partial(start: checksumStart, offset: checksumOffset)
        } else if flags & Self.dataValid != 0 {
            offload.checksum = .validated
        }
        return offload
    }
}
