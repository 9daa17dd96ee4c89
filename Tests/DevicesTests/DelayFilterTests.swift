import Core
import Devices
import Dispatch
import Synchronization
import XCTest

/// The delay filter's tests assert on the order in which requests finish, never on elapsed
/// time: a request held longer finishes after one held shorter (or not at all) that was
/// submitted after it. Every delay pair differs by hundreds of milliseconds, so only a machine
/// that stalls a thread for that long could reorder them; a wall-clock bound flaked on any
/// busy machine.
final class DelayFilterTests: XCTestCase {
    func testDelaysOnlyTheChosenOperations() throws {
        let device = try DeviceRegistry.open("delay(delay-read=300ms, delay-write=0) | memory(size=1M)")
        let read = TestBuffer(count: 512), write = TestBuffer(count: 512, pattern: 1)
        let events = EventOrder()
        device.submit(device.readRequest(read, at: 0), completion: events.completion("read"))
        device.submit(device.writeRequest(write, at: 512), completion: events.completion("write"))
        XCTAssertEqual(events.wait(for: 2), ["write", "read"], "a write submitted after a delayed read must not wait for it")

        // The synchronous path sleeps on its caller's thread: a write made while a read sleeps
        // finishes first.
        let sync = EventOrder()
        DispatchQueue.global().async {
            sync.record("read started")
            _ = try? device.readBytes(512, at: 0)
            sync.record("read")
        }
        XCTAssertEqual(sync.wait(for: 1), ["read started"])
        try device.writePattern(512, seed: 2, at: 512)
        sync.record("write")
        XCTAssertEqual(sync.wait(for: 3), ["read started", "write", "read"])
    }

    func testRequestsInFlightWaitTogether() throws {
        let device = try DeviceRegistry.open("delay(delay-read=200ms, delay-write=600ms) | memory(size=1M)")
        let buffers = (0..<5).map { _ in TestBuffer(count: 512) }
        let events = EventOrder()
        // The write is held longest and goes first. Had the filter held requests one after
        // another, the write would finish first, or at least before the third read.
        device.submit(device.writeRequest(buffers[0], at: 0), completion: events.completion("write"))
        for i in 1...4 { device.submit(device.readRequest(buffers[i], at: 0), completion: events.completion("read")) }
        XCTAssertEqual(events.wait(for: 5), ["read", "read", "read", "read", "write"])
    }

    func testDelayAppliesToEveryOperationUnlessOverridden() throws {
        let device = try XCTUnwrap(try DeviceRegistry.open("delay(delay=0.25, delay-flush=1ms) | null(size=1M)") as? DelayFilter)
        XCTAssertEqual(device.delays, [250_000_000, 250_000_000, 1_000_000, 250_000_000, 250_000_000])
        XCTAssertEqual(specError("delay(delay-read=fast) | null(size=1M)"),
                       "delay: delay-read 'fast' is not a duration (use e.g. 2ms, 0.5 or 1s, at most an hour)")
    }
}

/// Events (completions, and steps of the test's own threads) in the order they happen.
private final class EventOrder: BlockCompletionSink {
    private let events = Mutex<(names: [UInt64: String], order: [String])>(([:], []))
    private let recorded = DispatchSemaphore(value: 0)

    func record(_ event: String) {
        events.withLock { $0.order.append(event) }
        recorded.signal()
    }

    /// A completion recorded as `name` (with the error, if it failed).
    func completion(_ name: String) -> BlockCompletion {
        let tag = events.withLock { events in
            let tag = UInt64(events.names.count)
            events.names[tag] = name
            return tag
        }
        return BlockCompletion(sink: self, tag: tag)
    }

    func complete(tag: UInt64, result: BlockResult) {
        let name = events.withLock { $0.names[tag]! }
        if case .failure(let error) = result { record("\(name) failed: \(error)") } else { record(name) }
    }

    /// Waits for `count` events in all (failing the test after 10 s) and returns them in order.
    func wait(for count: Int) -> [String] {
        while events.withLock({ $0.order.count }) < count {
            if recorded.wait(timeout: .now() + 10) == .timedOut { XCTFail("an event did not happen"); break }
        }
        return events.withLock { $0.order }
    }
}
