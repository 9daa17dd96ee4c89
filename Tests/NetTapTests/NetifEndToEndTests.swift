import CXen
import Core
import Foundation
import NetTap
import XCTest

/// A Swift netfront and the netif backend on the local hypervisor: frames both ways, byte for
/// byte, with their offload metadata, across slots and queues.
final class NetifEndToEndTests: XCTestCase {
    var lab: NetLab!
    override func setUpWithError() throws { lab = try NetLab() }
    override func tearDown() { lab.shutdown() }

    func testSingleSlotFramesBothWays() throws {
        let endpoint = RecordingEndpoint()
        let (guest, paths) = try lab.guestWithVif(endpoint)
        let front = try LocalNetFrontend(hypervisor: guest, frontendPath: paths.frontendPath)
        XCTAssertEqual(endpoint.acceptedOffloads, .all)
        let out = TestFrames.tcp4(count: 1000, seed: 3)
        XCTAssertTrue(front.send(out))
        XCTAssertTrue(front.waitForTx())
        XCTAssertEqual(front.queues[0].txStatuses, [Netif.statusOkay])
        let got = endpoint.received(1)
        XCTAssertEqual(got.count, 1)
        XCTAssertEqual(got.first?.bytes, out.bytes)
        XCTAssertEqual(got.first?.offload, FrameOffload.none)

        let back = TestFrames.tcp4(count: 60, seed: 9)
        endpoint.send(back)
        let frames = try front.receive()
        XCTAssertEqual(frames.map { $0.bytes }, [back.bytes])
        try front.close()
    }

    func testMultiSlotAndGSOFramesKeepTheirBytesAndOffloads() throws {
        let endpoint = RecordingEndpoint()
        let (guest, paths) = try lab.guestWithVif(endpoint)
        let front = try LocalNetFrontend(hypervisor: guest, frontendPath: paths.frontendPath)
        // A jumbo frame (three slots), and a 64 KiB TSO segment with a partial checksum.
        let jumbo = TestFrames.tcp4(count: 9014, seed: 5)
        var tso = TestFrames.tcp4(count: 65000, seed: 7, partial: true)
        tso.offload.segmentation = .init(kind: .tcpv4, size: 1448)
        XCTAssertTrue(front.send(jumbo))
        XCTAssertTrue(front.send(tso))
        XCTAssertTrue(front.waitForTx())
        // One response per data slot (3 + 16), the GSO extra's RSP_NULL aside.
        XCTAssertEqual(front.queues[0].txStatuses, [Int16](repeating: Netif.statusOkay, count: 19))
        let got = endpoint.received(2)
        XCTAssertEqual(got.map { $0.bytes }, [jumbo.bytes, tso.bytes])
        XCTAssertEqual(got.last?.offload, FrameOffload(checksum: .partial(start: 34, offset: 16), segmentation: .init(kind: .tcpv4, size: 1448)))

        endpoint.send(tso)
        endpoint.send(jumbo)
        let frames = try front.receive(atLeast: 2)
        XCTAssertEqual(frames.map { $0.bytes }, [tso.bytes, jumbo.bytes])
        XCTAssertEqual(frames.first?.offload, tso.offload)
        try front.close()
    }

    /// A 64 KiB frame waits for the 17 or 18 buffers it takes while the guest posts them a few
    /// at a time: the queue's thread sleeps meanwhile (the guest is asked to notify once it has
    /// posted that many), rather than spinning on every buffer short of it, and the frame
    /// arrives whole once they are there.
    func testAFrameWaitingForMoreBuffersThanPostedLetsTheThreadSleep() throws {
        let endpoint = RecordingEndpoint()
        let (front, guest, _) = try lab.frontend(over: endpoint) { $0.rxBuffers = 4 }
        var tso = TestFrames.tcp4(count: 65000, seed: 7, partial: true)
        tso.offload.segmentation = .init(kind: .tcpv4, size: 1448)
        endpoint.send(tso)
        XCTAssertEqual(try front.receive(atLeast: 1, timeoutMilliseconds: 200).count, 0)
        XCTAssertEqual(front.postRxBuffers(8), 8)   // 12: still short
        let before = try XCTUnwrap(Self.threadTicks(named: "netif q0 d\(guest.domainID)"))
        usleep(500_000)
        let after = try XCTUnwrap(Self.threadTicks(named: "netif q0 d\(guest.domainID)"))
        XCTAssertLessThan(after - before, 15, "the ring thread spun for the frame's buffers (ticks of 10 ms in 0.5 s)")
        XCTAssertEqual(front.postRxBuffers(10), 10)
        let got = try front.receive(atLeast: 1)
        XCTAssertEqual(got.map(\.bytes), [tso.bytes])
        try front.close()
    }

