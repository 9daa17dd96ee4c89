import CXen
import Core
import Foundation
import NetTap
import Synchronization
import XCTest
import XenStore

/// A frontend that breaks netif's rules, one rule per test: netback's fatal errors disconnect
/// that vif alone (its backend goes Closing with an `error` node), its other errors answer the
/// frame's slots with XEN_NETIF_RSP_ERROR and the vif goes on; the daemon and other guests'
/// vifs keep serving throughout.
final class NetifHostileFrontendTests: XCTestCase {
    var lab: NetLab!
    var endpoint: RecordingEndpoint!
    var front: LocalNetFrontend!
    var paths: XenbusDevicePaths!
    var queue: LocalNetFrontend.Queue { front.queues[0] }

    override func setUpWithError() throws {
        lab = try NetLab()
        endpoint = RecordingEndpoint()
        let (guest, p) = try lab.guestWithVif(endpoint)
        paths = p
        front = try LocalNetFrontend(hypervisor: guest, frontendPath: p.frontendPath)
    }
    override func tearDown() { lab.shutdown() }

    /// A data slot whose page holds `bytes` (at `offset`); `size` as written in the request.
    func slot(_ bytes: [UInt8], offset: UInt16 = 0, size: Int? = nil, flags: UInt16 = 0) -> netif_tx_request {
        let (id, ref, page) = queue.takeTxID()!
        (page + Int(offset)).copyMemory(from: bytes, byteCount: bytes.count)
        return netif_tx_request(gref: ref, offset: offset, flags: flags, id: id, size: UInt16(size ?? bytes.count))
    }

    func gsoExtra(size: UInt16, type: UInt8 = Netif.gsoTCPv4, flags: UInt8 = 0) -> netif_extra_info {
        var e = netif_extra_info()
        e.type = Netif.extraGSO; e.flags = flags
        e.u.gso.size = size; e.u.gso.type = type
        return e
    }

    /// The backend failed this vif: Closing (or Closed) with an error that mentions `text`.
    func assertFatal(_ text: String, file: StaticString = #filePath, line: UInt = #line) throws {
        let store = lab.backend.store
        let state = try XenbusDeviceState.wait(store, paths.backendPath + "/state", for: [.closing, .closed], timeoutSeconds: 5)
        XCTAssertTrue(state == .closing || state == .closed, file: file, line: line)
        let error = try store.readString(paths.backendPath + "/error") ?? ""
        XCTAssertTrue(error.contains(text), "error node: \(error)", file: file, line: line)
        try assertOtherGuestsServed(file: file, line: line)
    }

    /// A second guest attaches and passes frames both ways while the first is broken.
    func assertOtherGuestsServed(file: StaticString = #filePath, line: UInt = #line) throws {
        let other = RecordingEndpoint()
        let (guest, p) = try lab.guestWithVif(other, name: "bystander")
        let f = try LocalNetFrontend(hypervisor: guest, frontendPath: p.frontendPath)
        let frame = TestFrames.tcp4(count: 200, seed: 4)
        XCTAssertTrue(f.send(frame), file: file, line: line)
        XCTAssertEqual(other.received(1).first?.bytes, frame.bytes, file: file, line: line)
        other.send(frame)
        XCTAssertEqual(try f.receive().first?.bytes, frame.bytes, file: file, line: line)
        try f.close()
    }

    /// The vif answered the slots put since the last check with `statuses`, and still carries
    /// a good frame.
    func assertAnswered(_ statuses: [Int16], file: StaticString = #filePath, line: UInt = #line) {
        queue.pushTx()
        XCTAssertTrue(front.waitForTx(), "no answer", file: file, line: line)
        XCTAssertEqual(queue.txStatuses, statuses, file: file, line: line)
        // The backend answers a sweep's slots before it hands the frames down: a frame of the
        // slots answered may reach the endpoint just after the answer, so wait for the good one.
        let good = TestFrames.tcp4(count: 120, seed: 8)
        XCTAssertTrue(front.send(good), file: file, line: line)
        let deadline = Date(timeIntervalSinceNow: 5)
        var got = endpoint.received(1)
        while got.last?.bytes != good.bytes && Date() < deadline { got = endpoint.received(got.count + 1, within: 0.05) }
        XCTAssertEqual(got.last?.bytes, good.bytes, file: file, line: line)
    }

