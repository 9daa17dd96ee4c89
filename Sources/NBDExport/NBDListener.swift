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
        var hints = addrinfo()
        hints.ai_socktype = Int32(SOCK_STREAM.rawValue)
        hints.ai_flags = AI_PASSIVE | AI_NUMERICSERV
        var list: UnsafeMutablePointer<addrinfo>?
        let rc = getaddrinfo(host, String(port), &hints, &list)
        guard rc == 0, let first = list else {
            throw NBDSystemError("resolve \(host): \(String(cString: gai_strerror(rc)))", errno: EINVAL)
        }
        defer { freeaddrinfo(list) }
        var last = NBDSystemError("listen tcp:\(host):\(port)", errno: EADDRNOTAVAIL)
        var ai: UnsafeMutablePointer<addrinfo>? = first
        while let a = ai {
            ai = a.pointee.ai_next
            let fd = socket(a.pointee.ai_family, a.pointee.ai_socktype | Int32(SOCK_CLOEXEC.rawValue), a.pointee.ai_protocol)
            if fd < 0 { last = NBDSystemError("socket"); continue }
            var one: Int32 = 1
            setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, socklen_t(MemoryLayout<Int32>.size))
            if bind(fd, a.pointee.ai_addr, a.pointee.ai_addrlen) == 0 && listen(fd, 128) == 0 { return fd }
            last = NBDSystemError("listen tcp:\(host):\(port)")
            Glibc.close(fd)
        }
        throw last
    }

    /// The port a TCP listener got (for port 0 in tests).
    static func boundPort(_ fd: Int32) -> UInt16? {
        var ss = sockaddr_storage()
        var len = socklen_t(MemoryLayout<sockaddr_storage>.size)
        let ok = withUnsafeMutablePointer(to: &ss) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(fd, $0, &len) }
        }
        guard ok == 0 else { return nil }
        switch Int32(ss.ss_family) {
        case AF_INET: return withUnsafePointer(to: &ss) { $0.withMemoryRebound(to: sockaddr_in.self, capacity: 1) { UInt16(bigEndian: $0.pointee.sin_port) } }
        case AF_INET6: return withUnsafePointer(to: &ss) { $0.withMemoryRebound(to: sockaddr_in6.self, capacity: 1) { UInt16(bigEndian: $0.pointee.sin6_port) } }
        default: return nil
        }
    }
}
