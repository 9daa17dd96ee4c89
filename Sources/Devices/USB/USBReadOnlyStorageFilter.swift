import Core
import Synchronization

/// `readonly-storage`: a USB mass-storage device (Bulk-Only Transport, interface 08:06:50) that
/// the guest cannot write. Each Command Block Wrapper on the bulk OUT endpoint is parsed; a
/// command of the write family never reaches the device: its CBW is taken, its data-OUT URBs
/// are swallowed, its CSW is answered here with status 1 (failed) and the full residue, and the
/// guest's following REQUEST SENSE is answered here with DATA PROTECT / WRITE PROTECTED
/// (07/27/00). The device's MODE SENSE answers get the write-protect bit (0x80 of the device-
/// specific parameter: byte 2 of a MODE SENSE(6) header, byte 3 of MODE SENSE(10)), so the
/// guest mounts the medium read-only and does not try. Everything else passes unchanged.
///
/// Refused commands: WRITE(6/10/12/16), WRITE AND VERIFY(10/12/16), WRITE SAME(10/16), UNMAP,
/// FORMAT UNIT, and the other ways to change the medium or the device: REASSIGN BLOCKS, WRITE
/// BUFFER (firmware), MODE SELECT(6/10), COMPARE AND WRITE, ORWRITE, WRITE ATOMIC, WRITE LONG,
/// XDWRITE, XDWRITEREAD, ATA PASS-THROUGH(12/16) (ATA writes to a SAT bridge).
///
/// Desynchronisation is closed: any OUT transfer of 31 bytes or more that carries a CBW with a
/// refused command is refused whatever state the filter believes the device is in; when it
/// waits for a command, an OUT transfer that is not one valid 31-byte CBW is STALLed (as the
/// Bulk-Only spec has a device do) without reaching the device. SET_INTERFACE to an alternate
/// setting of the storage interface that is not Bulk-Only (UAS, 08:06:62) is refused. The
/// guest cannot step around the parser either: SET_CONFIGURATION to a configuration other than
/// the storage interface's is refused (another configuration may hold a storage interface on
/// other endpoints), and so is every OUT transfer to another mass-storage interface of that
/// configuration (a second LUN interface: its commands never reach the device). Other
/// interfaces of a composite device are not this filter's business: stack
/// `interfaces(allow=08:06:50)` above it to hide them.
public final class USBReadOnlyStorageFilter: USBFilter, @unchecked Sendable {
    public override var name: String { "readonly-storage" }
    /// The storage interface's number and its bulk endpoints (OUT's number; IN's number).
    public let interface: UInt8
    public let outEndpoint: UInt8, inEndpoint: UInt8
    /// wMaxPacketSize of the bulk OUT endpoint: where in a transfer a device may see a CBW start.
    let outPacketSize: Int

    static let writeFamily: Set<UInt8> = [
        0x0A, 0x2A, 0xAA, 0x8A,   // WRITE(6/10/12/16)
        0x2E, 0xAE, 0x8E,         // WRITE AND VERIFY(10/12/16)
        0x41, 0x93,               // WRITE SAME(10/16)
        0x42,                     // UNMAP
        0x04,                     // FORMAT UNIT
        0x07,                     // REASSIGN BLOCKS
        0x3B,                     // WRITE BUFFER
        0x15, 0x55,               // MODE SELECT(6/10)
        0x89, 0x8B, 0x9C,         // COMPARE AND WRITE, ORWRITE(16), WRITE ATOMIC(16)
        0x3F,                     // WRITE LONG(10); WRITE LONG(16) is 0x9F/0x11
        0x50, 0x53,               // XDWRITE(10), XDWRITEREAD(10)
        0xA1, 0x85,               // ATA PASS-THROUGH(12/16)
    ]
    static let requestSense: UInt8 = 0x03, modeSense6: UInt8 = 0x1A, modeSense10: UInt8 = 0x5A
    /// Fixed-format sense data: DATA PROTECT, WRITE PROTECTED.
    static let writeProtectedSense: [UInt8] = [0x70, 0, 0x07, 0, 0, 0, 0, 10, 0, 0, 0, 0, 0x27, 0x00, 0, 0, 0, 0]

