import Core
import XCTest

final class AdaptivePollerTests: XCTestCase {
    func testAnAnswerWithinTheWindowIsTakenAndPollingGoesOn() {
        var poller = AdaptivePoller(microseconds: 1_000_000)
        var calls = 0
        XCTAssertEqual(poller.wait(idle: true) { calls += 1; return calls == 3 ? 28 : nil }, 28)
        XCTAssertEqual(calls, 3)
        // A hit keeps polling on: the next wait asks at once.
        calls = 0
        XCTAssertEqual(poller.wait(idle: true) { calls += 1; return 0 }, 0, "EOF is an answer too")
        XCTAssertEqual(calls, 1)
    }

    /// A clock for the poller that moves 1 µs each time it is read; `sleep` moves it on as a
    /// thread's sleep between two waits would.
    final class TestClock {
        var now: UInt64 = 1_000_000
        func read() -> UInt64 { now += 1_000; return now }
        func sleep(microseconds: UInt64) { now += microseconds * 1_000 }
    }

    func testMissesBackOffAndAHitResetsTheBackoff() {
        var poller = AdaptivePoller(microseconds: 200)
        let clock = TestClock()
        var calls = 0
        let never: () -> Int? = { calls += 1; return nil }
        /// Which of `n` waits polled at all (a wait that skips never calls `attempt`), each
        /// after a sleep of 10 ms: what the thread waited for came long after the window.
        func polled(_ n: Int) -> [Bool] {
            (0..<n).map { _ in
                clock.sleep(microseconds: 10_000)
                calls = 0
                XCTAssertNil(poller.wait(idle: true, clock: clock.read, never))
                return calls > 0
            }
        }
        // Miss, skip 1, miss, skip 2, miss, skip 4, miss.
        XCTAssertEqual(polled(11), [true, false, true, false, false, true, false, false, false, false, true])
        // Skips 8 now; the 9th wait polls, answers, and the one after polls again.
        XCTAssertEqual(polled(8), [Bool](repeating: false, count: 8))
        XCTAssertEqual(poller.wait(idle: true, clock: clock.read) { 5 }, 5)
        XCTAssertEqual(polled(2), [true, false], "after the hit one miss costs one skip again")
    }

    func testANearMissKeepsPolling() {
        var poller = AdaptivePoller(microseconds: 200)
        let clock = TestClock()
        var calls = 0
        let never: () -> Int? = { calls += 1; return nil }
        // Four misses in a row, long apart: the next three waits would skip.
        for _ in 0..<4 { clock.sleep(microseconds: 10_000); _ = poller.wait(idle: true, clock: clock.read, never) }
        // One back 50 µs after the window ran out: what it waited for came just after it.
        clock.sleep(microseconds: 10_000)
        calls = 0
        XCTAssertNil(poller.wait(idle: true, clock: clock.read, never))
        XCTAssertEqual(calls, 0, "a skip, as the back-off says")
        clock.sleep(microseconds: 10_000)
        XCTAssertNil(poller.wait(idle: true, clock: clock.read, never))
        for _ in 0..<3 {
            clock.sleep(microseconds: 50)
            calls = 0
            XCTAssertNil(poller.wait(idle: true, clock: clock.read, never))
            XCTAssertGreaterThan(calls, 0, "a near miss is followed by a window, not a skip")
        }
        // And the back-off starts again from one skip.
        clock.sleep(microseconds: 10_000)
        calls = 0
        XCTAssertNil(poller.wait(idle: true, clock: clock.read, never))
        XCTAssertEqual(calls, 0)
        clock.sleep(microseconds: 10_000)
        calls = 0
        XCTAssertNil(poller.wait(idle: true, clock: clock.read, never))
        XCTAssertGreaterThan(calls, 0)
    }

    func testTheBackoffStopsAt256Waits() {
        var poller = AdaptivePoller(microseconds: 1)
        let clock = TestClock()
        for _ in 0..<20_000 { clock.sleep(microseconds: 100); _ = poller.wait(idle: true, clock: clock.read) { Int?.none } }
        var since = 0
        var gaps: [Int] = []
        for _ in 0..<2000 {
            var called = false
            clock.sleep(microseconds: 100)
            _ = poller.wait(idle: true, clock: clock.read) { () -> Int? in called = true; return nil }
            if called { gaps.append(since); since = 0 } else { since += 1 }
        }
        XCTAssertFalse(gaps.isEmpty)
        XCTAssertEqual(Set(gaps.dropFirst()), [256])
    }

    func testBusyConnectionsAndAZeroWindowNeverPoll() {
        var poller = AdaptivePoller(microseconds: 50)
        XCTAssertNil(poller.wait(idle: false) { XCTFail("polled with requests in the device"); return 1 })
        var off = AdaptivePoller(microseconds: 0)
        XCTAssertNil(off.wait(idle: true) { XCTFail("polled with a zero window"); return 1 })
    }
}
