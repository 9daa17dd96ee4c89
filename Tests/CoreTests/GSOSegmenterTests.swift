import Core
import XCTest

/// Software segmentation of TCP GSO frames, checked byte by byte against headers and checksums
/// the test computes itself (nothing of FrameChecksum is used to check).
final class GSOSegmenterTests: XCTestCase {
    // TCP flags.
    static let fin: UInt8 = 0x01, psh: UInt8 = 0x08, ack: UInt8 = 0x10, cwr: UInt8 = 0x80

    /// A large TCP segment as a guest's netfront sends it: Ethernet (with an 802.1Q tag if
    /// `vlan`), IPv4 (id 0xfffe, to see it wrap) or IPv6, TCP with a 12-byte timestamps option
    /// and sequence number `sequence`, then `payload` patterned bytes; the TCP checksum left
    /// as garbage (the segmenter must not care).
    static func frame(ipv6: Bool = false, vlan: Bool = false, payload: Int, size: UInt16,
                      sequence: UInt32 = 0xffff_f000, flags: UInt8 = ack | psh | fin | cwr) -> EthernetFrame {
        var b: [UInt8] = [0x00, 0x16, 0x3e, 0, 0, 2, 0x00, 0x16, 0x3e, 0, 0, 1]
        if vlan { b += [0x81, 0x00, 0x00, 0x05] }
        let tcp: [UInt8] = [0x30, 0x39, 0x00, 0x50] + be32(sequence) + be32(0x0102_0304)
            + [0x80, flags, 0xff, 0xff, 0xde, 0xad, 0x00, 0x00]
            + [0x01, 0x01, 0x08, 0x0a, 0, 0, 0, 1, 0, 0, 0, 2]   // NOP NOP timestamps
        let tcpLength = tcp.count + payload
        if ipv6 {
            b += [0x86, 0xdd]
            b += [0x60, 0, 0, 0] + be16(UInt16(tcpLength)) + [6, 64]
            b += [0xfd, 0] + [UInt8](repeating: 0, count: 13) + [1]
            b += [0xfd, 0] + [UInt8](repeating: 0, count: 13) + [2]
        } else {
            b += [0x08, 0x00]
            b += [0x45, 0] + be16(UInt16(truncatingIfNeeded: 20 + tcpLength)) + [0xff, 0xfe, 0x40, 0, 64, 6, 0x12, 0x34]
            b += [10, 0, 0, 1, 10, 0, 0, 2]
        }
        b += tcp
        b += (0..<payload).map { UInt8(truncatingIfNeeded: $0 &* 31 &+ 7) }
        return EthernetFrame(b, offload: FrameOffload(checksum: .partial(start: UInt16(b.count - payload - tcp.count), offset: 16),
                                                     segmentation: .init(kind: ipv6 ? .tcpv6 : .tcpv4, size: size)))
    }

    static func be16(_ v: UInt16) -> [UInt8] { [UInt8(v >> 8), UInt8(v & 0xff)] }
    static func be32(_ v: UInt32) -> [UInt8] { be16(UInt16(v >> 16)) + be16(UInt16(v & 0xffff)) }
    static func read16(_ b: [UInt8], _ o: Int) -> Int { Int(b[o]) << 8 | Int(b[o + 1]) }
    static func read32(_ b: [UInt8], _ o: Int) -> UInt32 { UInt32(read16(b, o)) << 16 | UInt32(read16(b, o + 2)) }

    /// RFC 1071, a byte pair at a time.
    static func onesComplementSum(_ bytes: ArraySlice<UInt8>) -> UInt32 {
        var s: UInt32 = 0
        var i = bytes.startIndex
        while i + 1 < bytes.endIndex { s += UInt32(bytes[i]) << 8 | UInt32(bytes[i + 1]); i += 2 }
        if i < bytes.endIndex { s += UInt32(bytes[i]) << 8 }
        while s >> 16 != 0 { s = (s & 0xffff) + (s >> 16) }
        return s
    }

    /// The TCP pseudo-header's sum for a segment whose IP header starts at `ip`.
    static func pseudoHeaderSum(_ b: [UInt8], ip: Int, ipv6: Bool, tcp: Int) -> UInt32 {
        let addresses = ipv6 ? b[(ip + 8)..<(ip + 40)] : b[(ip + 12)..<(ip + 20)]
        let length = b.count - tcp
        return onesComplementSum(addresses + [0, 6] + be32(UInt32(length)))
    }

