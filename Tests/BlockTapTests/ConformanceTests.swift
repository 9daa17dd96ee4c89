import Bench
import BlockTap
import CReference
import CXen
import Core
import Foundation
import Glibc
import XCTest
import XenStore

/// SoftDev's blkif backend driven by a frontend written in C with Xen's own ring macros
/// (Sources/CReference/conformance.c), and the C reference backend serving SoftDev's Swift
/// frontend: each side of the protocol checked by the other side's independent implementation.
final class ConformanceTests: XCTestCase {
    var lab: LocalLab!
    override func setUpWithError() throws { lab = try LocalLab() }
    override func tearDown() { lab.shutdown() }

    /// Every check of the C suite, for ring orders 0 to 4, with persistent grants on and off.
    func testCFrontendAgainstTheSwiftBackend() throws {
        for order in 0...4 {
            for persistent in [true, false] {
                let where_ = "order \(order), persistent \(persistent)"
                let disk = TestDisk(size: 8 << 20)
                let (guest, paths) = try lab.guestWithDisk(disk, name: "c\(order)\(persistent ? "p" : "t")")
                let front = try CConformanceFrontend(guest: guest, paths: paths, ringOrder: order, persistent: persistent,
                                                     deviceBytes: UnsafeRawPointer(disk.bytes))
                XCTAssertEqual(front.persistent, persistent, where_)
                XCTAssertEqual(front.sectors, UInt64(8 << 20) / 512, where_)
                let results = front.runSuite()
                XCTAssertGreaterThan(results.count, 25, where_)
                for r in results {
                    XCTAssertTrue(r.passed, "\(where_): \(r.name): \(r.message)")
                    if getenv("SOFTDEV_TEST_LOG") != nil { print("\(where_): \(r.name): \(r.passed ? "pass" : "FAIL") \(r.message)") }
                }
                let negotiated = lab.service.inspect { devs in (devs[paths.backendPath]?.driver as? BlkifBackend)?.negotiated }
                XCTAssertEqual(negotiated?.ringPageOrder, order, where_)
                XCTAssertEqual(negotiated?.persistentGrants, persistent, where_)
                XCTAssertGreaterThan(disk.flushes, 0, where_)
                XCTAssertGreaterThan(disk.discards, 0, where_)
                XCTAssertEqual(try front.close(), 0, "\(where_): grants the backend still held after it closed")
            }
        }
    }

