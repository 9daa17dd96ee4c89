import CXen
import Glibc

/// Adaptive polling before a thread sleeps, for the NBD export's connections and the blkif
/// queues (as QEMU's iothreads poll before they block, `poll-max-ns`).
///
/// A client at queue depth 1 sends its next request a few microseconds after our reply reaches
/// it. Sleeping in between (in recv, or on the event channel) makes the kernel, and on a
/// virtual machine the hypervisor too, wake the thread again, which costs more than the
/// request. So, when nothing of the client's is in the device, the thread first checks for
/// the next request without blocking, for up to `window`. Polling is kept only while it pays:
/// after a miss the thread sleeps at once for a growing number of waits (1, 2, 4 … 256), so a
/// client that thinks between requests costs one window now and then, not a spinning core.
/// A near miss is not a miss: when the thread is back for its next wait within a window of
/// the one that ran out, what it waited for came just after the window (a disk write that
/// took 55 µs against a 50 µs window), and it keeps polling. Backing off there made a
/// queue-depth-1 writer to an O_DIRECT file sleep through most of its requests (QEMU grows
/// its window when the sleep turns out shorter than the limit; ours is the limit already).
public struct AdaptivePoller: Sendable {
    /// The default window: longer than a queue-depth-1 client's usual gap between a reply and
    /// its next request, short enough that a client that thinks costs little.
    public static let defaultMicroseconds = 50
    /// What a configuration may ask for: up to a second.
    public static let microsecondRange = 0...1_000_000
    /// How long to poll before sleeping, in nanoseconds; 0 never polls.
    public let window: UInt64
    @usableFromInline var skip = 0
    @usableFromInline var backoff = 1
    /// When the last window ran out with nothing (0: the last wait did not miss).
    @usableFromInline var missedAt: UInt64 = 0

    public init(microseconds: Int) { window = UInt64(min(max(0, microseconds), Self.microsecondRange.upperBound)) * 1000 }

    /// The result of `attempt` once it gives one within the window, or nil: sleep instead.
    /// `idle` false (work of this client in flight, whose completion will wake the thread)
    /// never polls.
    @inlinable
    public mutating func wait<T>(idle: Bool, _ attempt: () -> T?) -> T? {
        wait(idle: idle, clock: Self.now, attempt)
    }

    /// `wait` on the clock `clock` (nanoseconds): the monotonic clock, or a test's.
    @inlinable
    public mutating func wait<T>(idle: Bool, clock: () -> UInt64, _ attempt: () -> T?) -> T? {
        guard idle, window > 0 else { return nil }
        if missedAt != 0 {
            if clock() &- missedAt < window { skip = 0; backoff = 1 }
            missedAt = 0
        }
        if skip > 0 { skip -= 1; return nil }
        let deadline = clock() + window
        var turn = 0
        repeat {
            if let n = attempt() { backoff = 1; return n }
            cxen_cpu_relax()
            turn &+= 1
            // The clock every 8th turn: an attempt may cost less than reading it.
        } while turn & 7 != 0 || clock() < deadline
        skip = backoff
        backoff = min(backoff * 2, 256)
        missedAt = deadline
        return nil
    }

    @inlinable
    static func now() -> UInt64 {
        var ts = timespec()
        clock_gettime(CLOCK_MONOTONIC, &ts)
        return UInt64(ts.tv_sec) * 1_000_000_000 + UInt64(ts.tv_nsec)
    }
}
