import Core
import Devices
import Glibc
import Synchronization
import XCTest

/// `generator`: frames made when the guest posts buffers, as many as they hold, with correct
/// headers and checksums; its count, GSO and parameters; a filter above passes the demand down.
final class FrameGeneratorTests: XCTestCase {
    /// Whether the IPv4 header and the TCP segment of `frame` carry correct checksums.
    func checksumsAreCorrect(_ frame: EthernetFrame) -> Bool {
        frame.withUnsafeBytes { b in
            let ip = FrameChecksum.fold(FrameChecksum.sum(UnsafeRawBufferPointer(rebasing: b[14..<34])))
            var pseudo = FrameChecksum.sum(UnsafeRawBufferPointer(rebasing: b[26..<34]))
            pseudo &+= 6 &+ UInt64(b.count - 34)
            let tcp = FrameChecksum.fold(FrameChecksum.sum(UnsafeRawBufferPointer(rebasing: b[34...]), initial: pseudo))
            return ip == 0xffff && tcp == 0xffff
        }
    }

    func testFramesAreMadeForTheBuffersPostedUpToTheCount() throws {
        let generator = try XCTUnwrap(try DeviceRegistry.open("generator(size=60, count=5, dst=00:16:3e:00:00:07)", of: .net) as? FrameGenerator)
        XCTAssertTrue(generator.makesFramesOnDemand)
        let up = CollectingReceiver()
        generator.connect(up, accepting: .all)
        generator.guestPostedBuffers(3, queue: 1)
        XCTAssertEqual(up.received.count, 3)
        for frame in up.received {
            XCTAssertEqual(frame.count, 60)
            XCTAssertEqual(frame.queue, 1)
            XCTAssertEqual(Array(frame.bytes[0..<6]), [0x00, 0x16, 0x3e, 0, 0, 7])
            XCTAssertEqual(Array(frame.bytes[12..<14]), [0x08, 0x00])
            XCTAssertEqual(frame.offload, FrameOffload.none)
            XCTAssertTrue(checksumsAreCorrect(frame))
        }
        generator.guestPostedBuffers(10, queue: 1)
        XCTAssertEqual(up.received.count, 5, "count=5 is the end")
        generator.guestPostedBuffers(10, queue: 0)
        XCTAssertEqual(up.received.count, 5)
        XCTAssertEqual(generator.counts, NetTraffic(frames: 5, bytes: 300))
        generator.close()
        generator.guestPostedBuffers(10, queue: 0)
        XCTAssertEqual(up.received.count, 5, "nothing after close")
    }

    func testAGSOFrameWaitsForTheSlotsItTakes() throws {
        let generator = try FrameGenerator(size: 65535, mss: 1448)
        let up = CollectingReceiver()
        generator.connect(up, accepting: .all)
        // 16 data pages, or 17 when cut where the frame's own pages end, and the GSO extra.
        generator.guestPostedBuffers(20, queue: 0)
        XCTAssertEqual(up.received.count, 1)
        let slots = RxSlotLayout.slots(of: try XCTUnwrap(up.received.first))
        XCTAssert((17...18).contains(slots), "\(slots) slots")
        generator.guestPostedBuffers(slots - (20 - slots) - 1, queue: 0)
        XCTAssertEqual(up.received.count, 1, "one buffer short of a second frame")
        generator.guestPostedBuffers(1, queue: 0)
        XCTAssertEqual(up.received.count, 2)
        var frame = try XCTUnwrap(up.received.last)
        XCTAssertEqual(frame.count, 65535)
        XCTAssertEqual(frame.offload.segmentation, .init(kind: .tcpv4, size: 1448))
        XCTAssertEqual(frame.offload.checksum, .partial(start: 34, offset: 16))
        XCTAssertTrue(FrameChecksum.complete(&frame))
        XCTAssertTrue(checksumsAreCorrect(frame))
    }