    /// A parsed Command Block Wrapper.
    struct CBW {
        var tag: UInt32
        var length: UInt32
        var isIn: Bool
        var cdb: [UInt8]
        var opcode: UInt8 { cdb.first ?? 0 }
        var isRefused: Bool {
            USBReadOnlyStorageFilter.writeFamily.contains(opcode) || (opcode == 0x9F && cdb.count > 1 && cdb[1] & 0x1f == 0x11)
        }

        /// The CBW in `bytes` (at least 31 bytes starting with "USBC"), nil otherwise.
        init?(_ bytes: UnsafeMutableRawBufferPointer) {
            guard bytes.count >= 31, bytes.loadUnaligned(as: UInt32.self).littleEndian == 0x4342_5355 else { return nil }
            tag = bytes.loadUnaligned(fromByteOffset: 4, as: UInt32.self).littleEndian
            length = bytes.loadUnaligned(fromByteOffset: 8, as: UInt32.self).littleEndian
            isIn = bytes[12] & 0x80 != 0
            let cbLength = Int(bytes[14] & 0x1f)
            cdb = Array(bytes[15..<(15 + max(1, min(16, cbLength)))])
        }
    }

    private enum Phase {
        /// Waiting for a CBW.
        case command
        /// A passed command's data-OUT: bytes still to come.
        case dataOut(Int)
        /// A refused command: data-OUT still to swallow, a data-IN stage still to STALL.
        case refused(tag: UInt32, residue: UInt32, outLeft: Int, inPending: Bool)
        /// A REQUEST SENSE answered here.
        case sense(tag: UInt32, length: UInt32, allocation: Int, residue: UInt32?)
    }
    private struct State {
        var phase = Phase.command
        /// The last command was refused: the next REQUEST SENSE is answered here.
        var senseOwed = false
        /// The next IN transfer is a MODE SENSE's data: 2 (6) or 3 (10), the byte to patch.
        var patchByte: Int?
    }
    private let state = Mutex(State())
    private let relay = URBRelay()
    /// Alternate settings of the storage interface that are not Bulk-Only.
    private let otherAlternates: Set<UInt8>
    /// bConfigurationValue of the configuration the storage interface is in.
    let configurationValue: UInt8
    /// OUT endpoint numbers of the other mass-storage interfaces of that configuration.
    let otherStorageOut: Set<UInt8>

    /// Finds the storage interface of `device`; a device without one is refused.
    public init(device next: any USBDevice) throws(DeviceSpecError) {
        let d = next.descriptors
        var found: (UInt8, UInt8, UInt8)?
        var others = Set<UInt8>()
        var packet = 512
        var value: UInt8 = 1
        var storageOut = Set<UInt8>()
        for blob in d.configurations {
            var alternates: [(number: UInt8, alternate: UInt8, bot: Bool, storage: Bool, endpoints: [(address: UInt8, packet: Int)])] = []
            for item in USBDescriptors.walk(blob) {
                let b = Array(item.bytes)
                if item.type == 4, b.count >= 9 {
                    alternates.append((b[2], b[3], b[5] == 0x08 && b[6] == 0x06 && b[7] == 0x50, b[5] == 0x08, []))
                } else if item.type == 5, b.count >= 7, b[3] & 3 == 2, !alternates.isEmpty {
                    alternates[alternates.count - 1].endpoints.append((b[2], Int(b[4]) | Int(b[5] & 0x07) << 8))
                }
            }
            if let bot = alternates.first(where: { $0.bot }), let o = bot.endpoints.first(where: { $0.address & 0x80 == 0 }),
               let i = bot.endpoints.first(where: { $0.address & 0x80 != 0 }) {
                found = (bot.number, o.address & 0x0f, i.address & 0x0f)
                packet = max(8, o.packet)
                others = Set(alternates.filter { $0.number == bot.number && !$0.bot }.map(\.alternate))
                value = blob.count > 5 ? blob[5] : 1
                storageOut = Set(alternates.filter { $0.storage && $0.number != bot.number }
                    .flatMap { $0.endpoints.filter { $0.address & 0x80 == 0 }.map { $0.address & 0x0f } })
                break
            }
        }
        guard let (number, o, i) = found else {
            throw DeviceSpecError("readonly-storage: the device below has no Bulk-Only mass-storage interface (08:06:50 with a bulk IN and a bulk OUT endpoint)")
        }
        interface = number; outEndpoint = o; inEndpoint = i; outPacketSize = packet
        otherAlternates = others
        configurationValue = value
        otherStorageOut = storageOut.subtracting([o])
        super.init(next: next)
    }

