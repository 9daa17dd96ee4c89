import BlockTap
import CXen
import Core
import TestPeers
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

    /// Random requests shaped like real ones: mostly a real operation (read, write, indirect,
    /// flush, discard, barrier) with every other field random, so that most get past the
    /// opcode to the checks of segments, grants and ranges. A backend that answers wrongly, or
    /// writes where a request did not say, fails here: every request gets exactly one response,
    /// with its id and the operation it should carry; nothing out of range or with a bad segment
    /// is accepted; and the disk's bytes change only where an accepted write or discard said.
    func testRandomFieldsGetOneFaithfulResponseEachAndTouchOnlyWhatWasAccepted() throws {
        let seed = UInt64.random(in: 0...UInt64.max)
        var rng = SplitMix64(seed: seed)
        let sectors = disk.geometry.sectors
        let size = Int(disk.geometry.size)
        for i in 0..<size { disk.bytes.storeBytes(of: UInt8(truncatingIfNeeded: i &* 7 &+ 3), toByteOffset: i, as: UInt8.self) }
        let original = Array(UnsafeRawBufferPointer(start: disk.bytes, count: size))
        var changed = [Bool](repeating: false, count: Int(sectors))

        let dataFrame = try front.pages.allocate(pages: 16)
        let pool = try (0..<16).map { try front.pages.grant(frame: dataFrame + UInt32($0), to: 0, readOnly: false) }
        let batchSize = 8
        let indirectFrame = try front.pages.allocate(pages: batchSize)
        let indirectRefs = try (0..<batchSize).map { try front.pages.grant(frame: indirectFrame + UInt32($0), to: 0, readOnly: true) }
        let operations = [Blkif.opRead, Blkif.opWrite, Blkif.opIndirect, Blkif.opFlushDiskCache, Blkif.opDiscard, Blkif.opWriteBarrier]

        func chance(_ percent: UInt64) -> Bool { rng.next() % 100 < percent }
        func randomSector() -> UInt64 {
            chance(80) ? rng.next() % sectors : chance(50) ? sectors + rng.next() % 64 : rng.next()
        }
        func randomSegment() -> blkif_request_segment {
            let first = UInt8(truncatingIfNeeded: rng.next() % 8)
            let last = chance(90) ? first + UInt8(truncatingIfNeeded: rng.next() % UInt64(8 - first)) : UInt8(truncatingIfNeeded: rng.next())
            return blkif_request_segment(gref: chance(90) ? pool[Int(rng.next() % 16)] : GrantRef(truncatingIfNeeded: rng.next()),
                                         first_sect: first, last_sect: last)
        }
        /// What a request is, as the test built it.
        struct Sent {
            var operation: UInt8, writes = false, dataOp = false, sector: UInt64, segments: [blkif_request_segment] = []
            var discardSectors: UInt64 = 0
        }

        var statuses: [Int16: Int] = [:]
        for round in 0..<64 {
            var batch: [BlkifRequestBytes] = []
            var sent: [UInt64: Sent] = [:]
            for k in 0..<batchSize {
                var r = BlkifRequestBytes()
                r.withBytes { b in for i in stride(from: 0, to: b.count, by: 8) { b.storeBytes(of: rng.next(), toByteOffset: i, as: UInt64.self) } }
                let op = chance(90) ? operations[Int(rng.next() % 6)] : UInt8(truncatingIfNeeded: rng.next())
                let id = (rng.next() << 16) | UInt64(round * batchSize + k)   // unique, random above
                var info = Sent(operation: op, sector: randomSector())
                switch op {
                case Blkif.opRead, Blkif.opWrite, Blkif.opFlushDiskCache, Blkif.opWriteBarrier:
                    var q = r.request
                    q.operation = op; q.id = id; q.sector_number = info.sector
                    q.nr_segments = UInt8(truncatingIfNeeded: chance(90) ? rng.next() % 12 : rng.next())
                    r = BlkifRequestBytes(q)
                    let n = Int(q.nr_segments)
                    info.segments = (0..<min(n, Blkif.maxDirectSegments)).map { _ in randomSegment() }
                    r.withBytes { b in
                        for (i, seg) in info.segments.enumerated() {
                            b.storeBytes(of: seg, toByteOffset: 24 + 8 * i, as: blkif_request_segment.self)
                        }
                    }
                    info.dataOp = op == Blkif.opRead || op == Blkif.opWrite || n > 0
                    info.writes = op != Blkif.opRead && n > 0
                    if n > Blkif.maxDirectSegments { info.segments = [] }   // must be refused
                case Blkif.opDiscard:
                    var d = r.discard
                    d.operation = op; d.id = id; d.sector_number = info.sector
                    d.nr_sectors = chance(90) ? rng.next() % 64 : rng.next()
                    info.discardSectors = d.nr_sectors
                    r = BlkifRequestBytes(d)
                case Blkif.opIndirect:
                    var ind = r.indirect
                    ind.operation = op; ind.id = id; ind.sector_number = info.sector
                    ind.indirect_op = chance(90) ? (chance(50) ? Blkif.opRead : Blkif.opWrite) : UInt8(truncatingIfNeeded: rng.next())
                    ind.nr_segments = UInt16(truncatingIfNeeded: chance(90) ? rng.next() % 40 : rng.next() % 600)
                    withUnsafeMutableBytes(of: &ind.indirect_grefs) { $0.bindMemory(to: GrantRef.self)[0] = indirectRefs[k] }
                    let n = min(Int(ind.nr_segments), Blkif.segmentsPerIndirectPage)
                    info.segments = (0..<n).map { _ in randomSegment() }
                    let page = front.pages.pointer(indirectFrame + UInt32(k)).bindMemory(to: blkif_request_segment.self, capacity: n)
                    for (i, seg) in info.segments.enumerated() { page[i] = seg }
                    r = BlkifRequestBytes(ind)
                    info.dataOp = ind.indirect_op == Blkif.opRead || ind.indirect_op == Blkif.opWrite
                    info.writes = ind.indirect_op == Blkif.opWrite
                    info.operation = info.dataOp ? ind.indirect_op : op   // blkback answers with the inner operation
                    if Int(ind.nr_segments) > Blkif.maxIndirectSegments { info.segments = [] }
                default:
                    var q = r.request
                    q.operation = op; q.id = id
                    r = BlkifRequestBytes(q)
                }
                batch.append(r)
                sent[id] = info
            }

            let responses = try front.roundTrip(batch)
            XCTAssertEqual(Set(responses.map(\.id)), Set(sent.keys), "seed \(seed): one response per request, with its id")
            XCTAssertEqual(responses.count, batchSize, "seed \(seed)")
            for rsp in responses {
                guard let info = sent.removeValue(forKey: rsp.id) else { XCTFail("seed \(seed): a second response for \(rsp.id)"); continue }
                statuses[rsp.status, default: 0] += 1
                XCTAssertEqual(rsp.operation, info.operation, "seed \(seed): the response's operation")
                XCTAssertTrue([Blkif.statusOkay, Blkif.statusError, Blkif.statusNotSupported].contains(rsp.status))
                let count = info.segments.reduce(UInt64(0)) { $0 + UInt64(max(0, Int($1.last_sect) - Int($1.first_sect) + 1)) }
                let (end, overflow) = info.sector.addingReportingOverflow(count)
                if info.dataOp && (overflow || end > sectors || info.sector >= sectors) {
                    XCTAssertEqual(rsp.status, Blkif.statusError, "seed \(seed): op \(info.operation) at sector \(info.sector) of \(sectors)")
                }
                guard rsp.status == Blkif.statusOkay else { continue }
                if info.dataOp {
                    XCTAssertFalse(info.segments.isEmpty, "seed \(seed): accepted without segments")
                    XCTAssertTrue(info.segments.allSatisfy { $0.first_sect <= $0.last_sect && $0.last_sect < 8 && pool.contains($0.gref) },
                                  "seed \(seed): accepted a bad segment")
                }
                if info.writes {
                    for s in min(info.sector, sectors)..<min(end, sectors) where !overflow { changed[Int(s)] = true }
                } else if info.operation == Blkif.opDiscard && info.discardSectors > 0 {
                    let (end, overflow) = info.sector.addingReportingOverflow(info.discardSectors)
                    XCTAssertTrue(!overflow && end <= sectors, "seed \(seed): discard accepted out of range")
                    for s in info.sector..<min(sectors, end) where !overflow { changed[Int(s)] = true }
                }
            }
        }
        // The checks were reached: many requests got past the opcode, and both outcomes occur.
        XCTAssertGreaterThan(statuses[Blkif.statusOkay, default: 0], 64, "seed \(seed): \(statuses)")
        XCTAssertGreaterThan(statuses[Blkif.statusError, default: 0], 64, "seed \(seed): \(statuses)")
        let now = UnsafeRawBufferPointer(start: disk.bytes, count: size)
        let touched = (0..<Int(sectors)).filter { !changed[$0] && !now[$0 * 512..<($0 + 1) * 512].elementsEqual(original[$0 * 512..<($0 + 1) * 512]) }
        XCTAssertEqual(touched, [], "seed \(seed): sectors changed that no accepted write or discard named")

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
