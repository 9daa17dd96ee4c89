@testable import BlockTap
import CXen
import Core
import Glibc
import XCTest
import XenStore

/// What the backend writes into the guest's ring and what it promised at connect: responses
/// carry nothing of the daemon's memory, the advertised limits hold, and a connect that cannot
/// get its resources fails that device alone.
final class BlkifResponseAndLimitTests: XCTestCase {
    /// blkif_response is 16 bytes with 5 of padding (after operation, after status). XSA-216:
    /// Linux blkback leaked kernel stack through them. Every byte of a response slot that is not
    /// a field must be zero, whatever the slot held before (here 0xAA, from the ring's fill and
    /// from the request's own id, which lies under the response's padding).
    func testResponsesAreWrittenWholeWithZeroPadding() throws {
        let lab = try LocalLab()
        defer { lab.shutdown() }
        let (guest, paths) = try lab.guestWithDisk(TestDisk(size: 1 << 20))
        let front = try LocalBlockFrontend(hypervisor: guest, frontendPath: paths.frontendPath)
        let q = front.queues[0]
        let entries = q.ring.shared + SharedRingLayout.headerSize
        memset(entries, 0xAA, Int(q.ring.size) * BlkifRing.entrySize)

        let idBase: UInt64 = 0xAAAA_AAAA_AAAA_AA00
        var requests: [BlkifRequestBytes] = []
        var (read, _) = try front.makeRequest(id: idBase, write: false, sector: 0, firstPage: 0, pageCount: 1)
        requests.append(read)                                   // OKAY
        read.sectorNumber = 1 << 40
        var outOfRange = read.request
        outOfRange.id = idBase + 1
        requests.append(BlkifRequestBytes(outOfRange))          // ERROR
        var unknown = blkif_request()
        unknown.operation = 99; unknown.id = idBase + 2
        requests.append(BlkifRequestBytes(unknown))             // EOPNOTSUPP
        var flush = blkif_request()
        flush.operation = Blkif.opFlushDiskCache; flush.id = idBase + 3
        requests.append(BlkifRequestBytes(flush))
        var discard = blkif_request_discard()
        discard.operation = Blkif.opDiscard; discard.id = idBase + 4; discard.sector_number = 8; discard.nr_sectors = 8
        requests.append(BlkifRequestBytes(discard))
        // The bytes under the response's padding are 0xAA before the backend answers.
        XCTAssertTrue(requests.allSatisfy { r in withUnsafeBytes(of: r.storage) { b in (9..<16).allSatisfy { b[$0] == 0xAA } } })

        let responses = try front.roundTrip(requests)
        XCTAssertEqual(responses.map(\.status), [Blkif.statusOkay, Blkif.statusError, Blkif.statusNotSupported,
                                                 Blkif.statusOkay, Blkif.statusOkay])
        let fields = Set(0..<8).union([MemoryLayout<blkif_response>.offset(of: \blkif_response.operation)!])
            .union((0..<2).map { MemoryLayout<blkif_response>.offset(of: \blkif_response.status)! + $0 })
        let padding = (0..<MemoryLayout<blkif_response>.size).filter { !fields.contains($0) }
        XCTAssertEqual(padding, [9, 12, 13, 14, 15], "blkif_response's layout (io/blkif.h)")
        for k in 0..<requests.count {
            let slot = UnsafeRawBufferPointer(start: entries + k * BlkifRing.entrySize, count: MemoryLayout<blkif_response>.size)
            XCTAssertEqual(padding.map { slot[$0] }, [0, 0, 0, 0, 0], "response \(k): padding bytes")
        }
    }

    /// A frontend of a backend that advertises `maxIndirectSegments`, and a page for the
    /// indirect segment lists.
    func withIndirectLimit(_ maxIndirectSegments: Int, _ body: (LocalBlockFrontend, UInt32) throws -> Void) throws {
        var options = BlkifBackendOptions()
        options.maxIndirectSegments = maxIndirectSegments
        let lab = try LocalLab(options: options)
        defer { lab.shutdown() }
        let (guest, paths) = try lab.guestWithDisk(TestDisk(size: 1 << 20))
        let front = try LocalBlockFrontend(hypervisor: guest, frontendPath: paths.frontendPath)
        XCTAssertEqual(front.backendFeatures["feature-max-indirect-segments"], "\(maxIndirectSegments)")
        try body(front, try front.pages.allocate(pages: 1))
    }

    /// feature-max-indirect-segments is a promise both ways: a request with more segments than
    /// advertised is an error, even below what the backend could handle.
    func testIndirectSegmentsAreLimitedToWhatWasAdvertised() throws {
        try withIndirectLimit(16) { front, indirectPage in
            let (sixteen, _) = try front.makeRequest(id: 1, write: false, sector: 0, firstPage: 0, pageCount: 16, indirectPageFrame: indirectPage)
            XCTAssertEqual(try front.roundTrip([sixteen])[0].status, Blkif.statusOkay)
            let (seventeen, _) = try front.makeRequest(id: 2, write: false, sector: 0, firstPage: 0, pageCount: 17, indirectPageFrame: indirectPage)
            let rsp = try front.roundTrip([seventeen])[0]
            XCTAssertEqual(rsp.status, Blkif.statusError, "17 segments where 16 were advertised")
            XCTAssertEqual(rsp.operation, Blkif.opRead, "answered with the indirect request's own operation")
        }
    }

