import Glibc
import Synchronization
import XenStore

/// Routes xenstore watch events to handlers by token, on one thread: the thread that owns
/// every xenbus state machine of a store connection, so they need no locks of their own.
public final class WatchDispatcher: @unchecked Sendable {
    public let store: any XenStoreClient
    private let handlers = Mutex<[String: (String) -> Void]>([:])
    private let running = Atomic<Bool>(false)
    private var thread: pthread_t?
    private let tasks = Mutex<[() -> Void]>([])

    public init(store: any XenStoreClient) { self.store = store }

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

    /// Runs `task` on the dispatcher thread, after the events already queued.
    public func async(_ task: @escaping () -> Void) {
        tasks.withLock { $0.append(task) }
        store.watchEvents.push(XenStoreWatchEvent(path: "", token: "\u{0}task"))
    }

    public func start() {
        running.store(true, ordering: .sequentiallyConsistent)
        let box = Unmanaged.passRetained(self)
        var t = pthread_t()
        pthread_create(&t, nil, { arg in
            let d = Unmanaged<WatchDispatcher>.fromOpaque(arg!).takeRetainedValue()
            d.run()
            return nil
        }, box.toOpaque())
        thread = t
    }

    public func stop() {
        guard running.exchange(false, ordering: .sequentiallyConsistent) else { return }
        store.watchEvents.push(XenStoreWatchEvent(path: "", token: "\u{0}stop"))
        if let t = thread, !pthread_equal(t, pthread_self()).isTrue { pthread_join(t, nil) }
        thread = nil
    }

    private func run() {
        while running.load(ordering: .sequentiallyConsistent) {
            guard let e = store.watchEvents.next(timeoutMilliseconds: 1000) else { continue }
            if e.token == "\u{0}task" {
                for t in tasks.withLock({ q -> [() -> Void] in defer { q.removeAll() }; return q }) { t() }
                continue
            }
            if let h = handlers.withLock({ $0[e.token] }) { h(e.path) }
        }
    }
}

extension Int32 {
    var isTrue: Bool { self != 0 }
}
