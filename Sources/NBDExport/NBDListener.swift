import Core
import Glibc

/// A failed system call in the NBD export, with the errno it failed with.
public struct NBDSystemError: Error, CustomStringConvertible {
    public let operation: String
    public let errno: Int32
    init(_ operation: String, errno e: Int32 = Glibc.errno) { self.operation = operation; self.errno = e }
    public var description: String { "\(operation): \(String(cString: strerror(errno)))" }
}

/// A listening socket for an `NBDListenAddress`.
enum NBDListener {
    static func open(_ address: NBDListenAddress) throws(NBDSystemError) -> Int32 {
        switch address {
        case .unix(let path): return try openUnix(path)
        case .tcp(let host, let port): return try openTCP(host, port)
        }
    }

    /// Removes a socket left by a server that is gone (nobody answers there: ECONNREFUSED);
    /// refuses to touch a live server's socket or anything that is not a socket.
    private static func removeStale(_ path: String) throws(NBDSystemError) {
        var st = stat()
        guard lstat(path, &st) == 0 else { return }
        guard st.st_mode & S_IFMT == S_IFSOCK else { throw NBDSystemError("\(path) exists and is not a socket", errno: EEXIST) }
        let probe = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard probe >= 0 else { throw NBDSystemError("socket(AF_UNIX)") }
        defer { Glibc.close(probe) }
        let rc = UnixSocketAddress.with(path) { connect(probe, $0, $1) }
        if rc == 0 { throw NBDSystemError("\(path): another server is listening there", errno: EADDRINUSE) }
        guard errno == ECONNREFUSED else { throw NBDSystemError("\(path) exists and cannot be probed") }
        unlink(path)
    }

    private static func openUnix(_ path: String) throws(NBDSystemError) -> Int32 {
        // A stale socket from an earlier run would make bind fail.
        try removeStale(path)
        let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { throw NBDSystemError("socket(AF_UNIX)") }
        let ok = UnixSocketAddress.with(path) { bind(fd, $0, $1) }
        guard ok == 0 else { let e = NBDSystemError("bind \(path)"); Glibc.close(fd); throw e }
        // 0600 before listen(): nobody can connect between bind and chmod.
        guard chmod(path, 0o600) == 0, listen(fd, 128) == 0 else {
            let e = NBDSystemError("listen \(path)"); Glibc.close(fd); throw e
        }
        return fd
    }

    private static func openTCP(_ host: String, _ port: UInt16) throws(NBDSystemError) -> Int32 {
        do { return try TCPListener.open(host: host, port: port) } catch {
            throw error.errno == 0 ? NBDSystemError(error.message, errno: EINVAL) : NBDSystemError("listen tcp:\(host):\(port)", errno: error.errno)
        }
    }
}