    public override func submit(_ urb: URB) {
        if !urb.isIn && otherStorageOut.contains(urb.endpoint) { return urb.complete(.stall) }
        guard urb.endpoint != 0, urb.endpoint == inEndpoint || urb.endpoint == outEndpoint else {
            // Bulk-Only Mass Storage Reset: the device is back to waiting for a CBW.
            if let s = urb.setup, s.kind == .class, s.recipient == .interface, s.request == 0xFF {
                state.withLock { $0 = State() }
            }
            return next.submit(urb)
        }
        // The storage endpoints take bulk transfers in their own direction only (a device that
        // serves an endpoint by its number must not get an interrupt OUT on it instead).
        guard urb.type == .bulk, urb.endpoint == (urb.isIn ? inEndpoint : outEndpoint) else { return urb.complete(.stall) }
        urb.isIn ? submitIn(urb) : submitOut(urb)
    }

    private enum Action { case pass, relay, stall, accept, answer([UInt8]) }

    private func submitOut(_ urb: URB) {
        let cbw = CBW(urb.buffer)
        // A refused CBW at a later packet boundary of a transfer would start a command in a
        // device out of step with the filter: the transfer never reaches it.
        if urb.buffer.count > outPacketSize {
            for offset in stride(from: outPacketSize, to: urb.buffer.count - 30, by: outPacketSize) {
                if let hidden = CBW(UnsafeMutableRawBufferPointer(rebasing: urb.buffer[offset...])), hidden.isRefused {
                    state.withLock { $0.phase = .command }
                    return urb.complete(.stall)
                }
            }
        }
        let action: Action = state.withLock { s in
            // A refused command wherever it comes: the device never sees it.
            if let cbw, cbw.isRefused {
                s.phase = .refused(tag: cbw.tag, residue: cbw.length, outLeft: cbw.isIn ? 0 : Int(cbw.length),
                                   inPending: cbw.isIn && cbw.length > 0)
                s.senseOwed = false; s.patchByte = nil
                return .accept
            }
            switch s.phase {
            case .dataOut(let left):
                s.phase = left - urb.buffer.count > 0 ? .dataOut(left - urb.buffer.count) : .command
                return .relay
            case .refused(let tag, let residue, let outLeft, let inPending) where outLeft > 0:
                s.phase = .refused(tag: tag, residue: residue, outLeft: outLeft - urb.buffer.count, inPending: inPending)
                return .accept
            default:
                guard let cbw, urb.buffer.count == 31 else { s.phase = .command; return .stall }
                if cbw.opcode == Self.requestSense && s.senseOwed {
                    s.senseOwed = false
                    let allocation = Int(cbw.cdb.count > 4 ? cbw.cdb[4] : 0)
                    s.phase = .sense(tag: cbw.tag, length: cbw.length, allocation: allocation, residue: nil)
                    return .accept
                }
                s.senseOwed = false
                s.patchByte = cbw.opcode == Self.modeSense6 ? 2 : cbw.opcode == Self.modeSense10 ? 3 : nil
                s.phase = !cbw.isIn && cbw.length > 0 ? .dataOut(Int(cbw.length)) : .command
                return .pass
            }
        }
        switch action {
        case .accept:
            urb.actualLength = urb.buffer.count
            urb.complete(.ok)
        case .stall:
            urb.complete(.stall)
        case .relay:
            // Data-OUT of a passed command: a STALL ends the data stage early.
            relay.forward(urb, to: next) { [self] child, _ in
                if child.status != .ok { state.withLock { if case .dataOut = $0.phase { $0.phase = .command } } }
            }
        default:
            next.submit(urb)
        }
    }

