/// The offloads one side of a link takes from the other: what a frame may still need done when
/// it is handed over. The guest's frontend says what it takes (netif's `feature-gso-tcpv4`,
/// `feature-sg`...), a TAP what its `TUNSETOFFLOAD` enabled; a frame needing more is finished
/// in software: a checksum completed, a TCP segment cut (``GSOSegmenter``).
public struct NetOffloads: OptionSet, Sendable, CustomStringConvertible {
    public let rawValue: UInt32
    @inlinable public init(rawValue: UInt32) { self.rawValue = rawValue }
    /// Partial checksums (``FrameOffload/Checksum/partial(start:offset:)``) are finished by the taker.
    @inlinable public static var checksum: NetOffloads { NetOffloads(rawValue: 1 << 0) }
    /// TCP segments over IPv4 larger than the MTU, cut by the taker.
    @inlinable public static var tso4: NetOffloads { NetOffloads(rawValue: 1 << 1) }
    /// TCP segments over IPv6 larger than the MTU, cut by the taker.
    @inlinable public static var tso6: NetOffloads { NetOffloads(rawValue: 1 << 2) }
    /// Frames longer than one page (netif's scatter-gather: a frame in several slots).
    @inlinable public static var largeFrames: NetOffloads { NetOffloads(rawValue: 1 << 3) }

    @inlinable public static var all: NetOffloads { NetOffloads(rawValue: 0b1111) }

    public var description: String {
        let names: [(NetOffloads, String)] = [(.checksum, "csum"), (.tso4, "tso4"), (.tso6, "tso6"), (.largeFrames, "sg")]
        let s = names.filter { contains($0.0) }.map(\.1).joined(separator: ",")
        return s.isEmpty ? "none" : s
    }

    /// Whether a frame with `offload` can be handed over as it is.
    public func accepts(_ offload: FrameOffload) -> Bool {
        if case .partial = offload.checksum, !contains(.checksum) { return false }
        if let gso = offload.segmentation {
            return contains(gso.kind == .tcpv4 ? .tso4 : .tso6)
        }
        return true
    }
}

/// Where frames coming up a stack, toward the guest, go: the element above (a filter), or the
/// tap's backend at the top (a vif's queues), or the other end of a link.
public protocol NetFrameReceiver: AnyObject, Sendable {
    /// A frame on its way to the guest. Called on any thread (a TAP's reader, another guest's
    /// ring thread through a switch); must not block: a receiver that cannot take it now (the
    /// guest posted no buffers and its backlog is full) drops it and counts the drop.
    func toGuest(_ frame: EthernetFrame)
    /// Several frames at once (a TAP reader's read-until-empty, a generator): a receiver that
    /// hands frames to another thread takes one lock and one wake-up for all of them.
    func toGuest(_ frames: [EthernetFrame])
    /// `count` copies of `frame` in a row (a generator's burst, as pktgen's `clone_skb` sends
    /// one buffer again and again): a receiver that queues frames keeps the run as one entry,
    /// so that a copy costs no reference count and no per-frame bookkeeping on the way. The
    /// default hands the frame over `count` times, one `toGuest(_:)` each, which is what a
    /// filter sees.
    func toGuest(_ frame: EthernetFrame, repeating count: Int)
}

extension NetFrameReceiver {
    public func toGuest(_ frames: [EthernetFrame]) { for f in frames { toGuest(f) } }
    public func toGuest(_ frame: EthernetFrame, repeating count: Int) {
        for _ in 0..<max(0, count) { toGuest(frame) }
    }
}

