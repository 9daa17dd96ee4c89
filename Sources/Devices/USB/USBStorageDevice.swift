import Core
import Glibc
import Synchronization

/// `storage(device="<block spec>", readonly=, vendor=, product=, serial=)`: a USB stick
/// (mass storage, Bulk-Only Transport, SCSI transparent command set) over any block stack, so
/// that an encrypted, logged or read-only SoftDev disk can be a USB stick.
///
/// Each command is a state machine, as in QEMU's `dev-storage.c`: a CBW on bulk OUT, the data
/// phase (OUT URBs gathered into the command's buffer; IN URBs served in the sizes the host
/// asks for, several per command), then the CSW on bulk IN. A bulk IN URB that comes before
/// its data (or status) is ready stays pending and is completed when it is: block requests are
/// submitted and the URBs completed from their completions, so the tap's thread never waits
/// for the disk. An invalid CBW stalls both bulk endpoints until a reset recovery (BOT 6.6.1).
/// When the data the device has is shorter than the host asked for, the data phase is padded
/// and the CSW's residue says how much was not data (QEMU does the same).
public final class USBStorageDevice: USBDevice, BlockCompletionSink, @unchecked Sendable {
    public let name = "storage"
    public let speed = USBSpeed.high
    public let descriptors: USBDescriptors
    /// The block stack the stick serves.
    public let disk: any BlockDevice
    static let bulkIn: UInt8 = 0x81, bulkOut: UInt8 = 0x02
    static let cbwSignature: UInt32 = 0x4342_5355, cswSignature: UInt32 = 0x5342_5355

    /// One command from its CBW to its CSW.
    final class Command {
        let tag: UInt32
        /// dCBWDataTransferLength and its direction.
        let hostLength: Int
        let hostIn: Bool
        /// Bytes of the data phase moved so far.
        var moved = 0
        /// IN: the data for the host (`ready` once read); OUT: where the host's data goes.
        let buffer: UnsafeMutableRawBufferPointer
        /// IN: how many bytes of `buffer` are data (zeroes pad the rest of the phase).
        var valid: Int
        var ready = true
        /// Bytes of the data phase the command used (the residue is the rest).
        var processed: Int
        /// CSW status: 0 passed, 1 failed, 2 phase error.
        var status: UInt8
        /// What to do once the host's data is in.
        var after: After = .nothing
        enum After { case nothing, write(offset: UInt64, fua: Bool), flush }
        let vector = UnsafeMutablePointer<iovec>.allocate(capacity: 1)

        init(tag: UInt32, hostLength: Int, hostIn: Bool, bytes: Int, status: UInt8) {
            self.tag = tag; self.hostLength = hostLength; self.hostIn = hostIn; self.status = status
            let memory = bytes > 0 ? UnsafeMutableRawPointer.allocate(byteCount: bytes, alignment: 4096) : nil
            buffer = UnsafeMutableRawBufferPointer(start: memory, count: bytes)
            valid = bytes; processed = bytes
            vector.pointee = iovec(iov_base: memory, iov_len: bytes)
        }
        deinit { buffer.baseAddress?.deallocate(); vector.deallocate() }
        var buffers: IOBuffers { IOBuffers(vector, count: 1) }
        var residue: Int { status == 0 ? hostLength - min(hostLength, processed) : hostLength }
    }

    enum Phase { case command, dataOut, dataIn, executing, status }

    struct State {
        var phase = Phase.command
        var command: Command?
        var scsi: SCSIDisk
        /// Bulk IN URBs waiting for data or a CSW, oldest first.
        var pendingIn: [URB] = []
        /// Halted bulk endpoints (0x81, 0x02).
        var halted: Set<UInt8> = []
        /// An invalid CBW came: the halts stay until a Bulk-Only Mass Storage Reset.
        var awaitingReset = false
        /// Block requests in flight, by tag (a command reset away still owns its buffer).
        var io: [UInt64: Command] = [:]
        var nextIO: UInt64 = 1
        var closing = false, closed = false
    }
    private let state: Mutex<State>

    /// What to do once the lock is released: URBs to complete, block requests to submit.
    struct Effects {
        var urbs: [(URB, USBStatus)] = []
        var io: [(UInt64, BlockRequest)] = []
        var closeDisk = false
    }

