/// Software segmentation: cuts a TCP segment larger than the wire's MTU (a frame carrying
/// ``FrameOffload/Segmentation``, as a guest's netfront with `feature-gso-tcpv4/6` sends them)
/// into the segments a sender without TSO would have put on the wire, for a taker that cannot
/// take the large frame (a guest whose netfront did not negotiate GSO, behind a switch or a
/// stack). What Linux's `skb_gso_segment` does for such a device (`inet_gso_segment`,
/// `ipv6_gso_segment`, `tcp_gso_segment`):
/// - each segment is the frame's headers (Ethernet, VLAN tags, IP with its options or extension
///   headers, TCP with its options) and the next `size` payload bytes, the last one shorter;
/// - IPv4: total length per segment, the identification counting up from the frame's, the
///   header checksum computed again; IPv6: payload length per segment;
/// - TCP: the sequence number advanced by the payload before it; FIN and PSH only on the last
///   segment, CWR only on the first; the checksum partial (the pseudo-header sum in the field,
///   the frame marked `.partial`) for a taker that finishes checksums, else computed
///   (`.validated`).
///
/// A frame whose payload fits one segment comes out as one segment built the same way.
/// Anything that cannot be cut is refused with a ``Refusal``, never trapped on: the caller
/// drops the frame and counts it.
///
/// ```swift
/// if offloads.mustSegment(frame) {
///     guard let segments = try? GSOSegmenter.segment(frame, for: offloads) else { return drop() }
///     receiver.toGuest(segments)
/// }
/// ```
public enum GSOSegmenter {
    /// Why a frame could not be cut.
    public enum Refusal: Error, Equatable, Sendable, CustomStringConvertible {
        /// It carries no segmentation.
        case notSegmented
        /// Its segment size is 0.
        case zeroSize
        /// Its headers do not parse (truncated, not IP).
        case unreadableHeaders
        /// Not a whole TCP segment over the IP version its kind says (UDP, a fragment, IPv6
        /// for a TCPv4 segmentation).
        case notTCP
        /// A segment would not fit IP's 16-bit length.
        case segmentTooLong
        public var description: String {
            switch self {
            case .notSegmented: return "the frame carries no segmentation"
            case .zeroSize: return "a segment size of 0"
            case .unreadableHeaders: return "headers that do not parse"
            case .notTCP: return "not a whole TCP segment over the IP version its segmentation names"
            case .segmentTooLong: return "a segment longer than IP's length field holds"
            }
        }
    }

    // TCP flag bits (byte 13 of the header).
    static let fin: UInt8 = 0x01, psh: UInt8 = 0x08, cwr: UInt8 = 0x80

    /// `frame` cut for a taker of `offloads`: checksums left partial if it finishes them.
    public static func segment(_ frame: EthernetFrame, for offloads: NetOffloads) throws(Refusal) -> [EthernetFrame] {
        try segment(frame, partialChecksums: offloads.contains(.checksum))
    }

    /// `frame` cut into segments of its segmentation's size, in order.
    public static func segment(_ frame: EthernetFrame, partialChecksums: Bool) throws(Refusal) -> [EthernetFrame] {
        guard let gso = frame.offload.segmentation else { throw .notSegmented }
        guard gso.size > 0 else { throw .zeroSize }
        guard let h = FrameHeaders(frame) else { throw .unreadableHeaders }
        guard h.transportProtocol == FrameHeaders.tcp, !h.isFragment, h.network == (gso.kind == .tcpv4 ? .ipv4 : .ipv6) else {
            throw .notTCP
        }
        let headerLength = h.headerLength, size = Int(gso.size)
        let payload = frame.count - headerLength
        let count = max(1, (payload + size - 1) / size)
        // The longest segment's IP length (total length for IPv4, payload length for IPv6).
        let longest = headerLength + min(size, payload) - h.networkOffset - (h.network == .ipv6 ? 40 : 0)
        guard longest <= Int(UInt16.max) else { throw .segmentTooLong }
        let ip = h.networkOffset, tcp = h.transportOffset
        return frame.withUnsafeBytes { source in
            let id = be16(source, ip + 4)
            let sequence = UInt32(be16(source, tcp + 4)) << 16 | UInt32(be16(source, tcp + 6))
            let flags = source[tcp + 13]
            var segments: [EthernetFrame] = []
            segments.reserveCapacity(count)
            for i in 0..<count {
                let offset = headerLength + i * size
                let length = min(size, payload - i * size)
                var segment = EthernetFrame(count: headerLength + length, queue: frame.queue) { b in
                    b.copyMemory(from: UnsafeRawBufferPointer(rebasing: source[0..<headerLength]))
                    if length > 0 {
                        UnsafeMutableRawBufferPointer(rebasing: b[headerLength...])
                            .copyMemory(from: UnsafeRawBufferPointer(rebasing: source[offset..<(offset + length)]))
                    }
                    switch h.network {
                    case .ipv4:
                        put16(b, ip + 2, UInt16(b.count - ip))
                        put16(b, ip + 4, id &+ UInt16(truncatingIfNeeded: i))
                        put16(b, ip + 10, 0)
                        put16(b, ip + 10, ~FrameChecksum.fold(FrameChecksum.sum(UnsafeRawBufferPointer(rebasing: b[ip..<tcp]))))
                    case .ipv6:
                        put16(b, ip + 4, UInt16(b.count - ip - 40))
                    }
                    let s = sequence &+ UInt32(truncatingIfNeeded: i * size)
                    put16(b, tcp + 4, UInt16(s >> 16)); put16(b, tcp + 6, UInt16(s & 0xffff))
                    var f = flags
                    if i + 1 < count { f &= ~(fin | psh) }
                    if i > 0 { f &= ~cwr }
                    b[tcp + 13] = f
                }
                // The headers are the frame's, so they parse the same: the pseudo-header sum,
                // then the whole checksum for a taker that does not finish it.
                FrameChecksum.preparePartial(&segment, headers: h)
                if !partialChecksums { FrameChecksum.complete(&segment) }
                segments.append(segment)
            }
            return segments
        }
    }

    static func be16(_ b: UnsafeRawBufferPointer, _ o: Int) -> UInt16 { UInt16(b[o]) << 8 | UInt16(b[o + 1]) }
    static func put16(_ b: UnsafeMutableRawBufferPointer, _ o: Int, _ v: UInt16) {
        b[o] = UInt8(v >> 8); b[o + 1] = UInt8(v & 0xff)
    }
}

extension NetOffloads {
    /// Whether `frame` is a TCP segment to cut that a taker of these offloads does not take:
    /// it goes through ``GSOSegmenter`` first.
    @inlinable public func mustSegment(_ frame: EthernetFrame) -> Bool {
        guard let gso = frame.offload.segmentation else { return false }
        return !contains(gso.kind == .tcpv4 ? .tso4 : .tso6)
    }
}