    // MARK: Fatal: the vif is disconnected

    func testProducerIndexFarAheadDisconnectsTheVif() throws {
        // req_prod more than a ring ahead of the responses (RING_REQUEST_PROD_OVERFLOW).
        cxen_store32(queue.tx.shared.assumingMemoryBound(to: UInt32.self), 1000)
        queue.txChannel.notify()
        try assertFatal("impossible tx request producer index")
    }

    func testExtraOfTypeZeroOrPastTheLastIsFatal() throws {
        let frame = TestFrames.tcp4(count: 100).bytes
        queue.putRawTx(slot(frame, flags: Netif.txExtraInfo))
        var e = netif_extra_info()
        e.type = 0
        queue.putRawExtra(e)
        queue.pushTx()
        try assertFatal("invalid extra-info type 0")
    }

    func testExtraTypeBeyondMaximumIsFatal() throws {
        queue.putRawTx(slot(TestFrames.tcp4(count: 100).bytes, flags: Netif.txExtraInfo))
        var e = netif_extra_info()
        e.type = Netif.extraTypeMax
        queue.putRawExtra(e)
        queue.pushTx()
        try assertFatal("invalid extra-info type \(Netif.extraTypeMax)")
    }

    func testGSOSizeZeroIsFatal() throws {
        queue.putRawTx(slot(TestFrames.tcp4(count: 100).bytes, flags: Netif.txExtraInfo))
        queue.putRawExtra(gsoExtra(size: 0))
        queue.pushTx()
        try assertFatal("GSO extra with size 0")
    }

    func testUnknownGSOTypeIsFatal() throws {
        queue.putRawTx(slot(TestFrames.tcp4(count: 100).bytes, flags: Netif.txExtraInfo))
        queue.putRawExtra(gsoExtra(size: 1400, type: 3))
        queue.pushTx()
        try assertFatal("GSO extra of type 3")
    }

    func testMissingExtraIsFatal() throws {
        queue.putRawTx(slot(TestFrames.tcp4(count: 100).bytes, flags: Netif.txExtraInfo))
        queue.pushTx()
        try assertFatal("extra-info slot the ring does not hold")
    }

    func testMoreDataPastThePublishedSlotsIsFatal() throws {
        queue.putRawTx(slot(TestFrames.tcp4(count: 100).bytes, size: 200, flags: Netif.txMoreData))
        queue.pushTx()
        try assertFatal("more slots than the ring holds")
    }

    /// A frame of `count` 64-byte slots.
    func putSlots(_ count: Int) -> [UInt8] {
        let frame = TestFrames.tcp4(count: count * 64).bytes
        for i in 0..<count {
            let part = Array(frame[(i * 64)..<((i + 1) * 64)])
            queue.putRawTx(slot(part, size: i == 0 ? frame.count : 64, flags: i < count - 1 ? Netif.txMoreData : 0))
        }
        return frame
    }

    func testTwentyTwoSlotsAreFatal() throws {
        _ = putSlots(22)
        queue.pushTx()
        try assertFatal("at most 21")
    }

    func testSlotCrossingItsPageIsFatal() throws {
        let frame = TestFrames.tcp4(count: 300).bytes
        queue.putRawTx(slot(Array(frame[0..<100]), size: 300, flags: Netif.txMoreData))
        queue.putRawTx(slot(Array(frame[100..<300]), offset: 4000, size: 200))
        queue.pushTx()
        try assertFatal("crosses its page")
    }

