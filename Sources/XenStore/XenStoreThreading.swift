import Glibc
import CXen

/// A POSIX thread running a closure; `join()` waits for it. Used instead of Foundation's Thread
/// so the module needs only Glibc, and instead of Core's PosixThread because Core depends on
/// this module.
final class XenStoreThread: @unchecked Sendable {
    private var thread = pthread_t()
    private var joined = false

    /// Starts `body`; throws (naming `purpose`) if the thread cannot start, e.g. EAGAIN at the
    /// process's thread limit: that server or connection fails, not the process.
    init(_ purpose: String, _ body: @escaping @Sendable () -> Void) throws(XenStoreError) {
        final class Box { let body: @Sendable () -> Void; init(_ b: @escaping @Sendable () -> Void) { body = b } }
        let box = Unmanaged.passRetained(Box(body)).toOpaque()
        let rc = pthread_create(&thread, nil, { raw in
            let box = Unmanaged<Box>.fromOpaque(raw!).takeRetainedValue()
            box.body()
            return nil
        }, box)
        guard rc == 0 else {
            Unmanaged<Box>.fromOpaque(box).release()
            throw .other("cannot start a thread for \(purpose): \(String(cString: strerror(rc)))")
        }
    }

    /// Waits for the thread to finish; a no-op the second time or from the thread itself.
    func join() {
        guard !joined, pthread_equal(thread, pthread_self()) == 0 else { return }
        joined = true
        pthread_join(thread, nil)
    }
}

/// A mutex with a condition variable: what waiting for a reply needs and Synchronization's
/// Mutex does not offer.
final class XenStoreCondition: @unchecked Sendable {
    private let mutex = UnsafeMutablePointer<pthread_mutex_t>.allocate(capacity: 1)
    private let condition = UnsafeMutablePointer<pthread_cond_t>.allocate(capacity: 1)

    init() {
        pthread_mutex_init(mutex, nil)
        var attributes = pthread_condattr_t()
        pthread_condattr_init(&attributes)
        pthread_condattr_setclock(&attributes, CLOCK_MONOTONIC)   // timeouts immune to clock changes
        pthread_cond_init(condition, &attributes)
        pthread_condattr_destroy(&attributes)
    }
    deinit {
        pthread_cond_destroy(condition); pthread_mutex_destroy(mutex)
        condition.deallocate(); mutex.deallocate()
    }

    func withLock<T>(_ body: () throws -> T) rethrows -> T {
        pthread_mutex_lock(mutex)
        defer { pthread_mutex_unlock(mutex) }
        return try body()
    }

    /// Waits (with the lock held) until signalled or `deadline` passes; false on timeout.
    func wait(until deadline: timespec) -> Bool {
        var d = deadline
        return pthread_cond_timedwait(condition, mutex, &d) != ETIMEDOUT
    }

    func broadcast() { pthread_cond_broadcast(condition) }

    /// CLOCK_MONOTONIC now plus `seconds`.
    static func deadline(after seconds: Double) -> timespec {
        var now = timespec()
        clock_gettime(CLOCK_MONOTONIC, &now)
        let total = Double(now.tv_sec) + Double(now.tv_nsec) / 1e9 + seconds
        let whole = total.rounded(.down)
        return timespec(tv_sec: Int(whole), tv_nsec: Int((total - whole) * 1e9))
    }
}

/// Small POSIX helpers shared by the server and the client.
enum XenStorePOSIX {
    /// Writes what the descriptor takes of `bytes[offset...]`: send() with MSG_NOSIGNAL on a
    /// socket, so a vanished peer is an EPIPE error rather than a SIGPIPE that kills the process;
    /// write() on anything else (/dev/xen/xenbus). Returns the count, or -1 with errno set.
    static func writeSome(_ fd: Int32, _ bytes: [UInt8], from offset: Int = 0) -> Int {
        bytes.withUnsafeBytes { raw in
            let start = raw.baseAddress! + offset, count = raw.count - offset
            let n = send(fd, start, count, Int32(MSG_NOSIGNAL))
            if n < 0 && errno == ENOTSOCK { return Glibc.write(fd, start, count) }
            return n
        }
    }

    /// Writes all of `bytes` to a blocking descriptor; false if the peer is gone.
    static func writeAll(_ fd: Int32, _ bytes: [UInt8]) -> Bool {
        var sent = 0
        while sent < bytes.count {
            let n = writeSome(fd, bytes, from: sent)
            if n < 0 && errno == EINTR { continue }
            if n <= 0 { return false }
            sent += n
        }
        return true
    }

    /// A `sockaddr_un` for `path`; nil if the path does not fit.
    static func unixAddress(_ path: String) -> sockaddr_un? {
        var address = sockaddr_un()
        address.sun_family = sa_family_t(AF_UNIX)
        let bytes = Array(path.utf8)
        guard !bytes.isEmpty, bytes.count < MemoryLayout.size(ofValue: address.sun_path) else { return nil }
        withUnsafeMutableBytes(of: &address.sun_path) { raw in
            for (i, b) in bytes.enumerated() { raw[i] = b }
        }
        return address
    }

    static func withSockaddr<T>(_ address: inout sockaddr_un, _ body: (UnsafePointer<sockaddr>, socklen_t) -> T) -> T {
        withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { body($0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
        }
    }

    /// A non-blocking eventfd, used to wake a poll loop; fails at the process's descriptor limit.
    static func eventFD() throws(XenStoreError) -> Int32 {
        let fd = cxen_eventfd(0, Int32(CXEN_EFD_CLOEXEC | CXEN_EFD_NONBLOCK))
        guard fd >= 0 else { throw .other(errorText("eventfd")) }
        return fd
    }

    /// Makes an eventfd readable.
    static func signal(_ fd: Int32) {
        var one: UInt64 = 1
        _ = Glibc.write(fd, &one, 8)
    }

    static func errorText(_ what: String) -> String { "\(what): \(String(cString: strerror(errno)))" }
}
