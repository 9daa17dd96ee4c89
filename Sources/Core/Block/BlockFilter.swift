/// A device that stacks over another (nbdkit's filters, tapdisk's chains): every request passes
/// to `next` unchanged unless the filter overrides `submit`, the one path of every operation.
/// A filter changes a request (an offset moved), answers it (a refused write), or passes it
/// down and looks at the result (``BlockCompletionRelay``).
///
/// ```swift
/// final class NoFlush: BlockFilter {
///     override var capabilities: BlockCapabilities { next.capabilities.subtracting(.flush) }
///     override func submit(_ request: BlockRequest, completion: BlockCompletion) {
///         if request.operation == .flush { return completion.complete(.success) }
///         next.submit(request, completion: completion)
///     }
/// }
/// ```
open class BlockFilter: BlockDevice, @unchecked Sendable {
    public let next: any BlockDevice
    public init(next: any BlockDevice) { self.next = next }

    open var name: String { "filter" }
    open var geometry: BlockGeometry { next.geometry }
    open var capabilities: BlockCapabilities { next.capabilities }

    open func submit(_ request: BlockRequest, completion: BlockCompletion) { next.submit(request, completion: completion) }
    open func extents(at offset: UInt64, length: UInt64) throws(BlockError) -> [BlockExtent] {
        try next.extents(at: offset, length: length)
    }
    /// The device below's: a filter's completions pass through it whichever thread collects them.
    open func attachCompletionSource() -> BlockCompletionSource? { next.attachCompletionSource() }
    open func close() { next.close() }
}