    public init(disk: any BlockDevice, readOnly: Bool = false, vendor: String = "SoftDev", product: String = "USB Storage",
                serial: String = "000000000001") {
        self.disk = disk
        let scsi = SCSIDisk(vendor: vendor, product: product, serial: serial, geometry: disk.geometry, capabilities: disk.capabilities,
                            readOnly: readOnly)
        state = Mutex(State(scsi: scsi))
        descriptors = USBDescriptorBuilder.make(
            productID: 0x0001, maxPacket0: 64, interfaceClass: (0x08, 0x06, 0x50),
            endpoints: [.init(address: Self.bulkIn, type: .bulk, maxPacket: 512, interval: 0),
                        .init(address: Self.bulkOut, type: .bulk, maxPacket: 512, interval: 0)],
            maxPowerMilliamps: 100, manufacturer: vendor, product: product, serial: serial)
    }

    /// Whether the stick refuses writes (`readonly=true`, or a stack that cannot write).
    public var isWriteProtected: Bool { state.withLock { !$0.scsi.writable } }

    // MARK: USBDevice

    public func submit(_ urb: URB) {
        var e = Effects()
        switch (urb.type, urb.endpoint, urb.isIn) {
        case (.control, 0, _): control(urb, &e)
        case (.bulk, Self.bulkOut, false): state.withLock { bulkOut(urb, &$0, &e) }
        case (.bulk, Self.bulkIn & 0x0f, true):
            state.withLock { s in
                if s.halted.contains(Self.bulkIn) { e.urbs.append((urb, .stall)); return }
                s.pendingIn.append(urb)
                pump(&s, &e)
            }
        default: e.urbs.append((urb, .stall))
        }
        run(e)
    }

    public func cancel(_ urb: URB) {
        if state.withLock({ $0.pendingIn.removeURB(urb) }) { urb.complete(.cancelled) }
    }

    public func setConfiguration(_ value: UInt8) -> USBStatus {
        var e = Effects()
        state.withLock { restart(&$0, &e, clearHalts: true) }
        run(e)
        return .ok
    }

    public func isHalted(endpoint: UInt8, isIn: Bool) -> Bool {
        state.withLock { $0.halted.contains(isIn ? endpoint | 0x80 : endpoint) }
    }

    public func clearHalt(endpoint: UInt8, isIn: Bool) -> USBStatus {
        state.withLock { s in
            if !s.awaitingReset { s.halted.remove(isIn ? endpoint | 0x80 : endpoint) }
        }
        return .ok
    }

    public func reset() {
        var e = Effects()
        state.withLock { restart(&$0, &e, clearHalts: true) }
        run(e)
    }

    /// Closes the block stack (once the block requests still in flight are done).
    public func close() {
        var e = Effects()
        state.withLock { s in
            for urb in s.pendingIn { e.urbs.append((urb, .shutdown)) }
            s.pendingIn = []
            s.command = nil
            s.closing = true
            if s.io.isEmpty && !s.closed { s.closed = true; e.closeDisk = true }
        }
        run(e)
    }

    // MARK: Block completions (any thread)

    public func complete(tag: UInt64, result: BlockResult) {
        var e = Effects()
        state.withLock { s in
            guard let command = s.io.removeValue(forKey: tag) else { return }
            if s.closing && s.io.isEmpty && !s.closed { s.closed = true; e.closeDisk = true }
            guard command === s.command else { return }   // reset away: only its buffer was waited for
            if case .failure(let error) = result {
                s.scsi.failed(SCSISense.of(error, writing: !command.hostIn))
                command.status = 1; command.valid = 0; command.processed = 0
            }
            if s.phase == .executing { s.phase = .status }
            command.ready = true
            pump(&s, &e)
        }
        run(e)
    }

    // MARK: The state machine (called with the lock held)

    private func run(_ e: Effects) {
        for (urb, status) in e.urbs { urb.complete(status) }
        for (tag, request) in e.io { disk.submit(request, completion: BlockCompletion(sink: self, tag: tag)) }
        if e.closeDisk { disk.close() }
    }

    /// Class requests: Bulk-Only Mass Storage Reset and Get Max LUN; the rest stall.
    private func control(_ urb: URB, _ e: inout Effects) {
        guard let setup = urb.setup, setup.kind == .class, setup.recipient == .interface, setup.index == 0 else {
            return e.urbs.append((urb, .stall))
        }
        switch (setup.request, setup.isIn) {
        case (0xFF, false) where setup.value == 0 && setup.length == 0:
            state.withLock { s in
                s.awaitingReset = false
                restart(&s, &e, clearHalts: false)
            }
            urb.actualLength = 0
            e.urbs.append((urb, .ok))
        case (0xFE, true) where setup.value == 0 && setup.length >= 1:
            urb.buffer[0] = 0   // one LUN
            urb.actualLength = 1
            e.urbs.append((urb, .ok))
        default:
            e.urbs.append((urb, .stall))
        }
    }

