import Synchronization

/// For a filter that passes a request down and must see how it ended (to count it, time it,
/// retry it or change its result): the request goes down with the relay as its completion, the
/// relay calls `handler` with what the filter noted at submit time, then completes the
/// original with the handler's result.
///
/// The original completions wait in a fixed table of slots, so the common case allocates
/// nothing; when every slot is busy a request gets a one-off box instead of being turned away.
///
/// ```swift
/// let relay = BlockCompletionRelay<UInt64> { started, result in record(since: started); return result }
/// relay.submit(request, to: next, completion: completion, context: now())
/// ```
public final class BlockCompletionRelay<Context>: BlockCompletionSink, @unchecked Sendable {
    public typealias Handler = (_ context: Context, _ result: BlockResult) -> BlockResult
    private let handler: Handler
    private let slots: UnsafeMutablePointer<(completion: BlockCompletion, context: Context)?>
    private let capacity: Int
    private let free: Mutex<[Int]>

    public init(slots capacity: Int = 1024, handler: @escaping Handler) {
        self.handler = handler; self.capacity = capacity
        slots = .allocate(capacity: capacity)
        slots.initialize(repeating: nil, count: capacity)
        free = Mutex(Array((0..<capacity).reversed()))
    }

    deinit {
        slots.deinitialize(count: capacity)
        slots.deallocate()
    }

    /// Passes `request` down to `next`; when it completes, `handler(context, result)` runs on
    /// the completing thread and its result completes `completion`.
    public func submit(_ request: BlockRequest, to next: any BlockDevice, completion: BlockCompletion, context: Context) {
        guard let slot = free.withLock({ $0.popLast() }) else {
            return next.submit(request, completion: BlockCompletion(sink: Overflow(self, completion, context), tag: 0))
        }
        slots[slot] = (completion, context)
        next.submit(request, completion: BlockCompletion(sink: self, tag: UInt64(slot)))
    }

    public func complete(tag: UInt64, result: BlockResult) {
        let slot = Int(tag)
        let (completion, context) = slots[slot]!
        slots[slot] = nil
        free.withLock { $0.append(slot) }
        completion.complete(handler(context, result))
    }

    /// A request that found every slot busy.
    private final class Overflow: BlockCompletionSink, @unchecked Sendable {
        let relay: BlockCompletionRelay
        let completion: BlockCompletion
        let context: Context
        init(_ relay: BlockCompletionRelay, _ completion: BlockCompletion, _ context: Context) {
            self.relay = relay; self.completion = completion; self.context = context
        }
        func complete(tag: UInt64, result: BlockResult) { completion.complete(relay.handler(context, result)) }
    }
}
