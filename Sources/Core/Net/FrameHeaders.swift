/// Where an Ethernet frame's network and transport headers are, found by parsing it (netif
/// carries no checksum offsets, so a partial checksum's place must be found this way, as
/// netback's `skb_checksum_setup` does). Every length is checked against the frame: a short or
/// malformed frame gives nil, never a read past its end.
public struct FrameHeaders: Equatable, Sendable {
    public enum Network: Equatable, Sendable { case ipv4, ipv6 }
    /// After the MAC header and any 802.1Q / 802.1ad tags.
    public var networkOffset: Int
    public var network: Network
    /// The transport header, after IPv4 options or IPv6 extension headers.
    public var transportOffset: Int
    /// IP protocol number of the transport header (6 TCP, 17 UDP, ...).
    public var transportProtocol: UInt8
    /// TCP's header length (data offset) or UDP's 8; 0 for other protocols.
    public var transportHeaderLength: Int
    /// An IPv4 fragment other than a whole datagram (its checksum cannot be finished here).
    public var isFragment: Bool

    public static let tcp: UInt8 = 6
    public static let udp: UInt8 = 17

    /// All headers up to the payload (virtio_net_hdr's `hdr_len` for a TSO frame).
    public var headerLength: Int { transportOffset + transportHeaderLength }

    /// The checksum field of TCP or UDP: `(start, offset)` as a partial checksum names it.
    public var checksumLocation: (start: UInt16, offset: UInt16)? {
        guard !isFragment, transportOffset <= Int(UInt16.max) else { return nil }
        switch transportProtocol {
        case Self.tcp: return (UInt16(transportOffset), 16)
        case Self.udp: return (UInt16(transportOffset), 6)
        default: return nil
        }
    }

    /// Parses `bytes` (a whole frame); nil if it is not IPv4 or IPv6 or its headers do not fit.
    public init?(_ bytes: UnsafeRawBufferPointer) {
        let n = bytes.count
        func be16(_ o: Int) -> Int { Int(bytes[o]) << 8 | Int(bytes[o + 1]) }
        var offset = 12
        guard n >= 14 else { return nil }
        var type = be16(offset)
        // 802.1Q (0x8100) and 802.1ad (0x88a8) tags, at most two as in QinQ.
        var tags = 0
        while (type == 0x8100 || type == 0x88a8) && tags < 2 {
            guard n >= offset + 6 else { return nil }
            offset += 4
            type = be16(offset)
            tags += 1
        }
        offset += 2
        networkOffset = offset
        isFragment = false
        switch type {
        case 0x0800:
            guard n >= offset + 20, bytes[offset] >> 4 == 4 else { return nil }
            let ihl = Int(bytes[offset] & 0x0f) * 4
            guard ihl >= 20, n >= offset + ihl else { return nil }
            network = .ipv4
            transportProtocol = bytes[offset + 9]
            let fragment = be16(offset + 6)
            isFragment = fragment & 0x3fff != 0   // more-fragments flag or an offset
            transportOffset = offset + ihl
        case 0x86dd:
            guard n >= offset + 40, bytes[offset] >> 4 == 6 else { return nil }
            network = .ipv6
            var next = bytes[offset + 6]
            var o = offset + 40
            // Extension headers (hop-by-hop, routing, destination options, fragment), bounded.
            var hops = 0
            while hops < 8 {
                switch next {
                case 0, 43, 60:
                    guard n >= o + 8 else { return nil }
                    next = bytes[o]
                    o += (Int(bytes[o + 1]) + 1) * 8
                case 44:
                    guard n >= o + 8 else { return nil }
                    if be16(o + 2) & 0xfff9 != 0 { isFragment = true }
                    next = bytes[o]
                    o += 8
                default:
                    hops = 8
                    continue
                }
                hops += 1
            }
            guard o <= n else { return nil }
            transportProtocol = next
            transportOffset = o
        default:
            return nil
        }
        switch transportProtocol {
        case Self.tcp:
            guard isFragment || n >= transportOffset + 20 else { return nil }
            transportHeaderLength = isFragment ? 0 : Int(bytes[transportOffset + 12] >> 4) * 4
            guard isFragment || (transportHeaderLength >= 20 && n >= transportOffset + transportHeaderLength) else { return nil }
        case Self.udp:
            guard isFragment || n >= transportOffset + 8 else { return nil }
            transportHeaderLength = 8
        default:
            transportHeaderLength = 0
        }
    }