    func testAFilterAboveAGeneratorPassesTheDemandDown() throws {
        let stack = try XCTUnwrap(try DeviceRegistry.open("stats | generator(size=100)", of: .net) as? NetStatsFilter)
        XCTAssertTrue(stack.makesFramesOnDemand)
        let up = CollectingReceiver()
        stack.connect(up, accepting: .all)
        stack.guestPostedBuffers(4, queue: 0)
        XCTAssertEqual(up.received.map(\.count), [100, 100, 100, 100])
        XCTAssertEqual(stack.counters.toGuest, NetTraffic(frames: 4, bytes: 400))
        XCTAssertFalse(try XCTUnwrap(try DeviceRegistry.open("stats | null", of: .net) as? NetStatsFilter).makesFramesOnDemand)
        stack.close()
    }

    /// With a rate, a thread of its own hands the frames up as they fall due, whether or not
    /// buffers were posted (none here), in several runs, up to the count; nothing after close.
    func testAPacedGeneratorSendsItsCountOverTimeWithoutBeingAsked() throws {
        let generator = try XCTUnwrap(try DeviceRegistry.open("generator(size=60, count=150, rate=2k)", of: .net) as? FrameGenerator)
        XCTAssertEqual(generator.rate, 2000)
        XCTAssertFalse(generator.makesFramesOnDemand, "paced, it does not wait for buffers")
        let up = CountingRunReceiver()
        generator.connect(up, accepting: .all)
        XCTAssertEqual(generator.guestPostedBuffers(10, queue: 0), 0, "and makes none when asked (nor takes them from its count)")
        let deadline = monotonicSeconds() + 10
        while up.frames < 150 && monotonicSeconds() < deadline { usleep(1000) }
        XCTAssertEqual(up.frames, 150)
        // 150 frames at 2000 a second are 75 ms of them; a run holds 50 ms at most.
        XCTAssertGreaterThanOrEqual(up.runs, 2, "paced, not sent at once")
        usleep(20_000)
        XCTAssertEqual(up.frames, 150, "count=150 is the end")
        XCTAssertEqual(generator.counts, NetTraffic(frames: 150, bytes: 9000))
        generator.close()

        let endless = try FrameGenerator(size: 60, rate: 1000)
        let other = CountingRunReceiver()
        endless.connect(other, accepting: .all)
        while other.frames == 0 && monotonicSeconds() < deadline { usleep(1000) }
        endless.close()
        let after = other.frames
        usleep(20_000)
        XCTAssertGreaterThan(after, 0)
        XCTAssertEqual(other.frames, after, "nothing after close")
    }

    func testBadParametersAreRefused() throws {
        let generator = try FrameGenerator(size: 100)
        XCTAssertThrowsError(try generator.use(size: 40, mss: nil)) { XCTAssertTrue("\($0)".contains("size 40"), "\($0)") }
        XCTAssertThrowsError(try generator.use(size: 1000, mss: 1000)) { XCTAssertTrue("\($0)".contains("mss 1000"), "\($0)") }
        for (spec, message) in [("generator(size=40)", "size '40'"), ("generator(size=1514, mss=1500)", "mss 1500"),
                                ("generator(dst=zz)", "dst 'zz'"), ("generator(count=0)", "count '0'"),
                                ("generator(rate=0)", "rate '0'"), ("generator(rate=2T)", "rate '2T'"), ("generator(rate=5G)", "rate '5G'")] {
            XCTAssertThrowsError(try DeviceRegistry.open(spec, of: .net), spec) { error in
                XCTAssertTrue("\(error)".contains(message), "\(spec): \(error)")
            }
        }
    }
}

/// Counts what comes up, and in how many handings (a run of copies is one).
final class CountingRunReceiver: NetFrameReceiver, @unchecked Sendable {
    private let counts = Mutex<(frames: Int, runs: Int)>((0, 0))
    func toGuest(_ frame: EthernetFrame) { toGuest(frame, repeating: 1) }
    func toGuest(_ frame: EthernetFrame, repeating count: Int) { counts.withLock { $0.frames += count; $0.runs += 1 } }
    var frames: Int { counts.withLock { $0.frames } }
    var runs: Int { counts.withLock { $0.runs } }
}