    /// The C reference backend serves SoftDev's Swift blkfront: reads of zeroes, writes
    /// accepted and dropped, direct and indirect, at each ring order, persistent or not. No
    /// service watches the `cref-vbd` backend directory: the harness plays the backend's part
    /// of the handshake and runs the C backend on the ring it mapped.
    func testCReferenceBackendServesTheSwiftFrontend() throws {
        for (i, (order, persistent)) in [(0, true), (4, true), (2, false)].enumerated() {
            let where_ = "order \(order), persistent \(persistent)"
            let guest = try LocalHypervisor.createGuest(lab.address, name: "cref\(i)", pages: 8192)
            let paths = XenbusDevicePaths(frontendDomain: guest.domainID, backendDomain: 0, frontendType: "vbd",
                                          backendType: "cref-vbd", deviceID: 51712)
            try XenbusToolstack.attach(lab.backend.store, paths, frontend: ["virtual-device": "51712", "device-type": "disk"],
                                       backend: ["params": "null", "mode": "w", "dev": "xvda", "type": "cref"])
            let sectors: UInt64 = (64 << 20) / 512
            let harness = CReferenceBackendHarness(backend: lab.backend, guest: guest, paths: paths, sectors: sectors)
            try harness.advertise()
            let connected = expectation(description: "C backend connected")
            harness.connectInBackground { connected.fulfill() }
            var options = LocalBlockFrontend.Options()
            options.ringPageOrder = order
            options.persistentGrants = persistent
            let front = try LocalBlockFrontend(hypervisor: guest, frontendPath: paths.frontendPath, options: options)
            wait(for: [connected], timeout: 15)
            XCTAssertNil(harness.connectError, where_)
            XCTAssertEqual(front.sectors, sectors, where_)

            let ones = [UInt8](repeating: 0xA5, count: 64 * 4096)
            try front.write(sector: 0, ones)                       // indirect (64 segments), dropped
            try front.write(sector: 800, Array(ones.prefix(8 * 4096)))   // direct
            // Dirty the buffers so that zeroes can only come from the backend.
            for p in 0..<256 { memset(front.bufferPage(p), 0x5A, 4096) }
            XCTAssertEqual(try front.read(sector: 0, count: 256 * 4096), [UInt8](repeating: 0, count: 256 * 4096), where_)
            for p in 0..<8 { memset(front.bufferPage(p), 0x5A, 4096) }
            XCTAssertEqual(try front.read(sector: sectors - 64, count: 8 * 4096), [UInt8](repeating: 0, count: 8 * 4096), where_)
            XCTAssertThrowsError(try front.read(sector: sectors - 4, count: 4096), "\(where_): read across the end")
            XCTAssertEqual(try front.control(operation: Blkif.opFlushDiskCache), Blkif.statusOkay, where_)
            XCTAssertEqual(try front.control(operation: Blkif.opDiscard, sector: 8, sectors: 8), Blkif.statusOkay, where_)
            XCTAssertEqual(try front.control(operation: 0xEE), Blkif.statusNotSupported, where_)

            // A full ring of one-page reads published at once.
            let size = Int(front.queues[0].ring.size)
            for p in 0..<size { memset(front.bufferPage(p), 0x5A, 4096) }
            var requests: [BlkifRequestBytes] = []
            var refs: [GrantRef] = []
            for k in 0..<size {
                let (r, g) = try front.makeRequest(id: UInt64(1000 + k), write: false, sector: UInt64(k * 8), firstPage: k, pageCount: 1)
                requests.append(r); refs += g
            }
            let responses = try front.roundTrip(requests)
            if !persistent {
                // The backend unpinned every page once it answered: each grant can be revoked.
                for r in refs { XCTAssertNoThrow(try front.pages.endAccess(r), "\(where_): grant \(r)") }
            }
            XCTAssertEqual(Set(responses.map(\.id)), Set((0..<size).map { UInt64(1000 + $0) }), where_)
            XCTAssertTrue(responses.allSatisfy { $0.status == Blkif.statusOkay && $0.operation == Blkif.opRead }, where_)
            XCTAssertTrue((0..<size).allSatisfy { p in
                UnsafeRawBufferPointer(start: front.bufferPage(p), count: 4096).allSatisfy { $0 == 0 } }, where_)

            let stats = harness.stop()
            XCTAssertEqual(stats.broken, 0, where_)
            XCTAssertEqual(stats.failed, 2, "\(where_): the read across the end and the unknown operation")
            XCTAssertGreaterThanOrEqual(stats.served, UInt64(size + 6), where_)
            try? front.close(timeoutSeconds: 0.2)
        }
    }

    /// The suite is not vacuous, and the C backend speaks the protocol: run against the C null
    /// backend (which drops writes), every data check fails and every protocol check passes.
    func testCFrontendAgainstTheCNullBackend() throws {
        let guest = try LocalHypervisor.createGuest(lab.address, name: "cc", pages: 8192)
        let paths = XenbusDevicePaths(frontendDomain: guest.domainID, backendDomain: 0, frontendType: "vbd",
                                      backendType: "cref-vbd", deviceID: 51712)
        try XenbusToolstack.attach(lab.backend.store, paths, frontend: ["virtual-device": "51712", "device-type": "disk"],
                                   backend: ["params": "null", "mode": "w", "dev": "xvda", "type": "cref"])
        let harness = CReferenceBackendHarness(backend: lab.backend, guest: guest, paths: paths, sectors: (8 << 20) / 512)
        try harness.advertise()
        let connected = expectation(description: "C backend connected")
        harness.connectInBackground { connected.fulfill() }
        let front = try CConformanceFrontend(guest: guest, paths: paths, ringOrder: 3, persistent: false, deviceBytes: nil)
        wait(for: [connected], timeout: 15)
        XCTAssertNil(harness.connectError)
        let results = front.runSuite()
        // Data written and read back (the null device returns zeroes instead).
        let dataChecks = Set(results.map(\.name).filter {
            $0.hasPrefix("write-read-") || $0.hasPrefix("indirect-") && $0.hasSuffix("-segments") ||
            ["partial-page-segments", "write-barrier-with-data", "discard", "full-ring"].contains($0)
        })
        XCTAssertEqual(dataChecks.count, 20)
        for r in results {
            if getenv("SOFTDEV_TEST_LOG") != nil { print("C null backend: \(r.name): \(r.passed ? "pass" : "FAIL") \(r.message)") }
            if dataChecks.contains(r.name) {
                XCTAssertFalse(r.passed, "\(r.name) passed against a backend that drops writes: \(r.message)")
            } else {
                XCTAssertTrue(r.passed, "C backend: \(r.name): \(r.message)")
            }
        }
        let stats = harness.stop()
        XCTAssertEqual(stats.broken, 0)
        XCTAssertEqual(try front.close(), 0, "grants the C backend still held after it stopped")
    }
}
