import Core
import Glibc

/// `stats(file=...)` (net): counts the frames, bytes and drops that pass through it each way
/// (drops: frames the filter was handed after `close`), readable by code as a
/// ``Counters`` snapshot and written as one line when the device is closed: to `file` if
/// given (as the block `stats` filter writes its report), else to standard error, the log.
///
/// ```swift
/// let stack = try DeviceRegistry.open("stats | tap(name=sd0)", of: .net) as! NetStatsFilter
/// print(stack.counters.fromGuest.frames)
/// ```
public final class NetStatsFilter: NetFilter, @unchecked Sendable {
    public typealias Counters = NetCounters
    public override var name: String { "stats" }
    /// Where `close` writes the line, if anywhere.
    public let reportPath: String?
    private let live = NetDirectionCounters()
    private let started = monotonicSeconds()

    public init(next: any NetDevice, reportPath: String? = nil) {
        self.reportPath = reportPath
        super.init(next: next)
    }

    public override func fromGuest(_ frame: EthernetFrame) {
        live.fromGuest.count(frame)
        next.fromGuest(frame)
    }

    public override func toGuest(_ frame: EthernetFrame) {
        guard let receiver else { live.toGuest.drop(); return }
        live.toGuest.count(frame)
        receiver.toGuest(frame)
    }

    /// The counters now.
    public var counters: Counters { Counters(live) }

    /// The one-line report: `stats over 12.3 s: from guest: N frames, B bytes, D dropped; to guest: ...`.
    public func report() -> String {
        let elapsed = ((monotonicSeconds() - started) * 10).rounded() / 10
        return "stats over \(elapsed) s: \(counters)\n"
    }

    /// Closes the device below, then writes the line.
    public override func close() {
        super.close()
        let line = report()
        guard let reportPath else { fputs("net " + line, stderr); return }
        guard let file = fopen(reportPath, "w") else {
            fputs("stats(file=\(reportPath)): cannot write the report: \(String(cString: strerror(errno)))\n", stderr)
            return
        }
        fputs(line, file)
        fclose(file)
    }
}

extension NetStatsFilter {
    public static let descriptor = DeviceDescriptor(
        deviceClass: .net, name: "stats", kind: .filter,
        summary: "Counts frames, bytes and drops each way; one line to the log, or to file, at close.",
        parameters: [
            DeviceParameter("file", "Write the line to this file when the device is closed (default: the log)."),
        ],
        open: { parameters, next throws(DeviceSpecError) in
            NetStatsFilter(next: next as! any NetDevice, reportPath: parameters.string("file"))
        })
}
