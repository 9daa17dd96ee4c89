import CXen
import Glibc
import Synchronization

/// What one class of tap (blkif, netif, usbif) does on the thread of a ``RingServiceLoop``; the
/// loop owns the thread, the waiting, the polling, the cross-thread completions and the stop.
/// Every method is called on the loop's thread alone, so the service's ring state needs no lock.
public protocol RingService: AnyObject {
    /// What another thread hands back when a piece of work ends (blkif: a slot's tag and the
    /// device's result).
    associatedtype Completion

    /// Takes what the rings hold and starts it (requests to a device, frames to a TAP fd).
    /// Called on every turn until the loop stops.
    func takeWork()
    /// Finishes one completion another thread posted (writes its response, frees its slot).
    func finish(_ completion: Completion)
    /// Finishes a batch of posted completions, in order. The default calls `finish` for each;
    /// a service that keeps them (frames waiting for a guest's buffers) may swap the array for
    /// an empty one of its own instead of copying them one by one.
    func finish(batch: inout [Completion])
    /// Publishes the responses written this turn and notifies the peers that asked for it.
    func publish()
    /// Work started and not finished. While any is in flight the loop does not poll (its
    /// completion will wake the thread) and does not end when stopped.
    var inFlight: Int { get }
    /// Whether the loop should watch the rings for new work before it sleeps. A service that
    /// can take nothing now (a blkif barrier waiting for what is before it, a ring found broken)
    /// answers false, and the loop sleeps until a completion, an event or a stop.
    var awaitsWork: Bool { get }
    /// Whether the rings hold work now: the adaptive poller's question, asked often, so it must
    /// be cheap (an index compared, nothing written).
    func hasWork() -> Bool
    /// How many requests the service has taken from the rings event channel `index` notifies
    /// for, wrapping (their request consumer indexes added): an event after which this did
    /// not move found no work, and the loop unmasks its channel later each time that repeats
    /// (XSA-332). Asked once per event, on the loop's thread.
    func requestsTaken(channel index: Int) -> UInt32
    /// Before sleeping: asks the peers to notify (req_event = cons + 1) and checks once more
    /// (RING_FINAL_CHECK_FOR_REQUESTS); true if work arrived meanwhile, so the loop does not sleep.
    func prepareToSleep() -> Bool
    /// Whether a device's completions wait to be collected, asked without a system call (an
    /// O_DIRECT file's completion ring): while work is in flight the loop polls this a while
    /// before it sleeps, as QEMU polls linux-aio, since a fast disk answers within microseconds.
    func completionsReady() -> Bool
    /// Whether `completionsReady` can say anything (a device with such a ring is below).
    var pollsCompletions: Bool { get }
    /// Collects what `completionsReady` saw.
    func collectCompletions()
    /// Event channel `index` (in the order given to the loop) fired; its event is taken, and
    /// the loop unmasks the channel after the sweep that follows (XSA-332).
    func eventChannelFired(_ index: Int)
    /// Extra file descriptor `index` is ready with `events` (poll's revents). Poll is level-
    /// triggered: read what is ready (or stop asking for it), or the loop wakes again at once.
    func fileDescriptorReady(_ index: Int, events: Int16)
    /// Whether the loop should poll extra file descriptor `index` when it next sleeps (asked
    /// before each sleep). A service that cannot take what the descriptor has now (net frames
    /// from a TAP while the guest has no buffers) answers false, or poll, being level-
    /// triggered, would wake the thread again at once.
    func watchesFileDescriptor(_ index: Int) -> Bool
    /// The loop's thread starts: before anything else, on that thread (blkif names its
    /// vbd's ``BlockWorkers`` for the thread here).
    func threadStarted()
    /// The loop ended: nothing is in flight. Unmap the rings and the guest's pages here; this
    /// runs on the loop's thread, possibly long after `stop` gave up waiting, so nothing is
    /// unmapped while a device may still write into it.
    func ended()
}

