import Core
import Glibc

/// A few threads that run submitted work in order of arrival, for system calls that block:
/// buffered file I/O, where io_submit would do the copy on the submitting thread (QEMU's thread
/// pool and nbdkit's worker threads do the same for such files).
final class WorkerPool: @unchecked Sendable {
    private let lock = ConditionLock()
    private var work: [() -> Void] = []     // under lock; `head` is the next to run
    private var head = 0
    private var stopping = false
    private var threads: [PosixThread] = []

    /// Starts `count` threads, or none: if one cannot start, those started are stopped and
    /// the error thrown (the device's open fails, not the process).
    init(threads count: Int, purpose: String) throws(ThreadStartError) {
        for _ in 0..<count {
            do throws(ThreadStartError) {
                // `stop` joins every thread before the pool goes, so they need not hold it.
                let thread = try PosixThread(purpose) { [unowned(unsafe) self] in run() }
                lock.withLock { threads.append(thread) }
            } catch {
                stop()
                throw error
            }
        }
    }

    deinit { stop() }

    func enqueue(_ item: @escaping () -> Void) {
        lock.withLock {
            work.append(item)
            lock.signal()
        }
    }

    /// Runs what is queued, then stops and joins the threads. Idempotent.
    func stop() {
        let joining = lock.withLock { () -> [PosixThread] in
            stopping = true
            lock.broadcast()
            defer { threads = [] }
            return threads
        }
        for t in joining { t.join() }
    }

    private func run() {
        while let item = next() { item() }
    }

    /// The next item, waiting for one; nil once stopping and nothing is left.
    private func next() -> (() -> Void)? {
        lock.withLock {
            while head == work.count && !stopping { lock.wait() }
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
}
