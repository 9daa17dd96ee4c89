/// A device that stacks over another (nbdkit's filters, tapdisk's chains): by default every
/// operation passes to `next` unchanged. A filter overrides the operations it changes.
///
/// ```swift
/// final class NoFlush: BlockFilter {
///     override var capabilities: BlockCapabilities { next.capabilities.subtracting(.flush) }
///     override func flush() throws(BlockError) {}
/// }
/// ```
open class BlockFilter: BlockDevice, @unchecked Sendable {
    public let next: any BlockDevice
    public init(next: any BlockDevice) { self.next = next }

    open var name: String { "filter" }
    open var geometry: BlockGeometry { next.geometry }
    open var capabilities: BlockCapabilities { next.capabilities }

    open func submit(_ request: BlockRequest, completion: BlockCompletion) { next.submit(request, completion: completion) }
    open func read(into buffers: IOBuffers, at offset: UInt64) throws(BlockError) { try next.read(into: buffers, at: offset) }
    open func write(from buffers: IOBuffers, at offset: UInt64, fua: Bool) throws(BlockError) {
        try next.write(from: buffers, at: offset, fua: fua)
    }
    open func flush() throws(BlockError) { try next.flush() }
    open func discard(at offset: UInt64, length: UInt64) throws(BlockError) { try next.discard(at: offset, length: length) }
    open func writeZeroes(at offset: UInt64, length: UInt64, mayDiscard: Bool) throws(BlockError) {
        try next.writeZeroes(at: offset, length: length, mayDiscard: mayDiscard)
    }
    open func extents(at offset: UInt64, length: UInt64) throws(BlockError) -> [BlockExtent] {
        try next.extents(at: offset, length: length)
    }
    open func close() { next.close() }
}
