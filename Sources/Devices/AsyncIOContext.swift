import CAio
import Glibc

/// A failed system call: the call and its errno (swift-system's `Errno`, with the call named).
public struct SystemCallError: Error, Equatable, Sendable, CustomStringConvertible {
    public var call: String
    public var errno: Int32
    public init(_ call: String, errno: Int32) { self.call = call; self.errno = errno }
    public var description: String { "\(call): \(String(cString: strerror(errno)))" }
}

/// A Linux native AIO context (libaio), wrapped once so that devices never see a raw libaio
/// call or a negative errno. The kernel reads an `iocb` at `io_submit` and hands back its
/// `data` in the completion event, so each iocb must stay in place until its event is reaped.
///
/// libaio reports errors as negative return values, not through `errno`.
final class AsyncIOContext: @unchecked Sendable {
    private let context: io_context_t
    /// The most requests that may be in flight at once (`io_setup`'s `nr_events`).
    let depth: Int

    init(depth: Int) throws(SystemCallError) {
        var context: io_context_t?
        let result = io_setup(Int32(depth), &context)
        guard result == 0, let context else { throw SystemCallError("io_setup", errno: -result) }
        self.context = context
        self.depth = depth
    }

    deinit { io_destroy(context) }

    /// Whether completions wait to be reaped: a look at the ring the kernel shares, no system
    /// call (cheap enough to poll).
    var hasCompletions: Bool { caio_has_events(context) != 0 }

    /// Submits `count` iocbs in one system call; returns how many the kernel took (a prefix,
    /// possibly fewer than `count`: the caller resubmits or fails the rest).
    func submit(_ iocbs: UnsafeMutablePointer<UnsafeMutablePointer<iocb>?>, count: Int) throws(SystemCallError) -> Int {
        while true {
            let result = io_submit(context, count, iocbs)
            if result >= 0 { return Int(result) }
            if -result != EINTR { throw SystemCallError("io_submit", errno: -result) }
        }
    }

    /// Submits one iocb.
    func submit(_ iocb: UnsafeMutablePointer<iocb>) throws(SystemCallError) {
        var one: UnsafeMutablePointer<iocb>? = iocb
        let taken = try withUnsafeMutablePointer(to: &one) { (p) throws(SystemCallError) in try submit(p, count: 1) }
        if taken != 1 { throw SystemCallError("io_submit", errno: EAGAIN) }
    }

    /// Waits until at least `minimum` requests complete and stores up to `events.count` of them.
    func reap(into events: UnsafeMutableBufferPointer<io_event>, minimum: Int) throws(SystemCallError) -> Int {
        while true {
            let result = io_getevents(context, minimum, events.count, events.baseAddress, nil)
            if result >= 0 { return Int(result) }
            if -result != EINTR { throw SystemCallError("io_getevents", errno: -result) }
        }
    }

    /// What an iocb asks the kernel to do.
    enum Command {
        case read, write, dataSync
    }

    /// Fills `iocb` for `command` on `fd`. `data` comes back in the completion event.
    /// `rwFlags` are RWF_* flags for reads and writes (RWF_DSYNC makes a write durable).
    static func prepare(_ iocb: UnsafeMutablePointer<iocb>, _ command: Command, fd: Int32,
                        vectors: UnsafePointer<iovec>? = nil, count: Int = 0, offset: UInt64 = 0,
                        rwFlags: Int32 = 0, data: UnsafeMutableRawPointer?) {
        switch command {
        case .read: io_prep_preadv(iocb, fd, vectors, Int32(count), Int64(offset))
        case .write: io_prep_pwritev(iocb, fd, vectors, Int32(count), Int64(offset))
        case .dataSync: io_prep_fdsync(iocb, fd)
        }
        iocb.pointee.aio_rw_flags = UInt32(bitPattern: rwFlags)
        iocb.pointee.data = data
    }
}

/// Linux constants and calls that Glibc's Swift module does not export (they need _GNU_SOURCE).
enum LinuxFile {
    #if arch(x86_64)
    static let O_DIRECT: Int32 = 0o40000
    #else
    static let O_DIRECT: Int32 = 0o200000  // aarch64, and most other architectures
    #endif
    static let RWF_DSYNC: Int32 = 0x2
    /// Fail with EAGAIN instead of waiting for the disk (data not in the page cache).
    static let RWF_NOWAIT: Int32 = 0x8
    static let SEEK_DATA: Int32 = 3
    static let SEEK_HOLE: Int32 = 4
    static let FALLOC_FL_KEEP_SIZE: Int32 = 0x01
    static let FALLOC_FL_PUNCH_HOLE: Int32 = 0x02
    static let FALLOC_FL_ZERO_RANGE: Int32 = 0x10
    // <linux/fs.h>: _IOR(0x12, 114, size_t), _IO(0x12, 104), _IO(0x12, 123), _IO(0x12, 119)
    static let BLKGETSIZE64: UInt = 0x8008_1272
    static let BLKSSZGET: UInt = 0x1268
    static let BLKPBSZGET: UInt = 0x127B
    static let BLKDISCARD: UInt = 0x1277

    private typealias FallocateFunction = @convention(c) (Int32, Int32, Int, Int) -> Int32
    /// glibc's fallocate(2), looked up once: Swift's Glibc module hides it without _GNU_SOURCE.
    private static let fallocateFunction: FallocateFunction? = dlsym(nil, "fallocate").map {
        unsafeBitCast($0, to: FallocateFunction.self)
    }

    /// fallocate(2); sets errno to ENOSYS where it does not exist.
    static func fallocate(_ fd: Int32, _ mode: Int32, _ offset: UInt64, _ length: UInt64) -> Int32 {
        guard let fallocateFunction else { errno = ENOSYS; return -1 }
        return fallocateFunction(fd, mode, Int(offset), Int(length))
    }
}