    func testFirstSlotCrossingItsPageIsFatal() throws {
        queue.putRawTx(slot(Array(TestFrames.tcp4(count: 100).bytes[0..<90]), offset: 4090, size: 100))
        queue.pushTx()
        try assertFatal("crosses its page")
    }

    // MARK: Dropped with an error response: the vif goes on

    func testFirstSlotShorterThanAnEthernetHeaderIsAnswered() throws {
        queue.putRawTx(slot([1, 2, 3, 4, 5, 6, 7, 8, 9, 10]))
        assertAnswered([Netif.statusError])
        XCTAssertEqual(endpoint.count, 1)   // only the good frame went down
    }

    func testZeroLengthFrameIsAnswered() throws {
        queue.putRawTx(slot([], size: 0))
        assertAnswered([Netif.statusError])
    }

    func testSlotLargerThanTheRestOfTheFrameIsAnswered() throws {
        let frame = TestFrames.tcp4(count: 300).bytes
        queue.putRawTx(slot(Array(frame[0..<100]), size: 150, flags: Netif.txMoreData))
        queue.putRawTx(slot(Array(frame[100..<300])))   // 200 > the 50 left
        assertAnswered([Netif.statusError, Netif.statusError])
    }

    func testTwentyAndTwentyOneSlotsAreDropped() throws {
        _ = putSlots(20)
        _ = putSlots(21)
        assertAnswered([Int16](repeating: Netif.statusError, count: 41))
    }

    func testNineteenSlotsAreTaken() throws {
        let frame = putSlots(19)
        assertAnswered([Int16](repeating: Netif.statusOkay, count: 19))
        let got = endpoint.received(2)
        XCTAssertEqual(got.map { $0.count }, [frame.count, 120])
        XCTAssertEqual(got.first?.bytes, frame)
    }

    func testBadGrantReferenceIsAnswered() throws {
        var request = slot(TestFrames.tcp4(count: 100).bytes)
        request.gref = 60_000
        queue.putRawTx(request)
        assertAnswered([Netif.statusError])
    }

    func testZeroLengthSlotsInAFrameCarryNothing() throws {
        let frame = TestFrames.tcp4(count: 300).bytes
        queue.putRawTx(slot(Array(frame[0..<100]), size: 300, flags: Netif.txMoreData))
        var empty = slot([], size: 0, flags: Netif.txMoreData)
        empty.gref = 60_000   // never touched: it carries no bytes
        queue.putRawTx(empty)
        queue.putRawTx(slot(Array(frame[100..<300])))
        assertAnswered([Netif.statusOkay, Netif.statusOkay, Netif.statusOkay])
        XCTAssertEqual(endpoint.received(2).first?.bytes, frame)
    }

    func testHeadersSplitAcrossSlotsAreParsedWhole() throws {
        // XSA-423: the Ethernet header alone in the first slot, IP and TCP in the next ones.
        let frame = TestFrames.tcp4(count: 200, partial: true).bytes
        queue.putRawTx(slot(Array(frame[0..<14]), size: 200, flags: Netif.txMoreData | Netif.txChecksumBlank))
        queue.putRawTx(slot(Array(frame[14..<30]), flags: Netif.txMoreData))
        queue.putRawTx(slot(Array(frame[30..<200])))
        assertAnswered([Netif.statusOkay, Netif.statusOkay, Netif.statusOkay])
        let got = endpoint.received(2).first
        XCTAssertEqual(got?.bytes, frame)
        XCTAssertEqual(got?.offload.checksum, .partial(start: 34, offset: 16))
    }

    func testPartialChecksumOnAFrameThatIsNotTCPOrUDPIsAnswered() throws {
        var arp = [UInt8](repeating: 0xff, count: 42)
        arp[12] = 0x08; arp[13] = 0x06
        queue.putRawTx(slot(arp, flags: Netif.txChecksumBlank))
        assertAnswered([Netif.statusError])
    }

