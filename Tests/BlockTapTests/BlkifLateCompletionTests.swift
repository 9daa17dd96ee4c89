import BlockTap
import CXen
import Core
import Glibc
import XCTest
import XenStore

/// A disk whose requests complete on its own thread, late: only while the test lets them
/// (`release`), in submission order or the reverse. What it does is logged in order, so that
/// tests assert on order, not on time.
final class LateDisk: BlockDevice, @unchecked Sendable {
    let inner: TestDisk
    var name: String { "late" }
    var geometry: BlockGeometry { inner.geometry }
    var capabilities: BlockCapabilities { inner.capabilities }
    private let lock = ConditionLock()
    private var queue: [(BlockRequest, BlockCompletion)] = []
    private var held: Bool
    private var lastFirst = false
    private var closing = false
    private var events: [String] = []
    private var submittedCount = 0

    init(size: Int, held: Bool) throws {
        inner = TestDisk(size: size)
        self.held = held
        // The worker holds the disk until `close` (the backend's unplug) ends it.
        try PosixThread.detached("late disk") { [self] in self.work() }
    }

    /// What reached the disk, in order: "read 0", "write 16", "flush", "discard 8".
    var log: [String] { lock.withLock { events } }
    var submitted: Int { lock.withLock { submittedCount } }

    /// Lets queued and future requests complete (the latest first, if `lastFirst`).
    func release(lastFirst: Bool = false) { lock.withLock { held = false; self.lastFirst = lastFirst; lock.broadcast() } }

    private func note(_ r: BlockRequest) {
        switch r.operation {
        case .read: events.append("read \(r.offset / 512)")
        case .write: events.append("write \(r.offset / 512)")
        case .flush: events.append("flush")
        case .discard: events.append("discard \(r.offset / 512)")
        case .writeZeroes: events.append("zero \(r.offset / 512)")
        }
    }

    func submit(_ request: BlockRequest, completion: BlockCompletion) {
        lock.withLock { queue.append((request, completion)); submittedCount += 1; lock.broadcast() }
    }

    private func work() {
        while true {
            lock.lock()
            while (held || queue.isEmpty) && !(closing && queue.isEmpty) { lock.wait() }
            if queue.isEmpty { lock.unlock(); return }
            let (request, completion) = lastFirst ? queue.removeLast() : queue.removeFirst()
            note(request)
            lock.unlock()
            completion.complete(inner.performSynchronously(request))
        }
    }

    /// Ends the worker once everything queued has completed (a held request is released).
    func close() { lock.withLock { closing = true; held = false; lock.broadcast() } }

    // The synchronous path (a barrier's flush runs on the ring thread).
    func read(into buffers: IOBuffers, at offset: UInt64) throws(BlockError) { try inner.read(into: buffers, at: offset) }
    func write(from buffers: IOBuffers, at offset: UInt64, fua: Bool) throws(BlockError) {
        lock.withLock { events.append("write \(offset / 512)") }
        try inner.write(from: buffers, at: offset, fua: fua)
    }
    func flush() throws(BlockError) {
        lock.withLock { events.append("flush") }
        try inner.flush()
    }
    func discard(at offset: UInt64, length: UInt64) throws(BlockError) { try inner.discard(at: offset, length: length) }
}

/// blkif over a device that completes on another thread, late: completions cross threads into
/// the ring loop, a barrier waits for what is before it, a flush with data flushes first, and a
/// disconnect with a request stuck in the device neither hangs nor unmaps the guest's pages.
final class BlkifLateCompletionTests: XCTestCase {
    var lab: LocalLab!
    var disk: LateDisk!
    var paths: XenbusDevicePaths!
    var front: LocalBlockFrontend!

    func connect(held: Bool, options: BlkifBackendOptions = BlkifBackendOptions(), teardownTimeout: Double = 5,
                 persistent: Bool = true) throws {
        lab = try LocalLab(options: options, teardownTimeout: teardownTimeout)
        disk = try LateDisk(size: 1 << 20, held: held)
        let guest: LocalHypervisor
        (guest, paths) = try lab.guestWithDisk(disk)
        var o = LocalBlockFrontend.Options()
        o.persistentGrants = persistent
        front = try LocalBlockFrontend(hypervisor: guest, frontendPath: paths.frontendPath, options: o)
    }
    override func tearDown() {
        disk?.release()
        lab?.shutdown()
    }

