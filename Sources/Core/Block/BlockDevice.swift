import Glibc

/// The size and block sizes a block device presents.
public struct BlockGeometry: Equatable, Sendable {
    /// Size in bytes; a multiple of `logicalBlockSize`.
    public var size: UInt64
    /// The smallest unit of I/O the device accepts (512 or 4096). Requests are aligned to it.
    public var logicalBlockSize: UInt32
    /// The unit the device prefers (e.g. 4096 on a 512e disk).
    public var physicalBlockSize: UInt32
    public init(size: UInt64, logicalBlockSize: UInt32 = 512, physicalBlockSize: UInt32 = 4096) {
        self.size = size; self.logicalBlockSize = logicalBlockSize; self.physicalBlockSize = physicalBlockSize
    }
    /// Size in 512-byte sectors, the unit of blkif and of xenstore's `sectors` node.
    public var sectors: UInt64 { size / 512 }
}

/// What a device can do. Transports ask, never assume (nbdkit's can_write, can_flush, ...).
public struct BlockCapabilities: OptionSet, Sendable, CustomStringConvertible {
    public let rawValue: UInt32
    public init(rawValue: UInt32) { self.rawValue = rawValue }
    public static let write = BlockCapabilities(rawValue: 1 << 0)
    /// `flush` makes earlier writes durable (the device has a volatile cache).
    public static let flush = BlockCapabilities(rawValue: 1 << 1)
    /// Writes can be made durable one by one (forced unit access).
    public static let fua = BlockCapabilities(rawValue: 1 << 2)
    public static let discard = BlockCapabilities(rawValue: 1 << 3)
    /// `writeZeroes` is efficient (not emulated by writing zero buffers).
    public static let writeZeroes = BlockCapabilities(rawValue: 1 << 4)
    /// `extents` reports holes (sparse devices).
    public static let extents = BlockCapabilities(rawValue: 1 << 5)
    /// Several connections may use the device at once and see each other's flushed writes.
    public static let multiConn = BlockCapabilities(rawValue: 1 << 6)

    public static let all: BlockCapabilities = [.write, .flush, .fua, .discard, .writeZeroes, .extents, .multiConn]

    public var description: String {
        let names: [(BlockCapabilities, String)] = [(.write, "write"), (.flush, "flush"), (.fua, "fua"), (.discard, "discard"),
            (.writeZeroes, "write-zeroes"), (.extents, "extents"), (.multiConn, "multi-conn")]
        return names.filter { contains($0.0) }.map(\.1).joined(separator: ",")
    }
}

/// The operations a transport hands to a device.
public enum BlockOperation: UInt8, Sendable, CustomStringConvertible {
    case read, write, flush, discard, writeZeroes
    public var description: String {
        switch self {
        case .read: return "read"
        case .write: return "write"
        case .flush: return "flush"
        case .discard: return "discard"
        case .writeZeroes: return "write-zeroes"
        }
    }
}

/// Why a device operation failed: a value with a cause the transport maps to its own error
/// (BLKIF_RSP_ERROR or EOPNOTSUPP, NBD's EIO, ENOSPC, EPERM ...) and a message for logs.
public struct BlockError: Error, Equatable, Sendable, CustomStringConvertible {
    public enum Code: Sendable, Equatable {
        case io            // the medium failed
        case notSupported  // the device does not do this operation
        case outOfRange    // beyond the end of the device
        case readOnly      // a write to a read-only device
        case noSpace       // the backing store is full
        case invalid       // malformed request (misaligned, bad length)
    }
    public var code: Code
    public var errno: Int32
    public var message: String
    public init(_ code: Code, errno: Int32 = 0, _ message: String) {
        self.code = code; self.message = message
        self.errno = errno != 0 ? errno : {
            switch code {
            case .io: return EIO
            case .notSupported: return EOPNOTSUPP
            case .outOfRange: return EINVAL
            case .readOnly: return EROFS
            case .noSpace: return ENOSPC
            case .invalid: return EINVAL
            }
        }()
    }
    /// A failed system call, classified by errno (ENOSPC and EDQUOT are `.noSpace`).
    public static func system(_ operation: String, errno e: Int32) -> BlockError {
        let code: Code
        switch e {
        case ENOSPC, EDQUOT: code = .noSpace
        case EROFS, EPERM, EACCES: code = .readOnly
        case EOPNOTSUPP, ENOTSUP, ENOSYS: code = .notSupported
        case EINVAL: code = .invalid
        default: code = .io
        }
        return BlockError(code, errno: e, "\(operation): \(String(cString: strerror(e)))")
    }
    public var description: String { message }
}

