/// When a ring thread unmasks the event channels that woke it (XSA-332, Linux's
/// `xen_irq_lateeoi` as netback and blkback use it): a channel that fired stays masked until the
/// sweep after its event is done, so a peer that notifies in a loop is heard once per sweep, not
/// once per notification; and an event after which no request was taken (spurious: nothing
/// published, or the work already gone) delays the next unmask with a growing back-off, so a
/// storm of them costs a few wake-ups a second.
///
/// Spurious is judged as blkback judges it: no request taken from the rings since the channel
/// was last unmasked, by whatever path (the event's sweep, the adaptive poller, a turn a
/// completion caused). So a notification that arrives after its work was already taken, as
/// one racing the final check often does, is not held against the peer.
///
/// The back-off is Linux's shape with a lower ceiling: the first spurious event unmasks at
/// once, the second after 1 ms, then 2, 4 … at most ``maximumDelay``; one event that finds work
/// resets it. A peer that stops misbehaving waits at most that long for its next request to
/// be seen (and not at all when anything else wakes the thread: every turn sweeps the rings).
@usableFromInline struct EventChannelGates {
    /// The longest a spurious peer's channel stays masked: a frontend's request waits no longer.
    @usableFromInline static let maximumDelay: UInt64 = 32_000_000   // ns
    @usableFromInline static let firstDelay: UInt64 = 1_000_000   // ns

    @usableFromInline struct Gate {
        /// Fired: the event was taken and the port is masked.
        @usableFromInline var masked = false
        /// Fired and not yet judged (judged after the sweep that follows the event).
        @usableFromInline var judged = true
        /// Consecutive spurious events.
        @usableFromInline var spurious = 0
        /// When a masked port may be unmasked (monotonic ns).
        @usableFromInline var unmaskAt: UInt64 = 0
        /// The service's `requestsTaken` when the port was last unmasked.
        @usableFromInline var takenAtUnmask: UInt32 = 0
        @usableFromInline init() {}
    }
    @usableFromInline var gates: [Gate]
    /// How many gates are masked: 0 on the hot path, which then looks at none.
    @usableFromInline var maskedCount = 0

    @usableFromInline init(count: Int, requestsTaken: (Int) -> UInt32) {
        gates = (0..<count).map { i in
            var gate = Gate()
            gate.takenAtUnmask = requestsTaken(i)
            return gate
        }
    }

    /// Channel `i`'s event was taken (its port left masked): judged after the next sweep.
    @inlinable mutating func fired(_ i: Int) {
        if !gates[i].masked { maskedCount += 1 }
        gates[i].masked = true
        gates[i].judged = false
    }

    /// After a sweep: judges the events it followed, and unmasks (through `unmask`) every gate
    /// whose time has come, noting `requestsTaken(i)` for the next judgement. Returns how many
    /// of the events judged were spurious, how many unmasks were put off, and the poll timeout
    /// until the next unmask due (ms, rounded up; -1: none is waiting).
    @inlinable mutating func afterSweep(now: UInt64, requestsTaken: (Int) -> UInt32,
                                        unmask: (Int) -> Void) -> (spurious: Int, delayed: Int, timeout: Int32) {
        var spurious = 0, delayed = 0
        var next = UInt64.max
        for i in 0..<gates.count where gates[i].masked {
            let taken = requestsTaken(i)
            if !gates[i].judged {
                gates[i].judged = true
                if taken != gates[i].takenAtUnmask {
                    gates[i].spurious = 0
                    gates[i].unmaskAt = 0
                } else {
                    spurious += 1
                    gates[i].spurious = min(gates[i].spurious + 1, 64)
                    let n = gates[i].spurious
                    // 0 for the first, then 1 ms, 2 ms, 4 ms … up to the ceiling.
                    let delay = n < 2 ? 0 : min(Self.firstDelay << UInt64(min(n - 2, 32)), Self.maximumDelay)
                    gates[i].unmaskAt = now + delay
                    if delay > 0 { delayed += 1 }
                }
            }
            if gates[i].unmaskAt <= now {
                gates[i].masked = false
                gates[i].takenAtUnmask = taken
                maskedCount -= 1
                unmask(i)
            } else {
                next = min(next, gates[i].unmaskAt)
            }
        }
        guard next != .max else { return (spurious, delayed, -1) }
        return (spurious, delayed, Int32((next - now + 999_999) / 1_000_000))
    }
}

/// What a ring thread's event channels did, for `softdev list`, the metrics and the tests.
public struct RingEventStatistics: Sendable, Equatable, CustomStringConvertible {
    /// Events taken from the channels (each one a wake-up of the thread, or part of one).
    public var events: UInt64 = 0
    /// Events after which no request was taken (XSA-332's storm is made of these).
    public var spurious: UInt64 = 0
    /// Unmasks put off by the back-off after repeated spurious events.
    public var delayedUnmasks: UInt64 = 0
    public init() {}
    /// As every class's `statistics` node ends: "events=2 spurious-events=0".
    public var description: String { "events=\(events) spurious-events=\(spurious)" }
    public static func + (a: Self, b: Self) -> Self {
        var s = a
        s.events += b.events; s.spurious += b.spurious; s.delayedUnmasks += b.delayedUnmasks
        return s
    }
}