    /// The CPU time (user and system clock ticks) of this process's thread named `name`.
    static func threadTicks(named name: String) -> Int? {
        guard let tasks = try? FileManager.default.contentsOfDirectory(atPath: "/proc/self/task") else { return nil }
        for task in tasks {
            guard let comm = try? String(contentsOfFile: "/proc/self/task/\(task)/comm", encoding: .utf8),
                  comm.trimmingCharacters(in: .newlines) == name,
                  let stat = try? String(contentsOfFile: "/proc/self/task/\(task)/stat", encoding: .utf8),
                  let close = stat.lastIndex(of: ")") else { continue }
            // Fields after the name: state is the 3rd, utime and stime the 14th and 15th.
            let fields = stat[stat.index(after: close)...].split(separator: " ")
            guard fields.count > 12, let user = Int(fields[11]), let system = Int(fields[12]) else { return nil }
            return user + system
        }
        return nil
    }

    /// A ring's worth of frames published at once is taken and delivered in several batches
    /// (``NetifQueue``'s 64 slots), with multi-slot frames across the batches' edges: every
    /// slot answered, every frame whole and in order, both ways.
    func testARingOfFramesCrossesBatchesWholeAndInOrder() throws {
        let endpoint = RecordingEndpoint()
        let (guest, paths) = try lab.guestWithVif(endpoint)
        let front = try LocalNetFrontend(hypervisor: guest, frontendPath: paths.frontendPath)
        // Frames of one slot with a jumbo frame (three slots) every seventh: 120 frames, 154 slots.
        let frames = (0..<120).map { i in TestFrames.tcp4(count: i % 7 == 6 ? 9014 : 60 + i, seed: UInt8(i)) }
        let slots = frames.reduce(0) { $0 + ($1.count + xenPageSize - 1) / xenPageSize }
        XCTAssertGreaterThan(slots, 2 * 64, "more than two batches")
        for frame in frames { XCTAssertTrue(front.put(frame)) }
        front.queues[0].pushTx()   // one publication for all of them
        XCTAssertTrue(front.waitForTx())
        XCTAssertEqual(front.queues[0].txStatuses, [Int16](repeating: Netif.statusOkay, count: slots))
        XCTAssertEqual(endpoint.received(frames.count).map { $0.bytes }, frames.map { $0.bytes })

        endpoint.send(frames)
        var back: [EthernetFrame] = []
        while back.count < frames.count {
            let got = try front.receive(atLeast: frames.count - back.count)
            XCTAssertFalse(got.isEmpty, "frames stopped after \(back.count)")
            if got.isEmpty { break }
            back += got
        }
        XCTAssertEqual(back.map { $0.bytes }, frames.map { $0.bytes })
        try front.close()
    }

    /// Runs of copies of a frame (``NetFrameReceiver/toGuest(_:repeating:)``, the generator's
    /// way) wait in the backlog as one entry each, and are delivered as far as the guest's
    /// buffers go: a run split across batches and across the guest's reposts, multi-slot and
    /// GSO runs, every copy whole and in order, counted once.
    func testRunsOfCopiesArriveWholeInOrderAcrossBatchesAndShortBuffers() throws {
        let endpoint = RecordingEndpoint()
        let (guest, paths) = try lab.guestWithVif(endpoint)
        var options = LocalNetFrontend.Options()
        options.rxBuffers = 40   // fewer than a run takes: the runs wait for reposts
        let front = try LocalNetFrontend(hypervisor: guest, frontendPath: paths.frontendPath, options: options)
        var tso = TestFrames.tcp4(count: 20000, seed: 4, partial: true)
        tso.offload.segmentation = .init(kind: .tcpv4, size: 1448)
        let runs: [(EthernetFrame, Int)] = [(TestFrames.tcp4(count: 100, seed: 1), 150),
                                           (TestFrames.tcp4(count: 9014, seed: 2), 30),   // 3 slots each
                                           (tso, 7),                                      // 5 slots and the extra
                                           (TestFrames.tcp4(count: 60, seed: 3), 1)]
        for (frame, count) in runs { endpoint.send(frame, repeating: count) }
        let expected = runs.flatMap { [EthernetFrame](repeating: $0.0, count: $0.1) }
        var back: [EthernetFrame] = []
        while back.count < expected.count {
            let got = try front.receive(atLeast: 1)
            XCTAssertFalse(got.isEmpty, "frames stopped after \(back.count)")
            if got.isEmpty { break }
            back += got
        }
        XCTAssertEqual(back.count, expected.count)
        XCTAssertTrue(zip(back, expected).allSatisfy { $0.bytes == $1.bytes && $0.offload == $1.offload }, "every copy whole, in order")
        let backend = try XCTUnwrap(lab.host.inspect { $0[paths.backendPath]?.driver as? NetifBackend })
        XCTAssertEqual(backend.counters.rxFrames, UInt64(expected.count))
        XCTAssertEqual(backend.counters.rxBytes, UInt64(expected.reduce(0) { $0 + $1.count }))
        XCTAssertEqual(backend.counters.rxDropped, 0)
        try front.close()
    }

