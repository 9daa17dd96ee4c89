import Core

/// `interfaces(allow=CLASSES)`, e.g. `allow=08:06:50,03:*:*`: the guest sees only the interfaces
/// (alternate settings) whose class:subclass:protocol one of the patterns allows. The others are
/// cut out of every configuration descriptor with their class-specific and endpoint descriptors
/// (and an interface association that starts at a hidden interface), `bNumInterfaces` and
/// `wTotalLength` fixed. URBs to their endpoints, SET_INTERFACE to them, and class, vendor or
/// standard requests addressed to a hidden interface or endpoint are STALLed here and never
/// reach the device. A hidden interface's own class descriptors (``USBDescriptors/interfaceDescriptors``)
/// go with it; device-wide HID class descriptors (0x21-0x23) go when no HID interface stays.
/// Interface numbers are kept (Linux accepts the gaps).
public final class USBInterfacesFilter: USBFilter, @unchecked Sendable {
    public override var name: String { "interfaces" }
    public let allowed: [USBInterfaceClassPattern]
    private let filtered: USBDescriptors
    /// Interface numbers with no allowed alternate setting.
    let hiddenInterfaces: Set<UInt8>
    /// Endpoint addresses (0x80 for IN) that only hidden alternate settings have.
    let hiddenEndpoints: Set<UInt8>
    /// Endpoint numbers that only hidden alternate settings use, in either direction: a URB to
    /// one is refused whatever its direction (for a device that serves endpoints by number).
    let hiddenEndpointNumbers: Set<UInt8>
    /// (interface, alternate) pairs that are hidden.
    private let hiddenAlternates: Set<UInt16>

    public init(next: any USBDevice, allow: [USBInterfaceClassPattern]) {
        allowed = allow
        var d = next.descriptors
        var hiddenNumbers = Set<UInt8>(), keptNumbers = Set<UInt8>()
        var hiddenEP = Set<UInt8>(), keptEP = Set<UInt8>(), hiddenAlts = Set<UInt16>()
        var keepsHID = false
        d.configurations = d.configurations.map { blob in
            let items = USBDescriptors.walk(blob)
            guard let head = items.first, head.type == 2, head.bytes.count >= 9 else { return blob }
            var out = Array(head.bytes)
            var keeping = true
            var numbers = Set<UInt8>()
            for item in items.dropFirst() {
                let b = Array(item.bytes)
                switch item.type {
                case 4 where b.count >= 9:
                    keeping = allow.contains { $0.matches(b[5], b[6], b[7]) }
                    if keeping { keptNumbers.insert(b[2]); numbers.insert(b[2]); keepsHID = keepsHID || b[5] == 3 } else {
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
            out[4] = UInt8(numbers.count)
            return out
        }
        if !keepsHID { for key in d.others.keys where (0x21...0x23).contains(key >> 8) { d.others[key] = nil } }
        // A hidden interface's own class descriptors (its HID and report descriptors) go with it.
        for number in hiddenNumbers.subtracting(keptNumbers) { d.interfaceDescriptors[number] = nil }
        filtered = d
        hiddenInterfaces = hiddenNumbers.subtracting(keptNumbers)
        hiddenEndpoints = hiddenEP.subtracting(keptEP)
        hiddenEndpointNumbers = Set(hiddenEP.map { $0 & 0x0f }).subtracting(keptEP.map { $0 & 0x0f })
        hiddenAlternates = hiddenAlts
        super.init(next: next)
    }

    public override var descriptors: USBDescriptors { filtered }

    public override func submit(_ urb: URB) {
        if urb.endpoint != 0 {
            guard !hiddenEndpoints.contains(urb.endpointAddress), !hiddenEndpointNumbers.contains(urb.endpoint) else {
                return urb.complete(.stall)
            }
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
        case .interface: return hiddenInterfaces.contains(target)
        case .endpoint: return hiddenEndpoints.contains(target)
        default: return false
        }
    }

    public override func setInterface(_ interface: UInt8, alternate: UInt8) -> USBStatus {
        guard !hiddenAlternates.contains(UInt16(interface) << 8 | UInt16(alternate)) else { return .stall }
        return next.setInterface(interface, alternate: alternate)
    }

    public override func clearHalt(endpoint: UInt8, isIn: Bool) -> USBStatus {
        guard !hiddenEndpoints.contains(endpoint | (isIn ? 0x80 : 0)) else { return .stall }
        return next.clearHalt(endpoint: endpoint, isIn: isIn)
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