    /// Back to waiting for a CBW: the command is dropped (a block request in flight finishes
    /// unseen), waiting IN URBs are cancelled.
    private func restart(_ s: inout State, _ e: inout Effects, clearHalts: Bool) {
        s.command = nil
        s.phase = .command
        for urb in s.pendingIn { e.urbs.append((urb, .cancelled)) }
        s.pendingIn = []
        if clearHalts { s.halted = []; s.awaitingReset = false }
    }

    private func bulkOut(_ urb: URB, _ s: inout State, _ e: inout Effects) {
        if s.halted.contains(Self.bulkOut) { return e.urbs.append((urb, .stall)) }
        switch s.phase {
        case .command:
            let bytes = Array(urb.buffer)
            guard bytes.count == 31, le32(bytes, 0) == Self.cbwSignature, (1...16).contains(bytes[14] & 0x1f) else {
                // Not a valid CBW: stall both bulk endpoints until a reset recovery.
                s.halted = [Self.bulkIn, Self.bulkOut]
                s.awaitingReset = true
                restart(&s, &e, clearHalts: false)
                return e.urbs.append((urb, .stall))
            }
            urb.actualLength = 31
            e.urbs.append((urb, .ok))
            start(bytes, &s, &e)
        case .dataOut:
            let command = s.command!
            let n = min(urb.buffer.count, command.hostLength - command.moved)
            let keep = min(n, max(0, command.buffer.count - command.moved))
            if keep > 0 { (command.buffer.baseAddress! + command.moved).copyMemory(from: urb.buffer.baseAddress!, byteCount: keep) }
            command.moved += n
            urb.actualLength = urb.buffer.count
            e.urbs.append((urb, .ok))
            if command.moved == command.hostLength { dataOutDone(command, &s, &e) }
        case .dataIn, .executing, .status:
            e.urbs.append((urb, .stall))
        }
    }

    /// A valid CBW: the SCSI command decoded, the data phase set up (checked against what the
    /// host announced: a mismatch is a phase error, BOT 6.7), a read submitted at once.
    private func start(_ cbw: [UInt8], _ s: inout State, _ e: inout Effects) {
        let hostLength = Int(le32(cbw, 8)), hostIn = cbw[12] & 0x80 != 0
        let cdb = Array(cbw[15..<(15 + Int(cbw[14] & 0x1f))])
        let plan = s.scsi.plan(cdb, lun: cbw[13] & 0x0f)
        var status: UInt8 = s.scsi.sense == .none ? 0 : 1
        // What the device means to move: IN (and whether a shorter phase is fine), OUT.
        var deviceIn = 0, deviceOut = 0, cut = false
        switch plan {
        case .none, .flush: break
        case .dataIn(let data): deviceIn = data.count; cut = true
        case .read(_, let length): deviceIn = length
        case .write(_, let length, _), .discardOut(let length): deviceOut = length
        }
        if (deviceIn > 0 && (!hostIn || hostLength == 0 || (!cut && deviceIn > hostLength)))
            || (deviceOut > 0 && (hostIn || deviceOut > hostLength)) {
            status = 2
        }
        let bytes: Int
        switch plan {
        case _ where status == 2: bytes = 0
        case .dataIn(let data): bytes = min(data.count, hostLength)
        case .read(_, let length), .write(_, let length, _): bytes = length
        default: bytes = 0
        }
        let command = Command(tag: le32(cbw, 4), hostLength: hostLength, hostIn: hostIn, bytes: bytes, status: status)
        s.command = command
        if status == 0 {
            switch plan {
            case .dataIn(let data):
                data.prefix(bytes).withUnsafeBytes { command.buffer.copyMemory(from: $0) }
            case .read(let offset, let length):
                command.ready = false
                submit(BlockRequest(operation: .read, offset: offset, length: UInt64(length), buffers: command.buffers), command, &s, &e)
            case .write(let offset, _, let fua): command.after = .write(offset: offset, fua: fua)
            case .flush: command.after = .flush
            case .discardOut(let length): command.processed = length
            case .none: break
            }
        } else {
            command.valid = 0; command.processed = 0
        }
        if hostLength == 0 { dataOutDone(command, &s, &e) } else { s.phase = hostIn ? .dataIn : .dataOut }
        pump(&s, &e)
    }

    /// The host's data is all in (or there was none): the write or flush goes to the stack,
    /// or the status is ready.
    private func dataOutDone(_ command: Command, _ s: inout State, _ e: inout Effects) {
        switch command.after {
        case .write(let offset, let fua):
            s.phase = .executing
            submit(BlockRequest(operation: .write, offset: offset, length: UInt64(command.buffer.count), buffers: command.buffers, fua: fua),
                   command, &s, &e)
        case .flush:
            s.phase = .executing
            submit(BlockRequest(operation: .flush, offset: 0, length: 0), command, &s, &e)
        case .nothing:
            s.phase = .status
        }
    }