    /// Checks every segment of a cut frame: headers, payload, IP lengths and ids, sequence
    /// numbers, flags, checksums (full, or the pseudo-header sum when `partial`).
    func check(_ segments: [EthernetFrame], of original: EthernetFrame, ipv6: Bool, vlan: Bool, partial: Bool,
               file: StaticString = #filePath, line: UInt = #line) {
        let o = original.bytes
        let ip = vlan ? 18 : 14, tcp = ip + (ipv6 ? 40 : 20), headers = tcp + 32
        let size = Int(original.offload.segmentation!.size)
        let payload = o.count - headers
        XCTAssertEqual(segments.count, max(1, (payload + size - 1) / size), file: file, line: line)
        var reassembled: [UInt8] = []
        for (i, segment) in segments.enumerated() {
            let s = segment.bytes
            let last = i == segments.count - 1
            XCTAssertEqual(s.count, headers + (last ? payload - i * size : size), "segment \(i)", file: file, line: line)
            XCTAssertEqual(segment.queue, original.queue, file: file, line: line)
            XCTAssertNil(segment.offload.segmentation, file: file, line: line)
            XCTAssertEqual(Array(s[0..<ip]), Array(o[0..<ip]), "Ethernet header", file: file, line: line)
            if ipv6 {
                XCTAssertEqual(Self.read16(s, ip + 4), s.count - ip - 40, "IPv6 payload length", file: file, line: line)
                XCTAssertEqual(Array(s[(ip + 6)..<tcp]), Array(o[(ip + 6)..<tcp]), file: file, line: line)
            } else {
                XCTAssertEqual(Self.read16(s, ip + 2), s.count - ip, "IPv4 total length", file: file, line: line)
                XCTAssertEqual(Self.read16(s, ip + 4), (0xfffe + i) & 0xffff, "IPv4 id counts up", file: file, line: line)
                XCTAssertEqual(Self.onesComplementSum(s[ip..<tcp]), 0xffff, "IPv4 header checksum", file: file, line: line)
                XCTAssertEqual(Array(s[(ip + 12)..<tcp]), Array(o[(ip + 12)..<tcp]), file: file, line: line)
            }
            XCTAssertEqual(Self.read32(s, tcp + 4), Self.read32(o, tcp + 4) &+ UInt32(i * size), "sequence", file: file, line: line)
            var flags = o[tcp + 13]
            if !last { flags &= ~(Self.fin | Self.psh) }
            if i > 0 { flags &= ~Self.cwr }
            XCTAssertEqual(s[tcp + 13], flags, "flags of segment \(i)", file: file, line: line)
            XCTAssertEqual(Array(s[tcp..<(tcp + 4)]), Array(o[tcp..<(tcp + 4)]), "ports", file: file, line: line)
            XCTAssertEqual(Array(s[(tcp + 20)..<headers]), Array(o[(tcp + 20)..<headers]), "TCP options", file: file, line: line)
            let pseudo = Self.pseudoHeaderSum(s, ip: ip, ipv6: ipv6, tcp: tcp)
            if partial {
                XCTAssertEqual(segment.offload.checksum, .partial(start: UInt16(tcp), offset: 16), file: file, line: line)
                XCTAssertEqual(UInt32(Self.read16(s, tcp + 16)), pseudo, "the pseudo-header sum, to be finished", file: file, line: line)
            } else {
                XCTAssertEqual(segment.offload.checksum, .validated, file: file, line: line)
                var sum = pseudo + Self.onesComplementSum(s[tcp...])
                while sum >> 16 != 0 { sum = (sum & 0xffff) + (sum >> 16) }
                XCTAssertEqual(sum, 0xffff, "TCP checksum of segment \(i)", file: file, line: line)
            }
            reassembled += s[headers...]
        }
        XCTAssertEqual(reassembled, Array(o[headers...]), "the payload, split in order", file: file, line: line)
    }

    func testATCPv4FrameIsCutIntoSegmentsWithTheirOwnHeadersAndChecksums() throws {
        var frame = Self.frame(payload: 4000, size: 1448)
        frame.queue = 3
        let segments = try GSOSegmenter.segment(frame, partialChecksums: false)
        XCTAssertEqual(segments.map(\.count), [1448, 1448, 1104].map { $0 + 14 + 20 + 32 })
        check(segments, of: frame, ipv6: false, vlan: false, partial: false)
        // The sequence number wraps past 2^32 on the way (0xfffff000 + 4000).
        XCTAssertEqual(Self.read32(segments[2].bytes, 34 + 4), 0xffff_f000 &+ 2896)
    }

    func testATCPv6FrameIsCutWithPartialChecksumsForATakerThatFinishesThem() throws {
        let frame = Self.frame(ipv6: true, payload: 65000, size: 1428)
        let segments = try GSOSegmenter.segment(frame, for: [.checksum])
        XCTAssertEqual(segments.count, 46)
        check(segments, of: frame, ipv6: true, vlan: false, partial: true)
    }