/// A range of a device and whether it holds data (NBD's base:allocation).
public struct BlockExtent: Equatable, Sendable {
    public var offset: UInt64
    public var length: UInt64
    /// Not allocated: reads return zeroes and no space is used.
    public var isHole: Bool
    /// Reads return zeroes (a hole always does; an allocated range may too).
    public var isZero: Bool
    public init(offset: UInt64, length: UInt64, isHole: Bool, isZero: Bool) {
        self.offset = offset; self.length = length; self.isHole = isHole; self.isZero = isZero
    }
}

/// A soft block device: one way in for every request (`submit`), the capabilities that say
/// which operations it does, and its allocation map. Transports (the blkif backend, the NBD
/// export) check every request against the geometry before it reaches the device, so a device
/// sees only in-range, block-aligned I/O.
///
/// Every request takes the same path, `submit`, whoever sends it: a filter writes each
/// operation once, there. A device that is synchronous by nature (memory, null) conforms to
/// ``SynchronousBlockDevice`` and writes plain throwing operations instead of callbacks. A
/// device with its own queue (libaio, a remote server) implements `submit` and completes later,
/// from any thread.
///
/// ```swift
/// final class Zero: SynchronousBlockDevice {
///     let name = "zero"
///     let geometry = BlockGeometry(size: 1 << 30)
///     let capabilities: BlockCapabilities = []
///     func read(into buffers: IOBuffers, at offset: UInt64) throws(BlockError) { buffers.zero() }
/// }
/// ```
public protocol BlockDevice: SoftDevice {
    var geometry: BlockGeometry { get }
    var capabilities: BlockCapabilities { get }

    /// Starts `request`; calls `completion` exactly once, on any thread, when it is done.
    /// A write is complete only when it is where it should be (durable too, if `fua`).
    func submit(_ request: BlockRequest, completion: BlockCompletion)

    /// The allocation map of `[offset, offset+length)`, in order, covering at least `offset`.
    func extents(at offset: UInt64, length: UInt64) throws(BlockError) -> [BlockExtent]

    /// For a device with a completion queue of its own (libaio): lets the transport's thread
    /// collect the completions itself, waiting on a descriptor beside its rings, instead of a
    /// thread of the device's collecting them and handing each over (a wake-up less per
    /// request). nil (the default): the device completes as it does.
    func attachCompletionSource() -> BlockCompletionSource?

    /// For a transport's hot path: the result of `request`, done now on the calling thread,
    /// when the device always completes at once and never blocks (null, memory), so that no
    /// completion is made and called per request; nil (the default): `submit` it. A device
    /// that returns a result here does exactly what its `submit` would have done.
    func immediateResult(of request: BlockRequest) -> BlockResult?
}

/// Where a transport's thread collects a device's completions (``BlockDevice/attachCompletionSource()``).
public struct BlockCompletionSource: @unchecked Sendable {
    /// Readable while completions wait to be collected.
    public let fileDescriptor: Int32
    /// Delivers the completions that wait, each through its `BlockCompletion`, on the calling
    /// thread. Any thread may call it; each completion is delivered once.
    public let collect: () -> Void
    /// The transport no longer waits on the descriptor (its ring stopped): the device's own
    /// thread collects again.
    public let detach: () -> Void
    /// Whether completions wait, asked without a system call: a transport may poll it for a
    /// while before it sleeps (a fast disk completes within microseconds).
    public let ready: () -> Bool
    public init(fileDescriptor: Int32, collect: @escaping () -> Void, detach: @escaping () -> Void,
                ready: @escaping () -> Bool = { false }) {
        self.fileDescriptor = fileDescriptor; self.collect = collect; self.detach = detach; self.ready = ready
    }
}

extension BlockDevice {
    public func attachCompletionSource() -> BlockCompletionSource? { nil }
    public func immediateResult(of request: BlockRequest) -> BlockResult? { nil }
    public func extents(at offset: UInt64, length: UInt64) throws(BlockError) -> [BlockExtent] {
        [BlockExtent(offset: offset, length: length, isHole: false, isZero: false)]
    }
    public func close() {}

    /// Submits `request` and waits for its completion: for callers off the hot path (a
    /// partition table read at open, a barrier's flush, tests), never for a transport's requests.
    public func submitAndWait(_ request: BlockRequest) -> BlockResult {
        let waiter = BlockCompletionWaiter()
        submit(request, completion: BlockCompletion(sink: waiter, tag: 0))
        return waiter.wait()
    }

