import Core
import Dispatch
import Synchronization

/// `keyboard`: a HID boot keyboard (interface 03/01/01, one interrupt IN endpoint of 8-byte
/// reports `[modifiers, 0, k1..k6]`) whose keystrokes come from `type`. The tap answers
/// GET_DESCRIPTOR for the HID and report descriptors from `descriptors.others`; the class
/// requests (SET_IDLE, SET_PROTOCOL, GET_REPORT, SET_REPORT for the LEDs ...) come here. An
/// interrupt IN URB stays pending until a report is queued; each pending URB takes one report,
/// and no sooner than the endpoint's polling interval (`bInterval`, 10 ms) after the one before,
/// as a host polling a real keyboard gets them. (A guest answered at once for every resubmitted
/// URB would get a whole typed string within microseconds: 6 input events per character, more
/// than the 64 an evdev reader's buffer holds, so a reader a moment late lost keys, Enter too.)
public final class USBKeyboard: USBDevice, @unchecked Sendable {
    public let name = "keyboard"
    public let speed = USBSpeed.full
    public let descriptors: USBDescriptors

    /// The boot keyboard report descriptor of HID 1.11 appendix B.1 (63 bytes).
    public static let reportDescriptor: [UInt8] = [
        0x05, 0x01, 0x09, 0x06, 0xA1, 0x01, 0x05, 0x07, 0x19, 0xE0, 0x29, 0xE7, 0x15, 0x00, 0x25, 0x01,
        0x75, 0x01, 0x95, 0x08, 0x81, 0x02, 0x95, 0x01, 0x75, 0x08, 0x81, 0x01, 0x95, 0x05, 0x75, 0x01,
        0x05, 0x08, 0x19, 0x01, 0x29, 0x05, 0x91, 0x02, 0x95, 0x01, 0x75, 0x03, 0x91, 0x01, 0x95, 0x06,
        0x75, 0x08, 0x15, 0x00, 0x25, 0x65, 0x05, 0x07, 0x19, 0x00, 0x29, 0x65, 0x81, 0x00, 0xC0,
    ]
    /// HID 1.11, country 0, one report descriptor of 63 bytes.
    static let hidDescriptor: [UInt8] = [9, 0x21, 0x11, 0x01, 0, 1, 0x22, UInt8(reportDescriptor.count), 0]
    static let interruptIn: UInt8 = 0x81
    /// The interrupt endpoint's bInterval: 10 frames of 1 ms at full speed.
    static let pollingInterval: UInt8 = 10
    static let reportSpacing = Double(pollingInterval) / 1000

    struct State {
        var pending: [URB] = []
        var queued: [[UInt8]] = []
        /// When the next report may go (monotonic seconds): one per polling interval.
        var nextReport = 0.0
        /// A timer will deliver the next report when it is due.
        var timerArmed = false
        /// The last report delivered (GET_REPORT's answer).
        var current = [UInt8](repeating: 0, count: 8)
        var leds: UInt8 = 0
        var idle: UInt8 = 0
        /// 0 boot, 1 report (the reports are the boot ones either way).
        var hidProtocol: UInt8 = 1
    }
    private let state = Mutex(State())

    public init() {
        descriptors = USBDescriptorBuilder.make(
            productID: 0x0002, maxPacket0: 8, interfaceClass: (0x03, 0x01, 0x01), classDescriptors: Self.hidDescriptor,
            endpoints: [.init(address: Self.interruptIn, type: .interrupt, maxPacket: 8, interval: Self.pollingInterval)],
            maxPowerMilliamps: 100, manufacturer: "SoftDev", product: "USB Keyboard", serial: nil,
            interfaceDescriptors: [0: [0x2100: Self.hidDescriptor, 0x2200: Self.reportDescriptor]])
    }

    /// The LEDs the host last set (bit 0 Num Lock, 1 Caps Lock, 2 Scroll Lock).
    public var leds: UInt8 { state.withLock { $0.leds } }
    /// Reports queued and not yet delivered.
    public var queuedReports: Int { state.withLock { $0.queued.count } }

    public struct UnknownCharacter: Error, CustomStringConvertible {
        public let character: Character
        public var description: String { "keyboard: no key types \(character.debugDescription) on a US keyboard" }
    }

    /// Queues a press and a release report for each character of `text` (US layout); nothing
    /// is queued if a character has no key.
    public func type(_ text: String) throws {
        var reports: [[UInt8]] = []
        for c in text {
            guard let (usage, shift) = USBKeyboardLayout.key(for: c) else { throw UnknownCharacter(character: c) }
            reports.append([shift ? 0x02 : 0, 0, usage, 0, 0, 0, 0, 0])
            reports.append([UInt8](repeating: 0, count: 8))
        }
        send(reports)
    }

    /// Queues raw 8-byte reports (a key held with others, a modifier alone).
    public func send(_ reports: [[UInt8]]) {
        state.withLock { s in s.queued += reports.map { Array(($0 + [UInt8](repeating: 0, count: 8)).prefix(8)) } }
        deliver()
    }