    private func submit(_ request: BlockRequest, _ command: Command, _ s: inout State, _ e: inout Effects) {
        let tag = s.nextIO
        s.nextIO += 1
        s.io[tag] = command
        e.io.append((tag, request))
    }

    /// Serves the waiting IN URBs: data while the data phase lasts and its data is ready, then the CSW.
    private func pump(_ s: inout State, _ e: inout Effects) {
        while let urb = s.pendingIn.first, let command = s.command {
            if s.phase == .dataIn && command.ready {
                s.pendingIn.removeFirst()
                let n = min(urb.buffer.count, command.hostLength - command.moved)
                let data = max(0, min(n, command.valid - command.moved))
                if data > 0 { urb.buffer.baseAddress!.copyMemory(from: command.buffer.baseAddress! + command.moved, byteCount: data) }
                if n > data { memset(urb.buffer.baseAddress! + data, 0, n - data) }
                command.moved += n
                urb.actualLength = n
                e.urbs.append((urb, .ok))
                if command.moved == command.hostLength { s.phase = .status }
            } else if s.phase == .status {
                s.pendingIn.removeFirst()
                var csw = [UInt8](repeating: 0, count: 13)
                put32(&csw, 0, Self.cswSignature); put32(&csw, 4, command.tag); put32(&csw, 8, UInt32(command.residue))
                csw[12] = command.status
                let n = min(13, urb.buffer.count)
                urb.buffer.copyBytes(from: csw.prefix(n))
                urb.actualLength = n
                e.urbs.append((urb, n == 13 ? .ok : .babble))
                s.command = nil
                s.phase = .command
            } else {
                break
            }
        }
    }

    private func le32(_ b: [UInt8], _ at: Int) -> UInt32 {
        UInt32(b[at]) | UInt32(b[at + 1]) << 8 | UInt32(b[at + 2]) << 16 | UInt32(b[at + 3]) << 24
    }
    private func put32(_ b: inout [UInt8], _ at: Int, _ v: UInt32) {
        for i in 0..<4 { b[at + i] = UInt8(truncatingIfNeeded: v >> (8 * i)) }
    }
}

extension USBStorageDevice {
    public static let descriptor = DeviceDescriptor(
        deviceClass: .usb, name: "storage", kind: .device,
        summary: "A USB stick (mass storage, Bulk-Only Transport, SCSI) over a block stack.",
        parameters: [
            DeviceParameter("device", required: true, "the block stack it serves, e.g. \"crypt(...) | file(path=disk.img)\""),
            DeviceParameter("readonly", "true: write-protected (writes fail, MODE SENSE says so); default false"),
            DeviceParameter("vendor", "the vendor in INQUIRY (8 characters) and the USB manufacturer string; default SoftDev"),
            DeviceParameter("product", "the product in INQUIRY (16 characters) and the USB product string; default USB Storage"),
            DeviceParameter("serial", "the USB serial number (and INQUIRY's unit serial number); default from the block spec"),
        ],
        open: { parameters, _ throws(DeviceSpecError) in
            let spec = try parameters.required("device")
            let readOnly = try parameters.bool("readonly", default: false)
            for key in ["vendor", "product", "serial"] {
                if let v = parameters.string(key), v.isEmpty || !v.unicodeScalars.allSatisfy({ $0.isASCII && $0.value >= 0x20 && $0.value < 0x7f }) {
                    throw DeviceSpecError("storage: \(key) '\(v)' must be printable ASCII")
                }
            }
            let disk = try DeviceRegistry.open(spec)
            return USBStorageDevice(disk: disk, readOnly: readOnly, vendor: parameters.string("vendor") ?? "SoftDev",
                                    product: parameters.string("product") ?? "USB Storage",
                                    serial: parameters.string("serial") ?? defaultSerial(spec))
        })

    /// Twelve hex digits (BOT asks for at least 12) from the block spec, the same each run.
    static func defaultSerial(_ spec: String) -> String {
        var hash: UInt64 = 0xcbf2_9ce4_8422_2325
        for b in spec.utf8 { hash = (hash ^ UInt64(b)) &* 0x100_0000_01b3 }
        let hex = String(hash & 0xffff_ffff_ffff, radix: 16, uppercase: true)
        return String(repeating: "0", count: 12 - hex.count) + hex
    }
}
