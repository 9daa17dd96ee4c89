import BlockTap
import CXen
import Core
import XCTest
import XenStore

final class BlockTapEndToEndTests: XCTestCase {
    var lab: LocalLab!
    override func setUpWithError() throws { lab = try LocalLab() }
    override func tearDown() { lab.shutdown() }

    func pattern(_ count: Int, seed: UInt8) -> [UInt8] { (0..<count).map { UInt8(truncatingIfNeeded: $0 &* 31 &+ Int(seed)) } }

    func testWriteThenReadBackThroughTheRing() throws {
        let disk = TestDisk(size: 16 << 20)
        let (guest, paths) = try lab.guestWithDisk(disk)
        let front = try LocalBlockFrontend(hypervisor: guest, frontendPath: paths.frontendPath)
        XCTAssertEqual(front.sectors, UInt64(16 << 20) / 512)
        let data = pattern(8 * 4096, seed: 7)
        try front.write(sector: 2048, data)
        XCTAssertEqual(try front.read(sector: 2048, count: data.count), data)
        // And the bytes are where the sector number says, on the device itself.
        XCTAssertEqual(Array(UnsafeRawBufferPointer(start: disk.bytes + 2048 * 512, count: data.count)), data)
        try front.close()
    }

    func testEveryRingOrderAndIndirectAndPersistentCombination() throws {
        for order in 0...4 {
            for persistent in [true, false] {
                let disk = TestDisk(size: 8 << 20)
                let (guest, paths) = try lab.guestWithDisk(disk, name: "g\(order)\(persistent)")
                var o = LocalBlockFrontend.Options()
                o.ringPageOrder = order
                o.persistentGrants = persistent
                let front = try LocalBlockFrontend(hypervisor: guest, frontendPath: paths.frontendPath, options: o)
                let data = pattern(64 * 4096, seed: UInt8(order))   // 64 segments: indirect
                try front.write(sector: 8, data)
                XCTAssertEqual(try front.read(sector: 8, count: data.count), data, "order \(order) persistent \(persistent)")
                let negotiated = lab.service.inspect { devs in (devs[paths.backendPath]?.driver as? BlkifBackend)?.negotiated }
                XCTAssertEqual(negotiated?.ringPageOrder, order)
                XCTAssertEqual(negotiated?.persistentGrants, persistent)
                try front.close()
            }
        }
    }

    func testFlushAndDiscardReachTheDevice() throws {
        let disk = TestDisk(size: 4 << 20)
        let (guest, paths) = try lab.guestWithDisk(disk)
        let front = try LocalBlockFrontend(hypervisor: guest, frontendPath: paths.frontendPath)
        try front.write(sector: 0, [UInt8](repeating: 0xAB, count: 4096))
        XCTAssertEqual(try front.control(operation: Blkif.opFlushDiskCache), Blkif.statusOkay)
        XCTAssertEqual(disk.flushes, 1)
        XCTAssertEqual(try front.control(operation: Blkif.opDiscard, sector: 0, sectors: 8), Blkif.statusOkay)
        XCTAssertEqual(try front.read(sector: 0, count: 4096), [UInt8](repeating: 0, count: 4096))
        XCTAssertEqual(try front.control(operation: Blkif.opDiscard, sector: 8192, sectors: 8), Blkif.statusError, "past the end")
        // A discard of nothing succeeds without reaching the device, wherever it points, as
        // with Linux blkback.
        XCTAssertEqual(try front.control(operation: Blkif.opDiscard, sector: 16, sectors: 0), Blkif.statusOkay)
        XCTAssertEqual(try front.control(operation: Blkif.opDiscard, sector: 8200, sectors: 0), Blkif.statusOkay)
        XCTAssertEqual(disk.discards, 1)
        try front.close()
    }
}