    func testGSOOnAFrameThatIsNotTCPIsAnswered() throws {
        var udp = TestFrames.tcp4(count: 3000).bytes
        udp[23] = 17   // UDP
        queue.putRawTx(slot(Array(udp[0..<3000]), flags: Netif.txExtraInfo | Netif.txChecksumBlank))
        queue.putRawExtra(gsoExtra(size: 1400))
        assertAnswered([Netif.statusError])
    }

    func testMulticastAddIsADummyRequest() throws {
        var request = slot([], size: 0, flags: Netif.txExtraInfo)
        request.gref = 60_000   // a dummy: its data is never read
        queue.putRawTx(request)
        var e = netif_extra_info()
        e.type = Netif.extraMulticastAdd
        withUnsafeMutableBytes(of: &e.u.mcast.addr) { $0.copyBytes(from: [0x01, 0x00, 0x5e, 0, 0, 1]) }
        queue.putRawExtra(e)
        assertAnswered([Netif.statusOkay])
    }

    func testGarbageInEveryFieldNeverCrashes() throws {
        // Random requests: whatever they say, each is answered or the vif is failed, and the
        // daemon goes on serving others.
        var rng = SystemRandomNumberGenerator()
        for _ in 0..<200 {
            var r = netif_tx_request()
            withUnsafeMutableBytes(of: &r) { for i in 0..<$0.count { $0[i] = UInt8.random(in: 0...255, using: &rng) } }
            if Bool.random() { r.gref = queue.txRefs[Int.random(in: 0..<queue.txRefs.count)] }
            queue.putRawTx(r)
            if queue.tx.freeRequests == 0 { break }
        }
        queue.pushTx()
        try assertOtherGuestsServed()
    }

    // MARK: Event storms (XSA-332)

    /// A frontend that notifies its tx channel in a tight loop and publishes nothing: the
    /// vif's ring thread takes a few dozen events a second (its channel unmasked later after
    /// each spurious one, as Linux's lateeoi does), another guest is served meanwhile, and
    /// when the storm ends the vif carries frames again.
    func testAnEventStormCostsBoundedWakeUpsAndOtherGuestsAreServed() throws {
        let backend = try XCTUnwrap(lab.host.inspect { $0[self.paths.backendPath]?.driver as? NetifBackend })
        let before = backend.counters.events
        final class Storm: Sendable { let on = Atomic<Bool>(true), notified = Atomic<Int>(0) }
        let storm = Storm()
        let channel = queue.txChannel
        try PosixThread.detached("storm") {
            while storm.on.load(ordering: .relaxed) { channel.notify(); storm.notified.add(1, ordering: .relaxed) }
        }
        let start = monotonicSeconds()
        try assertOtherGuestsServed()
        while monotonicSeconds() - start < 1 { usleep(10_000) }
        storm.on.store(false, ordering: .relaxed)
        let seconds = monotonicSeconds() - start
        usleep(1000)
        let events = backend.counters.events
        let taken = events.events - before.events, spurious = events.spurious - before.spurious
        XCTAssertGreaterThan(storm.notified.load(ordering: .relaxed), 10_000, "a storm")
        // 1 s: a couple of unmasks at once, then 1, 2, 4 … 32 ms apart.
        XCTAssertLessThan(taken, UInt64(20 + 50 * seconds), "\(events) in \(seconds) s")
        XCTAssertGreaterThan(spurious, 10, "\(events)")
        XCTAssertGreaterThan(events.delayedUnmasks, 5, "\(events)")
        let good = TestFrames.tcp4(count: 120, seed: 8)
        XCTAssertTrue(front.send(good))
        XCTAssertEqual(endpoint.received(1).last?.bytes, good.bytes, "the vif serves again")
    }

    // MARK: Rx: a guest that posts no buffers