    func testVLANTaggedFramesKeepTheirTagInEverySegment() throws {
        let frame = Self.frame(vlan: true, payload: 3000, size: 1000)
        check(try GSOSegmenter.segment(frame, partialChecksums: false), of: frame, ipv6: false, vlan: true, partial: false)
        let v6 = Self.frame(ipv6: true, vlan: true, payload: 2500, size: 1200)
        check(try GSOSegmenter.segment(v6, partialChecksums: false), of: v6, ipv6: true, vlan: true, partial: false)
    }

    func testAPayloadThatIsAnExactMultipleOfTheSizeGivesFullSegmentsOnly() throws {
        let frame = Self.frame(payload: 3 * 1448, size: 1448)
        let segments = try GSOSegmenter.segment(frame, partialChecksums: false)
        XCTAssertEqual(segments.map(\.count), [Int](repeating: 14 + 20 + 32 + 1448, count: 3))
        check(segments, of: frame, ipv6: false, vlan: false, partial: false)
    }

    /// A segment size at or above the payload: one segment, every flag kept (it is the first
    /// and the last), its lengths and checksums made right.
    func testASizeLargerThanThePayloadGivesOneSegmentWithEveryFlag() throws {
        for payload in [0, 1, 100, 1448] {
            let frame = Self.frame(payload: payload, size: 1448)
            let segments = try GSOSegmenter.segment(frame, partialChecksums: false)
            XCTAssertEqual(segments.count, 1)
            XCTAssertEqual(segments[0].bytes[34 + 13], Self.ack | Self.psh | Self.fin | Self.cwr)
            check(segments, of: frame, ipv6: false, vlan: false, partial: false)
        }
        let v6 = Self.frame(ipv6: true, payload: 10, size: 60000)
        check(try GSOSegmenter.segment(v6, partialChecksums: true), of: v6, ipv6: true, vlan: false, partial: true)
    }

    func testASizeOfOneCutsEveryByte() throws {
        let frame = Self.frame(payload: 5, size: 1)
        check(try GSOSegmenter.segment(frame, partialChecksums: false), of: frame, ipv6: false, vlan: false, partial: false)
    }

    func testWhatCannotBeCutIsRefusedCleanly() {
        func refusal(_ frame: EthernetFrame) -> GSOSegmenter.Refusal? {
            do { _ = try GSOSegmenter.segment(frame, partialChecksums: false); return nil } catch { return error }
        }
        var zero = Self.frame(payload: 3000, size: 1448)
        zero.offload.segmentation?.size = 0
        XCTAssertEqual(refusal(zero), .zeroSize)
        var plain = Self.frame(payload: 100, size: 1448)
        plain.offload.segmentation = nil
        XCTAssertEqual(refusal(plain), .notSegmented)
        var wrongKind = Self.frame(ipv6: true, payload: 3000, size: 1448)
        wrongKind.offload.segmentation?.kind = .tcpv4
        XCTAssertEqual(refusal(wrongKind), .notTCP)
        // UDP (protocol 17) marked for TCP segmentation.
        var udp = Self.frame(payload: 3000, size: 1448).bytes
        udp[14 + 9] = 17
        XCTAssertEqual(refusal(EthernetFrame(udp, offload: FrameOffload(segmentation: .init(kind: .tcpv4, size: 1448)))), .notTCP)
        // An IPv4 fragment.
        var fragment = Self.frame(payload: 3000, size: 1448).bytes
        fragment[14 + 6] = 0x20
        XCTAssertEqual(refusal(EthernetFrame(fragment, offload: FrameOffload(segmentation: .init(kind: .tcpv4, size: 1448)))), .notTCP)
        // Truncated anywhere in its headers (v4 and v6, tagged or not): refused, never a read
        // past the end.
        for (ipv6, vlan) in [(false, false), (true, false), (false, true), (true, true)] {
            let whole = Self.frame(ipv6: ipv6, vlan: vlan, payload: 200, size: 100)
            let headers = (vlan ? 18 : 14) + (ipv6 ? 40 : 20) + 32
            for length in 0..<headers {
                var cut = whole
                cut.truncate(to: length)
                XCTAssertEqual(refusal(cut), .unreadableHeaders, "\(length) bytes")
            }
        }
    }

    func testATakerThatTakesTheSegmentationNeedsNoCutting() {
        let v4 = Self.frame(payload: 3000, size: 1448), v6 = Self.frame(ipv6: true, payload: 3000, size: 1448)
        XCTAssertFalse(NetOffloads.all.mustSegment(v4))
        XCTAssertTrue(NetOffloads([.checksum, .tso6]).mustSegment(v4))
        XCTAssertFalse(NetOffloads([.checksum, .tso6]).mustSegment(v6))
        XCTAssertTrue(NetOffloads([]).mustSegment(v6))
        XCTAssertFalse(NetOffloads([]).mustSegment(EthernetFrame(v4.bytes)))
    }
}
