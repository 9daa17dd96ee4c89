import Core
import Glibc

/// `pcap(file=PATH, format=pcap|pcapng)`: writes every frame that passes, both ways, to a
/// capture file that tcpdump, tshark and Wireshark read, and passes it on unchanged.
///
/// `pcap` is the classic format (LINKTYPE_ETHERNET, microsecond timestamps); `pcapng` has
/// one Enhanced Packet Block per frame whose `epb_flags` say the direction as seen from the
/// guest's interface: **inbound** for frames going to the guest, **outbound** for frames
/// coming from it. The format defaults from the extension (`.pcapng` or else classic). A
/// frame with a partial checksum is written with the checksum finished (on a copy: the frame
/// passed on keeps its offload), so `tcpdump -vv` shows it correct. Writes are buffered under
/// one lock and flushed, with the file closed, in `close`.
public final class CaptureFilter: NetFilter, @unchecked Sendable {
    public enum Format: String, Sendable { case pcap, pcapng }
    public override var name: String { "pcap" }
    public let path: String
    public let format: Format

    private let output: BufferedOutputFile
    static let snapshotLength: UInt32 = 262_144

    /// Creates (truncates) `path` and writes the file's header.
    public init(next: any NetDevice, path: String, format: Format? = nil) throws(DeviceSpecError) {
        let format = format ?? (path.hasSuffix(".pcapng") ? .pcapng : .pcap)
        guard let output = BufferedOutputFile(creating: path, owner: "pcap(file=\(path))") else {
            throw DeviceSpecError("pcap(file=\(path)): cannot create the file: \(String(cString: strerror(errno)))")
        }
        self.path = path
        self.format = format
        output.append { Self.appendFileHeader(format, to: &$0) }
        self.output = output
        super.init(next: next)
    }

    public override func fromGuest(_ frame: EthernetFrame) {
        capture(frame, inbound: false)
        next.fromGuest(frame)
    }

    public override func toGuest(_ frame: EthernetFrame) {
        capture(frame, inbound: true)
        receiver?.toGuest(frame)
    }

    private func capture(_ frame: EthernetFrame, inbound: Bool) {
        var copy = frame
        if case .partial = frame.offload.checksum { FrameChecksum.complete(&copy) }
        var now = timespec()
        clock_gettime(CLOCK_REALTIME, &now)
        let microseconds = UInt64(now.tv_sec) * 1_000_000 + UInt64(now.tv_nsec / 1000)
        output.append { buffer in
            copy.withUnsafeBytes { Self.appendRecord(format, $0, microseconds: microseconds, inbound: inbound, to: &buffer) }
        }
    }

    /// Closes the device below, then flushes and closes the file.
    public override func close() {
        super.close()
        output.close()
    }

    // MARK: The formats (little-endian, as this host writes them)

    static func append32(_ v: UInt32, _ b: inout [UInt8]) { withUnsafeBytes(of: v.littleEndian) { b.append(contentsOf: $0) } }
    static func append16(_ v: UInt16, _ b: inout [UInt8]) { withUnsafeBytes(of: v.littleEndian) { b.append(contentsOf: $0) } }

    static func appendFileHeader(_ format: Format, to b: inout [UInt8]) {
        switch format {
        case .pcap:
            append32(0xa1b2_c3d4, &b); append16(2, &b); append16(4, &b)
            append32(0, &b); append32(0, &b); append32(snapshotLength, &b); append32(1, &b)   // LINKTYPE_ETHERNET
        case .pcapng:
            // Section Header Block: no options, section length unknown.
            append32(0x0a0d_0d0a, &b); append32(28, &b); append32(0x1a2b_3c4d, &b)
            append16(1, &b); append16(0, &b); append32(0xffff_ffff, &b); append32(0xffff_ffff, &b); append32(28, &b)
            // Interface Description Block: Ethernet, microsecond timestamps (the default).
            append32(1, &b); append32(20, &b); append16(1, &b); append16(0, &b); append32(snapshotLength, &b); append32(20, &b)
        }
    }

    static func appendRecord(_ format: Format, _ bytes: UnsafeRawBufferPointer, microseconds: UInt64, inbound: Bool, to b: inout [UInt8]) {
        let length = UInt32(bytes.count)
        let captured = min(length, snapshotLength)
        let data = UnsafeRawBufferPointer(rebasing: bytes[..<Int(captured)])
        switch format {
        case .pcap:
            append32(UInt32(microseconds / 1_000_000), &b); append32(UInt32(microseconds % 1_000_000), &b)
            append32(captured, &b); append32(length, &b)
            b.append(contentsOf: data)
        case .pcapng:
            let padding = (4 - Int(captured) % 4) % 4
            let total = UInt32(28 + Int(captured) + padding + 8 + 4 + 4)
            append32(6, &b); append32(total, &b); append32(0, &b)
            append32(UInt32(microseconds >> 32), &b); append32(UInt32(microseconds & 0xffff_ffff), &b)
            append32(captured, &b); append32(length, &b)
            b.append(contentsOf: data)
            b.append(contentsOf: repeatElement(0, count: padding))
            // epb_flags: direction 01 inbound, 10 outbound; then opt_endofopt.
            append16(2, &b); append16(4, &b); append32(inbound ? 1 : 2, &b)
            append16(0, &b); append16(0, &b)
            append32(total, &b)
        }
    }
}

extension CaptureFilter {
    public static let descriptor = DeviceDescriptor(
        deviceClass: .net, name: "pcap", kind: .filter,
        summary: "Writes every frame, both ways, to a pcap or pcapng capture file (checksums finished).",
        parameters: [
            DeviceParameter("file", required: true, "The capture file to create (truncated if it exists)."),
            DeviceParameter("format", "pcap or pcapng (with each frame's direction); default from the extension."),
        ],
        open: { parameters, next throws(DeviceSpecError) in
            let format = try parameters.string("format").map { _ throws(DeviceSpecError) in
                CaptureFilter.Format(rawValue: try parameters.choice("format", ["pcap", "pcapng"], default: "pcap"))!
            }
            return try CaptureFilter(next: next as! any NetDevice, path: parameters.required("file"), format: format)
        })
}