    /// Gives the next queued report to the oldest pending URB if one polling interval has
    /// passed since the last; otherwise, if both wait, arms a timer for when it is due.
    private func deliver() {
        var delivered: (URB, [UInt8])?
        var wait: Double?
        state.withLock { s in
            guard !s.pending.isEmpty && !s.queued.isEmpty else { return }
            let now = monotonicSeconds()
            if now >= s.nextReport {
                s.current = s.queued.removeFirst()
                s.nextReport = now + Self.reportSpacing
                delivered = (s.pending.removeFirst(), s.current)
            }
            if !s.pending.isEmpty && !s.queued.isEmpty && !s.timerArmed {
                s.timerArmed = true
                wait = s.nextReport - now
            }
        }
        if let (urb, report) = delivered { urb.complete(in: report) }
        if let wait {
            DispatchQueue.global().asyncAfter(deadline: .now() + .nanoseconds(Int(max(0, wait) * 1e9))) { [weak self] in
                guard let self else { return }
                self.state.withLock { $0.timerArmed = false }
                self.deliver()
            }
        }
    }

    public func submit(_ urb: URB) {
        switch (urb.type, urb.endpoint, urb.isIn) {
        case (.interrupt, Self.interruptIn & 0x0f, true):
            state.withLock { $0.pending.append(urb) }
            deliver()
        case (.control, 0, _):
            control(urb)
        default:
            urb.complete(.stall)
        }
    }

    /// HID class requests to interface 0: the rest stall (as usbhid allows).
    private func control(_ urb: URB) {
        guard let setup = urb.setup, setup.kind == .class, setup.recipient == .interface, setup.index == 0 else {
            return urb.complete(.stall)
        }
        switch (setup.request, setup.isIn) {
        case (0x01, true):   // GET_REPORT (input)
            urb.complete(in: state.withLock { $0.current })
        case (0x02, true):   // GET_IDLE
            urb.complete(in: [state.withLock { $0.idle }])
        case (0x03, true):   // GET_PROTOCOL
            urb.complete(in: [state.withLock { $0.hidProtocol }])
        case (0x09, false):  // SET_REPORT (output: the LEDs)
            guard urb.buffer.count >= 1 else { return urb.complete(.stall) }
            let leds = urb.buffer[0]
            state.withLock { $0.leds = leds }
            urb.actualLength = urb.buffer.count
            urb.complete(.ok)
        case (0x0A, false):  // SET_IDLE
            state.withLock { $0.idle = UInt8(setup.value >> 8) }
            urb.complete(.ok)
        case (0x0B, false) where setup.value <= 1:  // SET_PROTOCOL
            state.withLock { $0.hidProtocol = UInt8(setup.value) }
            urb.complete(.ok)
        default:
            urb.complete(.stall)
        }
    }

    public func cancel(_ urb: URB) {
        if state.withLock({ $0.pending.removeURB(urb) }) { urb.complete(.cancelled) }
    }

    /// A port reset: queued keys are dropped, pending URBs cancelled.
    public func reset() {
        let pending = state.withLock { s in
            let pending = s.pending
            s = State()
            return pending
        }
        for urb in pending { urb.complete(.cancelled) }
    }

    public func close() {
        let pending = state.withLock { s in
            defer { s.pending = [] }
            return s.pending
        }
        for urb in pending { urb.complete(.shutdown) }
    }
}

extension USBKeyboard {
    public static let descriptor = DeviceDescriptor(
        deviceClass: .usb, name: "keyboard", kind: .device,
        summary: "A HID boot keyboard whose keystrokes are typed from the host (softdev type).",
        parameters: [],
        open: { _, _ throws(DeviceSpecError) in USBKeyboard() })
}

/// The US layout: a character's HID usage (keyboard page) and whether Shift is held.
enum USBKeyboardLayout {
    static func key(for c: Character) -> (usage: UInt8, shift: Bool)? {
        guard let scalar = c.unicodeScalars.first, c.unicodeScalars.count == 1 || c == "\r\n" else { return nil }
        let v = scalar.value
        switch scalar {
        case "a"..."z": return (UInt8(0x04 + v - 0x61), false)
        case "A"..."Z": return (UInt8(0x04 + v - 0x41), true)
        case "1"..."9": return (UInt8(0x1E + v - 0x31), false)
        case "0": return (0x27, false)
        case "\n", "\r": return (0x28, false)
        case "\u{1b}": return (0x29, false)
        case "\u{8}": return (0x2A, false)
        case "\t": return (0x2B, false)
        case " ": return (0x2C, false)
        default: break
        }
        if let i = shiftedDigits.firstIndex(of: c) {
            let digit = shiftedDigits.distance(from: shiftedDigits.startIndex, to: i)
            return (digit == 9 ? 0x27 : UInt8(0x1E + digit), true)
        }
        for (usage, plain, shifted) in punctuation {
            if c == plain { return (usage, false) }
            if c == shifted { return (usage, true) }
        }
        return nil
    }

    /// Shift + 1 ... 9, 0.
    private static let shiftedDigits = "!@#$%^&*()"
    private static let punctuation: [(UInt8, Character, Character)] = [
        (0x2D, "-", "_"), (0x2E, "=", "+"), (0x2F, "[", "{"), (0x30, "]", "}"), (0x31, "\\", "|"),
        (0x33, ";", ":"), (0x34, "'", "\""), (0x35, "`", "~"), (0x36, ",", "<"), (0x37, ".", ">"), (0x38, "/", "?"),
    ]
}
