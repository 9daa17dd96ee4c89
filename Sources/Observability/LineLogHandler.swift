import Glibc
import Logging

/// swift-log's handler for the daemon: one line per event, as daemons log under a service
/// manager (which adds the date), in the shape the daemon always had with the level and the
/// metadata added:
///
/// ```text
/// softdev 14:05:01.123 info connected to domain 3: ring order 4, ... class=block device=/local/domain/0/backend/softdev-vbd/3/51712
/// ```
///
/// Metadata comes last as `key=value`, sorted by key, a value quoted when it holds a space, a
/// quote or an `=`, so that a line splits back into its fields. Each line is one write(2), so
/// lines from several threads never interleave.
public struct LineLogHandler: LogHandler {
    public var logLevel: Logger.Level
    public var metadata: Logger.Metadata = [:]
    public var metadataProvider: Logger.MetadataProvider?
    private let output: @Sendable (String) -> Void

    /// `output` gets each line without its newline; by default it goes to stderr.
    public init(level: Logger.Level = .info, output: @escaping @Sendable (String) -> Void = LineLogHandler.standardError) {
        logLevel = level; self.output = output
    }

    public subscript(metadataKey key: String) -> Logger.Metadata.Value? {
        get { metadata[key] }
        set { metadata[key] = newValue }
    }

    public func log(event: LogEvent) {
        var all = metadata
        if let provided = metadataProvider?.get() { all.merge(provided) { $1 } }
        if let given = event.metadata { all.merge(given) { $1 } }
        output(Self.line(level: event.level, message: event.message.description, metadata: all))
    }

    /// The line for one event, stamped now (UTC, to the millisecond).
    public static func line(level: Logger.Level, message: String, metadata: Logger.Metadata) -> String {
        var now = timespec()
        clock_gettime(CLOCK_REALTIME, &now)
        var tm = tm()
        var seconds = now.tv_sec
        gmtime_r(&seconds, &tm)
        func two(_ n: Int32) -> String { n < 10 ? "0\(n)" : "\(n)" }
        let ms = now.tv_nsec / 1_000_000
        let stamp = "\(two(tm.tm_hour)):\(two(tm.tm_min)):\(two(tm.tm_sec)).\(ms < 10 ? "00" : ms < 100 ? "0" : "")\(ms)"
        var line = "softdev \(stamp) \(level) \(message)"
        for (key, value) in metadata.sorted(by: { $0.key < $1.key }) {
            let text = "\(value)"
            let plain = !text.isEmpty && !text.contains(where: { $0 == " " || $0 == "\"" || $0 == "=" })
            line += " \(key)=" + (plain ? text : "\"" + text.replacingAll("\"", with: "\\\"") + "\"")
        }
        return line
    }

    /// Writes the line and its newline to stderr in one write(2).
    public static let standardError: @Sendable (String) -> Void = { line in
        var bytes = Array((line + "\n").utf8)
        var done = 0
        while done < bytes.count {
            let n = bytes.withUnsafeMutableBytes { write(2, $0.baseAddress! + done, $0.count - done) }
            if n < 0 && errno == EINTR { continue }
            guard n > 0 else { return }
            done += n
        }
    }
}

extension String {
    fileprivate func replacingAll(_ target: Character, with replacement: String) -> String {
        var out = ""
        for c in self { if c == target { out += replacement } else { out.append(c) } }
        return out
    }
}