    func testGuestWithoutScatterGatherGetsNoLargeFrames() throws {
        let endpoint = RecordingEndpoint()
        let (guest, paths) = try lab.guestWithVif(endpoint)
        var options = LocalNetFrontend.Options()
        options.scatterGather = false
        let front = try LocalNetFrontend(hypervisor: guest, frontendPath: paths.frontendPath, options: options)
        XCTAssertEqual(endpoint.acceptedOffloads, [.checksum])
        endpoint.send(TestFrames.tcp4(count: 9014))
        endpoint.send(TestFrames.tcp4(count: 1514, seed: 2))
        let frames = try front.receive()
        XCTAssertEqual(frames.map { $0.count }, [1514])
        try front.close()
    }

    /// A TCP segment for a guest whose netfront negotiated no GSO (nor scatter-gather) reaches
    /// it cut into MSS-sized segments, their checksums left partial for netfront to finish
    /// (it used to be dropped).
    func testAGuestWithoutGSOGetsTheSegmentsOfALargeFrame() throws {
        let endpoint = RecordingEndpoint()
        let (guest, paths) = try lab.guestWithVif(endpoint)
        var options = LocalNetFrontend.Options()
        options.gso = false
        options.scatterGather = false
        let front = try LocalNetFrontend(hypervisor: guest, frontendPath: paths.frontendPath, options: options)
        XCTAssertEqual(endpoint.acceptedOffloads, [.checksum])
        var tso = TestFrames.tcp4(count: 54 + 10000, seed: 7, partial: true)
        tso.offload.segmentation = .init(kind: .tcpv4, size: 1448)
        endpoint.send(tso)
        let frames = try front.receive(atLeast: 7)
        XCTAssertEqual(frames.map(\.count), [Int](repeating: 54 + 1448, count: 6) + [54 + 1312])
        var payload: [UInt8] = []
        for (i, f) in frames.enumerated() {
            let b = f.bytes
            XCTAssertEqual(f.offload.checksum, .partial(start: 34, offset: 16))
            XCTAssertNil(f.offload.segmentation)
            XCTAssertEqual(Int(b[16]) << 8 | Int(b[17]), f.count - 14, "IPv4 total length")
            XCTAssertEqual(Int(b[40]) << 8 | Int(b[41]), i * 1448, "sequence number")
            payload += b[54...]
        }
        XCTAssertEqual(payload, Array(tso.bytes[54...]))
        let backend = try XCTUnwrap(lab.host.inspect { $0[paths.backendPath]?.driver as? NetifBackend })
        XCTAssertEqual(backend.counters.rxFrames, 7)
        XCTAssertEqual(backend.counters.rxDropped, 0)
        try front.close()
    }

    func testTwoQueuesCarryTheirOwnFrames() throws {
        let endpoint = RecordingEndpoint()
        let (front, _, paths) = try lab.frontend(over: endpoint) { $0.queues = 2 }
        XCTAssertEqual(front.queues.count, 2)
        XCTAssertTrue(front.send(TestFrames.tcp4(count: 100, seed: 1), queue: 0))
        XCTAssertTrue(front.send(TestFrames.tcp4(count: 200, seed: 2), queue: 1))
        let got = endpoint.received(2)
        XCTAssertEqual(Set(got.map { "\($0.queue):\($0.count)" }), ["0:100", "1:200"])
        var toQueue1 = TestFrames.tcp4(count: 300)
        toQueue1.queue = 1
        endpoint.send(toQueue1)
        XCTAssertEqual(try front.receive(queue: 1).map { $0.count }, [300])
        XCTAssertEqual(try front.receive(queue: 0, atLeast: 1, timeoutMilliseconds: 100).count, 0)
        try front.close()
    }
}
