import Glibc

/// A few threads that run submitted work in order of arrival, for system calls that block:
/// buffered file I/O, where io_submit would do the copy on the submitting thread (QEMU's thread
/// pool and nbdkit's worker threads do the same for such files).
final class WorkerPool: @unchecked Sendable {
    private let mutex = UnsafeMutablePointer<pthread_mutex_t>.allocate(capacity: 1)
    private let condition = UnsafeMutablePointer<pthread_cond_t>.allocate(capacity: 1)
    private var work: [() -> Void] = []     // under mutex; `head` is the next to run
    private var head = 0
    private var stopping = false
    private var threads: [pthread_t] = []

    init(threads count: Int) {
        pthread_mutex_init(mutex, nil)
        pthread_cond_init(condition, nil)
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

    deinit {
        stop()
        pthread_cond_destroy(condition)
        pthread_mutex_destroy(mutex)
        condition.deallocate()
        mutex.deallocate()
    }

    func enqueue(_ item: @escaping () -> Void) {
        pthread_mutex_lock(mutex)
        work.append(item)
        pthread_cond_signal(condition)
        pthread_mutex_unlock(mutex)
    }

    /// Runs what is queued, then stops and joins the threads. Idempotent.
    func stop() {
        pthread_mutex_lock(mutex)
        stopping = true
        pthread_cond_broadcast(condition)
        let joining = threads
        threads = []
        pthread_mutex_unlock(mutex)
        for t in joining { pthread_join(t, nil) }
    }

    private func run() {
        while true {
            pthread_mutex_lock(mutex)
            while head == work.count && !stopping { pthread_cond_wait(condition, mutex) }
            if head == work.count {   // stopping and nothing left
                pthread_mutex_unlock(mutex)
                return
            }
            let item = work[head]
            head += 1
            if head == work.count {
                work.removeAll(keepingCapacity: true)
                head = 0
            } else if head >= 4096 && head * 2 >= work.count {
                work.removeFirst(head)
                head = 0
            }
            pthread_mutex_unlock(mutex)
            item()
        }
    }
}