    /// Advertising 0 turns indirect requests off: any is an error, direct ones still work.
    func testNoIndirectSegmentsAdvertisedRefusesIndirectRequests() throws {
        try withIndirectLimit(0) { front, indirectPage in
            let (indirect, _) = try front.makeRequest(id: 1, write: false, sector: 0, firstPage: 0, pageCount: 12, indirectPageFrame: indirectPage)
            XCTAssertEqual(try front.roundTrip([indirect])[0].status, Blkif.statusError)
            let (direct, _) = try front.makeRequest(id: 2, write: false, sector: 0, firstPage: 0, pageCount: 11)
            XCTAssertEqual(try front.roundTrip([direct])[0].status, Blkif.statusOkay)
        }
    }

    /// A failed mmap at connect (the persistent grant table; the address space exhausted) was
    /// a fatalError that took every guest's disk down: it is that device's error now, written
    /// to its `error` node, and the next device connects.
    func testAPersistentTableThatCannotBeMappedFailsThatDeviceAlone() throws {
        let lab = try LocalLab()
        defer { lab.shutdown() }
        let mapTable = PersistentGrantCache.mapTable
        PersistentGrantCache.mapTable = { _ in errno = ENOMEM; return nil }
        defer { PersistentGrantCache.mapTable = mapTable }
        let (guest, paths) = try lab.guestWithDisk(TestDisk(size: 1 << 20))
        XCTAssertThrowsError(try LocalBlockFrontend(hypervisor: guest, frontendPath: paths.frontendPath, timeoutSeconds: 5)) { error in
            guard case XenbusWaitError.closed = error else { return XCTFail("\(error)") }
        }
        // Written to the device's `error` node and the log. (The node is read from the log: a
        // collapsed second watch event may retry the connect and overwrite the node.)
        XCTAssertNotNil(try lab.backend.store.readString(paths.backendPath + "/error"))
        let logged = lab.shared.lock.withLock { lab.shared.log.filter { $0.contains("error:") } }
        XCTAssertTrue(logged.first?.contains("persistent grant table: mmap") ?? false, "\(logged)")

        PersistentGrantCache.mapTable = mapTable
        let (other, otherPaths) = try lab.guestWithDisk(TestDisk(size: 1 << 20), name: "next")
        let front = try LocalBlockFrontend(hypervisor: other, frontendPath: otherPaths.frontendPath)
        try front.write(sector: 8, [UInt8](repeating: 0x42, count: 4096))
        XCTAssertEqual(try front.read(sector: 8, count: 4096), [UInt8](repeating: 0x42, count: 4096))
    }

    /// A connect that fails at its second queue releases the first, which never started: its
    /// ring is unmapped, so the guest can take its pages back. Written with the generic
    /// ``LocalFrontend``, as a frontend of another class would be.
    func testAConnectThatFailsMidwayReleasesTheQueuesAlreadyOpened() throws {
        let lab = try LocalLab()
        defer { lab.shutdown() }
        let mapTable = PersistentGrantCache.mapTable
        var calls = 0
        PersistentGrantCache.mapTable = { bytes in
            calls += 1
            if calls == 2 { errno = ENOMEM; return nil }
            return mapTable(bytes)
        }
        defer { PersistentGrantCache.mapTable = mapTable }
        let (guest, paths) = try lab.guestWithDisk(TestDisk(size: 1 << 20))
        let link = try LocalFrontend(hypervisor: guest, frontendPath: paths.frontendPath)
        var nodes = [("protocol", "x86_64-abi"), ("feature-persistent", "1"), ("multi-queue-num-queues", "2")]
        var rings: [LocalFrontend.Ring<BlkifRing>] = []
        for q in 0..<2 {
            let ring = try link.makeRing(BlkifRing.self, pageOrder: 1)
            let channel = try link.makeChannel()
            nodes += ring.nodes(prefix: "queue-\(q)/") + [("queue-\(q)/event-channel", "\(channel.localPort)")]
            rings.append(ring)
        }
        XCTAssertEqual(nodes.map(\.0).filter { $0.hasPrefix("queue-0/") }, ["queue-0/ring-ref0", "queue-0/ring-ref1", "queue-0/event-channel"])
        XCTAssertThrowsError(try link.connect(nodes: nodes, timeoutSeconds: 5))
        XCTAssertEqual(calls, 2, "the second queue's table failed")
        for ref in rings.flatMap(\.refs) {
            XCTAssertNoThrow(try link.pages.endAccess(ref), "ring page \(ref) was released")
        }
    }
}
