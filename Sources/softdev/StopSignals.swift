import Glibc

/// SIGTERM and SIGINT, blocked so that they are taken when the command is ready for them
/// (threads started afterwards inherit the mask): `wait` sleeps for one, `pending` polls.
struct StopSignals {
    private var set = sigset_t()

    /// Blocks both signals in this thread and the threads it starts from now on.
    static func block() -> StopSignals {
        var s = StopSignals()
        sigemptyset(&s.set)
        sigaddset(&s.set, SIGTERM)
        sigaddset(&s.set, SIGINT)
        pthread_sigmask(SIG_BLOCK, &s.set, nil)
        return s
    }

    /// Sleeps until one arrives; returns its number.
    func wait() -> Int32 {
        var set = self.set
        var received: Int32 = 0
        sigwait(&set, &received)
        return received
    }

    /// Whether one has arrived (and waits, blocked).
    var pending: Bool {
        var pending = sigset_t()
        sigpending(&pending)
        return sigismember(&pending, SIGTERM) == 1 || sigismember(&pending, SIGINT) == 1
    }
}
