import CXen
import Core
import Devices
import Foundation
import Glibc
import TestPeers
import USBTap
import XCTest

/// A usbfront can write anything into its URB ring. Each bad request gets an error status
/// (-EINVAL for a malformed one, -ENODEV for a port or address with no device); a broken ring
/// disconnects that controller alone; other guests' controllers keep serving; nothing crashes
/// or hangs.
final class UsbifHostileFrontendTests: XCTestCase {
    var lab: USBLab!
    var front: LocalUSBFrontend!
    var paths: XenbusDevicePaths!

    override func setUpWithError() throws {
        lab = try USBLab()
        lab.register(try XCTUnwrap(try DeviceRegistry.open("storage(device=\"memory(size=1M)\")", of: .usb) as? any USBDevice), as: "stick")
        let guest: LocalHypervisor
        (guest, paths) = try lab.guestWithController(name: "hostile", ports: 4, plugged: [1: "stick"])
        front = try LocalUSBFrontend(hypervisor: guest, frontendPath: paths.frontendPath)
        try front.waitForPort(1)
        _ = try front.enumerate(port: 1, address: 5)
    }
    override func tearDown() { lab.shutdown() }

    /// A bulk IN of one page to the stick, with the fields given.
    func request(port: Int = 1, device: UInt8 = 5, endpoint: UInt8 = 1, type: USBTransferType = .bulk, isIn: Bool = true,
                 segments: [usbif_request_segment], bufferLength: Int? = nil) -> usbif_urb_request {
        var r = usbif_urb_request()
        r.pipe = Usbif.Pipe(port: port, isIn: isIn, device: device, endpoint: endpoint, type: type).rawValue
        r.nr_buffer_segs = UInt16(segments.count)
        r.buffer_length = UInt16(truncatingIfNeeded: bufferLength ?? segments.reduce(0) { $0 + Int($1.length) })
        withUnsafeMutableBytes(of: &r.seg) { raw in
            let segs = raw.bindMemory(to: usbif_request_segment.self)
            for (i, s) in segments.prefix(Usbif.maxSegments).enumerated() { segs[i] = s }
        }
        return r
    }

    /// A page of the guest granted to the backend.
    func grantedPage(readOnly: Bool = false) throws -> GrantRef {
        let frame = try front.connection.pages.allocate(pages: 1)
        return try front.connection.grant(frame: frame, count: 1, readOnly: readOnly)[0]
    }

    func status(_ r: usbif_urb_request) throws -> USBStatus {
        try front.wait(try front.putHostile(r)).status
    }

    /// A Bulk-Only TEST UNIT READY round trip: the stick and the controller still work.
    func stickWorks(_ front: LocalUSBFrontend, address: UInt8 = 5) throws {
        var host = BOTHost(front: front, port: 1, address: address)
        XCTAssertEqual(try host.command([0, 0, 0, 0, 0, 0]).status, 0)
        XCTAssertEqual(try host.command([0x12, 0, 0, 0, 36, 0], dataIn: 36).data.count, 36)
    }

    func testMalformedRequestsGetErrorStatuses() throws {
        let page = try grantedPage()
        let whole = usbif_request_segment(gref: page, offset: 0, length: 4096)
        // Too many segments: nr_buffer_segs over 16, and buffer plus ISO descriptor segments over 16.
        var r = request(segments: [whole])
        r.nr_buffer_segs = 17
        XCTAssertEqual(try status(r), .invalid, "nr_buffer_segs 17")
        r.nr_buffer_segs = 0xffff
        XCTAssertEqual(try status(r), .invalid, "nr_buffer_segs 65535")
        var iso = request(device: 5, endpoint: 1, type: .isochronous, segments: Array(repeating: whole, count: 10))
        iso.u.isoc.number_of_packets = 1
        iso.u.isoc.nr_frame_desc_segs = 7
        XCTAssertEqual(try status(iso), .invalid, "10 buffer + 7 descriptor segments")
        iso.u.isoc.nr_frame_desc_segs = 1
        iso.u.isoc.number_of_packets = 0
        XCTAssertEqual(try status(iso), .invalid, "no packets")
        iso.u.isoc.number_of_packets = 2000
        XCTAssertEqual(try status(iso), .invalid, "more packets than the descriptor segment holds")
        // A segment out of its page.
        XCTAssertEqual(try status(request(segments: [usbif_request_segment(gref: page, offset: 4000, length: 200)])), .invalid, "offset + length > 4096")
        XCTAssertEqual(try status(request(segments: [usbif_request_segment(gref: page, offset: 0xffff, length: 1)])), .invalid, "offset 65535")
        XCTAssertEqual(try status(request(segments: [usbif_request_segment(gref: page, offset: 0, length: 0xffff)])), .invalid, "length 65535")
        // buffer_length that is not what the segments cover.
        XCTAssertEqual(try status(request(segments: [whole], bufferLength: 100)), .invalid, "buffer_length 100 over a 4096-byte segment")
        XCTAssertEqual(try status(request(isIn: false, segments: [whole, whole], bufferLength: 4096)), .invalid, "buffer_length 4096 over two pages")
        // Ports and addresses with no device.
        for port in [0, 2, 4, 5, 31] {
            XCTAssertEqual(try status(request(port: port, segments: [whole])), .noDevice, "port \(port)")
        }
        XCTAssertEqual(try status(request(device: 6, segments: [whole])), .noDevice, "an address never given")
        try stickWorks(front, address: 5)
        // Address 0 again is a port reset (xen-hcd resets locally): only control there.
        XCTAssertEqual(try status(request(device: 0, segments: [whole])), .invalid, "a bulk URB at address 0")
        XCTAssertEqual(try status(request(device: 5, segments: [whole])), .noDevice, "the address went with the reset")
        _ = try front.enumerate(port: 1, address: 5)
        try stickWorks(front, address: 5)
        XCTAssertEqual(front.duplicateResponses, 0)
    }