extension RingService {
    public func finish(batch: inout [Completion]) {
        for i in 0..<batch.count { finish(batch[i]) }
    }
    public var pollsCompletions: Bool { false }
    public func completionsReady() -> Bool { false }
    public func collectCompletions() {}
    public var awaitsWork: Bool { true }
    public func eventChannelFired(_ index: Int) {}
    public func fileDescriptorReady(_ index: Int, events: Int16) {}
    public func watchesFileDescriptor(_ index: Int) -> Bool { true }
    public func threadStarted() {}
}

/// One thread that serves a queue's rings: it waits (poll) on any number of event channels
/// plus extra file descriptors (a TAP fd, a libusb fd, a socket, a device's completion eventfd),
/// takes the completions other threads post in batches, polls the rings adaptively when idle
/// (``AdaptivePoller``), and stops with a timeout. The class-specific logic is a ``RingService``.
///
/// ```swift
/// let loop = try RingServiceLoop<MyQueue>(purpose: "vif 3/0", channels: [tx, rx],
///                                          fileDescriptors: [tapFD], poller: AdaptivePoller(microseconds: 50),
///                                          completionCapacity: 256)
/// try loop.start(myQueue)
/// // on another thread, when a device is done:
/// loop.post(completion)
/// // at disconnect:
/// if !loop.stop(timeout: 5) { log("still in flight; released when the device completes") }
/// ```
///
/// Per turn it does: take work (until stopped), finish posted completions, publish, unmask the
/// event channels that woke it (only now, after the sweep: XSA-332, see ``EventChannelGates``);
/// then, if nothing is in flight, poll the rings for a while; then arm notifications and sleep
/// in poll.
/// A turn with no posted completion takes no lock, and a request served inline (a device that
/// completes in `submit` on this thread) passes through none of this.
public final class RingServiceLoop<Service: RingService>: @unchecked Sendable {
    public let purpose: String
    /// Polled for events, in this order; consumed by the loop, then reported to the service.
    public let channels: [any EventChannel]
    /// Polled beside the channels, with the events asked for each.
    public let fileDescriptors: [(fd: Int32, events: Int16)]
    @usableFromInline let completions: RingCompletionQueue<Service.Completion>
    /// Written by `post` when the completion queue was empty, read by the loop's poll.
    @usableFromInline let wake: Int32
    @usableFromInline let stopping = Atomic<Bool>(false)
    /// The loop's thread, recorded by the thread itself before it takes any work: everything
    /// that compares against it (a completion) happens after that work was started.
    @usableFromInline @exclusivity(unchecked) var loopThread = pthread_t()
    @usableFromInline @exclusivity(unchecked) var poller: AdaptivePoller
    /// The same window for a device's completions while work is in flight, with its own backoff.
    @usableFromInline @exclusivity(unchecked) var completionPoller: AdaptivePoller

    @usableFromInline struct Life {
        @usableFromInline var thread: PosixThread?
        /// Held from `start` until the thread ends (then released, breaking the cycle with a
        /// service that holds its loop), or given `ended` by `stop` if it never started.
        @usableFromInline var service: Service?
        @usableFromInline var ended = false
        @usableFromInline init() {}
    }
    @usableFromInline let life = Mutex(Life())
    @usableFromInline let eventsTaken = Atomic<UInt64>(0)
    @usableFromInline let spuriousEvents = Atomic<UInt64>(0)
    @usableFromInline let delayedUnmasks = Atomic<UInt64>(0)

    /// What the event channels did so far (read from any thread).
    public var eventStatistics: RingEventStatistics {
        var s = RingEventStatistics()
        s.events = eventsTaken.load(ordering: .relaxed)
        s.spurious = spuriousEvents.load(ordering: .relaxed)
        s.delayedUnmasks = delayedUnmasks.load(ordering: .relaxed)
        return s
    }
    /// The longest a channel stays masked after repeated spurious events, in seconds: how late
    /// a peer that stops misbehaving may find its next request seen.
    public static var maximumUnmaskDelay: Double { Double(EventChannelGates.maximumDelay) / 1e9 }

    public struct SetupError: Error, CustomStringConvertible {
        public let description: String
    }

