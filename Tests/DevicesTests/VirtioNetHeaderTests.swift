import Core
import Devices
import XCTest

/// The virtio_net_hdr mapping both ways, each case of NET.md §4.
final class VirtioNetHeaderTests: XCTestCase {
    func testEncodesLittleEndianAndDecodesBack() {
        let h = VirtioNetHeader(flags: 1, gsoType: 4, headerLength: 0x0102, gsoSize: 0x0304, checksumStart: 0x0506, checksumOffset: 0x0708)
        XCTAssertEqual(h.bytes, [1, 4, 2, 1, 4, 3, 6, 5, 8, 7])
        XCTAssertEqual(h.bytes.withUnsafeBytes { VirtioNetHeader($0) }, h)
    }

    // MARK: guest → TAP

    func testPlainFrameHasAnEmptyHeader() {
        var f = NetTestFrames.arp()
        XCTAssertEqual(VirtioNetHeader.fromGuest(&f), VirtioNetHeader())
    }

    func testValidatedBecomesDataValid() {
        var f = NetTestFrames.tcp4(port: 80)
        f.offload.checksum = .validated
        XCTAssertEqual(VirtioNetHeader.fromGuest(&f), VirtioNetHeader(flags: VirtioNetHeader.dataValid))
    }

    func testPartialBecomesNeedsChecksum() {
        var f = NetTestFrames.tcp4(port: 80, partial: true)
        XCTAssertEqual(VirtioNetHeader.fromGuest(&f), VirtioNetHeader(flags: 1, checksumStart: 34, checksumOffset: 16))
    }

    func testTSO4() {
        var f = NetTestFrames.tcp4(port: 80, payload: 3000, partial: true)
        f.offload.segmentation = .init(kind: .tcpv4, size: 1448)
        XCTAssertEqual(VirtioNetHeader.fromGuest(&f),
                       VirtioNetHeader(flags: 1, gsoType: 1, headerLength: 54, gsoSize: 1448, checksumStart: 34, checksumOffset: 16))
    }

    func testTSO6GivesType4AndTheIPv6HeaderLength() {
        // An IPv6 TCP frame made from the UDP one's IPv6 header.
        var bytes = NetTestFrames.udp6(payload: 2000).bytes
        bytes[20] = 6   // next header TCP
        let tcp: [UInt8] = [0x9c, 0x40, 0, 80, 0, 0, 0, 1, 0, 0, 0, 0, 0x50, 0x10, 0xff, 0xff, 0, 0, 0, 0]
        bytes.replaceSubrange(54..<74, with: tcp)
        var f = EthernetFrame(bytes, offload: FrameOffload(segmentation: .init(kind: .tcpv6, size: 1440)))
        let h = VirtioNetHeader.fromGuest(&f)
        XCTAssertEqual(h, VirtioNetHeader(flags: 1, gsoType: 4, headerLength: 74, gsoSize: 1440, checksumStart: 54, checksumOffset: 16))
        XCTAssertEqual(f.offload.checksum, .partial(start: 54, offset: 16), "a GSO frame not marked partial is prepared")
    }

    func testGSOWithoutPartialGetsThePseudoHeaderSum() {
        var f = NetTestFrames.tcp4(port: 80, payload: 3000)
        let expected = NetTestFrames.tcp4(port: 80, payload: 3000, partial: true).bytes
        f.offload.segmentation = .init(kind: .tcpv4, size: 1448)
        XCTAssertEqual(VirtioNetHeader.fromGuest(&f)?.flags, VirtioNetHeader.needsChecksum)
        XCTAssertEqual(f.bytes, expected)
    }

    func testGSOWhoseHeadersDoNotParseIsDropped() {
        var arp = NetTestFrames.arp()
        arp.offload.segmentation = .init(kind: .tcpv4, size: 1448)
        XCTAssertNil(VirtioNetHeader.fromGuest(&arp))
        var udp = NetTestFrames.udp6()
        udp.offload.segmentation = .init(kind: .tcpv6, size: 1448)
        XCTAssertNil(VirtioNetHeader.fromGuest(&udp), "UDP cannot be TSO")
        var mismatch = NetTestFrames.tcp4(port: 80, payload: 3000, partial: true)
        mismatch.offload.segmentation = .init(kind: .tcpv6, size: 1448)
        XCTAssertNil(VirtioNetHeader.fromGuest(&mismatch), "tcpv6 on an IPv4 frame")
        var truncated = NetTestFrames.tcp4(port: 80)
        truncated.truncate(to: 40)
        truncated.offload.segmentation = .init(kind: .tcpv4, size: 1448)
        XCTAssertNil(VirtioNetHeader.fromGuest(&truncated))
    }

    // MARK: TAP → guest

    func testNeedsChecksumBecomesPartial() {
        XCTAssertEqual(VirtioNetHeader(flags: 1, checksumStart: 34, checksumOffset: 16).offload(frameLength: 74),
                       FrameOffload(checksum: .partial(start: 34, offset: 16)))
        XCTAssertNil(VirtioNetHeader(flags: 1, checksumStart: 34, checksumOffset: 16).offload(frameLength: 51),
                     "a checksum field outside the frame")
    }

    func testDataValidBecomesValidatedAndNothingBecomesNone() {
        XCTAssertEqual(VirtioNetHeader(flags: 2).offload(frameLength: 60), FrameOffload(checksum: .validated))
        XCTAssertEqual(VirtioNetHeader().offload(frameLength: 60), FrameOffload())
    }

    func testTCPGSOBecomesSegmentation() {
        XCTAssertEqual(VirtioNetHeader(flags: 1, gsoType: 1, headerLength: 54, gsoSize: 1448, checksumStart: 34, checksumOffset: 16)
                        .offload(frameLength: 9000),
                       FrameOffload(checksum: .partial(start: 34, offset: 16), segmentation: .init(kind: .tcpv4, size: 1448)))
        XCTAssertEqual(VirtioNetHeader(flags: 1, gsoType: 4, headerLength: 74, gsoSize: 1440, checksumStart: 54, checksumOffset: 16)
                        .offload(frameLength: 9000)?.segmentation, .init(kind: .tcpv6, size: 1440))
    }

    func testECNUDPUnknownAndZeroSizeGSOAreDropped() {
        for type: UInt8 in [1 | 0x80, 4 | 0x80, 3, 5, 2, 9] {
            XCTAssertNil(VirtioNetHeader(flags: 1, gsoType: type, gsoSize: 1448, checksumStart: 34, checksumOffset: 16)
                            .offload(frameLength: 9000), "gso_type \(type)")
        }
        XCTAssertNil(VirtioNetHeader(flags: 1, gsoType: 1, gsoSize: 0, checksumStart: 34, checksumOffset: 16).offload(frameLength: 9000))
    }
}
