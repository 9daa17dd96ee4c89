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

    func testMissesBackOffAndAHitResetsTheBackoff() {
        var poller = AdaptivePoller(microseconds: 200)
        var calls = 0
        let never: () -> Int? = { calls += 1; return nil }
        /// Which of `n` waits polled at all (a wait that skips never calls `attempt`).
        func polled(_ n: Int) -> [Bool] {
            (0..<n).map { _ in calls = 0; XCTAssertNil(poller.wait(idle: true, never)); return calls > 0 }
        }
        // Miss, skip 1, miss, skip 2, miss, skip 4, miss.
        XCTAssertEqual(polled(11), [true, false, true, false, false, true, false, false, false, false, true])
        // Skips 8 now; the 9th wait polls, answers, and the one after polls again.
        XCTAssertEqual(polled(8), [Bool](repeating: false, count: 8))
        XCTAssertEqual(poller.wait(idle: true) { 5 }, 5)
        XCTAssertEqual(polled(2), [true, false], "after the hit one miss costs one skip again")
    }

    func testTheBackoffStopsAt256Waits() {
        var poller = AdaptivePoller(microseconds: 1)
        for _ in 0..<20_000 { _ = poller.wait(idle: true) { Int?.none } }
        var since = 0
        var gaps: [Int] = []
        for _ in 0..<2000 {
            var called = false
            _ = poller.wait(idle: true) { () -> Int? in called = true; return nil }
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
