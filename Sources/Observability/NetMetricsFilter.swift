import Core
import CoreMetrics

/// What the daemon puts at the top of every network stack it serves when metrics are on:
/// frames and bytes in each direction (`from-guest`, `to-guest`), as swift-metrics counters
/// labelled with the class, the device (the vif's backend path) and the transport. Closing the
/// stack removes them. (Frames the backend drops, a guest's malformed ones or those for a
/// guest that posts no buffers, are in `softdev list`'s counters.)
public final class NetMetricsFilter: NetFilter, @unchecked Sendable {
    public override var name: String { next.name }
    private let fromGuestFrames: Counter, fromGuestBytes: Counter, toGuestFrames: Counter, toGuestBytes: Counter

    public init(next: any NetDevice, metrics: MetricsRegistry, device: String, transport: String) {
        let labels = [("class", SoftDeviceClass.net.name), ("device", device), ("transport", transport)]
        let from = labels + [("direction", "from-guest")], to = labels + [("direction", "to-guest")]
        fromGuestFrames = Counter(label: MetricsRegistry.frames, dimensions: from, factory: metrics)
        fromGuestBytes = Counter(label: MetricsRegistry.frameBytes, dimensions: from, factory: metrics)
        toGuestFrames = Counter(label: MetricsRegistry.frames, dimensions: to, factory: metrics)
        toGuestBytes = Counter(label: MetricsRegistry.frameBytes, dimensions: to, factory: metrics)
        super.init(next: next)
    }

    public override func fromGuest(_ frame: EthernetFrame) {
        fromGuestFrames.increment()
        fromGuestBytes.increment(by: frame.count)
        next.fromGuest(frame)
    }

    public override func toGuest(_ frame: EthernetFrame) {
        toGuestFrames.increment()
        toGuestBytes.increment(by: frame.count)
        super.toGuest(frame)
    }

    public override func close() {
        super.close()
        fromGuestFrames.destroy(); fromGuestBytes.destroy(); toGuestFrames.destroy(); toGuestBytes.destroy()
    }
}