    func testBadGrantReferencesAreErrors() throws {
        // OUT data from a reference never granted, or granted read-only, and IN data into a
        // read-only page: the grant copy fails, the URB is -EINVAL, nothing else happens.
        for ref: GrantRef in [0, 7, 4000, 0xffff_ffff] {
            let cbw = request(endpoint: 2, isIn: false, segments: [usbif_request_segment(gref: ref, offset: 0, length: 31)])
            XCTAssertEqual(try status(cbw), .invalid, "OUT from ref \(ref)")
        }
        let readOnly = try grantedPage(readOnly: true)
        // A CBW from a read-only page is fine (the backend only reads it): INQUIRY.
        let cbwPage = try front.connection.pages.allocate(pages: 1)
        let cbwRef = try front.connection.grant(frame: cbwPage, count: 1, readOnly: true)[0]
        let bytes = BOTHost.cbw(tag: 9, length: 36, isIn: true, cdb: [0x12, 0, 0, 0, 36, 0])
        bytes.withUnsafeBytes { front.connection.pages.pointer(cbwPage).copyMemory(from: $0.baseAddress!, byteCount: 31) }
        XCTAssertEqual(try status(request(endpoint: 2, isIn: false, segments: [usbif_request_segment(gref: cbwRef, offset: 0, length: 31)])), .ok)
        // Its data IN into a read-only page: the copy back fails.
        XCTAssertEqual(try status(request(segments: [usbif_request_segment(gref: readOnly, offset: 0, length: 36)])), .invalid, "IN into a read-only grant")
        // The CSW comes as usual: the command was done, only the data could not be delivered.
        let csw = try front.transfer(port: 1, device: 5, endpoint: 1, type: .bulk, isIn: true, length: 13)
        XCTAssertEqual(csw.status, .ok)
        XCTAssertEqual(Array(csw.data.prefix(4)), [0x55, 0x53, 0x42, 0x53])
        try stickWorks(front, address: 5)
    }