/// A soft network device: an element of a chain between a guest's network card and an
/// endpoint (a TAP interface, a switch, a sink). Frames go down the chain from the guest
/// (`fromGuest`) and come up toward it (``NetFrameReceiver/toGuest(_:)`` of the element above),
/// each direction written once, as block devices write `submit` once.
///
/// The top of a stack is connected before any frame flows (`connect`), and closed after the
/// last; an endpoint that has a reader of its own (a TAP) starts it in `connect` and stops it
/// in `close`. `fromGuest` may be called from several threads at once (one per queue of a
/// multi-queue vif) and must not block: a device that cannot take a frame now drops it.
///
/// ```swift
/// final class DropBroadcast: NetFilter {
///     override var name: String { "drop-broadcast" }
///     override func fromGuest(_ frame: EthernetFrame) {
///         if frame.destination != .broadcast { next.fromGuest(frame) }
///     }
/// }
/// ```
public protocol NetDevice: SoftDevice {
    /// What the device takes from above: a frame needing something else is finished (a
    /// checksum completed, a TCP segment cut) before it is handed down.
    var offloads: NetOffloads { get }
    /// A frame from the guest, on its way down.
    func fromGuest(_ frame: EthernetFrame)
    /// Connects the receiver of frames coming up, which takes `offloads` (what it can do with
    /// a frame: a TAP enables only the kernel offloads the guest side can take).
    func connect(_ receiver: any NetFrameReceiver, accepting offloads: NetOffloads)
    /// Whether the device makes frames for the guest when the guest has room for them (a
    /// generator), rather than when they arrive from elsewhere (a TAP, a switch). Asked once,
    /// when a vif connects; a filter answers for the device below it.
    var makesFramesOnDemand: Bool { get }
    /// The guest posted `buffers` more rx buffers (a page each) on queue `queue`: called on
    /// that queue's ring thread, only for a device that ``makesFramesOnDemand``. The device
    /// makes the frames they hold now, on this thread, and hands them up as any frame goes up
    /// (``NetFrameReceiver/toGuest(_:)``, with `queue` as their queue); they reach the guest in
    /// the same sweep, with no other thread, lock or wake-up between (as netback's own thread
    /// fills the buffers). It must not block. A device may make fewer (or none): it is asked
    /// again only for the buffers the guest posts next. Returns the frames it made. At the end
    /// of a link (``NetLink``), with no guest, the link asks again and again while it makes
    /// some; none means it is done (a generator's `count` reached).
    @discardableResult
    func guestPostedBuffers(_ buffers: Int, queue: Int) -> Int
    /// An endpoint whose frames for the guest wait in kernel queues until they are read (a
    /// TAP's queues) can leave the reading to the guest side's own threads, which read only
    /// while their guest has buffers for what they read, as QEMU's tap backend stops reading
    /// its descriptor while the guest has no room. The frames then wait in the kernel's queue
    /// (whose sender sees it fill) rather than being read, handed to another thread, and
    /// dropped there; and a frame reaches the guest with one thread woken, not two.
    ///
    /// Returns each queue's descriptor, for the taker to poll for `POLLIN`, or nil: the device
    /// hands its frames up by itself (the default; a filter asks the device below). Called
    /// before ``connect(_:accepting:)``; once it has returned descriptors, the device starts no
    /// reader of its own, and its frames are read only by ``readFrames(queue:buffers:)``.
    func handOverReading() -> [Int32]?
    /// On the one thread that polls queue `queue`'s descriptor, after ``handOverReading()``:
    /// reads the frames waiting there, handing each up (``NetFrameReceiver/toGuest(_:)``) on
    /// this thread, until they fill `buffers` page-sized buffers, the queue is empty, or a
    /// burst is read.
    /// Never blocks.
    func readFrames(queue: Int, buffers: Int) -> NetFramesRead
}

extension NetDevice {
    public var makesFramesOnDemand: Bool { false }
    @discardableResult
    public func guestPostedBuffers(_ buffers: Int, queue: Int) -> Int { 0 }
    public func handOverReading() -> [Int32]? { nil }
    public func readFrames(queue: Int, buffers: Int) -> NetFramesRead { NetFramesRead(frames: 0, buffers: 0, empty: true) }
}

/// What ``NetDevice/readFrames(queue:buffers:)`` read.
public struct NetFramesRead: Equatable, Sendable {
    /// Frames handed up.
    public var frames: Int
    /// The page-sized buffers they take (a frame's pages, and one for a GSO extra).
    public var buffers: Int
    /// The queue was found empty (or the device closed): poll its descriptor before reading again.
    public var empty: Bool
    public init(frames: Int, buffers: Int, empty: Bool) { self.frames = frames; self.buffers = buffers; self.empty = empty }
}

/// A network device that stacks over another: frames pass through unchanged both ways unless
/// the filter overrides a direction: `fromGuest` (down) or `toGuest` (up).
open class NetFilter: NetDevice, NetFrameReceiver, @unchecked Sendable {
    public let next: any NetDevice
    /// The receiver above, set by `connect` before frames flow and cleared by `close`.
    public private(set) var receiver: (any NetFrameReceiver)?
    /// What the receiver above takes.
    public private(set) var receiverOffloads: NetOffloads = []

    public init(next: any NetDevice) { self.next = next }

    open var name: String { "filter" }
    open var offloads: NetOffloads { next.offloads }
    /// Down, toward the endpoint.
    open func fromGuest(_ frame: EthernetFrame) { next.fromGuest(frame) }
    /// Up, toward the guest.
    open func toGuest(_ frame: EthernetFrame) { receiver?.toGuest(frame) }
    /// The device below makes the frames on demand, then the filter passes the demand down.
    open var makesFramesOnDemand: Bool { next.makesFramesOnDemand }
    @discardableResult
    open func guestPostedBuffers(_ buffers: Int, queue: Int) -> Int { next.guestPostedBuffers(buffers, queue: queue) }
    /// The device below is read by the guest side's threads, and what it reads comes up
    /// through the filter as any frame does.
    open func handOverReading() -> [Int32]? { next.handOverReading() }
    open func readFrames(queue: Int, buffers: Int) -> NetFramesRead { next.readFrames(queue: queue, buffers: buffers) }
    open func connect(_ receiver: any NetFrameReceiver, accepting offloads: NetOffloads) {
        self.receiver = receiver
        receiverOffloads = offloads
        next.connect(self, accepting: offloads)
    }
    /// Closes the device below first (an endpoint's reader stops), then forgets the receiver.
    open func close() {
        next.close()
        receiver = nil
    }
}

extension SoftDeviceClass {
    /// Network cards: ``NetDevice``, served over netif and between endpoints.
    public static let net = SoftDeviceClass("net")
}
