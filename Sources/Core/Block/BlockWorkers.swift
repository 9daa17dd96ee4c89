import Glibc

/// The threads a transport owns for the requests a device may block on (a buffered file's
/// read that misses the page cache, a content store's lookups, a compressed chunk rewritten),
/// as nbdkit's server owns the threads its plugins run on and QEMU an iothread's thread pool:
/// each vbd's rings share one, the NBD export has one. A device never starts threads to serve
/// requests: it hands what may block to ``BlockOffload``, which runs it on the pool of the
/// transport whose thread submitted it.
///
/// - Threads start when work waits and none is idle, up to `limit`, and stay until `stop`
///   (an idle pool costs no thread). Work runs in the order it was queued.
/// - A transport's thread names its pool once, when it starts (``adopt()``). A thread of no
///   transport (a test, a filter's timer) uses ``shared``.
/// - Work queued from a worker thread runs there and then (``BlockOffload``): the thread may
///   block already, and a pool whose threads all waited for work queued behind them would
///   never finish.
public final class BlockWorkers: @unchecked Sendable {
    public let limit: Int
    public let purpose: String
    private let lock = ConditionLock()
    private var work: [() -> Void] = []   // under lock; `head` is the next to run
    private var head = 0
    private var threads: [PosixThread] = []
    private var waiting = 0
    /// Threads being started (counted against the limit before they exist).
    private var starting = 0
    private var stopping = false

    public init(limit: Int, purpose: String) {
        self.limit = max(1, limit)
        self.purpose = purpose
    }

    deinit { stop() }

    /// Threads started and not yet stopped.
    public var threadCount: Int { lock.withLock { threads.count } }

    /// For threads of no transport (tests, tools, a timer's thread): started on first use, never stopped.
    public static let shared = BlockWorkers(limit: 16, purpose: "block workers")

    /// The pool of the transport whose thread this is, or nil.
    @inline(__always) public static var current: BlockWorkers? {
        guard let p = pthread_getspecific(poolKey) else { return nil }
        return Unmanaged<BlockWorkers>.fromOpaque(p).takeUnretainedValue()
    }

    /// True on a worker thread of any pool: it may block.
    @inline(__always) public static var onWorkerThread: Bool { pthread_getspecific(workerKey) != nil }

    /// Makes this pool the calling thread's (a transport's ring or connection thread, once at
    /// its start), for as long as the thread lives.
    public func adopt() {
        if let old = pthread_getspecific(Self.poolKey) { Unmanaged<BlockWorkers>.fromOpaque(old).release() }
        pthread_setspecific(Self.poolKey, Unmanaged.passRetained(self).toOpaque())
    }

    /// Runs `item` on one of the threads, starting one if none is idle and the limit allows.
    /// If no thread can start (the process's thread limit) and none runs, `item` runs here:
    /// late, on the caller's thread, rather than never. After `stop`, it runs here too.
    public func enqueue(_ item: @escaping () -> Void) {
        let spawn: Bool? = lock.withLock {
            if stopping { return nil }
            work.append(item)
            if waiting > 0 { lock.signal() }
            guard work.count - head > waiting + starting && threads.count + starting < limit else { return false }
            starting += 1
            return true
        }
        guard let spawn else { return item() }
        guard spawn else { return }
        do throws(ThreadStartError) {
            // `stop` joins every thread before the pool goes, so they need not hold it.
            let thread = try PosixThread(purpose) { [unowned(unsafe) self] in run() }
            lock.withLock { starting -= 1; threads.append(thread) }
        } catch {
            // Without a thread of the pool to run it, what is queued runs here.
            if lock.withLock({ starting -= 1; return threads.isEmpty && starting == 0 }) {
                while let next = take(waiting: false) { next() }
            }
        }
    }

    /// Runs what is queued, then stops and joins the threads. Work queued later runs on the
    /// caller's thread. Idempotent.
    public func stop() {
        let joining = lock.withLock { () -> [PosixThread] in
            stopping = true
            lock.broadcast()
            defer { threads = [] }
            return threads
        }
        for t in joining { t.join() }
        // A pool whose threads never started may still hold work.
        while let next = take(waiting: false) { next() }
    }

    private func run() {
        pthread_setspecific(Self.workerKey, UnsafeRawPointer(bitPattern: 1))
        while let item = take(waiting: true) { item() }
    }

    /// The next item; with `waiting`, waits for one until the pool stops.
    private func take(waiting wait: Bool) -> (() -> Void)? {
        lock.withLock {
            while wait && head == work.count && !stopping {
                waiting += 1
                lock.wait()
                waiting -= 1
            }
            guard head < work.count else { return nil }
            let item = work[head]
            head += 1
            if head == work.count {
                work.removeAll(keepingCapacity: true)
                head = 0
            } else if head >= 4096 && head * 2 >= work.count {
                work.removeFirst(head)
                head = 0
            }
            return item
        }
    }

    nonisolated(unsafe) private static let poolKey: pthread_key_t = makeKey { p in
        if let p { Unmanaged<BlockWorkers>.fromOpaque(p).release() }
    }
    nonisolated(unsafe) private static let workerKey: pthread_key_t = makeKey(nil)

    private static func makeKey(_ destructor: (@convention(c) (UnsafeMutableRawPointer?) -> Void)?) -> pthread_key_t {
        var key = pthread_key_t()
        let made = pthread_key_create(&key, destructor)
        precondition(made == 0, "BlockWorkers: pthread_key_create failed (\(made))")
        return key
    }
}

/// A device's requests that may block, served off the thread that submitted them: on the
/// pool of that thread's transport (``BlockWorkers/current``, else ``BlockWorkers/shared``),
/// or at once when the caller may wait (``BlockRequest/callerMayWait``) or is a worker
/// already. The device keeps one and calls ``waitUntilIdle()`` in `close`, so that nothing
/// of its own runs after it closed.
///
/// ```swift
/// public func submit(_ request: BlockRequest, completion: BlockCompletion) {
///     offload.serve(request, completion) { self.performSynchronously(request) }
/// }
/// ```
public final class BlockOffload: @unchecked Sendable {
    private let lock = ConditionLock()
    private var running = 0

    public init() {}

    /// Runs `perform` where the request may block, then completes it with the result.
    public func serve(_ request: BlockRequest, _ completion: BlockCompletion, _ perform: @escaping () -> BlockResult) {
        if request.callerMayWait || BlockWorkers.onWorkerThread { return completion.complete(perform()) }
        run {
            let result = perform()
            return { completion.complete(result) }
        }
    }

    /// Runs `work` on a worker of the submitting thread's transport; what it returns runs
    /// after the device counts it done (a completion, which may lead to the device's close).
    public func run(_ work: @escaping () -> (() -> Void)) {
        lock.withLock { running += 1 }
        (BlockWorkers.current ?? BlockWorkers.shared).enqueue { [self] in
            let then = work()
            lock.withLock {
                running -= 1
                if running == 0 { lock.broadcast() }
            }
            then()
        }
    }

    /// Waits until no request of this device is queued or running on a pool.
    public func waitUntilIdle() {
        lock.withLock { while running > 0 { lock.wait() } }
    }
}