    /// Random requests, half of them plausible (a port, an address, segments over granted pages
    /// with random offsets and lengths), the rest random bytes: every request gets exactly one
    /// response (the stick's URBs that wait for a CBW are answered when it is unplugged), and
    /// the controller serves a new stick afterwards. Reproducible from the seed printed.
    func testRandomRequestsGetOneResponseEach() throws {
        let seed = UInt64.random(in: 0...UInt64.max)
        var rng = SplitMix64(seed: seed)
        let why = "seed \(seed)"
        let pages = try (0..<4).map { _ in try grantedPage() }
        var waiting: Set<UInt16> = []
        var sent = 0
        let before = front.responsesTaken
        for _ in 0..<40 {
            var batch: [UInt16] = []
            for _ in 0..<16 where waiting.count + batch.count < 12 {
                var r = usbif_urb_request()
                withUnsafeMutableBytes(of: &r) { b in for i in 0..<b.count { b[i] = UInt8(truncatingIfNeeded: rng.next()) } }
                if rng.next() % 2 == 0 {
                    let type = USBTransferType(rawValue: UInt8(rng.next() % 4))!
                    let device: UInt8 = [0, 5, 6][Int(rng.next() % 3)]
                    r.pipe = Usbif.Pipe(port: Int(rng.next() % 3), isIn: rng.next() % 2 == 0, device: device, endpoint: UInt8(rng.next() % 4),
                                        type: type).rawValue
                    let n = Int(rng.next() % 5)
                    var total = 0
                    withUnsafeMutableBytes(of: &r.seg) { raw in
                        let segs = raw.bindMemory(to: usbif_request_segment.self)
                        for i in 0..<n {
                            let offset = UInt16(rng.next() % 4096), length = UInt16(rng.next() % UInt64(4097 - Int(offset)))
                            segs[i] = usbif_request_segment(gref: rng.next() % 8 == 0 ? GrantRef(truncatingIfNeeded: rng.next()) : pages[Int(rng.next() % 4)],
                                                            offset: offset, length: length)
                            total += Int(length)
                        }
                    }
                    r.nr_buffer_segs = UInt16(n)
                    r.buffer_length = UInt16(truncatingIfNeeded: total)
                    if type == .isochronous { r.u.isoc.nr_frame_desc_segs = UInt16(rng.next() % 2); r.nr_buffer_segs = UInt16(max(0, n - 1)) }
                }
                r.pipe &= ~UInt32(USBIF_PIPE_UNLINK)   // unlinks of random ids are fine, but answered at once: keep them rarer
                if rng.next() % 16 == 0 { r.pipe |= UInt32(USBIF_PIPE_UNLINK) }
                batch.append(try front.putHostile(r))
                sent += 1
            }
            // Each answered at once, or waiting in the stick (a bulk IN before a CBW).
            for id in batch {
                if (try? front.wait(id, timeoutSeconds: 0.2)) == nil { waiting.insert(id) }
            }
            for id in waiting where (try? front.wait(id, timeoutSeconds: 0)) != nil { waiting.remove(id) }
        }
        // Unplugged, the stick lets go of what it held: one response each.
        try lab.backend.store.write(paths.backendPath + "/port/1", "")
        try front.waitForPort(1, plugged: false)
        for id in waiting { XCTAssertNoThrow(try front.wait(id, timeoutSeconds: 5), "\(why): URB \(id) never answered") }
        XCTAssertGreaterThan(sent, 300, why)
        XCTAssertEqual(front.responsesTaken - before, sent, why)
        XCTAssertEqual(front.duplicateResponses, 0, why)
        // The controller is still connected and serves a new stick.
        XCTAssertEqual(try lab.backend.store.readString(paths.backendPath + "/state"), "4", why)
        lab.register(try XCTUnwrap(try DeviceRegistry.open("storage(device=\"memory(size=1M)\")", of: .usb) as? any USBDevice), as: "stick2")
        try lab.backend.store.write(paths.backendPath + "/port/1", "stick2")
        try front.waitForPort(1)
        _ = try front.enumerate(port: 1, address: 9)
        try stickWorks(front, address: 9)
    }

    /// An impossible producer index on either ring disconnects that controller, with an error
    /// node; another guest's controller keeps working.
    func testAnImpossibleProducerIndexDisconnectsThatControllerAlone() throws {
        lab.register(try XCTUnwrap(try DeviceRegistry.open("storage(device=\"memory(size=1M)\")", of: .usb) as? any USBDevice), as: "bystander-stick")
        let (otherGuest, otherPaths) = try lab.guestWithController(name: "bystander", plugged: [1: "bystander-stick"])
        let other = try LocalUSBFrontend(hypervisor: otherGuest, frontendPath: otherPaths.frontendPath)
        try other.waitForPort(1)
        _ = try other.enumerate(port: 1, address: 5)

        let reqProd = front.urbRing.shared.assumingMemoryBound(to: UInt32.self)
        reqProd.pointee = front.urbRing.size + 40   // more than a ring ahead of the responses
        front.channel.notify()
        _ = try front.connection.waitForBackend([.closing, .closed], timeoutSeconds: 5)
        let error = try XCTUnwrap(try lab.backend.store.readString(paths.backendPath + "/error"))
        XCTAssertTrue(error.contains("impossible"), error)
        try stickWorks(other)

        // The connection ring: an impossible producer index seen when a plug event is due.
        lab.register(try XCTUnwrap(try DeviceRegistry.open("keyboard", of: .usb) as? any USBDevice), as: "kbd")
        let (thirdGuest, thirdPaths) = try lab.guestWithController(name: "third", plugged: [:])
        let third = try LocalUSBFrontend(hypervisor: thirdGuest, frontendPath: thirdPaths.frontendPath)
        third.connRing.shared.assumingMemoryBound(to: UInt32.self).pointee = third.connRing.requestProducer &+ 600
        try lab.backend.store.write(thirdPaths.backendPath + "/port/2", "kbd")
        third.channel.notify()
        _ = try third.connection.waitForBackend([.closing, .closed], timeoutSeconds: 5)
        let connError = try XCTUnwrap(try lab.backend.store.readString(thirdPaths.backendPath + "/error"))
        XCTAssertTrue(connError.contains("connection ring"), connError)
        try stickWorks(other)
        try other.close()
    }
}
