import Core
import Glibc
import XCTest

/// The end-of-batch hint: what devices hold while a thread is plugged starts at the flush, in
/// order, each device's own items together; nothing is held unplugged; a wait flushes first.
final class BlockPlugTests: XCTestCase {
    /// A device that holds its requests while plugged and completes each when it starts it.
    final class HoldingDevice: BlockDevice, BlockPlugTarget, @unchecked Sendable {
        let name = "holding"
        let geometry = BlockGeometry(size: 1 << 20)
        let capabilities: BlockCapabilities = [.write]
        /// The batches `startHeld` received, by tag.
        var started: [[UInt64]] = []
        var pending: [UInt64: BlockCompletion] = [:]
        /// Holds one more request for each one it starts, this many times (a completion that
        /// resubmits during the flush).
        var resubmit = 0

        func submit(_ request: BlockRequest, completion: BlockCompletion) {
            guard let plug = BlockPlug.current else { return completion.complete(.success) }
            pending[request.offset] = completion
            plug.hold(UnsafeMutableRawPointer(bitPattern: UInt(request.offset) + 1)!, for: self)
        }
        func startHeld(_ items: UnsafeBufferPointer<UnsafeMutableRawPointer>) {
            let tags = items.map { UInt64(UInt(bitPattern: $0) - 1) }
            started.append(tags)
            for tag in tags {
                pending.removeValue(forKey: tag)?.complete(.success)
                if resubmit > 0 {
                    resubmit -= 1
                    submit(BlockRequest(operation: .read, offset: tag + 1000, length: 0), completion: BlockCompletion(sink: NoSink(), tag: 0))
                }
            }
        }
    }
    final class NoSink: BlockCompletionSink, @unchecked Sendable { func complete(tag: UInt64, result: BlockResult) {} }
    final class Sink: BlockCompletionSink, @unchecked Sendable {
        var done: [UInt64] = []
        func complete(tag: UInt64, result: BlockResult) { done.append(tag) }
    }

    func read(_ device: any BlockDevice, _ offset: UInt64, _ sink: Sink) {
        device.submit(BlockRequest(operation: .read, offset: offset, length: 0), completion: BlockCompletion(sink: sink, tag: offset))
    }

    func testUnpluggedRequestsStartAtOnce() {
        XCTAssertNil(BlockPlug.current)
        let device = HoldingDevice(), sink = Sink()
        read(device, 1, sink)
        XCTAssertEqual(sink.done, [1])
        XCTAssertTrue(device.started.isEmpty)
    }

    func testEachDevicesHeldRequestsStartTogetherInOrderAtTheOutermostEnd() {
        let a = HoldingDevice(), b = HoldingDevice(), sink = Sink()
        BlockPlug.begin()
        XCTAssertNotNil(BlockPlug.current)
        read(a, 1, sink); read(b, 2, sink); read(a, 3, sink)
        BlockPlug.batch { read(b, 4, sink) }   // nested: does not flush
        XCTAssertTrue(sink.done.isEmpty, "nothing starts while plugged")
        BlockPlug.end()
        XCTAssertNil(BlockPlug.current)
        XCTAssertEqual(a.started, [[1, 3]])
        XCTAssertEqual(b.started, [[2, 4]])
        XCTAssertEqual(sink.done, [1, 3, 2, 4])
    }

    func testFlushStartsWhatIsHeldAndStaysPlugged() {
        let device = HoldingDevice(), sink = Sink()
        BlockPlug.begin()
        read(device, 1, sink)
        BlockPlug.flush()
        XCTAssertEqual(sink.done, [1])
        XCTAssertNotNil(BlockPlug.current, "still plugged")
        read(device, 2, sink)
        XCTAssertEqual(sink.done, [1])
        BlockPlug.end()
        XCTAssertEqual(device.started, [[1], [2]])
    }

    func testWhatAFlushSubmitsWhilePluggedStartsInTheSameFlush() {
        let device = HoldingDevice(), sink = Sink()
        device.resubmit = 2
        BlockPlug.begin()
        read(device, 1, sink); read(device, 2, sink)
        BlockPlug.flush()
        XCTAssertEqual(device.started, [[1, 2], [1001, 1002]], "the resubmitted requests started in a second round")
        XCTAssertTrue(device.pending.isEmpty)
        // Once the plug has ended, what a start submits starts at once.
        device.resubmit = 1
        read(device, 3, sink)
        BlockPlug.end()
        XCTAssertEqual(device.started, [[1, 2], [1001, 1002], [3]])
        XCTAssertEqual(sink.done, [1, 2, 3])
    }

    func testWaitingForARequestFlushesThePlugFirst() {
        // A filter that waits for its own read below while the thread is plugged would wait for
        // ever if the read stayed held.
        let device = HoldingDevice()
        let result = BlockPlug.batch { device.submitAndWait(BlockRequest(operation: .read, offset: 7, length: 0)) }
        XCTAssertEqual(result, .success)
        XCTAssertEqual(device.started, [[7]])
    }

    func testEachThreadHasItsOwnPlug() {
        let device = HoldingDevice(), sink = Sink()
        BlockPlug.begin()
        nonisolated(unsafe) var otherPlugged = true
        let done = DispatchSemaphore(value: 0)
        Thread { otherPlugged = BlockPlug.current != nil; done.signal() }.start()
        done.wait()
        XCTAssertFalse(otherPlugged, "another thread is not plugged by this one")
        read(device, 1, sink)
        BlockPlug.end()
        XCTAssertEqual(sink.done, [1])
    }
}
