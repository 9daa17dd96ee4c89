import Core
import Synchronization

/// Frames, bytes and drops of one direction, as a snapshot: what the network devices count
/// (`stats`, `null`, `filter`, a switch's ports, a TAP).
public struct NetTraffic: Equatable, Sendable, CustomStringConvertible {
    public var frames: UInt64
    public var bytes: UInt64
    public var drops: UInt64
    public init(frames: UInt64 = 0, bytes: UInt64 = 0, drops: UInt64 = 0) {
        self.frames = frames; self.bytes = bytes; self.drops = drops
    }
    public var description: String { "\(frames) frames, \(bytes) bytes, \(drops) dropped" }
}

/// The live counters behind a ``NetTraffic``: atomics, so that any thread counts without a lock.
final class NetTrafficCounter: Sendable {
    private let frames = Atomic<UInt64>(0), bytes = Atomic<UInt64>(0), drops = Atomic<UInt64>(0)

    /// A frame that went through.
    func count(_ frame: EthernetFrame) { count(frames: 1, bytes: frame.count) }
    /// `frames` frames of `bytes` bytes in all that went through.
    func count(frames: Int, bytes: Int) {
        self.frames.wrappingAdd(UInt64(frames), ordering: .relaxed)
        self.bytes.wrappingAdd(UInt64(bytes), ordering: .relaxed)
    }
    /// A frame that was dropped.
    func drop() { drops.wrappingAdd(1, ordering: .relaxed) }

    var snapshot: NetTraffic {
        NetTraffic(frames: frames.load(ordering: .relaxed), bytes: bytes.load(ordering: .relaxed), drops: drops.load(ordering: .relaxed))
    }
}

/// The two directions' counters of one device.
struct NetDirectionCounters: Sendable {
    let fromGuest = NetTrafficCounter()
    let toGuest = NetTrafficCounter()
}

/// Frames, bytes and drops both ways: what a device has counted so far.
public struct NetCounters: Equatable, Sendable, CustomStringConvertible {
    /// Down, from the guest toward the endpoint.
    public var fromGuest: NetTraffic
    /// Up, toward the guest.
    public var toGuest: NetTraffic
    public init(fromGuest: NetTraffic = NetTraffic(), toGuest: NetTraffic = NetTraffic()) {
        self.fromGuest = fromGuest; self.toGuest = toGuest
    }
    init(_ live: NetDirectionCounters) { self.init(fromGuest: live.fromGuest.snapshot, toGuest: live.toGuest.snapshot) }
    public var description: String { "from guest: \(fromGuest); to guest: \(toGuest)" }
}
