import Glibc

/// A unix socket path as the `sockaddr` that bind and connect take, built in one place for
/// the local hypervisor's control socket, the NBD export's listener and the `nbd` device.
public enum UnixSocketAddress {
    /// `sun_path` holds 108 bytes including the terminating NUL.
    public static let maxPathBytes = 107

    /// Calls `body` with `path` as a `sockaddr_un` and its length. A longer path is cut to
    /// `maxPathBytes`: callers that take paths from users check them first.
    public static func with<T>(_ path: String, _ body: (UnsafePointer<sockaddr>, socklen_t) throws -> T) rethrows -> T {
        var addr = sockaddr_un()
        addr.sun_family = sa_family_t(AF_UNIX)
        withUnsafeMutableBytes(of: &addr.sun_path) { $0.copyBytes(from: path.utf8.prefix(maxPathBytes)) }
        return try withUnsafePointer(to: &addr) {
            try $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { try body($0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
        }
    }
}