    /// Parses `frame`.
    public init?(_ frame: EthernetFrame) {
        guard let h = frame.withUnsafeBytes({ FrameHeaders($0) }) else { return nil }
        self = h
    }
}

/// The Internet checksum (RFC 1071) work a frame's offloads leave: finishing a partial
/// checksum in software, and writing the pseudo-header sum a partial checksum starts from.
public enum FrameChecksum {
    /// One's-complement sum of `bytes` (16-bit big-endian words, an odd last byte padded),
    /// added to `initial`, not folded.
    public static func sum(_ bytes: UnsafeRawBufferPointer, initial: UInt64 = 0) -> UInt64 {
        var s = initial
        var i = 0
        let n = bytes.count
        // Eight bytes at a time: the sum of 32-bit halves cannot overflow 64 bits for any frame.
        while i + 8 <= n {
            let w = UInt64(bigEndian: bytes.loadUnaligned(fromByteOffset: i, as: UInt64.self))
            s &+= (w >> 32) &+ (w & 0xffff_ffff)
            i += 8
        }
        while i + 2 <= n {
            s &+= UInt64(bytes[i]) << 8 | UInt64(bytes[i + 1])
            i += 2
        }
        if i < n { s &+= UInt64(bytes[i]) << 8 }
        return s
    }

    /// Folds a sum to 16 bits.
    public static func fold(_ sum: UInt64) -> UInt16 {
        var s = sum
        while s >> 16 != 0 { s = (s & 0xffff) &+ (s >> 16) }
        return UInt16(s)
    }

    /// Finishes a partial checksum in place (Linux's skb_checksum_help): the sum over
    /// `[start, end)`, field included, complemented into the field. The frame's checksum
    /// becomes `.validated`. False (the frame unchanged) if the location is outside the frame.
    @discardableResult
    public static func complete(_ frame: inout EthernetFrame) -> Bool {
        guard case let .partial(start, offset) = frame.offload.checksum else { return true }
        let s = Int(start), field = Int(start) + Int(offset)
        guard s <= frame.count, field + 2 <= frame.count else { return false }
        frame.withUnsafeMutableBytes { b in
            var c = ~fold(sum(UnsafeRawBufferPointer(rebasing: b[s...])))
            // UDP sends a computed zero as 0xffff (0 means "no checksum").
            if c == 0 && offset == 6 { c = 0xffff }
            b[field] = UInt8(c >> 8); b[field + 1] = UInt8(c & 0xff)
        }
        frame.offload.checksum = .validated
        return true
    }

    /// Writes the pseudo-header sum (not complemented) into the TCP or UDP checksum field, the
    /// state a partial checksum starts from (netback recalculates it for a GSO frame the guest
    /// did not mark `csum_blank`), and marks the frame partial. False if the headers are not
    /// TCP or UDP over IPv4 or IPv6.
    @discardableResult
    public static func preparePartial(_ frame: inout EthernetFrame, headers h: FrameHeaders) -> Bool {
        guard let (start, offset) = h.checksumLocation else { return false }
        frame.withUnsafeMutableBytes { b in
            let length = UInt64(b.count - h.transportOffset)
            var s: UInt64
            switch h.network {
            case .ipv4: s = sum(UnsafeRawBufferPointer(rebasing: b[(h.networkOffset + 12)..<(h.networkOffset + 20)]))
            case .ipv6: s = sum(UnsafeRawBufferPointer(rebasing: b[(h.networkOffset + 8)..<(h.networkOffset + 40)]))
            }
            s &+= UInt64(h.transportProtocol) &+ length
            let folded = fold(s)
            let field = Int(start) + Int(offset)
            b[field] = UInt8(folded >> 8); b[field + 1] = UInt8(folded & 0xff)
        }
        frame.offload.checksum = .partial(start: start, offset: offset)
        return true
    }
}
