import Core
import Glibc
import Synchronization

/// `log(logfile=...)`: writes one JSON object per line to `logfile` for every request that
/// passes through, when it completes (nbdkit's log filter, in JSON lines):
///
/// ```
/// {"time":"2026-11-24T19:33:34.388123Z","id":7,"op":"write","offset":4096,"length":4096,"flags":["fua"],"result":"ok","duration_ns":51234}
/// {"time":"2026-11-24T19:33:34.391002Z","id":8,"op":"read","offset":0,"length":512,"flags":[],"result":"EIO","error":"file(path=disk.img): read: Input/output error","duration_ns":8120}
/// ```
///
/// `time` is when the request arrived (UTC), `id` counts requests from 1 in the order they
/// arrived, `result` is "ok" or the errno's name, `error` the device's message. Lines are
/// flushed as they are written, so the log can be followed while the device runs. Placed first
/// in a stack it shows the requests as the transport sent them; placed lower, as the filters
/// above changed them.
public final class LogFilter: BlockFilter, @unchecked Sendable {
    public override var name: String { "log" }
    public let path: String
    private let file: LineOutputFile
    private let nextID = Atomic<UInt64>(1)

    /// Opens (truncates, or appends to) `path`; the error names the file and the reason.
    public init(next: any BlockDevice, path: String, append: Bool = false) throws(BlockError) {
        guard let file = LineOutputFile(path: path, append: append) else {
            throw BlockError.system("log(logfile=\(path)): cannot open", errno: errno)
        }
        self.path = path
        self.file = file
        super.init(next: next)
    }

    /// One request between its arrival and its completion.
    private final class Entry: BlockCompletionSink, @unchecked Sendable {
        let filter: LogFilter
        let id: UInt64
        let operation: String
        let offset: UInt64, length: UInt64
        let flags: [String]
        let wallClock = timespec.now(CLOCK_REALTIME)
        let start = timespec.now(CLOCK_MONOTONIC)
        var completion: BlockCompletion?

        init(_ filter: LogFilter, _ operation: String, _ offset: UInt64, _ length: UInt64, flags: [String]) {
            self.filter = filter; self.operation = operation; self.offset = offset; self.length = length; self.flags = flags
            id = filter.nextID.wrappingAdd(1, ordering: .relaxed).oldValue
        }

        func complete(tag: UInt64, result: BlockResult) {
            filter.write(self, result)
            completion!.complete(result)
        }
    }

    private func entry(for request: BlockRequest) -> Entry {
        var flags: [String] = []
        if request.fua { flags.append("fua") }
        if request.mayDiscard { flags.append("may-discard") }
        return Entry(self, request.operation.description, request.offset, request.length, flags: flags)
    }

    private func write(_ entry: Entry, _ result: BlockResult) {
        let elapsed = timespec.now(CLOCK_MONOTONIC).nanoseconds - entry.start.nanoseconds
        var line = "{\"time\":\"\(Self.timestamp(entry.wallClock))\",\"id\":\(entry.id),\"op\":\"\(entry.operation)\""
        line += ",\"offset\":\(entry.offset),\"length\":\(entry.length),\"flags\":["
        line += entry.flags.map { "\"\($0)\"" }.joined(separator: ",") + "]"
        switch result {
        case .success: line += ",\"result\":\"ok\""
        case .failure(let error): line += ",\"result\":\"\(Self.errnoName(error.errno))\",\"error\":\(Self.jsonString(error.message))"
        }
        line += ",\"duration_ns\":\(elapsed)}\n"
        file.write(line)
    }

    static func timestamp(_ t: timespec) -> String {
        var seconds = t.tv_sec
        var parts = tm()
        gmtime_r(&seconds, &parts)
        var text = [CChar](repeating: 0, count: 32)
        strftime(&text, text.count, "%Y-%m-%dT%H:%M:%S", &parts)
        let micro = String(t.tv_nsec / 1000)
        return String(cString: text) + "." + String(repeating: "0", count: 6 - micro.count) + micro + "Z"
    }

    static func errnoName(_ e: Int32) -> String {
        let names = ErrorFilter.errorNames + [("EOPNOTSUPP", EOPNOTSUPP), ("EDQUOT", EDQUOT), ("EACCES", EACCES), ("ENOSYS", ENOSYS)]
        return names.first { $0.1 == e }?.0 ?? "errno \(e)"
    }

    /// `text` as a JSON string literal.
    static func jsonString(_ text: String) -> String {
        var out = "\""
        for c in text.unicodeScalars {
            switch c {
            case "\"": out += "\\\""
            case "\\": out += "\\\\"
            case "\n": out += "\\n"
            case "\r": out += "\\r"
            case "\t": out += "\\t"
            case _ where c.value < 0x20:
                let hex = String(c.value, radix: 16)
                out += "\\u" + String(repeating: "0", count: 4 - hex.count) + hex
            default: out.unicodeScalars.append(c)
            }
        }
        return out + "\""
    }

    // MARK: Operations

    public override func submit(_ request: BlockRequest, completion: BlockCompletion) {
        let entry = entry(for: request)
        entry.completion = completion
        next.submit(request, completion: BlockCompletion(sink: entry, tag: 0))
    }

    public override func extents(at offset: UInt64, length: UInt64) throws(BlockError) -> [BlockExtent] {
        let entry = Entry(self, "extents", offset, length, flags: [])
        do {
            let extents = try next.extents(at: offset, length: length)
            write(entry, .success)
            return extents
        } catch {
            write(entry, .failure(error))
            throw error
        }
    }

    /// Closes the device below, then the log.
    public override func close() {
        next.close()
        file.close()
    }
}

extension timespec {
    static func now(_ clock: clockid_t) -> timespec {
        var t = timespec()
        clock_gettime(clock, &t)
        return t
    }
    var nanoseconds: UInt64 { UInt64(tv_sec) * 1_000_000_000 + UInt64(tv_nsec) }
}

extension LogFilter {
    public static let descriptor = DeviceDescriptor(
        name: "log", kind: .filter,
        summary: "Writes every request and its result, with its timing, to a file as JSON lines.",
        parameters: [
            DeviceParameter("logfile", required: true, "The file the JSON lines are written to."),
            DeviceParameter("logappend", "true to append to the file instead of truncating it (default false)."),
        ],
        open: { parameters, next throws(DeviceSpecError) in
            let path = try parameters.required("logfile")
            let append = try parameters.bool("logappend", default: false)
            return try DeviceSpecError.opening { () throws(BlockError) in try LogFilter(next: next!, path: path, append: append) }
        })
}
