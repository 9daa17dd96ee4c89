import Core
import Glibc
import XCTest

final class RxSlotLayoutTests: XCTestCase {
    /// A frame's bytes at `offset` into a page-aligned block.
    private func withBlock(_ body: (UnsafeMutableRawPointer) throws -> Void) rethrows {
        var memory: UnsafeMutableRawPointer?
        XCTAssertEqual(posix_memalign(&memory, xenPageSize, 20 * xenPageSize), 0)
        defer { free(memory) }
        try body(memory!)
    }

    func testAFrameOfAPageOrLessTakesOneSlotWhereverItLies() {
        withBlock { base in
            for (count, offset) in [(60, 0), (1514, 4000), (4096, 0), (4096, 17), (0, 5)] {
                let layout = RxSlotLayout.slots(count: count, at: base + offset)
                XCTAssertEqual(layout.slots, 1, "\(count) bytes at \(offset)")
                XCTAssertEqual(layout.first, count)
            }
        }
    }

    func testALongerFrameIsCutWhereItsPagesEnd() {
        withBlock { base in
            // Page-aligned: whole pages.
            var l = RxSlotLayout.slots(count: 65535, at: base)
            XCTAssertEqual(l.slots, 16); XCTAssertEqual(l.first, 4096)
            // 100 bytes into a page: the first slot is the rest of it, then whole pages.
            l = RxSlotLayout.slots(count: 65535, at: base + 100)
            XCTAssertEqual(l.first, 3996)
            XCTAssertEqual(l.slots, 17, "3996 + 15 * 4096 < 65535 <= 3996 + 16 * 4096")
            XCTAssertLessThanOrEqual(l.slots, 18, "netfront's XEN_NETIF_NR_SLOTS_MIN")
            l = RxSlotLayout.slots(count: 4097, at: base + 4095 - 3000)
            XCTAssertEqual(l.first, 3001); XCTAssertEqual(l.slots, 2)
            // Every byte in some slot, no slot over a page, none reading two of our pages.
            for offset in stride(from: 0, to: xenPageSize, by: 97) {
                for count in [4097, 9000, 40000, 65535] {
                    let (slots, first) = RxSlotLayout.slots(count: count, at: base + offset)
                    XCTAssert(first > 0 && first <= xenPageSize)
                    XCTAssertEqual(slots, 1 + (count - first + xenPageSize - 1) / xenPageSize)
                    XCTAssertLessThanOrEqual(slots, 17)
                    if first != xenPageSize { XCTAssertEqual((offset + first) % xenPageSize, 0, "\(count) at \(offset)") }
                }
            }
        }
    }

    func testAShortRestOfAPageIsNotAFirstSlot() {
        withBlock { base in
            // 100 bytes left in the page: fewer than netfront pulls headers from.
            let l = RxSlotLayout.slots(count: 9000, at: base + xenPageSize - 100)
            XCTAssertEqual(l.first, 4096)
            XCTAssertEqual(l.slots, 3)
            XCTAssertEqual(RxSlotLayout.slots(count: 9000, at: base + xenPageSize - RxSlotLayout.shortestFirstSlot).first,
                           RxSlotLayout.shortestFirstSlot)
        }
    }

    func testAFramesSlotsCountItsGSOExtra() {
        var frame = EthernetFrame(count: 9000)
        let data = frame.withUnsafeBytes { RxSlotLayout.slots(count: 9000, at: $0.baseAddress!).slots }
        XCTAssertEqual(RxSlotLayout.slots(of: frame), data)
        frame.offload.segmentation = .init(kind: .tcpv4, size: 1448)
        XCTAssertEqual(RxSlotLayout.slots(of: frame), data + 1)
    }
}
