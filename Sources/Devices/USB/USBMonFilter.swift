import Core
import Glibc
import Synchronization

/// `usbmon(file=PATH, snaplen=N, bus=B, device=D)`: a capture of every URB in Linux's usbmon
/// format as libpcap writes it (LINKTYPE_USB_LINUX_MMAPPED, 220), which tshark and Wireshark
/// dissect: per URB an 'S' (submission) record when it arrives and a 'C' (completion) record when
/// it ends, each a 64-byte header (URB id, type, transfer type, endpoint address, device and bus
/// numbers, the setup packet of a control submission, status, lengths, interval, start frame)
/// followed by the data: OUT data with the submission, IN data with the completion, at most
/// `snaplen` bytes. The standard requests the tap answers (enumeration) are in the capture too,
/// as usbmon shows them. Records are buffered under one lock and flushed, with the file, in `close`.
public final class USBMonFilter: USBFilter, @unchecked Sendable {
    public override var name: String { "usbmon" }
    public let path: String
    public let snapLength: Int
    public let bus: UInt16
    public let device: UInt8
    private let output: BufferedOutputFile
    private let relay = URBRelay()
    private let nextID = Atomic<UInt64>(1)
    static let headerLength = 64

    public init(next: any USBDevice, path: String, snapLength: Int = 65536, bus: UInt16 = 1, device: UInt8 = 1) throws(DeviceSpecError) {
        guard let output = BufferedOutputFile(creating: path, owner: "usbmon(file=\(path))") else {
            throw DeviceSpecError("usbmon(file=\(path)): cannot create the file: \(String(cString: strerror(errno)))")
        }
        self.path = path; self.snapLength = snapLength; self.bus = bus; self.device = device
        // The pcap file header: version 2.4, snap length, LINKTYPE_USB_LINUX_MMAPPED.
        output.append { b in
            CaptureFilter.append32(0xa1b2_c3d4, &b); CaptureFilter.append16(2, &b); CaptureFilter.append16(4, &b)
            CaptureFilter.append32(0, &b); CaptureFilter.append32(0, &b)
            CaptureFilter.append32(UInt32(Self.headerLength + snapLength), &b); CaptureFilter.append32(220, &b)
        }
        self.output = output
        super.init(next: next)
    }

    public override func submit(_ urb: URB) {
        let id = nextID.wrappingAdd(1, ordering: .relaxed).oldValue
        record(urb, id: id, completion: false)
        relay.forward(urb, to: next) { [self] child, _ in record(child, id: id, completion: true) }
    }

    public override func submitStandard(_ urb: URB, tap: (URB) -> Bool) {
        let id = nextID.wrappingAdd(1, ordering: .relaxed).oldValue
        record(urb, id: id, completion: false)
        relay.forwardStandard(urb, to: next, tap: tap) { [self] child, _ in record(child, id: id, completion: true) }
    }

    public override func cancel(_ urb: URB) { relay.cancel(urb, on: next) }

    /// One record: the 64-byte usbmon header (`struct usbmon_packet`, host byte order) and its data.
    private func record(_ urb: URB, id: UInt64, completion: Bool) {
        var now = timespec()
        clock_gettime(CLOCK_REALTIME, &now)
        let hasData = urb.isIn == completion   // OUT data goes with the submission, IN data with the completion
        let length = completion ? urb.actualLength : urb.buffer.count
        let captured = hasData ? min(length, snapLength) : 0
        var h: [UInt8] = []
        h.reserveCapacity(Self.headerLength + captured)
        withUnsafeBytes(of: id.littleEndian) { h.append(contentsOf: $0) }
        h.append(completion ? UInt8(ascii: "C") : UInt8(ascii: "S"))
        h.append(urb.type.rawValue)
        h.append(urb.endpointAddress)
        h.append(device)
        CaptureFilter.append16(bus, &h)
        let setup = !completion && urb.setup != nil
        h.append(setup ? 0 : UInt8(ascii: "-"))                                          // flag_setup
        h.append(hasData && length > 0 ? 0 : (urb.isIn ? UInt8(ascii: "<") : UInt8(ascii: ">")))   // flag_data
        withUnsafeBytes(of: Int64(now.tv_sec).littleEndian) { h.append(contentsOf: $0) }
        CaptureFilter.append32(UInt32(truncatingIfNeeded: now.tv_nsec / 1000), &h)
        CaptureFilter.append32(UInt32(bitPattern: completion ? urb.status.rawValue : -115), &h)   // -EINPROGRESS while submitted
        CaptureFilter.append32(UInt32(length), &h)
        CaptureFilter.append32(UInt32(captured), &h)
        if setup, let s = urb.setup {
            h += s.bytes
        } else if urb.type == .isochronous {
            CaptureFilter.append32(UInt32(bitPattern: urb.errorCount), &h); CaptureFilter.append32(UInt32(urb.isoPackets.count), &h)
        } else {
            h += [UInt8](repeating: 0, count: 8)
        }
        CaptureFilter.append32(UInt32(urb.interval), &h)
        CaptureFilter.append32(UInt32(urb.startFrame), &h)
        CaptureFilter.append32(urb.isIn ? 0x200 : 0, &h)   // xfer_flags: URB_DIR_IN
        CaptureFilter.append32(UInt32(urb.isoPackets.count), &h)   // ndesc, then the ISO descriptors before the data
        for p in urb.isoPackets {
            CaptureFilter.append32(UInt32(bitPattern: completion ? p.status : -18), &h)   // -EXDEV until done, as Linux
            CaptureFilter.append32(p.offset, &h); CaptureFilter.append32(completion ? p.actualLength : p.length, &h)
            CaptureFilter.append32(0, &h)
        }
        if captured > 0 { h.append(contentsOf: UnsafeRawBufferPointer(rebasing: UnsafeRawBufferPointer(urb.buffer)[0..<captured])) }
        let micros = UInt32(truncatingIfNeeded: now.tv_nsec / 1000)
        output.append { b in
            CaptureFilter.append32(UInt32(truncatingIfNeeded: now.tv_sec), &b); CaptureFilter.append32(micros, &b)
            CaptureFilter.append32(UInt32(h.count), &b)
            CaptureFilter.append32(UInt32(h.count - captured + (hasData ? length : 0)), &b)
            b += h
        }
    }

    /// Closes the device below, then flushes and closes the file.
    public override func close() {
        super.close()
        output.close()
    }
}

extension USBMonFilter {
    public static let descriptor = DeviceDescriptor(
        deviceClass: .usb, name: "usbmon", kind: .filter,
        summary: "Writes every URB's submission and completion to a usbmon pcap capture (tshark, Wireshark).",
        parameters: [
            DeviceParameter("file", required: true, "The capture file to create (truncated if it exists)."),
            DeviceParameter("snaplen", "Data bytes kept per record (default 65536)."),
            DeviceParameter("bus", "The bus number the records carry (default 1)."),
            DeviceParameter("device", "The device number the records carry (default 1)."),
        ],
        open: { parameters, next throws(DeviceSpecError) in
            try USBMonFilter(next: next as! any USBDevice, path: parameters.required("file"),
                             snapLength: parameters.integer("snaplen", in: 0...(1 << 20)) ?? 65536,
                             bus: parameters.integer("bus", in: 1...65535) ?? 1, device: parameters.integer("device", in: 1...127) ?? 1)
        })
}
