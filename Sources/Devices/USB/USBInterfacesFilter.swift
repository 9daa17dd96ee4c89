import Core
import Synchronization

/// `interfaces(allow=CLASSES)`, e.g. `allow=08:06:50,03:*:*`: the guest sees only the interfaces
/// (alternate settings) whose class:subclass:protocol one of the patterns allows. The others are
/// cut out of every configuration descriptor with their class-specific and endpoint descriptors
/// (and an interface association that starts at a hidden interface), `bNumInterfaces` and
/// `wTotalLength` fixed. URBs to their endpoints, SET_INTERFACE to them, and class, vendor or
/// standard requests addressed to a hidden interface or endpoint are STALLed here and never
/// reach the device. A hidden interface's own class descriptors (``USBDescriptors/interfaceDescriptors``)
/// go with it; device-wide HID class descriptors (0x21-0x23) go when no HID interface stays.
/// Interface numbers are kept (Linux accepts the gaps).
///
/// What is hidden is worked out per configuration and judged against the configuration in
/// force (the SET_CONFIGURATION that passed through here last): interface 0 may be a stick in
/// configuration 1 and a keyboard in configuration 2, and a guest that switches to 2 must not
/// reach the keyboard because the stick was allowed. Before any configuration is set (and after
/// a reset) no endpoint but 0 is reachable, and an interface hidden in any configuration is.
public final class USBInterfacesFilter: USBFilter, @unchecked Sendable {
    public override var name: String { "interfaces" }
    public let allowed: [USBInterfaceClassPattern]
    private let filtered: USBDescriptors

    /// What the filter hides while one configuration is in force.
    struct Hidden: Equatable {
        /// Interface numbers with no allowed alternate setting.
        var interfaces = Set<UInt8>()
        /// Endpoint addresses (0x80 for IN) that only hidden alternate settings have.
        var endpoints = Set<UInt8>()
        /// Endpoint numbers that only hidden alternate settings use, in either direction: a URB to
        /// one is refused whatever its direction (for a device that serves endpoints by number).
        var endpointNumbers = Set<UInt8>()
        /// (interface << 8 | alternate) pairs that are hidden.
        var alternates = Set<UInt16>()
        /// Unconfigured: every endpoint but 0.
        var everyEndpoint = false

        func hides(endpoint: UInt8, isIn: Bool) -> Bool {
            everyEndpoint || endpoints.contains(endpoint | (isIn ? 0x80 : 0)) || endpointNumbers.contains(endpoint)
        }
    }
    /// By bConfigurationValue; 0 is the unconfigured state.
    let hidden: [UInt8: Hidden]
    /// The configuration in force, as the last SET_CONFIGURATION through here left it.
    private let configuration = Mutex<UInt8>(0)

    public init(next: any USBDevice, allow: [USBInterfaceClassPattern]) {
        allowed = allow
        var d = next.descriptors
        var hidden: [UInt8: Hidden] = [:]
        var keptAnywhere = Set<UInt8>(), hiddenAnywhere = Set<UInt8>()
        var keepsHID = false
        d.configurations = d.configurations.map { blob in
            let items = USBDescriptors.walk(blob)
            guard let head = items.first, head.type == 2, head.bytes.count >= 9 else { return blob }
            var out = Array(head.bytes)
            var keeping = true
            var keptNumbers = Set<UInt8>(), hiddenNumbers = Set<UInt8>()
            var keptEP = Set<UInt8>(), hiddenEP = Set<UInt8>(), hiddenAlts = Set<UInt16>()
            for item in items.dropFirst() {
                let b = Array(item.bytes)
                switch item.type {
                case 4 where b.count >= 9:
                    keeping = allow.contains { $0.matches(b[5], b[6], b[7]) }
                    if keeping { keptNumbers.insert(b[2]); keepsHID = keepsHID || b[5] == 3 } else {
                        hiddenNumbers.insert(b[2]); hiddenAlts.insert(UInt16(b[2]) << 8 | UInt16(b[3]))
                    }
                case 11 where b.count >= 8:   // interface association: follows its first interface
                    let first = b[2]
                    let firstAllowed = items.contains { i in
                        let x = Array(i.bytes)
                        return i.type == 4 && x.count >= 9 && x[2] == first && allow.contains { $0.matches(x[5], x[6], x[7]) }
                    }
                    if firstAllowed { out += b }
                    continue
                case 5 where b.count >= 7:
                    if keeping { keptEP.insert(b[2]) } else { hiddenEP.insert(b[2]) }
                default: break
                }
                if keeping { out += b }
            }
            out[2] = UInt8(out.count & 0xff); out[3] = UInt8(out.count >> 8)
            out[4] = UInt8(keptNumbers.count)
            let value = head.bytes[head.bytes.startIndex + 5]
            hidden[value] = Hidden(interfaces: hiddenNumbers.subtracting(keptNumbers), endpoints: hiddenEP.subtracting(keptEP),
                                   endpointNumbers: Set(hiddenEP.map { $0 & 0x0f }).subtracting(keptEP.map { $0 & 0x0f }),
                                   alternates: hiddenAlts)
            keptAnywhere.formUnion(keptNumbers)
            hiddenAnywhere.formUnion(hiddenNumbers.subtracting(keptNumbers))
            return out
        }
        var unconfigured = Hidden(everyEndpoint: true)
        for h in hidden.values { unconfigured.interfaces.formUnion(h.interfaces); unconfigured.alternates.formUnion(h.alternates) }
        hidden[0] = unconfigured
        if !keepsHID { for key in d.others.keys where (0x21...0x23).contains(key >> 8) { d.others[key] = nil } }
        // A hidden interface's own class descriptors (its HID and report descriptors) go with
        // it, unless another configuration shows an interface of that number.
        for number in hiddenAnywhere.subtracting(keptAnywhere) { d.interfaceDescriptors[number] = nil }
        filtered = d
        self.hidden = hidden
        super.init(next: next)
    }

