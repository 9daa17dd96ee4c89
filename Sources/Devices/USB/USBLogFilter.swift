import Core
import Glibc
import Synchronization

/// `log(logfile=PATH, logappend=BOOL)` for USB: one JSON line per URB when it completes, like the
/// block `log` filter:
///
/// ```
/// {"time":"2026-11-24T19:33:34.388123Z","id":3,"endpoint":"0x81","direction":"in","type":"bulk","length":512,"actual_length":13,"status":"ok","errno":0,"duration_ns":51234}
/// {"time":"2026-11-24T19:33:34.391002Z","id":4,"endpoint":"0x00","direction":"in","type":"control","setup":{"bmRequestType":"0xa1","bRequest":254,"wValue":0,"wIndex":0,"wLength":1},"length":1,"actual_length":1,"status":"ok","errno":0,"duration_ns":8120}
/// ```
///
/// `time` is when the URB arrived (UTC), `id` counts URBs from 1, `status` is "ok", "stall",
/// "EPROTO"... with the negative errno in `errno`. The standard requests the tap answers
/// (descriptors, addresses, configuration) are logged too, as they pass.
public final class USBLogFilter: USBFilter, @unchecked Sendable {
    public override var name: String { "log" }
    public let path: String
    private let file: LineOutputFile
    private let nextID = Atomic<UInt64>(1)
    private let relay = URBRelay()

    public init(next: any USBDevice, path: String, append: Bool = false) throws(DeviceSpecError) {
        guard let file = LineOutputFile(path: path, append: append) else {
            throw DeviceSpecError("log(logfile=\(path)): cannot open: \(String(cString: strerror(errno)))")
        }
        self.path = path
        self.file = file
        super.init(next: next)
    }

    public override func submit(_ urb: URB) {
        relay.forward(urb, to: next, then: logger())
    }

    public override func submitStandard(_ urb: URB, tap: (URB) -> Bool) {
        relay.forwardStandard(urb, to: next, tap: tap, then: logger())
    }

    /// What writes a URB's line when it completes: its id and times taken now, as it arrives.
    private func logger() -> URBRelay.Completion {
        let id = nextID.wrappingAdd(1, ordering: .relaxed).oldValue
        let wallClock = timespec.now(CLOCK_REALTIME), start = timespec.now(CLOCK_MONOTONIC)
        return { [self] child, _ in
            write(Self.line(child, id: id, wallClock: wallClock, nanoseconds: timespec.now(CLOCK_MONOTONIC).nanoseconds - start.nanoseconds))
        }
    }

    public override func cancel(_ urb: URB) { relay.cancel(urb, on: next) }

    static func line(_ urb: URB, id: UInt64, wallClock: timespec, nanoseconds: UInt64) -> String {
        var line = "{\"time\":\"\(LogFilter.timestamp(wallClock))\",\"id\":\(id),\"endpoint\":\"\(hex(urb.endpointAddress))\""
        line += ",\"direction\":\"\(urb.isIn ? "in" : "out")\",\"type\":\"\(urb.type)\""
        if let s = urb.setup {
            line += ",\"setup\":{\"bmRequestType\":\"\(hex(s.requestType))\",\"bRequest\":\(s.request),\"wValue\":\(s.value)"
            line += ",\"wIndex\":\(s.index),\"wLength\":\(s.length)}"
        }
        if !urb.isoPackets.isEmpty { line += ",\"iso_packets\":\(urb.isoPackets.count),\"error_count\":\(urb.errorCount)" }
        line += ",\"length\":\(urb.buffer.count),\"actual_length\":\(urb.actualLength)"
        line += ",\"status\":\(LogFilter.jsonString(urb.status.description)),\"errno\":\(urb.status.rawValue),\"duration_ns\":\(nanoseconds)}\n"
        return line
    }

    static func hex(_ v: UInt8) -> String { "0x" + (v < 16 ? "0" : "") + String(v, radix: 16) }

    private func write(_ line: String) { file.write(line) }

    /// Closes the device below, then the log.
    public override func close() {
        next.close()
        file.close()
    }
}

extension USBLogFilter {
    public static let descriptor = DeviceDescriptor(
        deviceClass: .usb, name: "log", kind: .filter,
        summary: "Writes every URB (endpoint, type, setup, lengths, status, timing) to a file as JSON lines.",
        parameters: [
            DeviceParameter("logfile", required: true, "The file the JSON lines are written to."),
            DeviceParameter("logappend", "true to append to the file instead of truncating it (default false)."),
        ],
        open: { parameters, next throws(DeviceSpecError) in
            try USBLogFilter(next: next as! any USBDevice, path: parameters.required("logfile"),
                             append: parameters.bool("logappend", default: false))
        })
}