    /// The operations as calls that wait (through `submit`), for callers off the hot path:
    /// `try stack.sync.read(into: buffers, at: 0)`.
    public var sync: BlockDeviceSync { BlockDeviceSync(device: self) }
}

/// A device's operations as calls that wait for their completion (``BlockDevice/sync``). A
/// type of its own, so that these never stand in for a ``SynchronousBlockDevice``'s own
/// operations (which `submit` calls: that would go round in circles).
public struct BlockDeviceSync {
    public let device: any BlockDevice
    public func read(into buffers: IOBuffers, at offset: UInt64) throws(BlockError) {
        try device.submitAndWait(BlockRequest(operation: .read, offset: offset, length: UInt64(buffers.byteCount), buffers: buffers)).get()
    }
    public func write(from buffers: IOBuffers, at offset: UInt64, fua: Bool) throws(BlockError) {
        try device.submitAndWait(BlockRequest(operation: .write, offset: offset, length: UInt64(buffers.byteCount), buffers: buffers,
                                              fua: fua)).get()
    }
    public func flush() throws(BlockError) {
        try device.submitAndWait(BlockRequest(operation: .flush, offset: 0, length: 0)).get()
    }
    public func discard(at offset: UInt64, length: UInt64) throws(BlockError) {
        try device.submitAndWait(BlockRequest(operation: .discard, offset: offset, length: length)).get()
    }
    public func writeZeroes(at offset: UInt64, length: UInt64, mayDiscard: Bool) throws(BlockError) {
        try device.submitAndWait(BlockRequest(operation: .writeZeroes, offset: offset, length: length, mayDiscard: mayDiscard)).get()
    }
}

/// A device whose operations are plain calls that are done when they return (memory, null):
/// it writes them as throwing functions and `submit` runs them on the caller's thread. The
/// defaults: read-only, nothing to flush, no discard, zeroes written as buffers of zeroes.
public protocol SynchronousBlockDevice: BlockDevice {
    func read(into buffers: IOBuffers, at offset: UInt64) throws(BlockError)
    func write(from buffers: IOBuffers, at offset: UInt64, fua: Bool) throws(BlockError)
    func flush() throws(BlockError)
    func discard(at offset: UInt64, length: UInt64) throws(BlockError)
    func writeZeroes(at offset: UInt64, length: UInt64, mayDiscard: Bool) throws(BlockError)
}

extension SynchronousBlockDevice {
    public func submit(_ request: BlockRequest, completion: BlockCompletion) {
        completion.complete(performSynchronously(request))
    }

    /// Runs `request` through the synchronous operations, on this thread.
    public func performSynchronously(_ request: BlockRequest) -> BlockResult {
        do {
            switch request.operation {
            case .read: try read(into: request.buffers, at: request.offset)
            case .write: try write(from: request.buffers, at: request.offset, fua: request.fua)
            case .flush: try flush()
            case .discard: try discard(at: request.offset, length: request.length)
            case .writeZeroes: try writeZeroes(at: request.offset, length: request.length, mayDiscard: request.mayDiscard)
            }
            return .success
        } catch {
            return .failure(error)
        }
    }

    public func write(from buffers: IOBuffers, at offset: UInt64, fua: Bool) throws(BlockError) {
        throw BlockError(.readOnly, "\(name): device is read-only")
    }
    public func flush() throws(BlockError) {}
    public func discard(at offset: UInt64, length: UInt64) throws(BlockError) {
        throw BlockError(.notSupported, "\(name): discard is not supported")
    }
    /// Writes zero buffers, a chunk at a time.
    public func writeZeroes(at offset: UInt64, length: UInt64, mayDiscard: Bool) throws(BlockError) {
        try writeZeroesByWriting(at: offset, length: length)
    }
    public func writeZeroesByWriting(at offset: UInt64, length: UInt64) throws(BlockError) {
        let chunk = 1 << 20
        let zeroes = UnsafeMutableRawPointer.allocate(byteCount: chunk, alignment: 4096)
        defer { zeroes.deallocate() }
        memset(zeroes, 0, chunk)
        var done: UInt64 = 0
        while done < length {
            let n = Int(min(UInt64(chunk), length - done))
            var v = iovec(iov_base: zeroes, iov_len: n)
            try withUnsafeMutablePointer(to: &v) { (p) throws(BlockError) in
                try write(from: IOBuffers(p, count: 1), at: offset + done, fua: false)
            }
            done += UInt64(n)
        }
    }
}