    /// `completionCapacity`: the most completions that can be pending at once (the ring's size).
    public init(purpose: String, channels: [any EventChannel], fileDescriptors: [(fd: Int32, events: Int16)] = [],
                poller: AdaptivePoller, completionCapacity: Int) throws(SetupError) {
        self.purpose = purpose
        self.channels = channels
        self.fileDescriptors = fileDescriptors
        self.poller = poller
        self.completionPoller = AdaptivePoller(microseconds: Int(poller.window / 1000))
        completions = RingCompletionQueue(capacity: completionCapacity)
        wake = cxen_eventfd(0, Int32(CXEN_EFD_CLOEXEC | CXEN_EFD_NONBLOCK))
        guard wake >= 0 else { throw SetupError(description: "\(purpose): eventfd: \(String(cString: strerror(errno)))") }
    }

    deinit { Glibc.close(wake) }

    /// Starts the thread that serves `service`. On failure nothing runs and `stop` releases the
    /// service's resources (`ended`). (A loop stopped without a `start` knows no service: it
    /// closes its channels, and the service releases the rest itself.)
    /// (Inlinable, as `run` is: the tap's module gets the loop specialized for its service.)
    @inlinable public func start(_ service: Service) throws(ThreadStartError) {
        // Under the lock, so that a `stop` on another thread sees either no start or a thread
        // (the thread takes the lock only as it ends).
        try life.withLock { (l) throws(ThreadStartError) in
            l.service = service
            l.thread = try PosixThread(purpose) { [self] in
                self.run(service)
                // The last use of the service from this loop: drop it, so that a queue that
                // `stop` gave up on is freed now that its device finally completed.
                self.life.withLock { $0.ended = true; $0.service = nil }
            }
        }
    }

    /// True on the loop's thread: a completion there is finished inline, not posted.
    @inlinable public var isLoopThread: Bool { pthread_equal(pthread_self(), loopThread) != 0 }

    /// From any thread but the loop's: hands `completion` to the loop, waking it if it may sleep.
    @inlinable public func post(_ completion: Service.Completion) {
        if completions.post(completion) { signalWake() }
    }

    /// From any thread but the loop's: hands several completions over with one lock and at
    /// most one wake-up.
    @inlinable public func post<S: Sequence>(contentsOf completions: S) where S.Element == Service.Completion {
        if self.completions.post(contentsOf: completions) { signalWake() }
    }

    /// Stops taking work and waits up to `seconds` for the work in flight to finish and the
    /// thread to end (it unmaps and closes everything as it ends). True if it ended; false if a
    /// device still holds work: the thread goes on, and releases everything when the last
    /// completion arrives. Never unmaps memory a device may still write to. Idempotent.
    @discardableResult
    public func stop(timeout seconds: Double = .infinity) -> Bool {
        requestStop()
        let (thread, neverStarted, service): (PosixThread?, Bool, Service?) = life.withLock { l in
            if l.thread == nil && !l.ended {
                l.ended = true
                defer { l.service = nil }
                return (nil, true, l.service)
            }
            return (l.thread, false, nil)
        }
        if neverStarted {
            // No thread ran, so nothing can be in flight: release now, on this thread.
            service?.ended()
            closeChannels()
            return true
        }
        guard let thread else { return true }
        if seconds == .infinity {
            // In slices: a thread an earlier `stop` gave up on is detached, and only its end
            // (not pthread_join) can be waited for.
            while !thread.join(timeout: 60) {}
            return true
        }
        return thread.join(timeout: seconds)
    }

    /// Stops taking work without waiting: the loop finishes what is in flight and ends. For a
    /// caller that stops several loops at once, then waits for each with `stop(timeout:)`.
    public func requestStop() {
        if !stopping.exchange(true, ordering: .sequentiallyConsistent) { signalWake() }
    }

    /// Whether the loop has ended (for a caller that `stop` returned false to).
    public var hasEnded: Bool { life.withLock { $0.ended } }

    @usableFromInline func signalWake() {
        var one: UInt64 = 1
        _ = Glibc.write(wake, &one, 8)
    }

