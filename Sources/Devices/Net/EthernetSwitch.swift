import Core
import Synchronization

/// `switch(name=S)`: a port of the learning Ethernet switch `S`, shared by name within the
/// process: every `switch(name=S)` opened is one more port of the same switch, which goes
/// away when its last port closes. It learns which port each source MAC address is behind
/// (forgotten after ``agingSeconds`` of silence), sends a frame for a known unicast address
/// to that port alone, floods broadcast, multicast and unknown unicast to every other port,
/// and never sends a frame back to the port it came from.
///
/// Each port hands frames to its own receiver (the guest behind it) on the sender's thread,
/// outside the switch's lock. A partial checksum the receiver cannot take is finished in
/// software, a TCP segment it cannot take is cut in software (``GSOSegmenter``); one that
/// cannot be cut is dropped and counted.
public final class EthernetSwitch: @unchecked Sendable {
    public let name: String
    /// How long a learned address is kept without a frame from it.
    public static let agingSeconds: Double = 300

    private struct Learned { var port: ObjectIdentifier; var seen: Double }
    private struct State {
        var ports: [SwitchPort] = []
        var table: [MACAddress: Learned] = [:]
    }
    private let state = Mutex(State())

    private init(name: String) { self.name = name }

    /// The switches in this process that have ports, by name.
    private static let switches = Mutex<[String: EthernetSwitch]>([:])

    /// Opens a new port of the switch `name`, creating the switch if it has none.
    public static func port(of name: String) -> SwitchPort {
        switches.withLock { switches in
            let sw = switches[name] ?? EthernetSwitch(name: name)
            switches[name] = sw
            let port = SwitchPort(switch: sw)
            sw.state.withLock { $0.ports.append(port) }
            return port
        }
    }

    /// The number of ports of the switch `name` now (0 if it does not exist).
    public static func portCount(of name: String) -> Int {
        switches.withLock { $0[name]?.state.withLock { $0.ports.count } ?? 0 }
    }

    /// Removes `port`; the switch goes when its last port does.
    fileprivate func remove(_ port: SwitchPort) {
        Self.switches.withLock { switches in
            let empty = state.withLock { s in
                s.ports.removeAll { $0 === port }
                let id = ObjectIdentifier(port)
                s.table = s.table.filter { $0.value.port != id }
                return s.ports.isEmpty
            }
            if empty && switches[name] === self { switches[name] = nil }
        }
    }

    /// Learns the sender's address and hands `frame` to the ports it goes to.
    fileprivate func forward(_ frame: EthernetFrame, from sender: SwitchPort) {
        let source = frame.source, destination = frame.destination
        let now = monotonicSeconds()
        let senderID = ObjectIdentifier(sender)
        let targets: [SwitchPort] = state.withLock { s in
            if !source.isMulticast {
                s.table[source] = Learned(port: senderID, seen: now)
            }
            if !destination.isMulticast, let learned = s.table[destination], now - learned.seen < Self.agingSeconds {
                guard learned.port != senderID else { return [] }
                return s.ports.filter { ObjectIdentifier($0) == learned.port }
            }
            return s.ports.filter { $0 !== sender }
        }
        for port in targets { port.deliver(frame) }
    }
}

/// One port of an ``EthernetSwitch``: the endpoint device a `switch(name=S)` spec opens.
public final class SwitchPort: NetDevice, @unchecked Sendable {
    public let name = "switch"
    public let `switch`: EthernetSwitch
    /// The switch takes everything; what a receiver cannot take is finished or dropped there.
    public let offloads: NetOffloads = .all

    private struct Connection { var receiver: (any NetFrameReceiver)?; var offloads: NetOffloads = [] }
    private let connection = Mutex(Connection())
    private let live = NetDirectionCounters()
    private let closed = Atomic<Bool>(false)

    fileprivate init(switch sw: EthernetSwitch) { self.switch = sw }

    /// A frame from the guest behind this port, into the switch.
    public func fromGuest(_ frame: EthernetFrame) {
        guard !closed.load(ordering: .relaxed) else { live.fromGuest.drop(); return }
        live.fromGuest.count(frame)
        self.switch.forward(frame, from: self)
    }

    public func connect(_ receiver: any NetFrameReceiver, accepting offloads: NetOffloads) {
        connection.withLock { $0 = Connection(receiver: receiver, offloads: offloads) }
    }

    /// A frame out of the switch, to the guest behind this port.
    fileprivate func deliver(_ frame: EthernetFrame) {
        let (receiver, accepting) = connection.withLock { ($0.receiver, $0.offloads) }
        guard let receiver else { live.toGuest.drop(); return }
        var frame = frame
        if !accepting.accepts(frame.offload) {
            if accepting.mustSegment(frame) {
                // A guest without GSO gets the segments a sender without TSO would have sent.
                guard let segments = try? GSOSegmenter.segment(frame, for: accepting) else { live.toGuest.drop(); return }
                for s in segments { live.toGuest.count(s) }
                return receiver.toGuest(segments)
            }
            guard FrameChecksum.complete(&frame) else { live.toGuest.drop(); return }
        }
        live.toGuest.count(frame)
        receiver.toGuest(frame)
    }

    /// Frames, bytes and drops each way through this port.
    public var counts: NetCounters { NetCounters(live) }

    /// Leaves the switch.
    public func close() {
        guard !closed.exchange(true, ordering: .acquiringAndReleasing) else { return }
        self.switch.remove(self)
        connection.withLock { $0 = Connection() }
    }
}

extension SwitchPort {
    public static let descriptor = DeviceDescriptor(
        deviceClass: .net, name: "switch", kind: .device,
        summary: "A port of the learning Ethernet switch of this name, shared by every stack in the process.",
        parameters: [
            DeviceParameter("name", required: true, "The switch's name: stacks naming the same switch are connected."),
        ],
        open: { parameters, _ throws(DeviceSpecError) in
            EthernetSwitch.port(of: try parameters.required("name"))
        })
}