    private func submitIn(_ urb: URB) {
        let action: Action = state.withLock { s in
            switch s.phase {
            case .refused(let tag, let residue, _, let inPending):
                if inPending {
                    s.phase = .refused(tag: tag, residue: residue, outLeft: 0, inPending: false)
                    return .stall
                }
                s.phase = .command
                s.senseOwed = true
                return .answer(Self.csw(tag: tag, residue: residue, status: 1))
            case .sense(let tag, let length, let allocation, let residue):
                if residue == nil && length > 0 {
                    let data = Array(Self.writeProtectedSense.prefix(min(allocation, Int(length))))
                    s.phase = .sense(tag: tag, length: length, allocation: allocation, residue: length - UInt32(min(data.count, urb.buffer.count)))
                    return .answer(data)
                }
                s.phase = .command
                return .answer(Self.csw(tag: tag, residue: residue ?? length, status: 0))
            case .dataOut:
                // The guest went on to the status stage: the data stage is over.
                s.phase = .command
                return .pass
            case .command:
                if s.patchByte != nil { return .relay }
                return .pass
            }
        }
        switch action {
        case .answer(let bytes): urb.complete(in: bytes)
        case .stall: urb.complete(.stall)
        case .relay:
            relay.forward(urb, to: next) { [self] child, _ in
                let byte = state.withLock { s -> Int? in
                    defer { s.patchByte = nil }
                    return s.patchByte
                }
                // MODE SENSE data (not a CSW: the device may have failed the command without data).
                guard let byte, child.status == .ok, child.actualLength > byte,
                      !(child.actualLength == 13 && child.buffer.loadUnaligned(as: UInt32.self).littleEndian == 0x5342_5355) else { return }
                child.buffer[byte] |= 0x80
            }
        default:
            next.submit(urb)
        }
    }

    /// A Command Status Wrapper.
    static func csw(tag: UInt32, residue: UInt32, status: UInt8) -> [UInt8] {
        var b: [UInt8] = []
        CaptureFilter.append32(0x5342_5355, &b)
        CaptureFilter.append32(tag, &b)
        CaptureFilter.append32(residue, &b)
        b.append(status)
        return b
    }

    public override func cancel(_ urb: URB) {
        relay.cancel(urb, on: next)
        next.cancel(urb)
    }

    public override func setConfiguration(_ value: UInt8) -> USBStatus {
        guard value == 0 || value == configurationValue else { return .stall }
        return next.setConfiguration(value)
    }

    public override func setInterface(_ interface: UInt8, alternate: UInt8) -> USBStatus {
        guard interface != self.interface || !otherAlternates.contains(alternate) else { return .stall }
        return next.setInterface(interface, alternate: alternate)
    }

    public override func reset() {
        state.withLock { $0 = State() }
        next.reset()
    }
}

extension USBReadOnlyStorageFilter {
    public static let descriptor = DeviceDescriptor(
        deviceClass: .usb, name: "readonly-storage", kind: .filter,
        summary: "Refuses a mass-storage device's SCSI writes (write-protect sense) and sets the write-protect bit in MODE SENSE.",
        parameters: [],
        open: { _, next throws(DeviceSpecError) in try USBReadOnlyStorageFilter(device: next as! any USBDevice) })
}
