import Core
import CPcap
import Glibc
import Synchronization

/// `filter(expr=EXPR, direction=both|from-guest|to-guest)`: passes the frames that match a
/// tcpdump expression (`pcap-filter(7)`: "not port 22", "arp or icmp", "ip6 and udp") and drops
/// the rest, counting them. The expression is compiled once, at open, by libpcap for Ethernet
/// (a bad one is refused with libpcap's message), and run on each frame's bytes as they are
/// (a TCP segment larger than the MTU matches as one packet). `direction` says which frames
/// are filtered; the others pass untouched.
public final class PacketFilter: NetFilter, @unchecked Sendable {
    public enum Direction: String, Sendable { case both, fromGuest = "from-guest", toGuest = "to-guest" }
    public override var name: String { "filter" }
    public let expression: String
    public let direction: Direction
    /// The compiled program, read by any thread at once (never through an inout access).
    private let program = UnsafeMutablePointer<bpf_program>.allocate(capacity: 1)
    private let live = NetDirectionCounters()

    /// libpcap's compiler kept global state before 1.8: one compile at a time, whatever the version.
    private static let compiling = Mutex<Void>(())
    static let snapshotLength: Int32 = 262_144

    /// Compiles `expression`; the error carries libpcap's message.
    public init(next: any NetDevice, expression: String, direction: Direction = .both) throws(DeviceSpecError) {
        self.expression = expression
        self.direction = direction
        var program = bpf_program()
        let failure: String? = Self.compiling.withLock { _ in
            guard let pcap = pcap_open_dead(DLT_EN10MB, Self.snapshotLength) else { return "pcap_open_dead failed" }
            defer { pcap_close(pcap) }
            guard pcap_compile(pcap, &program, expression, 1, PCAP_NETMASK_UNKNOWN) == 0 else {
                return String(cString: pcap_geterr(pcap))
            }
            return nil
        }
        if let failure { throw DeviceSpecError("filter(expr=\(DeviceSpec.quoteIfNeeded(expression))): \(failure) (see man 7 pcap-filter)") }
        self.program.initialize(to: program)
        super.init(next: next)
    }

    deinit { pcap_freecode(program); program.deallocate() }

    /// Whether `frame` matches the expression.
    public func matches(_ frame: EthernetFrame) -> Bool {
        frame.withUnsafeBytes { bytes in
            var header = pcap_pkthdr()
            header.caplen = UInt32(bytes.count)
            header.len = UInt32(bytes.count)
            return pcap_offline_filter(program, &header, bytes.bindMemory(to: UInt8.self).baseAddress) != 0
        }
    }

    public override func fromGuest(_ frame: EthernetFrame) {
        guard direction == .toGuest || matches(frame) else { live.fromGuest.drop(); return }
        live.fromGuest.count(frame)
        next.fromGuest(frame)
    }

    public override func toGuest(_ frame: EthernetFrame) {
        guard direction == .fromGuest || matches(frame), let receiver else { live.toGuest.drop(); return }
        live.toGuest.count(frame)
        receiver.toGuest(frame)
    }

    /// Frames passed and dropped each way.
    public var counts: NetCounters { NetCounters(live) }
}

extension PacketFilter {
    public static let descriptor = DeviceDescriptor(
        deviceClass: .net, name: "filter", kind: .filter,
        summary: "Passes frames matching a tcpdump expression, drops and counts the others.",
        parameters: [
            DeviceParameter("expr", required: true, "A pcap-filter(7) expression, quoted, e.g. expr=\"not port 22\"."),
            DeviceParameter("direction", "both (default), from-guest or to-guest: which frames are filtered."),
        ],
        open: { parameters, next throws(DeviceSpecError) in
            let direction = PacketFilter.Direction(rawValue: try parameters.choice("direction", ["both", "from-guest", "to-guest"], default: "both"))!
            return try PacketFilter(next: next as! any NetDevice, expression: parameters.required("expr"), direction: direction)
        })
}
