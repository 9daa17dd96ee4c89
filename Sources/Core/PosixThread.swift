import CXen
import Glibc

/// Why a thread could not be started (pthread_create's error, e.g. EAGAIN at the process's
/// thread limit): the caller fails that one device or connection, never the daemon.
public struct ThreadStartError: Error, CustomStringConvertible {
    public let errno: Int32
    public let purpose: String
    public var description: String { "cannot start a thread for \(purpose): \(String(cString: strerror(errno)))" }
}

/// A POSIX thread running a closure: every thread SoftDev starts (ring threads, the watch
/// dispatcher, teardown, NBD connections, device workers) is one of these, so that
/// pthread_create's result is checked in one place. Plain pthreads rather than Foundation's
/// Thread: the ring threads need nothing else and the modules need only Glibc.
public final class PosixThread: @unchecked Sendable {
    private var thread = pthread_t()
    /// Set by the thread as it returns; guarded by `lock`.
    private var finished = false
    private var joined = false
    private let lock = ConditionLock()

    /// Starts `body` on a new thread; `purpose` names it in the error, and, shortened
    /// (``shortName(_:)``), to the system (`top -H`, `ps -L`, gdb's `info threads`).
    public init(_ purpose: String, _ body: @escaping @Sendable () -> Void) throws(ThreadStartError) {
        final class Start {
            let body: @Sendable () -> Void
            let owner: PosixThread
            let name: String
            init(_ b: @escaping @Sendable () -> Void, _ o: PosixThread, _ n: String) { body = b; owner = o; name = n }
        }
        let start = Unmanaged.passRetained(Start(body, self, Self.shortName(purpose))).toOpaque()
        let rc = pthread_create(&thread, nil, { arg in
            let start = Unmanaged<Start>.fromOpaque(arg!).takeRetainedValue()
            _ = cxen_name_thread(start.name)
            start.body()
            start.owner.lock.lock()
            start.owner.finished = true
            start.owner.lock.broadcast()
            start.owner.lock.unlock()
            return nil
        }, start)
        guard rc == 0 else {
            Unmanaged<AnyObject>.fromOpaque(start).release()
            throw ThreadStartError(errno: rc, purpose: purpose)
        }
    }

    /// A thread's name as the system keeps it (15 bytes): "netif queue 1 of domain 12"
    /// becomes "netif q1 d12", "tap(name=sdn1) queue 0" "tap sdn1 q0".
    public static func shortName(_ purpose: String) -> String {
        var name = purpose
        for (long, short) in [("the ", ""), ("queue ", "q"), (" of domain ", " d"), ("controller", "ctl"), ("(name=", " "),
                              ("(path=", " "), (")", ""), ("'s ", " ")] {
            name = name.replacing(long, with: short)
        }
        var bytes = Array(name.utf8.prefix(15))
        while !bytes.isEmpty, String(validating: bytes, as: UTF8.self) == nil { bytes.removeLast() }   // no cut character
        return String(decoding: bytes, as: UTF8.self)
    }

    /// Starts a thread nobody joins (it cleans up after itself when `body` returns).
    public static func detached(_ purpose: String, _ body: @escaping @Sendable () -> Void) throws(ThreadStartError) {
        let t = try PosixThread(purpose, body)
        pthread_detach(t.thread)
        t.lock.lock(); t.joined = true; t.lock.unlock()
    }

    /// True when called on this thread.
    public var isCurrent: Bool { pthread_equal(thread, pthread_self()) != 0 }

    /// Waits for the thread to finish; a no-op the second time or from the thread itself.
    public func join() {
        guard !isCurrent else { return }
        lock.lock()
        let already = joined
        joined = true
        lock.unlock()
        if !already { pthread_join(thread, nil) }
    }

    /// Waits up to `seconds` for the thread to finish. True if it did (and is joined); false
    /// if it still runs: the caller reports that and goes on, the thread detaches itself and
    /// cleans up whenever it ends.
    public func join(timeout seconds: Double) -> Bool {
        guard !isCurrent else { return false }
        let deadline = monotonicSeconds() + seconds
        lock.lock()
        while !finished {
            let left = deadline - monotonicSeconds()
            if left <= 0 { break }
            lock.wait(timeout: left)
        }
        let done = finished
        let already = joined
        joined = true
        lock.unlock()
        if already { return done }
        if done { pthread_join(thread, nil) } else { pthread_detach(thread) }
        return done
    }
}
