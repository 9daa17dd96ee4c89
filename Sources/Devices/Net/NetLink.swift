import Core
import Synchronization

/// Two network endpoints joined without a guest: what the network tap exports on a host
/// without Xen. The first element of the spec stands in for the guest (an endpoint device,
/// e.g. a TAP); the rest is an ordinary net stack, filters then an endpoint:
///
/// ```swift
/// let link = try NetLink(spec: "tap(name=a) | filter(expr=\"tcp\") | tap(name=b)")
/// ...
/// link.close()
/// ```
///
/// Frames the first endpoint produces go down the stack (its `fromGuest`); frames coming up
/// the stack go to the first endpoint's `fromGuest`. Each side accepts what the other's
/// `offloads` says, so TAP to TAP keeps checksum and TSO offloads end to end.
///
/// A side that makes its frames on demand (``NetDevice/makesFramesOnDemand``: a generator)
/// has no guest to post buffers here, so a thread of the link asks it for frames, a ring's
/// worth at a time, as fast as the other side takes them, until it makes none (its count
/// reached) or the link closes: `generator(count=1000) | tap(name=a)` sends 1000 frames into
/// the host's interface `a` (a persistent TAP that is up: one that is down drops them), as
/// pktgen would.
public final class NetLink: @unchecked Sendable {
    /// The endpoint standing in for the guest.
    public let first: any NetDevice
    /// The stack below it (its top element).
    public let stack: any NetDevice
    /// The threads asking on-demand sides for frames, and whether they must stop.
    private var pumps: [PosixThread] = []
    private let stopping = Atomic<Bool>(false)
    /// Buffers a pump announces at a time: a 256-slot ring's worth.
    static let pumpBuffers = 256

    /// Hands frames to a device's `fromGuest`: the adapter each side's receiver is.
    private final class Forwarder: NetFrameReceiver, @unchecked Sendable {
        let target: any NetDevice
        init(_ target: any NetDevice) { self.target = target }
        func toGuest(_ frame: EthernetFrame) { target.fromGuest(frame) }
    }

    /// Opens both sides of `spec` and connects them.
    public convenience init(spec: String) throws(DeviceSpecError) {
        try self.init(DeviceSpec(parsing: spec))
    }

    /// Checks `spec` as a link (syntax, names, classes, parameters) without opening anything.
    public static func check(_ text: String) throws(DeviceSpecError) {
        let spec = try DeviceSpec(parsing: text)
        try checkShape(spec)
        try DeviceRegistry.check(DeviceSpec(elements: [spec.elements[0]]).description, of: .net)
        try DeviceRegistry.check(DeviceSpec(elements: Array(spec.elements.dropFirst())).description, of: .net)
    }

    private static func checkShape(_ spec: DeviceSpec) throws(DeviceSpecError) {
        guard spec.elements.count >= 2 else {
            throw DeviceSpecError("a link joins two endpoints, '\(spec)' has one: write e.g. tap(name=a) | tap(name=b)")
        }
        if let descriptor = DeviceRegistry.descriptor(named: spec.elements[0].name, of: .net), descriptor.kind == .filter,
           descriptor.deviceClass == .net {
            throw DeviceSpecError("\(descriptor.name) is a filter: a link starts with an endpoint (the guest's side), e.g. tap(name=a) | \(spec.elements[0].name)(...) | tap(name=b)")
        }
    }

    public init(_ spec: DeviceSpec) throws(DeviceSpecError) {
        try Self.checkShape(spec)
        let head = DeviceSpec(elements: [spec.elements[0]])
        let first = try DeviceRegistry.openStack(head, of: .net) as! any NetDevice
        let stack: any NetDevice
        do {
            stack = try DeviceRegistry.openStack(DeviceSpec(elements: Array(spec.elements.dropFirst())), of: .net) as! any NetDevice
        } catch {
            first.close()
            throw error
        }
        self.first = first
        self.stack = stack
        stack.connect(Forwarder(first), accepting: first.offloads)
        first.connect(Forwarder(stack), accepting: stack.offloads)
        for side in [first, stack] where side.makesFramesOnDemand {
            do throws(ThreadStartError) {
                pumps.append(try PosixThread("link frames") { [self] in pump(side) })
            } catch {
                close()
                throw DeviceSpecError("\(spec): no thread to ask \(side.name) for frames: \(error)")
            }
        }
    }

    /// Asks `side` for frames until it makes none or the link closes.
    private func pump(_ side: any NetDevice) {
        while !stopping.load(ordering: .relaxed) {
            if side.guestPostedBuffers(Self.pumpBuffers, queue: 0) == 0 { return }
        }
    }

    /// Stops the link's own threads, then closes the first endpoint (its reader stops), then
    /// the stack.
    public func close() {
        stopping.store(true, ordering: .relaxed)
        for t in pumps { t.join() }
        pumps = []
        first.close()
        stack.close()
    }
}
