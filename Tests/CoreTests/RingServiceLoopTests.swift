import CXen
import Core
import Glibc
import Synchronization
import XCTest

/// An event channel whose peer is the test: `notify` (or `fire`) makes it readable.
private final class TestChannel: EventChannel, @unchecked Sendable {
    let localPort: EventPort
    let fileDescriptor = cxen_eventfd(0, Int32(CXEN_EFD_CLOEXEC | CXEN_EFD_NONBLOCK))
    let closed = Atomic<Bool>(false)
    init(port: EventPort) { localPort = port }
    deinit { Glibc.close(fileDescriptor) }
    func fire() { var one: UInt64 = 1; _ = Glibc.write(fileDescriptor, &one, 8) }
    func notify() {}
    @discardableResult func consume() -> Bool { var v: UInt64 = 0; return Glibc.read(fileDescriptor, &v, 8) == 8 }
    func wait(timeoutMilliseconds: Int32) -> Bool { false }
    func close() { closed.store(true, ordering: .relaxed) }
}

/// A service whose work the test counts: `inFlight` is set by the test, each completion
/// finishes one; everything the loop calls is recorded with whether it ran on the loop's thread.
private final class CountingService: RingService, @unchecked Sendable {
    typealias Completion = Int
    let outstanding = Atomic<Int>(0)
    let record = Mutex<(finished: [Int], offThread: Int, channels: [Int], fds: [Int], ended: Int)>(([], 0, [], [], 0))
    weak var loop: RingServiceLoop<CountingService>?
    let pipeRead: Int32

    init(pipeRead: Int32) { self.pipeRead = pipeRead }

    private func onLoop() -> Bool { loop?.isLoopThread ?? false }
    func takeWork() {}
    func finish(_ completion: Int) {
        let on = onLoop()
        record.withLock { $0.finished.append(completion); if !on { $0.offThread += 1 } }
        outstanding.subtract(1, ordering: .relaxed)
    }
    func publish() {}
    var inFlight: Int { outstanding.load(ordering: .relaxed) }
    func hasWork() -> Bool { false }
    func prepareToSleep() -> Bool { false }
    func eventChannelFired(_ index: Int) { record.withLock { $0.channels.append(index) } }
    func fileDescriptorReady(_ index: Int, events: Int16) {
        var byte: UInt8 = 0
        _ = Glibc.read(pipeRead, &byte, 1)
        record.withLock { $0.fds.append(index) }
    }
    func ended() {
        let on = onLoop()
        record.withLock { $0.ended += 1; if !on { $0.offThread += 1 } }
    }
}

final class RingServiceLoopTests: XCTestCase {
    private var channels: [TestChannel] = []
    private var pipe: [Int32] = [-1, -1]
    private var service: CountingService!
    private var loop: RingServiceLoop<CountingService>!

    override func setUpWithError() throws {
        channels = [TestChannel(port: 1), TestChannel(port: 2)]
        XCTAssertEqual(Glibc.pipe(&pipe), 0)
        service = CountingService(pipeRead: pipe[0])
        loop = try RingServiceLoop(purpose: "test", channels: channels, fileDescriptors: [(pipe[0], Int16(POLLIN))],
                                   poller: AdaptivePoller(microseconds: 0), completionCapacity: 64)
        service.loop = loop
        try loop.start(service)
    }
    override func tearDown() {
        loop.stop(timeout: 5)
        Glibc.close(pipe[0]); Glibc.close(pipe[1])
    }

    private func waitUntil(_ what: String, _ condition: () -> Bool) {
        let deadline = monotonicSeconds() + 5
        while !condition() && monotonicSeconds() < deadline { usleep(1000) }
        XCTAssertTrue(condition(), what)
    }

    func testCompletionsPostedByOtherThreadsAreFinishedOnTheLoopThreadInOrder() throws {
        service.outstanding.store(1000, ordering: .relaxed)
        let loop = self.loop!
        try PosixThread.detached("poster") { for i in 0..<1000 { loop.post(i) } }
        waitUntil("every completion finished") { service.record.withLock { $0.finished.count } == 1000 }
        let r = service.record.withLock { $0 }
        XCTAssertEqual(r.finished, Array(0..<1000))
        XCTAssertEqual(r.offThread, 0, "finished on the loop's thread")
        XCTAssertFalse(loop.isLoopThread)
    }

