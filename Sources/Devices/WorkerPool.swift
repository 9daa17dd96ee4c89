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
    private var threads: [pthread_t] = []

    init(threads count: Int) {
        for _ in 0..<count {
            var thread = pthread_t()
            let rc = pthread_create(&thread, nil, { context in
                Unmanaged<WorkerPool>.fromOpaque(context!).takeUnretainedValue().run()
                return nil
            }, Unmanaged.passUnretained(self).toOpaque())
            precondition(rc == 0, "cannot start a worker thread: \(String(cString: strerror(rc)))")
            threads.append(thread)
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
        let joining = lock.withLock { () -> [pthread_t] in
            stopping = true
            lock.broadcast()
            defer { threads = [] }
            return threads
        }
        for t in joining { pthread_join(t, nil) }
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
