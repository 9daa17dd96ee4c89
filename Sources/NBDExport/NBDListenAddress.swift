import Core
import Glibc

/// Where an `NBDServer` listens: a unix socket (the default, mode 0600) or a TCP address.
///
/// ```swift
/// let a = try NBDListenAddress.parse("unix:/run/softdev/disk.sock")
/// let b = try NBDListenAddress.parse("tcp:127.0.0.1:10809")
/// let c = try NBDListenAddress.parse("tcp:[::1]:10809")
/// ```
public enum NBDListenAddress: Equatable, Sendable, CustomStringConvertible {
    case unix(path: String)
    case tcp(host: String, port: UInt16)

    /// The port NBD servers use by default (IANA).
    public static let defaultPort: UInt16 = 10809

    /// Parses `unix:PATH`, `tcp:HOST:PORT`, `tcp:[IPv6]:PORT` or `tcp:HOST` (port 10809).
    /// A bare path starting with `/` or `.` is taken as a unix socket; port 0 picks a free port.
    public static func parse(_ text: String) throws(NBDAddressError) -> NBDListenAddress {
        if text.hasPrefix("unix:") {
            let path = String(text.dropFirst(5))
            guard !path.isEmpty else { throw NBDAddressError(text, "the unix socket path is empty") }
            guard path.utf8.count <= UnixSocketAddress.maxPathBytes else {
                throw NBDAddressError(text, "the unix socket path is longer than \(UnixSocketAddress.maxPathBytes) bytes")
            }
            return .unix(path: path)
        }
        if text.hasPrefix("/") || text.hasPrefix(".") { return try parse("unix:" + text) }
        guard text.hasPrefix("tcp:") else {
            throw NBDAddressError(text, "expected unix:PATH or tcp:HOST:PORT")
        }
        let rest = Substring(text.dropFirst(4))
        var host: Substring
        var port: Substring?
        if rest.hasPrefix("[") {
            guard let close = rest.firstIndex(of: "]") else { throw NBDAddressError(text, "missing ] after the IPv6 address") }
            host = rest[rest.index(after: rest.startIndex)..<close]
            let after = rest[rest.index(after: close)...]
            if !after.isEmpty {
                guard after.hasPrefix(":") else { throw NBDAddressError(text, "expected :PORT after ]") }
                port = after.dropFirst()
            }
        } else if let colon = rest.lastIndex(of: ":") {
            host = rest[..<colon]
            port = rest[rest.index(after: colon)...]
            guard !host.contains(":") else { throw NBDAddressError(text, "write an IPv6 address in brackets: tcp:[::1]:10809") }
        } else {
            host = rest
        }
        guard !host.isEmpty else { throw NBDAddressError(text, "the host is empty") }
        var number = defaultPort
        if let port {
            // Port 0 asks the kernel for a free port; `NBDServer.boundPort` tells which.
            guard let p = UInt16(port) else {
                throw NBDAddressError(text, "the port '\(port)' is not a number from 0 to 65535")
            }
            number = p
        }
        return .tcp(host: String(host), port: number)
    }

    public var description: String {
        switch self {
        case .unix(let path): return "unix:\(path)"
        case .tcp(let host, let port): return host.contains(":") ? "tcp:[\(host)]:\(port)" : "tcp:\(host):\(port)"
        }
    }
}

/// A listen address that cannot be parsed, with what was wrong.
public struct NBDAddressError: Error, Equatable, CustomStringConvertible {
    public let text: String
    public let reason: String
    init(_ text: String, _ reason: String) { self.text = text; self.reason = reason }
    public var description: String { "invalid NBD address '\(text)': \(reason)" }
}