    @usableFromInline func closeChannels() {
        for c in channels { c.close() }
    }

    // MARK: The loop's thread

    @inlinable func run(_ service: Service) {
        loopThread = pthread_self()
        service.threadStarted()
        let channelCount = channels.count
        var fds = channels.map { pollfd(fd: $0.fileDescriptor, events: Int16(POLLIN), revents: 0) }
        fds += fileDescriptors.map { pollfd(fd: $0.fd, events: $0.events, revents: 0) }
        fds.append(pollfd(fd: wake, events: Int16(POLLIN), revents: 0))
        let wakeIndex = fds.count - 1
        let finish = { (batch: inout [Service.Completion]) in service.finish(batch: &batch) }
        var gates = EventChannelGates(count: channelCount) { service.requestsTaken(channel: $0) }
        var pollTimeout: Int32 = -1
        while true {
            let isStopping = stopping.load(ordering: .relaxed)
            if isStopping {
                if service.inFlight == 0 { break }
            } else {
                service.takeWork()
            }
            completions.drainBatch(finish)
            service.publish()
            if gates.maskedCount > 0 {
                // The sweep after the events is done: judge them and unmask (or put it off).
                let (spurious, delayed, timeout) = gates.afterSweep(
                    now: AdaptivePoller.now(), requestsTaken: { service.requestsTaken(channel: $0) }) { i in
                        channels[i].unmask()
                        fds[i].fd = channels[i].fileDescriptor
                    }
                if spurious > 0 { spuriousEvents.add(UInt64(spurious), ordering: .relaxed) }
                if delayed > 0 { delayedUnmasks.add(UInt64(delayed), ordering: .relaxed) }
                pollTimeout = timeout
            }
            if !isStopping && service.awaitsWork {
                // Idle: watch the rings a while before asking for a notification. The event
                // index is left behind meanwhile, so a peer that pushes now usually need not
                // notify. Nothing is in flight, so what else can need this thread is a stop or
                // what another thread hands over (net's frames for the guest come this way):
                // both end the window, or the guest would wait out the window for its frames.
                if service.inFlight == 0, poller.wait(idle: true, {
                    service.hasWork() || !completions.isEmpty || stopping.load(ordering: .relaxed) ? true : nil
                }) != nil { continue }
                // Sleep only after asking for (and re-checking) the next notification.
                if service.prepareToSleep() { continue }
            }
            if !isStopping && service.inFlight > 0 && service.pollsCompletions, completionPoller.wait(idle: true, {
                service.completionsReady() || !completions.isEmpty ? true : nil
            }) != nil {
                service.collectCompletions()
                continue
            }
            if !completions.isEmpty { continue }
            for i in 0..<fds.count { fds[i].revents = 0 }
            for i in channelCount..<wakeIndex {
                fds[i].fd = service.watchesFileDescriptor(i - channelCount) ? fileDescriptors[i - channelCount].fd : -1
            }
            // While stopping, a short timeout: the completions awaited wake the thread anyway,
            // this only bounds the cost of a wake-up lost to a misbehaving device. Otherwise
            // until a masked channel's back-off ends (the next turn unmasks it).
            if poll(&fds, nfds_t(fds.count), isStopping ? 10 : pollTimeout) > 0 {
                for i in 0..<channelCount where fds[i].revents != 0 {
                    // Taken, left masked (out of the poll set) until after the next sweep.
                    channels[i].takePending()
                    fds[i].fd = -1
                    gates.fired(i)
                    eventsTaken.add(1, ordering: .relaxed)
                    service.eventChannelFired(i)
                }
                for i in channelCount..<wakeIndex where fds[i].revents != 0 {
                    service.fileDescriptorReady(i - channelCount, events: fds[i].revents)
                }
                if fds[wakeIndex].revents != 0 { var v: UInt64 = 0; _ = Glibc.read(wake, &v, 8) }
            }
        }
        completions.drainBatch(finish)
        service.publish()
        service.ended()
        closeChannels()
    }
}
