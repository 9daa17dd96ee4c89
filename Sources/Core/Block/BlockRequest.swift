import Glibc

/// A scatter-gather list over memory the transport owns (mapped guest pages, a socket buffer).
/// It does not own the `iovec`s; it is valid until the request completes.
public struct IOBuffers: @unchecked Sendable, Sequence {
    public let vectors: UnsafeMutablePointer<iovec>?
    public let count: Int

    @inlinable
    public init(_ vectors: UnsafeMutablePointer<iovec>?, count: Int) {
        self.vectors = vectors; self.count = count
    }
    /// No buffers (a computed constant: a stored global would cost a lazy-initialisation
    /// check at each use, and every request without data takes it as a default).
    @inlinable public static var empty: IOBuffers { IOBuffers(nil, count: 0) }

    /// The total length in bytes.
    public var byteCount: Int {
        var n = 0
        for i in 0..<count { n += vectors![i].iov_len }
        return n
    }

    public func makeIterator() -> Iterator { Iterator(buffers: self, index: 0) }
    public struct Iterator: IteratorProtocol {
        let buffers: IOBuffers
        var index: Int
        public mutating func next() -> UnsafeMutableRawBufferPointer? {
            guard index < buffers.count else { return nil }
            defer { index += 1 }
            let v = buffers.vectors![index]
            return UnsafeMutableRawBufferPointer(start: v.iov_base, count: v.iov_len)
        }
    }

    /// Fills every buffer with zeroes.
    public func zero() {
        for b in self where b.count > 0 { memset(b.baseAddress!, 0, b.count) }
    }
    /// The memory of bytes `[position, position + count)` of the buffers, seen as one run of
    /// bytes, when they lie in one buffer; nil when they span two.
    public func contiguous(at position: Int, count: Int) -> UnsafeMutableRawPointer? {
        var skip = position
        for b in self {
            if skip >= b.count { skip -= b.count; continue }
            return b.count - skip >= count ? b.baseAddress! + skip : nil
        }
        return nil
    }
    /// Copies `total` bytes of `source` into the buffers, seen as one run of bytes, from byte
    /// `position` of that run (up to its end).
    public func copy(from source: UnsafeRawPointer, count total: Int, at position: Int = 0) {
        var skip = position, done = 0
        for b in self where done < total {
            if skip >= b.count { skip -= b.count; continue }
            let n = Swift.min(b.count - skip, total - done)
            memcpy(b.baseAddress! + skip, source + done, n)
            done += n; skip = 0
        }
    }
    /// Copies `total` bytes of the buffers, seen as one run of bytes, from byte `position` of
    /// that run (up to its end), into `destination`.
    public func copy(to destination: UnsafeMutableRawPointer, count total: Int, at position: Int = 0) {
        var skip = position, done = 0
        for b in self where done < total {
            if skip >= b.count { skip -= b.count; continue }
            let n = Swift.min(b.count - skip, total - done)
            memcpy(destination + done, b.baseAddress! + skip, n)
            done += n; skip = 0
        }
    }
}

/// One request for a device, already checked against its geometry by the transport.
public struct BlockRequest: @unchecked Sendable {
    public var operation: BlockOperation
    /// Byte offset; a multiple of the logical block size.
    public var offset: UInt64
    /// Byte length (for read and write, `buffers.byteCount`).
    public var length: UInt64
    /// The data of a read (filled by the device) or a write; empty for the others.
    public var buffers: IOBuffers
    /// Forced unit access: the write must be durable before it completes.
    public var fua: Bool
    /// For `writeZeroes`: the device may punch a hole instead of writing.
    public var mayDiscard: Bool
    /// The submitting thread has nothing else to do until this request completes (an NBD
    /// connection with no other request in flight or waiting, as nbdkit's threads are): a
    /// device that would hand a blocking operation to a thread of its own may run it on this
    /// one, saving two thread hand-overs. A filter that passes the request on from another
    /// thread (a timer) clears it.
    public var callerMayWait = false

    @inlinable
    public init(operation: BlockOperation, offset: UInt64, length: UInt64, buffers: IOBuffers = .empty,
                fua: Bool = false, mayDiscard: Bool = false) {
        self.operation = operation; self.offset = offset; self.length = length
        self.buffers = buffers; self.fua = fua; self.mayDiscard = mayDiscard
    }
}

public enum BlockResult: Sendable, Equatable {
    case success
    case failure(BlockError)

    /// Throws the failure.
    public func get() throws(BlockError) {
        if case .failure(let error) = self { throw error }
    }
}

/// Receives completions from devices. The transport implements it; `complete` may be called on
/// any thread.
public protocol BlockCompletionSink: AnyObject, Sendable {
    func complete(tag: UInt64, result: BlockResult)
}

/// The way a device reports that one request is done: call `complete` exactly once.
/// Inlinable: every request makes one and completes through it, in another module than the
/// one that defines it (a transport makes it, a device completes it).
public struct BlockCompletion: Sendable {
    public let sink: any BlockCompletionSink
    public let tag: UInt64
    @inlinable public init(sink: any BlockCompletionSink, tag: UInt64) { self.sink = sink; self.tag = tag }
    @inlinable public func complete(_ result: BlockResult) { sink.complete(tag: tag, result: result) }
}

/// Waits for a device's completion on the calling thread (``BlockDevice/submitAndWait(_:)``,
/// the NBD export's synchronous reads); reusable, one request at a time.
public final class BlockCompletionWaiter: BlockCompletionSink, @unchecked Sendable {
    private let lock = ConditionLock()
    private var result: BlockResult?

    public init() {}

    public func complete(tag: UInt64, result: BlockResult) {
        lock.withLock { self.result = result; lock.broadcast() }
    }

    /// The result of the request completed to this waiter, once it is there.
    public func wait() -> BlockResult {
        BlockPlug.flush()   // the request may be held in this thread's plug
        return lock.withLock {
            while result == nil { lock.wait() }
            defer { result = nil }
            return result!
        }
    }
}
