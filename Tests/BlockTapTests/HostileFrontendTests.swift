import BlockTap
import CXen
import Core
import XCTest
import XenStore

/// A frontend can write anything into its ring. Each bad request gets BLKIF_RSP_ERROR or
/// EOPNOTSUPP; a broken ring disconnects that device alone; the daemon and its other devices
/// keep serving.
final class HostileFrontendTests: XCTestCase {
    var lab: LocalLab!
    var disk: TestDisk!
    var guest: LocalHypervisor!
    var front: LocalBlockFrontend!
    var paths: XenbusDevicePaths!

    override func setUpWithError() throws {
        lab = try LocalLab()
        disk = TestDisk(size: 1 << 20)   // 2048 sectors
        (guest, paths) = try lab.guestWithDisk(disk)
        // Per-request grants: every reference is mapped and unmapped per request, the strictest path.
        var options = LocalBlockFrontend.Options()
        options.persistentGrants = false
        front = try LocalBlockFrontend(hypervisor: guest, frontendPath: paths.frontendPath, options: options)
    }
    override func tearDown() { lab.shutdown() }

    /// A READ of `segments` segments of buffer pages, with the given fields.
    func request(op: UInt8 = Blkif.opRead, sector: UInt64 = 0, segments: [(GrantRef, UInt8, UInt8)]) -> BlkifRequestBytes {
        var r = blkif_request()
        r.operation = op
        r.nr_segments = UInt8(truncatingIfNeeded: segments.count)
        r.id = 0xC0FFEE
        r.sector_number = sector
        var raw = BlkifRequestBytes(r)
        raw.withBytes { b in
            for (i, s) in segments.enumerated() where i < 11 {
                b.storeBytes(of: blkif_request_segment(gref: s.0, first_sect: s.1, last_sect: s.2), toByteOffset: 24 + 8 * i, as: blkif_request_segment.self)
            }
        }
        return raw
    }

    func status(_ r: BlkifRequestBytes) throws -> Int16 {
        let rsp = try front.roundTrip([r])
        XCTAssertEqual(rsp[0].id, r.request.id, "the response carries the request's id")
        return rsp[0].status
    }

    var page0: GrantRef { get throws { try front.grantBuffer(0, readOnly: false) } }

    func testOutOfRangeSectorsAreErrors() throws {
        XCTAssertEqual(try status(request(sector: 2048, segments: [(try page0, 0, 7)])), Blkif.statusError)
        XCTAssertEqual(try status(request(sector: 2047, segments: [(try page0, 0, 1)])), Blkif.statusError, "crosses the end")
        XCTAssertEqual(try status(request(sector: 2040, segments: [(try page0, 0, 7)])), Blkif.statusOkay, "the last page is fine")
    }

    func testSectorOverflowIsAnError() throws {
        XCTAssertEqual(try status(request(sector: UInt64.max - 3, segments: [(try page0, 0, 7)])), Blkif.statusError)
        XCTAssertEqual(try status(request(sector: UInt64.max / 256, segments: [(try page0, 0, 7)])), Blkif.statusError)
    }

    func testZeroAndTooManySegmentsAreErrors() throws {
        XCTAssertEqual(try status(request(segments: [])), Blkif.statusError)
        var r = request(segments: [(try page0, 0, 7)])
        r.withBytes { $0[1] = 12 }   // nr_segments past BLKIF_MAX_SEGMENTS_PER_REQUEST
        XCTAssertEqual(try status(r), Blkif.statusError)
        var ind = blkif_request_indirect()
        ind.operation = Blkif.opIndirect; ind.indirect_op = Blkif.opRead; ind.nr_segments = 257; ind.id = 1
        XCTAssertEqual(try front.roundTrip([BlkifRequestBytes(ind)])[0].status, Blkif.statusError)
        ind.nr_segments = 0
        XCTAssertEqual(try front.roundTrip([BlkifRequestBytes(ind)])[0].status, Blkif.statusError)
        ind.nr_segments = 4; ind.indirect_op = Blkif.opDiscard
        XCTAssertEqual(try front.roundTrip([BlkifRequestBytes(ind)])[0].status, Blkif.statusError, "indirect discard")
    }

    func testBadSectorBoundsInASegmentAreErrors() throws {
        XCTAssertEqual(try status(request(segments: [(try page0, 5, 2)])), Blkif.statusError, "first_sect > last_sect")
        XCTAssertEqual(try status(request(segments: [(try page0, 0, 8)])), Blkif.statusError, "last_sect past the page")
        XCTAssertEqual(try status(request(segments: [(try page0, 255, 255)])), Blkif.statusError)
    }

