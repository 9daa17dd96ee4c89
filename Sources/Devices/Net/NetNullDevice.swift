import Core

/// `null` (net): an endpoint that takes every frame from the guest, counts its frames and
/// bytes and forgets it, and sends nothing: the sink of the ring benchmark. It takes every
/// offload, does no work per frame but two atomic additions, and takes no lock.
public final class NetNullDevice: NetDevice, @unchecked Sendable {
    public let name = "null"
    public let offloads: NetOffloads = .all
    private let counter = NetTrafficCounter()

    public init() {}

    public func fromGuest(_ frame: EthernetFrame) { counter.count(frame) }
    public func connect(_ receiver: any NetFrameReceiver, accepting offloads: NetOffloads) {}
    public func close() {}

    /// What it has taken so far (nothing ever goes to the guest).
    public var counts: NetCounters { NetCounters(fromGuest: counter.snapshot) }
}

extension NetNullDevice {
    public static let descriptor = DeviceDescriptor(
        deviceClass: .net, name: "null", kind: .device,
        summary: "Takes and discards every frame from the guest, sends none: a sink for benchmarks.",
        parameters: [],
        open: { _, _ throws(DeviceSpecError) in NetNullDevice() })
}