    /// Puts `requests` on the ring and publishes them, without waiting.
    func push(_ requests: [BlkifRequestBytes]) {
        let q = front.queues[0]
        for r in requests { q.ring.putRequest(r) }
        q.pushRequests()
    }

    func waitUntil(_ what: String, seconds: Double = 5, _ condition: () -> Bool) {
        let deadline = monotonicSeconds() + seconds
        while !condition() && monotonicSeconds() < deadline { usleep(1000) }
        XCTAssertTrue(condition(), what)
    }

    /// Sixteen writes completed by the device's thread in the reverse order: each gets its
    /// response, in the order the device completed them, and the data is where it belongs.
    func testCompletionsFromAnotherThreadAnswerEveryRequest() throws {
        try connect(held: true)
        var requests: [BlkifRequestBytes] = []
        for k in 0..<16 {
            memset(front.bufferPage(k), Int32(0x10 + k), 4096)
            requests.append(try front.makeRequest(id: UInt64(100 + k), write: true, sector: UInt64(8 * k), firstPage: k, pageCount: 1).0)
        }
        push(requests)
        waitUntil("all sixteen reach the device") { disk.submitted == 16 }
        XCTAssertEqual(front.queues[0].ring.unconsumedResponses(), 0, "nothing answered before the device completes")
        disk.release(lastFirst: true)
        let responses = try front.collect(16)
        XCTAssertEqual(responses.map(\.id), (100..<116).reversed().map(UInt64.init))
        XCTAssertTrue(responses.allSatisfy { $0.status == Blkif.statusOkay && $0.operation == Blkif.opWrite })
        for k in 0..<16 {
            XCTAssertEqual(try front.read(sector: UInt64(8 * k), count: 4096), [UInt8](repeating: UInt8(0x10 + k), count: 4096), "page \(k)")
        }
    }

    /// WRITE_BARRIER: nothing after it starts, and it does not run, until what is before it has
    /// completed; then it flushes and writes its data; then the rest goes on.
    func testABarrierWaitsForALateCompletionBeforeIt() throws {
        try connect(held: true)
        memset(front.bufferPage(0), 0x01, 4096); memset(front.bufferPage(1), 0x02, 4096); memset(front.bufferPage(2), 0x03, 4096)
        let (before, _) = try front.makeRequest(id: 1, write: true, sector: 0, firstPage: 0, pageCount: 1)
        var barrier = try front.makeRequest(id: 2, write: true, sector: 8, firstPage: 1, pageCount: 1).0.request
        barrier.operation = Blkif.opWriteBarrier
        let (after, _) = try front.makeRequest(id: 3, write: true, sector: 16, firstPage: 2, pageCount: 1)
        push([before, BlkifRequestBytes(barrier), after])
        waitUntil("the write before the barrier reaches the device") { disk.submitted == 1 }
        usleep(50_000)   // room for a wrong backend to run the barrier or take the next request
        XCTAssertEqual(disk.log, [], "the barrier waits for the write before it")
        XCTAssertEqual(disk.submitted, 1, "nothing after the barrier is taken")
        disk.release()
        let responses = try front.collect(3)
        XCTAssertEqual(responses.map(\.id), [1, 2, 3])
        XCTAssertEqual(responses.map(\.operation), [Blkif.opWrite, Blkif.opWriteBarrier, Blkif.opWrite])
        XCTAssertTrue(responses.allSatisfy { $0.status == Blkif.statusOkay })
        XCTAssertEqual(disk.log, ["write 0", "flush", "write 8", "write 16"])
    }

