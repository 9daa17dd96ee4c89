import Logging
import NBDExport

/// Where `[metrics] listen` (or `--metrics`) puts the Prometheus endpoint: a TCP address with
/// its port always written, since no port is the metrics port by convention.
public struct MetricsListenAddress: Sendable, Equatable, CustomStringConvertible {
    public var host: String
    /// 0: the kernel picks one (tests).
    public var port: UInt16

    public init(host: String, port: UInt16) { self.host = host; self.port = port }

    /// Parses `HOST:PORT` or `[IPv6]:PORT`; `place` names the key in the error.
    public static func parse(_ text: String, place: String) throws(ServeConfigError) -> MetricsListenAddress {
        let wrong = ServeConfigError("\(place) = \"\(text)\": expected HOST:PORT, e.g. \"127.0.0.1:9464\" (a TCP address; the port is required)")
        // The NBD export's TCP addresses are written the same way after their `tcp:`.
        guard !text.hasPrefix("tcp:"), !text.hasPrefix("unix:"),
              case .tcp(let host, let port)? = try? NBDListenAddress.parse("tcp:" + text),
              text.hasSuffix(":\(port)") else { throw wrong }
        return MetricsListenAddress(host: host, port: port)
    }

    public var description: String { host.contains(":") ? "[\(host)]:\(port)" : "\(host):\(port)" }
}

extension ServeConfig {
    /// The levels `log-level` and `--log-level` take, least severe first.
    public static let logLevels = Logger.Level.allCases.map(\.rawValue)

    /// Parses a log level; `place` names the key or option in the error.
    public static func parseLogLevel(_ text: String, place: String) throws(ServeConfigError) -> Logger.Level {
        guard let level = Logger.Level(rawValue: text) else {
            throw ServeConfigError("\(place) = \"\(text)\": use one of \(logLevels.joined(separator: ", "))")
        }
        return level
    }
}
