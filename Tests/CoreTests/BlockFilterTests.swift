import Core
import Foundation
import XCTest

/// The block device API has one path per operation: what a filter does in `submit` is what
/// every caller gets, a transport's ring thread as much as a test's waiting call.
final class BlockFilterTests: XCTestCase {
    /// Counts what reaches it; holds completions until told when `holding`.
    final class Below: BlockDevice, @unchecked Sendable {
        let name = "below"
        let geometry = BlockGeometry(size: 1 << 20)
        let capabilities: BlockCapabilities = [.write, .flush]
        let lock = NSLock()
        var seen: [Core.BlockOperation] = []
        var held: [BlockCompletion] = []
        var holding = false
        func submit(_ request: BlockRequest, completion: BlockCompletion) {
            let hold = lock.withLock { seen.append(request.operation); if holding { held.append(completion) }; return holding }
            if !hold { completion.complete(.success) }
        }
    }

    /// The example of BlockFilter's documentation.
    final class NoFlush: BlockFilter, @unchecked Sendable {
        override var capabilities: BlockCapabilities { next.capabilities.subtracting(.flush) }
        override func submit(_ request: BlockRequest, completion: BlockCompletion) {
            if request.operation == .flush { return completion.complete(.success) }
            next.submit(request, completion: completion)
        }
    }

    final class Recorder: BlockCompletionSink, @unchecked Sendable {
        let lock = NSLock()
        var results: [UInt64: [BlockResult]] = [:]
        func complete(tag: UInt64, result: BlockResult) { lock.withLock { results[tag, default: []].append(result) } }
    }

    func testAFilterWritesAnOperationOnceForEveryCaller() throws {
        let below = Below()
        let filter = NoFlush(next: below)
        let recorder = Recorder()
        filter.submit(BlockRequest(operation: .flush, offset: 0, length: 0), completion: BlockCompletion(sink: recorder, tag: 1))
        try filter.sync.flush()
        filter.submit(BlockRequest(operation: .discard, offset: 0, length: 512), completion: BlockCompletion(sink: recorder, tag: 2))
        XCTAssertEqual(below.seen, [.discard], "no flush reached the device below, by either way in")
        XCTAssertEqual(recorder.results[1], [.success])
        XCTAssertFalse(filter.capabilities.contains(.flush))
    }

    func testTheRelayCompletesEachRequestOnceWithTheHandlersResultEvenWhenItsSlotsAreFull() {
        let below = Below()
        below.holding = true
        let seen = Recorder()
        // Two slots for five requests: three go through the overflow path.
        let relay = BlockCompletionRelay(slots: 2) { request, result in
            let tag = request.offset / 512
            seen.complete(tag: tag, result: result)
            return tag == 3 ? .failure(BlockError(.io, "the filter failed it")) : result
        }
        let callers = Recorder()
        for tag in UInt64(0)..<5 {
            relay.submit(BlockRequest(operation: .write, offset: tag * 512, length: 0), to: below,
                         completion: BlockCompletion(sink: callers, tag: tag))
        }
        XCTAssertTrue(callers.results.isEmpty, "nothing completes before the device does")
        for c in below.held.reversed() { c.complete(.success) }
        below.held.forEach { $0.complete(.success) }   // a wrong device completes twice: dropped
        for tag in UInt64(0)..<5 {
            XCTAssertEqual(seen.results[tag], [.success], "the handler saw request \(tag) once")
            XCTAssertEqual(callers.results[tag], [tag == 3 ? .failure(BlockError(.io, "the filter failed it")) : .success],
                           "request \(tag) completed once, with the handler's result")
        }
    }
}