    /// FLUSH_DISKCACHE with segments (Linux blkfront's REQ_PREFLUSH | REQ_FUA write): the
    /// flush completes (late, on the device's thread) before the write is submitted.
    func testAFlushWithDataFlushesThenWrites() throws {
        try connect(held: false)
        memset(front.bufferPage(0), 0x5F, 4096)
        var flush = try front.makeRequest(id: 9, write: true, sector: 24, firstPage: 0, pageCount: 1).0.request
        flush.operation = Blkif.opFlushDiskCache
        let rsp = try front.roundTrip([BlkifRequestBytes(flush)])[0]
        XCTAssertEqual(rsp.status, Blkif.statusOkay)
        XCTAssertEqual(rsp.operation, Blkif.opFlushDiskCache)
        XCTAssertEqual(disk.log, ["flush", "write 24"])
        XCTAssertEqual(try front.read(sector: 24, count: 4096), [UInt8](repeating: 0x5F, count: 4096))
    }

    /// The guest closes its disk while the device holds a request: the xenbus host waits its
    /// teardown timeout, reports it and lets xenbus go on; the request's page and the ring stay
    /// mapped (the device may still write into them) until the device completes, and are
    /// released then.
    func testStoppingWithARequestInFlightNeitherHangsNorUnmapsItsPages() throws {
        try connect(held: true, teardownTimeout: 0.3, persistent: false)
        let (read, refs) = try front.makeRequest(id: 5, write: false, sector: 0, firstPage: 0, pageCount: 1)
        push([read])
        waitUntil("the read reaches the device") { disk.submitted == 1 }

        let start = monotonicSeconds()
        try front.close(timeoutSeconds: 5)
        XCTAssertLessThan(monotonicSeconds() - start, 4, "the backend closed without waiting for the device")
        waitUntil("the backend is Closed") { XenbusDeviceState.read(lab.backend.store, paths.backendPath + "/state") == .closed }
        waitUntil("the stuck request is reported") {
            lab.shared.lock.lock(); defer { lab.shared.lock.unlock() }
            return lab.shared.log.contains { $0.contains("still busy") }
        }
        let ringRef = front.queues[0].ringRefs[0]
        XCTAssertThrowsError(try front.pages.endAccess(refs[0]), "the data page stays mapped for the device")
        XCTAssertThrowsError(try front.pages.endAccess(ringRef), "the ring stays mapped for the response")

        disk.release()
        waitUntil("the data page is released once the device completes") { (try? front.pages.endAccess(refs[0])) != nil }
        waitUntil("the ring is released") { (try? front.pages.endAccess(ringRef)) != nil }
        XCTAssertEqual(disk.log, ["read 0"])
    }
}

/// A device that may block, as a buffered file or a content store does: it hands its requests
/// to ``BlockOffload``, and a read of sector 0 blocks until the test lets it go.
final class BlockingDisk: BlockDevice, @unchecked Sendable {
    let inner = TestDisk(size: 1 << 20)
    var name: String { "blocking" }
    var geometry: BlockGeometry { inner.geometry }
    var capabilities: BlockCapabilities { inner.capabilities }
    let offload = BlockOffload()
    private let lock = ConditionLock()
    private var released = false
    private(set) var blockedOnWorker: Bool?
    private var blocked = false

    func submit(_ request: BlockRequest, completion: BlockCompletion) {
        offload.serve(request, completion) { [self] in
            if request.operation == .read && request.offset == 0 {
                lock.withLock {
                    blocked = true; blockedOnWorker = BlockWorkers.onWorkerThread; lock.broadcast()
                    while !released { lock.wait() }
                }
            }
            return inner.performSynchronously(request)
        }
    }
    var isBlocked: Bool { lock.withLock { blocked } }
    func release() { lock.withLock { released = true; lock.broadcast() } }
    func close() { release(); offload.waitUntilIdle() }
}