    public override var descriptors: USBDescriptors { filtered }

    /// What is hidden now (a configuration the descriptors do not have hides everything but endpoint 0).
    private var now: Hidden { hidden[configuration.withLock { $0 }] ?? hidden[0]! }

    public override func submit(_ urb: URB) {
        if urb.endpoint != 0 {
            guard !now.hides(endpoint: urb.endpoint, isIn: urb.isIn) else { return urb.complete(.stall) }
        } else if aimsAtHidden(urb) {
            return urb.complete(.stall)
        }
        next.submit(urb)
    }

    /// Standard requests aimed at a hidden interface or endpoint (GET_DESCRIPTOR of its HID
    /// report, GET_STATUS, GET_INTERFACE, SET_INTERFACE, SET_FEATURE(HALT)) STALL here.
    public override func submitStandard(_ urb: URB, tap: (URB) -> Bool) {
        if aimsAtHidden(urb) { return urb.complete(.stall) }
        next.submitStandard(urb, tap: tap)
    }

    /// A control request whose recipient is a hidden interface or endpoint.
    private func aimsAtHidden(_ urb: URB) -> Bool {
        guard let setup = urb.setup else { return false }
        let target = UInt8(truncatingIfNeeded: setup.index)
        switch setup.recipient {
        case .interface: return now.interfaces.contains(target)
        case .endpoint: return target & 0x0f != 0 && now.hides(endpoint: target & 0x0f, isIn: target & 0x80 != 0)
        default: return false
        }
    }

    public override func setConfiguration(_ value: UInt8) -> USBStatus {
        let status = next.setConfiguration(value)
        if status == .ok { configuration.withLock { $0 = value } }
        return status
    }

    public override func setInterface(_ interface: UInt8, alternate: UInt8) -> USBStatus {
        guard !now.alternates.contains(UInt16(interface) << 8 | UInt16(alternate)) else { return .stall }
        return next.setInterface(interface, alternate: alternate)
    }

    public override func clearHalt(endpoint: UInt8, isIn: Bool) -> USBStatus {
        guard !now.hides(endpoint: endpoint, isIn: isIn) else { return .stall }
        return next.clearHalt(endpoint: endpoint, isIn: isIn)
    }

    public override func reset() {
        configuration.withLock { $0 = 0 }
        next.reset()
    }

    /// Parses `08:06:50,03:*:*` (commas or blanks between patterns).
    static func patterns(_ text: String) throws(DeviceSpecError) -> [USBInterfaceClassPattern] {
        var out: [USBInterfaceClassPattern] = []
        for item in text.split(whereSeparator: { $0 == "," || $0 == " " }) {
            switch USBInterfaceClassPattern.parse(String(item)) {
            case .success(let p): out.append(p)
            case .failure(let reason): throw DeviceSpecError("interfaces: allow: expected \(reason.message)")
            }
        }
        guard !out.isEmpty else { throw DeviceSpecError("interfaces: allow: expected at least one cc:ss:pp") }
        return out
    }
}

extension USBInterfacesFilter {
    public static let descriptor = DeviceDescriptor(
        deviceClass: .usb, name: "interfaces", kind: .filter,
        summary: "Hides every interface not allowed from the descriptors and STALLs URBs and requests aimed at it.",
        parameters: [
            DeviceParameter("allow", required: true, "Interface classes cc:ss:pp (hex, * for ss or pp), comma-separated and so quoted, e.g. allow=\"08:06:50,03:*:*\"."),
        ],
        open: { parameters, next throws(DeviceSpecError) in
            USBInterfacesFilter(next: next as! any USBDevice, allow: try patterns(parameters.required("allow")))
        })
}