    func testEventChannelsAndFileDescriptorsAreReportedByIndex() {
        channels[1].fire()
        waitUntil("channel 1 reported") { service.record.withLock { $0.channels } == [1] }
        channels[0].fire()
        waitUntil("channel 0 reported") { service.record.withLock { $0.channels } == [1, 0] }
        var byte: UInt8 = 7
        XCTAssertEqual(Glibc.write(pipe[1], &byte, 1), 1)
        waitUntil("the pipe reported") { service.record.withLock { $0.fds } == [0] }
    }

    /// A device that never completes: stop gives up after its timeout, and nothing is released
    /// (its pages may still be written); the last completion, however late, releases everything
    /// on the loop's thread.
    func testStopWaitsForWorkInFlightAndReleasesOnlyWhenItCompletes() {
        service.outstanding.store(1, ordering: .relaxed)
        let start = monotonicSeconds()
        XCTAssertFalse(loop.stop(timeout: 0.2), "a request is in flight")
        XCTAssertGreaterThanOrEqual(monotonicSeconds() - start, 0.2)
        XCTAssertFalse(loop.hasEnded)
        XCTAssertEqual(service.record.withLock { $0.ended }, 0, "nothing released while the device may write")
        XCTAssertFalse(channels[0].closed.load(ordering: .relaxed))
        loop.post(42)
        waitUntil("the loop ends after the last completion") { loop.hasEnded }
        let r = service.record.withLock { $0 }
        XCTAssertEqual(r.finished, [42])
        XCTAssertEqual(r.ended, 1)
        XCTAssertEqual(r.offThread, 0, "released on the loop's thread")
        XCTAssertTrue(channels.allSatisfy { $0.closed.load(ordering: .relaxed) })
        XCTAssertTrue(loop.stop(timeout: 1), "a later stop sees it ended")
    }

    func testStopWithNothingInFlightEndsAtOnce() {
        XCTAssertTrue(loop.stop(timeout: 5))
        XCTAssertTrue(loop.hasEnded)
        XCTAssertEqual(service.record.withLock { $0.ended }, 1)
    }
}

final class RingCompletionQueueTests: XCTestCase {
    /// The poster wakes the ring thread only for the first completion of a batch: the others
    /// find the wake-up already on its way.
    func testOnlyTheFirstPostOfABatchAsksForAWakeUp() {
        let q = RingCompletionQueue<Int>(capacity: 8)
        XCTAssertTrue(q.isEmpty)
        XCTAssertTrue(q.post(1))
        XCTAssertFalse(q.post(2))
        XCTAssertFalse(q.post(3))
        XCTAssertFalse(q.isEmpty)
        var got: [Int] = []
        XCTAssertEqual(q.drainBatch { got += $0 }, 3)
        XCTAssertEqual(got, [1, 2, 3])
        XCTAssertTrue(q.isEmpty)
        XCTAssertEqual(q.drainBatch { _ in XCTFail("empty") }, 0)
        XCTAssertTrue(q.post(4), "empty again: the next post wakes")
    }

    /// A batch taken over by swapping changes hands whole, and the queue goes on with the
    /// buffer it was given back.
    func testABatchTakenOverBySwappingKeepsItsOrderAndTheQueueGoesOn() {
        let q = RingCompletionQueue<Int>(capacity: 4)
        for i in 1...6 { _ = q.post(i) }
        var kept: [Int] = []
        kept.reserveCapacity(4)
        XCTAssertEqual(q.drainBatch { swap(&kept, &$0) }, 6)
        XCTAssertEqual(kept, [1, 2, 3, 4, 5, 6])
        XCTAssertTrue(q.isEmpty)
        _ = q.post(7)
        var next: [Int] = []
        XCTAssertEqual(q.drainBatch { next += $0 }, 1)
        XCTAssertEqual(next, [7])
    }
}