/// The vbd's worker pool: a device that blocks on one request holds a worker, not the ring.
final class BlkifWorkerPoolTests: XCTestCase {
    func testARequestThatBlocksHoldsAWorkerWhileTheRingServesTheNext() throws {
        let lab = try LocalLab(options: BlkifBackendOptions(), teardownTimeout: 5)
        defer { lab.shutdown() }
        let disk = BlockingDisk()
        defer { disk.release() }
        let (guest, paths) = try lab.guestWithDisk(disk)
        let front = try LocalBlockFrontend(hypervisor: guest, frontendPath: paths.frontendPath)
        memset(front.bufferPage(1), 0x6B, 4096)
        let (stuck, _) = try front.makeRequest(id: 1, write: false, sector: 0, firstPage: 0, pageCount: 1)
        let (next, _) = try front.makeRequest(id: 2, write: true, sector: 8, firstPage: 1, pageCount: 1)
        let q = front.queues[0]
        q.ring.putRequest(stuck); q.pushRequests()
        let deadline = monotonicSeconds() + 5
        while !disk.isBlocked && monotonicSeconds() < deadline { usleep(1000) }
        XCTAssertTrue(disk.isBlocked, "the read reached the device")
        XCTAssertEqual(disk.blockedOnWorker, true, "it blocks a worker thread, not the ring's")
        // The ring thread is free: the write behind it is answered while the read still blocks.
        q.ring.putRequest(next); q.pushRequests()
        let answered = try front.collect(1)
        XCTAssertEqual(answered.map(\.id), [2])
        XCTAssertEqual(answered.first?.status, Blkif.statusOkay)
        XCTAssertTrue(disk.isBlocked)
        disk.release()
        XCTAssertEqual(try front.collect(1).map(\.id), [1])
        XCTAssertEqual(try front.read(sector: 8, count: 4096), [UInt8](repeating: 0x6B, count: 4096))
        try front.close()
    }
}

/// A disk that answers reads and writes at once (`immediateResult`) and everything else
/// through `submit`; it counts both ways in, and fails writes past its first half.
final class ImmediateDisk: BlockDevice, @unchecked Sendable {
    let inner = TestDisk(size: 1 << 20)
    var name: String { "immediate" }
    var geometry: BlockGeometry { inner.geometry }
    var capabilities: BlockCapabilities { inner.capabilities }
    private let lock = NSLock()
    private var immediateCount = 0, submitCount = 0
    var counts: (immediate: Int, submitted: Int) { lock.withLock { (immediateCount, submitCount) } }

    func immediateResult(of request: BlockRequest) -> BlockResult? {
        guard request.operation == .read || request.operation == .write else { return nil }
        lock.withLock { immediateCount += 1 }
        if request.operation == .write && request.offset >= geometry.size / 2 { return .failure(BlockError(.io, "bad half")) }
        return inner.performSynchronously(request)
    }
    func submit(_ request: BlockRequest, completion: BlockCompletion) {
        lock.withLock { submitCount += 1 }
        completion.complete(inner.performSynchronously(request))
    }
}

/// A device that has its result at once (null, memory) is answered without a completion: the
/// data, the status and the requests that still go through `submit` are those of the slow way.
final class BlkifImmediateResultTests: XCTestCase {
    func testImmediateResultsAnswerTheRingAndOtherRequestsAreSubmitted() throws {
        let lab = try LocalLab()
        defer { lab.shutdown() }
        let disk = ImmediateDisk()
        let (guest, paths) = try lab.guestWithDisk(disk)
        let front = try LocalBlockFrontend(hypervisor: guest, frontendPath: paths.frontendPath, options: LocalBlockFrontend.Options())
        let data = (0..<8192).map { UInt8(truncatingIfNeeded: $0 &* 7 &+ 3) }
        try front.write(sector: 16, data)
        XCTAssertEqual(try front.read(sector: 16, count: 8192), data, "written and read back through immediate results")
        XCTAssertEqual(try front.read(sector: 24, count: 4096), Array(data[4096...]))
        XCTAssertEqual(disk.counts.immediate, 3)
        XCTAssertEqual(disk.counts.submitted, 0, "no request went through submit")

        XCTAssertThrowsError(try front.write(sector: disk.geometry.sectors / 2, [UInt8](repeating: 1, count: 4096)),
                             "an immediate failure is the request's error")
        XCTAssertEqual(try front.control(operation: Blkif.opFlushDiskCache), Blkif.statusOkay)
        XCTAssertEqual(disk.counts.submitted, 1, "the flush went through submit")
        XCTAssertEqual(disk.inner.flushes, 1)
        XCTAssertEqual(try front.read(sector: 16, count: 8192), data, "the ring goes on after an error")
    }
}
