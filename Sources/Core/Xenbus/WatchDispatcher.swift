import CXen
import Glibc
import Synchronization
import XenStore

/// Routes xenstore watch events to handlers by token, on one thread: the thread that owns
/// every xenbus state machine of a store connection, so they need no locks of their own.
///
/// A connection's watch events arrive in one queue, so there is exactly one dispatcher per
/// connection (``XenbusBackendHost`` owns it; a second one on the same connection refuses to
/// start, since two would steal each other's events). Tasks and timers of the dispatcher's
/// own go through its own eventfd, never through the store's queue.
public final class WatchDispatcher: @unchecked Sendable {
    public let store: any XenStoreClient
    private let handlers = Mutex<[String: (String) -> Void]>([:])
    private let tasks = Mutex<[() -> Void]>([])
    private let running = Atomic<Bool>(false)
    private let wake: Int32
    private var thread: PosixThread?
    /// Tasks due at a monotonic time; only the dispatcher thread touches it.
    private var timers: [(deadline: Double, task: () -> Void)] = []

    /// The watch queues a dispatcher serves now: one each.
    private static let served = Mutex<Set<ObjectIdentifier>>([])

    public init(store: any XenStoreClient) {
        self.store = store
        wake = cxen_eventfd(0, Int32(CXEN_EFD_CLOEXEC | CXEN_EFD_NONBLOCK))
    }
    deinit { if wake >= 0 { Glibc.close(wake) } }

    /// Watches `path`; `handler` runs on the dispatcher thread with the changed path.
    public func watch(_ path: String, token: String, _ handler: @escaping (String) -> Void) throws {
        handlers.withLock { $0[token] = handler }
        do { try store.watch(path, token: token) } catch {
            _ = handlers.withLock { $0.removeValue(forKey: token) }
            throw error
        }
    }

    public func unwatch(_ path: String, token: String) {
        _ = handlers.withLock { $0.removeValue(forKey: token) }
        try? store.unwatch(path, token: token)
    }

    /// Runs `task` on the dispatcher thread, after what is queued already.
    public func async(_ task: @escaping () -> Void) {
        let wasEmpty = tasks.withLock { q -> Bool in q.append(task); return q.count == 1 }
        if wasEmpty { signal() }
    }

    /// Runs `task` on the dispatcher thread `seconds` from now (or at stop, not at all).
    public func after(_ seconds: Double, _ task: @escaping () -> Void) {
        let deadline = monotonicSeconds() + seconds
        async { [self] in timers.append((deadline, task)) }
    }

    /// True on the dispatcher's thread.
    public var isCurrent: Bool { thread?.isCurrent ?? false }
    public var isRunning: Bool { running.load(ordering: .acquiring) }

    public func start() throws {
        guard wake >= 0 else { throw XenStoreError.invalid("watch dispatcher: eventfd: \(String(cString: strerror(errno)))") }
        let queue = ObjectIdentifier(store.watchEvents)
        guard Self.served.withLock({ $0.insert(queue).inserted }) else {
            throw XenStoreError.invalid("a watch dispatcher already serves this xenstore connection: share it (XenbusBackendHost)")
        }
        running.store(true, ordering: .releasing)
        do {
            thread = try PosixThread("the xenstore watch dispatcher") { [self] in run() }
        } catch {
            running.store(false, ordering: .releasing)
            _ = Self.served.withLock { $0.remove(queue) }
            throw error
        }
    }

    /// Stops the thread after the task it runs now; queued tasks and timers are dropped.
    public func stop() {
        guard running.exchange(false, ordering: .acquiringAndReleasing) else { return }
        signal()
        thread?.join()
        _ = Self.served.withLock { $0.remove(ObjectIdentifier(store.watchEvents)) }
    }

    private func signal() {
        var one: UInt64 = 1
        _ = Glibc.write(wake, &one, 8)
    }

    private func run() {
        var fds = [pollfd(fd: store.watchEvents.fileDescriptor, events: Int16(POLLIN), revents: 0),
                   pollfd(fd: wake, events: Int16(POLLIN), revents: 0)]
        while running.load(ordering: .acquiring) {
            runDueTimers()
            // Several events may wait; take them all before sleeping again.
            while running.load(ordering: .relaxed), let e = store.watchEvents.takeIfAny() {
                if let h = handlers.withLock({ $0[e.token] }) { h(e.path) }
            }
            let queued = tasks.withLock { q -> [() -> Void] in defer { q.removeAll() }; return q }
            for t in queued where running.load(ordering: .relaxed) { t() }
            if !queued.isEmpty { continue }
            var timeout: Int32 = 1000
            if let next = timers.map(\.deadline).min() {
                timeout = Int32(max(0, min(1000, (next - monotonicSeconds()) * 1000 + 1)))
            }
            fds[0].revents = 0; fds[1].revents = 0
            if poll(&fds, 2, timeout) > 0, fds[1].revents != 0 {
                var v: UInt64 = 0
                _ = Glibc.read(wake, &v, 8)
            }
        }
    }

    private func runDueTimers() {
        guard !timers.isEmpty else { return }
        let now = monotonicSeconds()
        let due = timers.filter { $0.deadline <= now }
        guard !due.isEmpty else { return }
        timers.removeAll { $0.deadline <= now }
        for t in due { t.task() }
    }
}
