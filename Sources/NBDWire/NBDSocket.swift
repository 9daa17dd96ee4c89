import Glibc

/// A connected stream socket, used by the NBD export (one per client) and by the `nbd` device
/// (its connection to a server). Every system call on such a socket is wrapped here, once.
/// `send` uses MSG_NOSIGNAL because a client that went away must cost us an EPIPE, not the
/// process (SIGPIPE).
public struct NBDSocket: Sendable {
    public let fd: Int32
    public init(fd: Int32) { self.fd = fd }

    /// Reads exactly `count` bytes; false on EOF or error.
    public func readFully(_ p: UnsafeMutableRawPointer, _ count: Int) -> Bool {
        var done = 0
        while done < count {
            let n = recv(fd, p + done, count - done, 0)
            if n > 0 { done += n; continue }
            if n < 0 && errno == EINTR { continue }
            return false
        }
        return true
    }

    /// Reads what is available, at most `count`, blocking only if nothing is; 0 on EOF or error.
    public func readSome(_ p: UnsafeMutableRawPointer, _ count: Int) -> Int {
        while true {
            let n = recv(fd, p, count, 0)
            if n >= 0 { return n }
            if errno != EINTR { return 0 }
        }
    }

    /// Reads what is available without blocking: the byte count, 0 on EOF or error, nil if
    /// nothing has arrived yet.
    public func readNow(_ p: UnsafeMutableRawPointer, _ count: Int) -> Int? {
        while true {
            let n = recv(fd, p, count, Int32(MSG_DONTWAIT))
            if n >= 0 { return n }
            if errno == EINTR { continue }
            return errno == EAGAIN || errno == EWOULDBLOCK ? nil : 0
        }
    }

    /// Writes every byte of the vectors; false if the peer is gone. `vectors` is consumed.
    public func writeFully(_ vectors: UnsafeMutablePointer<iovec>, count: Int) -> Bool {
        var v = vectors
        var left = count
        while left > 0 {
            var msg = msghdr()
            msg.msg_iov = v
            msg.msg_iovlen = left
            var n = sendmsg(fd, &msg, Int32(MSG_NOSIGNAL))
            if n < 0 {
                if errno == EINTR { continue }
                return false
            }
            // Skip what was written: whole vectors, then into the first partial one.
            while left > 0 && n >= v.pointee.iov_len {
                n -= v.pointee.iov_len
                v += 1
                left -= 1
            }
            if left > 0 && n > 0 {
                v.pointee.iov_base += n
                v.pointee.iov_len -= n
            }
        }
        return true
    }

    public func writeFully(_ bytes: [UInt8]) -> Bool {
        var copy = bytes
        return copy.withUnsafeMutableBytes { b in
            var v = iovec(iov_base: b.baseAddress, iov_len: b.count)
            return writeFully(&v, count: 1)
        }
    }

    /// Wakes a thread blocked reading this socket without freeing the descriptor number, so
    /// that no late completion can write into a socket opened later under the same number.
    public func shutdown() { _ = Glibc.shutdown(fd, Int32(SHUT_RDWR)) }
    public func close() { _ = Glibc.close(fd) }
}
