import BlockTap
import CXen
import Core
import XCTest

/// The raw request copy and its views: what the hot paths rely on about blkif.h's layout.
final class BlkifProtocolTests: XCTestCase {
    func testSectorNumberAndIDSitAtOneOffsetInEveryView() {
        let offset = MemoryLayout<blkif_request>.offset(of: \.sector_number)
        XCTAssertEqual(offset, MemoryLayout<blkif_request_indirect>.offset(of: \.sector_number))
        XCTAssertEqual(offset, MemoryLayout<blkif_request_discard>.offset(of: \.sector_number))
        XCTAssertEqual(MemoryLayout<blkif_request>.size, 112)
        let id = MemoryLayout<blkif_request>.offset(of: \.id)
        XCTAssertEqual(id, MemoryLayout<blkif_request_indirect>.offset(of: \.id))
        XCTAssertEqual(id, MemoryLayout<blkif_request_discard>.offset(of: \.id))
    }

    func testSettingTheSectorNumberChangesOnlyThatField() {
        var ind = blkif_request_indirect()
        ind.operation = Blkif.opIndirect
        ind.indirect_op = Blkif.opRead
        ind.nr_segments = 256
        ind.id = 0xABCD
        ind.sector_number = 1
        withUnsafeMutableBytes(of: &ind.indirect_grefs) { $0.bindMemory(to: GrantRef.self)[0] = 77 }
        var raw = BlkifRequestBytes(ind)
        raw.sectorNumber = 0x1234_5678_9ABC
        XCTAssertEqual(raw.sectorNumber, 0x1234_5678_9ABC)
        let back = raw.indirect
        XCTAssertEqual(back.sector_number, 0x1234_5678_9ABC)
        XCTAssertEqual(back.nr_segments, 256)
        XCTAssertEqual(back.id, 0xABCD)
        XCTAssertEqual(back.indirect_op, Blkif.opRead)
        var grefs = back.indirect_grefs
        XCTAssertEqual(withUnsafeBytes(of: &grefs) { $0.bindMemory(to: GrantRef.self)[0] }, 77)
    }
}
