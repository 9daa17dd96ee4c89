import Core
import Glibc
import Synchronization
import XCTest

/// The transports' worker pools and the devices' way onto them: threads start only when work
/// waits and none is idle, up to the limit; work runs in order; a worker that offloads runs
/// the work itself; a device's close waits for its work; the caller that may wait runs it.
final class BlockWorkersTests: XCTestCase {
    /// A gate the work waits at until the test opens it.
    final class Gate: @unchecked Sendable {
        private let lock = ConditionLock()
        private var open = false
        private(set) var waiting = 0
        func pass() { lock.withLock { waiting += 1; lock.broadcast(); while !open { lock.wait() }; waiting -= 1 } }
        func openUp() { lock.withLock { open = true; lock.broadcast() } }
        func waitFor(_ n: Int) -> Bool {
            let deadline = monotonicSeconds() + 5
            return lock.withLock {
                while waiting < n && monotonicSeconds() < deadline { lock.wait(timeout: 0.01) }
                return waiting >= n
            }
        }
    }

    func testThreadsStartOnlyForWorkAndNeverPastTheLimit() {
        let pool = BlockWorkers(limit: 3, purpose: "test")
        defer { pool.stop() }
        XCTAssertEqual(pool.threadCount, 0, "an idle pool has no thread")
        let gate = Gate()
        let done = Atomic<Int>(0)
        for _ in 0..<8 { pool.enqueue { gate.pass(); done.add(1, ordering: .relaxed) } }
        XCTAssertTrue(gate.waitFor(3), "three run at once")
        usleep(20_000)
        XCTAssertEqual(gate.waiting, 3, "no more than the limit at once")
        XCTAssertEqual(pool.threadCount, 3)
        gate.openUp()
        pool.stop()
        XCTAssertEqual(done.load(ordering: .relaxed), 8, "stop runs what was queued")
        var ranHere = false
        pool.enqueue { ranHere = true }
        XCTAssertTrue(ranHere, "after stop, work runs on the caller's thread")
    }

    func testOneThreadRunsWorkInTheOrderQueued() {
        let pool = BlockWorkers(limit: 1, purpose: "test")
        let order = Mutex<[Int]>([])
        for i in 0..<200 { pool.enqueue { order.withLock { $0.append(i) } } }
        pool.stop()
        XCTAssertEqual(order.withLock { $0 }, Array(0..<200))
        XCTAssertEqual(pool.threadCount, 0)
    }

    /// A request served from a thread that adopted a pool runs on that pool's threads; one
    /// served from a worker already runs there and then (a pool of one thread whose work
    /// offloads again would otherwise wait for itself forever).
    func testOffloadRunsOnTheAdoptingThreadsPoolAndInlineOnAWorker() throws {
        let pool = BlockWorkers(limit: 1, purpose: "transport")
        defer { pool.stop() }
        let offload = BlockOffload()
        let finished = ConditionLock()
        var results: [String] = []
        let sink = Sink { tag, _ in finished.withLock { results.append("\(tag)"); finished.broadcast() } }
        try PosixThread.detached("transport") {
            pool.adopt()
            XCTAssertTrue(BlockWorkers.current === pool)
            XCTAssertFalse(BlockWorkers.onWorkerThread)
            offload.serve(Self.read, BlockCompletion(sink: sink, tag: 1)) {
                XCTAssertTrue(BlockWorkers.onWorkerThread, "on a worker")
                // Offloaded again from the worker: runs here, before this returns.
                var inner = false
                offload.serve(Self.read, BlockCompletion(sink: sink, tag: 2)) { inner = true; return .success }
                XCTAssertTrue(inner)
                return .success
            }
        }
        finished.withLock { while results.count < 2 { finished.wait(timeout: 5) } }
        XCTAssertEqual(results, ["2", "1"])
        XCTAssertEqual(pool.threadCount, 1, "the transport's pool ran it")
        offload.waitUntilIdle()
    }

    func testACallerThatMayWaitRunsItItself() {
        let offload = BlockOffload()
        var request = Self.read
        request.callerMayWait = true
        let me = pthread_self()
        var ranHere = false, completed = false
        offload.serve(request, BlockCompletion(sink: Sink { _, _ in completed = true }, tag: 0)) {
            ranHere = pthread_equal(pthread_self(), me) != 0
            return .success
        }
        XCTAssertTrue(ranHere)
        XCTAssertTrue(completed, "completed before serve returned")
    }

    /// A device's close waits for its requests still running on a pool; the completion comes
    /// after the device's part is done.
    func testWaitUntilIdleWaitsForWorkStillRunning() throws {
        let pool = BlockWorkers(limit: 2, purpose: "transport")
        defer { pool.stop() }
        let offload = BlockOffload()
        let gate = Gate()
        let events = Mutex<[String]>([])
        let sink = Sink { _, _ in events.withLock { $0.append("completed") } }
        try PosixThread.detached("transport") {
            pool.adopt()
            offload.serve(Self.read, BlockCompletion(sink: sink, tag: 0)) {
                gate.pass()
                events.withLock { $0.append("performed") }
                return .success
            }
        }
        XCTAssertTrue(gate.waitFor(1))
        let closer = try PosixThread("closer") {
            offload.waitUntilIdle()
            events.withLock { $0.append("idle") }
        }
        usleep(20_000)
        XCTAssertEqual(events.withLock { $0 }, [], "close waits while the request runs")
        gate.openUp()
        closer.join()
        let seen = events.withLock { $0 }
        XCTAssertEqual(seen.first, "performed")
        XCTAssertTrue(seen.contains("idle"))
    }

    static let read = BlockRequest(operation: .read, offset: 0, length: 0)

    final class Sink: BlockCompletionSink, @unchecked Sendable {
        let body: (UInt64, BlockResult) -> Void
        init(_ body: @escaping (UInt64, BlockResult) -> Void) { self.body = body }
        func complete(tag: UInt64, result: BlockResult) { body(tag, result) }
    }
}
