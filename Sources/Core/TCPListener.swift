import Glibc

/// Why a TCP listening socket could not be made: what failed, and its errno (0 for a name that
/// does not resolve, whose reason is in `message`).
public struct TCPListenError: Error, CustomStringConvertible {
    public let message: String
    public let errno: Int32
    public var description: String { message }
}

/// A listening TCP socket on `host:port` (the first address of `host` that binds), for the NBD
/// export and the metrics endpoint; and the port the kernel gave to port 0.
public enum TCPListener {
    public static func open(host: String, port: UInt16, backlog: Int32 = 128) throws(TCPListenError) -> Int32 {
        var hints = addrinfo()
        hints.ai_socktype = Int32(SOCK_STREAM.rawValue)
        hints.ai_flags = AI_PASSIVE | AI_NUMERICSERV
        var list: UnsafeMutablePointer<addrinfo>?
        let rc = getaddrinfo(host, String(port), &hints, &list)
        guard rc == 0, let first = list else {
            throw TCPListenError(message: "cannot resolve \(host): \(String(cString: gai_strerror(rc)))", errno: 0)
        }
        defer { freeaddrinfo(list) }
        var failure = EADDRNOTAVAIL
        for a in sequence(first: first, next: { $0.pointee.ai_next }) {
            let fd = socket(a.pointee.ai_family, a.pointee.ai_socktype | Int32(SOCK_CLOEXEC.rawValue), a.pointee.ai_protocol)
            guard fd >= 0 else { failure = Glibc.errno; continue }
            var one: Int32 = 1
            setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, socklen_t(MemoryLayout<Int32>.size))
            if bind(fd, a.pointee.ai_addr, a.pointee.ai_addrlen) == 0 && listen(fd, backlog) == 0 { return fd }
            failure = Glibc.errno
            close(fd)
        }
        throw TCPListenError(message: "cannot listen on \(host):\(port): \(String(cString: strerror(failure)))", errno: failure)
    }

    /// The port a listening socket is bound to (IPv4 or IPv6), e.g. the one port 0 got.
    public static func boundPort(_ fd: Int32) -> UInt16? {
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