    /// A guest that posts no rx buffers, its vif over an endpoint the test sends from.
    private func starvedGuest(_ name: String, scatterGather: Bool) throws -> (RecordingEndpoint, XenbusDevicePaths, LocalNetFrontend) {
        let starved = RecordingEndpoint()
        let (guest, p) = try lab.guestWithVif(starved, name: name)
        var options = LocalNetFrontend.Options()
        options.rxBuffers = 0
        options.scatterGather = scatterGather
        return (starved, p, try LocalNetFrontend(hypervisor: guest, frontendPath: p.frontendPath, options: options))
    }

    func testFloodToAGuestWithoutBuffersStaysBounded() throws {
        let (starved, p, f) = try starvedGuest("starved", scatterGather: true)
        let frame = TestFrames.tcp4(count: 1500)
        for _ in 0..<5000 { starved.send(frame) }   // 7.5 MB against a 1 MiB backlog
        let backend = lab.host.inspect { $0[p.backendPath]?.driver as? NetifBackend }
        let counters = try XCTUnwrap(backend?.counters)
        XCTAssertGreaterThanOrEqual(counters.rxDropped, UInt64(5000 - (1 << 20) / 1500 - 1))
        XCTAssertEqual(counters.rxFrames, 0)
        // The guest that does post buffers is not held up by it.
        try assertOtherGuestsServed()
        try f.close()
    }

    /// A run of copies is admitted as far as the backlog's bound goes, the rest dropped and
    /// counted; a later run finds no room either.
    func testARunToAGuestWithoutBuffersStaysBounded() throws {
        let (starved, p, f) = try starvedGuest("starved-run", scatterGather: true)
        let backend = lab.host.inspect { $0[p.backendPath]?.driver as? NetifBackend }
        starved.send(TestFrames.tcp4(count: 1500), repeating: 5000)   // 7.5 MB against a 1 MiB backlog
        starved.send(TestFrames.tcp4(count: 100), repeating: 1000)
        // Any number of copies: no overflow, no array of them (a device may ask for anything).
        starved.send(TestFrames.tcp4(count: 100), repeating: Int.max)
        starved.send(EthernetFrame(count: 0), repeating: 1 << 40)
        let admitted: UInt64 = (1 << 20) / 1500
        let counters = try XCTUnwrap(backend?.counters)
        XCTAssertEqual(counters.rxDropped, 5000 - admitted + 1000 + UInt64(Int.max) + (1 << 40))
        XCTAssertEqual(counters.rxFrames, 0)
        // Buffers posted now take the admitted frames, and no more.
        XCTAssertEqual(f.postRxBuffers(256), 256)
        var got = 0
        while got < Int(admitted), case let frames = try f.receive(atLeast: 1, timeoutMilliseconds: 2000), !frames.isEmpty {
            got += frames.count
        }
        XCTAssertEqual(got, Int(admitted))
        try f.close()
    }

    /// Frames a guest cannot take (too large without scatter-gather) leave the backlog once:
    /// counted twice, they would make room for more than the bound.
    func testDroppedFramesDoNotWidenTheBacklog() throws {
        let (starved, p, f) = try starvedGuest("narrow", scatterGather: false)
        let backend = lab.host.inspect { $0[p.backendPath]?.driver as? NetifBackend }
        let large = TestFrames.tcp4(count: 9014)
        for _ in 0..<100 { starved.send(large) }
        let deadline = monotonicSeconds() + 5
        while (backend?.counters.rxDropped ?? 0) < 100 && monotonicSeconds() < deadline { usleep(1000) }
        XCTAssertEqual(backend?.counters.rxDropped, 100, "every frame too large for the guest is dropped")
        let frame = TestFrames.tcp4(count: 1500)
        for _ in 0..<5000 { starved.send(frame) }   // 7.5 MB against a 1 MiB backlog
        let counters = try XCTUnwrap(backend?.counters)
        let admitted: UInt64 = (1 << 20) / 1500 + 1
        XCTAssertGreaterThanOrEqual(counters.rxDropped, 5100 - admitted, "the backlog holds at most 1 MiB, whatever was dropped before")
        try f.close()
    }
}
