import Core
import Glibc

/// Adaptive polling of an idle connection's socket before the reader blocks on it.
///
/// At queue depth 1 a client sends its next request a few microseconds after our reply
/// reaches it; blocking in recv() in between puts the reader to sleep and makes the kernel
/// (on a virtual machine, the hypervisor too) wake it again, which costs more than the request.
/// So, when nothing of this client's is in the device, the reader first asks the socket
/// without blocking for up to `window` (`softdev serve --nbd-poll-us`, 50 µs by default). Polling is kept only while it pays: after a miss the
/// reader blocks at once for a growing number of waits (1, 2, 4 … 256), so a connection whose
/// client thinks between requests costs one window now and then, not a spinning core.
struct NBDPoller {
    /// How long to poll before blocking, in nanoseconds; 0 never polls.
    let window: UInt64
    private var skip = 0
    private var backoff = 1

    init(microseconds: Int) { window = UInt64(max(0, microseconds)) * 1000 }

    /// The result of `attempt` once it gives one within the window, or nil: block instead.
    mutating func wait(idle: Bool, _ attempt: () -> Int?) -> Int? {
        guard idle, window > 0 else { return nil }
        if skip > 0 { skip -= 1; return nil }
        let deadline = Self.now() + window
        repeat {
            if let n = attempt() { backoff = 1; return n }
        } while Self.now() < deadline
        skip = backoff
        backoff = min(backoff * 2, 256)
        return nil
    }

    private static func now() -> UInt64 {
        var ts = timespec()
        clock_gettime(CLOCK_MONOTONIC, &ts)
        return UInt64(ts.tv_sec) * 1_000_000_000 + UInt64(ts.tv_nsec)
    }
}