    func testBadAndForeignGrantReferencesAreErrors() throws {
        XCTAssertEqual(try status(request(segments: [(60_000, 0, 7)])), Blkif.statusError, "never granted")
        XCTAssertEqual(try status(request(segments: [(1 << 30, 0, 7)])), Blkif.statusError, "past the table")
        let frame = try front.pages.allocate(pages: 1)
        let foreign = try front.pages.grant(frame: frame, to: 5, readOnly: false)
        XCTAssertEqual(try status(request(segments: [(foreign, 0, 7)])), Blkif.statusError, "granted to domain 5")
        let readOnly = try front.pages.grant(frame: frame, to: 0, readOnly: true)
        XCTAssertEqual(try status(request(segments: [(readOnly, 0, 7)])), Blkif.statusError, "a read needs a writable grant")
        XCTAssertEqual(try status(request(op: Blkif.opWrite, segments: [(readOnly, 0, 7)])), Blkif.statusOkay, "a write may use it")
        // A bad reference after good ones: nothing stays mapped, so the guest can revoke them all.
        let good = try front.pages.grant(frame: frame, to: 0, readOnly: false)
        XCTAssertEqual(try status(request(segments: [(good, 0, 7), (60_001, 0, 7)])), Blkif.statusError)
        XCTAssertNoThrow(try front.pages.endAccess(good), "the backend released the good grant")
    }

    func testUnknownOperationsAreNotSupported() throws {
        for op: UInt8 in [4, 7, 99, 255] {
            XCTAssertEqual(try status(request(op: op, segments: [(try page0, 0, 7)])), Blkif.statusNotSupported, "op \(op)")
        }
    }

    func testGarbageInEveryFieldNeverStopsTheBackend() throws {
        var generator = SystemRandomNumberGenerator()
        for _ in 0..<64 {
            var batch: [BlkifRequestBytes] = []
            for _ in 0..<8 {
                var r = BlkifRequestBytes()
                r.withBytes { b in for i in 0..<b.count { b[i] = UInt8.random(in: 0...255, using: &generator) } }
                batch.append(r)
            }
            let responses = try front.roundTrip(batch)
            XCTAssertEqual(responses.count, 8)
            for rsp in responses {
                XCTAssertTrue([Blkif.statusOkay, Blkif.statusError, Blkif.statusNotSupported].contains(rsp.status))
            }
        }
        // Still serving, bytes intact.
        try front.write(sector: 16, [UInt8](repeating: 0x5A, count: 4096))
        XCTAssertEqual(try front.read(sector: 16, count: 4096), [UInt8](repeating: 0x5A, count: 4096))
    }

    func testAProducerIndexBeyondTheRingDisconnectsThatDeviceAlone() throws {
        // A second guest whose disk must keep working.
        let otherDisk = TestDisk(size: 1 << 20)
        let (otherGuest, otherPaths) = try lab.guestWithDisk(otherDisk, name: "bystander")
        let other = try LocalBlockFrontend(hypervisor: otherGuest, frontendPath: otherPaths.frontendPath)

        let q = front.queues[0]
        let reqProd = q.ring.shared.assumingMemoryBound(to: UInt32.self)
        reqProd.pointee = q.ring.size + 40   // more than a ring ahead of the responses
        q.channel.notify()
        try front.connection.waitForBackend([.closing, .closed], timeoutSeconds: 5)
        let error = try lab.backend.store.readString(paths.backendPath + "/error")
        XCTAssertNotNil(error)
        XCTAssertTrue(error!.contains("impossible"), error!)

        try other.write(sector: 0, [UInt8](repeating: 0x77, count: 8192))
        XCTAssertEqual(try other.read(sector: 0, count: 8192), [UInt8](repeating: 0x77, count: 8192))
    }

    func testAGuestThatDiesIsUnpluggedAndItsNodesRemoved() throws {
        let (g2, p2) = try lab.guestWithDisk(TestDisk(size: 1 << 20), name: "doomed")
        var f2: LocalBlockFrontend? = try LocalBlockFrontend(hypervisor: g2, frontendPath: p2.frontendPath)
        try f2!.write(sector: 0, [UInt8](repeating: 1, count: 4096))
        XCTAssertEqual(lab.service.count, 2)
        f2 = nil
        // Destroying the domain: its control connection closes, as when a guest crashes.
        g2.destroy()
        let deadline = monotonicSeconds() + 5
        while lab.service.count != 1 && monotonicSeconds() < deadline { usleep(10_000) }
        XCTAssertEqual(lab.service.count, 1)
        XCTAssertNil(try lab.backend.store.readString(p2.backendPath + "/state"))
        // The first guest is unaffected.
        try front.write(sector: 0, [UInt8](repeating: 2, count: 4096))
        XCTAssertEqual(try front.read(sector: 0, count: 4096), [UInt8](repeating: 2, count: 4096))
    }
}
