import Glibc

/// The control socket's address and system calls, in one place for the broker and its clients.
enum LocalControlSocket {
    /// A SOCK_SEQPACKET socket (message boundaries keep each control message whole) with
    /// `call(fd, address, length)` applied to `path`: connect for clients, bind for the broker.
    static func open(_ path: String, _ call: (Int32, UnsafePointer<sockaddr>, socklen_t) -> Int32) -> (fd: Int32, errno: Int32) {
        let s = socket(AF_UNIX, Int32(SOCK_SEQPACKET.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard s >= 0 else { return (-1, errno) }
        let r = UnixSocketAddress.with(path) { call(s, $0, $1) }
        guard r == 0 else { let e = errno; Glibc.close(s); return (-1, e) }
        return (s, 0)
    }
}
