import Logging
import Observability

/// The daemon's messages through swift-log: one ``LineLogHandler`` line per event, at a level.
public enum DaemonLog {
    /// The daemon's logger, writing lines at `level` (nil: info) and above to `output` (stderr).
    public static func logger(level: Logger.Level?,
                              output: @escaping @Sendable (String) -> Void = LineLogHandler.standardError) -> Logger {
        Logger(label: "softdev") { _ in LineLogHandler(level: level ?? .info, output: output) }
    }

    /// What the daemon hands Core's xenbus host and the taps as their `log` closure: they still
    /// log plain strings, so the device a message is about (it starts with the backend path,
    /// `/local/domain/0/backend/softdev-vbd/3/51712: ...`) becomes metadata (`device`, `class`,
    /// `domain`), and the level is read from the words, as below.
    public static func messages(to logger: Logger) -> @Sendable (String) -> Void {
        { message in
            var text = Substring(message)
            var metadata: Logger.Metadata = [:]
            if message.hasPrefix("/local/domain/"), let colon = message.range(of: ": ") {
                let path = message[..<colon.lowerBound]
                metadata["device"] = "\(path)"
                // /local/domain/<backend>/backend/<type>/<guest>/<id>
                let parts = path.split(separator: "/")
                if parts.count >= 6, parts[3] == "backend" {
                    metadata["domain"] = "\(parts[5])"
                    if let c = DeviceClass.all.first(where: { $0.backendType == parts[4] }) { metadata["class"] = "\(c.name)" }
                }
                text = message[colon.upperBound...]
            }
            logger.log(level: level(of: text), "\(text)", metadata: metadata)
        }
    }

    /// A device that could not start or failed is an error; one that holds its teardown up is a
    /// warning; xenbus state steps (`InitWait -> Connected`) are debug; the rest (connected,
    /// disconnected, serving, unplugged, a guest gone) is what an operator follows: info.
    static func level(of text: Substring) -> Logger.Level {
        if text.hasPrefix("cannot ") || text.hasPrefix("error:") { return .error }
        if text.contains("still busy") || text.contains("tearing down on the watch thread") || text.hasPrefix("teardown ended after") {
            return .warning
        }
        if text.contains(" -> ") { return .debug }
        return .info
    }
}
