import Glibc
import Synchronization

/// What a ``BlockCompletionRelay`` keeps of a request while it is below: enough for a filter to
/// count, time or log it when it completes.
public struct BlockRelayedRequest: Sendable {
    public var operation: BlockOperation
    public var offset: UInt64
    public var length: UInt64
    public var fua: Bool
    public var mayDiscard: Bool
    /// When it was submitted, on the monotonic clock (``BlockCompletionRelay/nanoseconds()``).
    public var submitted: UInt64
}

/// For a filter that passes a request down and must see how it ended (to count it, time it or
/// change its result): the request goes down with the relay as its completion, and when it
/// completes the relay calls `handler` with what it kept of the request and the result, then
/// completes the original with the handler's result.
///
/// The original completions wait in a fixed table of slots, so the common case allocates
/// nothing; when every slot is busy a request gets a one-off box instead of being turned away.
/// Not generic on purpose: a generic class used from another module runs unspecialised, with a
/// type-metadata lookup on every request.
///
/// ```swift
/// let relay = BlockCompletionRelay { request, result in
///     record(request.operation, BlockCompletionRelay.nanoseconds() - request.submitted); return result
/// }
/// relay.submit(request, to: next, completion: completion)
/// ```
public final class BlockCompletionRelay: BlockCompletionSink, @unchecked Sendable {
    public typealias Handler = (_ request: BlockRelayedRequest, _ result: BlockResult) -> BlockResult
    private let handler: Handler
    private let completions: UnsafeMutablePointer<BlockCompletion?>
    private let requests: UnsafeMutablePointer<BlockRelayedRequest>
    private let capacity: Int
    private let free: Mutex<[Int]>

    public init(slots capacity: Int = 1024, handler: @escaping Handler) {
        self.handler = handler; self.capacity = capacity
        completions = .allocate(capacity: capacity)
        completions.initialize(repeating: nil, count: capacity)
        requests = .allocate(capacity: capacity)
        free = Mutex(Array((0..<capacity).reversed()))
    }

    deinit {
        completions.deinitialize(count: capacity)
        completions.deallocate()
        requests.deallocate()
    }

    /// Now on the monotonic clock, in nanoseconds.
    @inline(__always) public static func nanoseconds() -> UInt64 {
        var now = timespec()
        clock_gettime(CLOCK_MONOTONIC, &now)
        return UInt64(now.tv_sec) &* 1_000_000_000 &+ UInt64(now.tv_nsec)
    }

    /// Passes `request` down to `next`; when it completes, `handler` runs on the completing
    /// thread and its result completes `completion`.
    public func submit(_ request: BlockRequest, to next: any BlockDevice, completion: BlockCompletion) {
        let kept = BlockRelayedRequest(operation: request.operation, offset: request.offset, length: request.length,
                                       fua: request.fua, mayDiscard: request.mayDiscard, submitted: Self.nanoseconds())
        guard let slot = free.withLock({ $0.popLast() }) else {
            return next.submit(request, completion: BlockCompletion(sink: Overflow(self, completion, kept), tag: 0))
        }
        completions[slot] = completion
        requests[slot] = kept
        next.submit(request, completion: BlockCompletion(sink: self, tag: UInt64(slot)))
    }

    public func complete(tag: UInt64, result: BlockResult) {
        let slot = Int(tag)
        // A device that completes a request twice is wrong; the second is dropped, not trapped.
        guard slot < capacity, let completion = completions[slot].take() else { return }
        let kept = requests[slot]
        free.withLock { $0.append(slot) }
        completion.complete(handler(kept, result))
    }

    /// A request that found every slot busy.
    private final class Overflow: BlockCompletionSink, @unchecked Sendable {
        let relay: BlockCompletionRelay
        let completion: BlockCompletion
        let kept: BlockRelayedRequest
        let done = Atomic<Bool>(false)
        init(_ relay: BlockCompletionRelay, _ completion: BlockCompletion, _ kept: BlockRelayedRequest) {
            self.relay = relay; self.completion = completion; self.kept = kept
        }
        func complete(tag: UInt64, result: BlockResult) {
            guard !done.exchange(true, ordering: .acquiringAndReleasing) else { return }   // completed twice: dropped
            completion.complete(relay.handler(kept, result))
        }
    }
}
