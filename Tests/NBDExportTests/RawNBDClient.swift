import Core
import Foundation
import Glibc
@testable import NBDExport
import NBDWire

/// A deliberately naive NBD client that sends exactly the bytes a test asks for, including
/// what a well-behaved client never would (writes to a read-only export, garbage, bad options).
final class RawNBDClient {
    let fd: Int32

    init(socketPath: String) throws {
        fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0)
        var addr = sockaddr_un()
        addr.sun_family = sa_family_t(AF_UNIX)
        withUnsafeMutableBytes(of: &addr.sun_path) { $0.copyBytes(from: Array(socketPath.utf8)) }
        let rc = withUnsafePointer(to: &addr) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
        }
        guard rc == 0 else { throw POSIXError(POSIXErrorCode(rawValue: errno)!) }
        // A test must fail, not hang, if the server stops answering.
        var tv = timeval(tv_sec: 10, tv_usec: 0)
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
    }
    deinit { close(fd) }

    func send(_ bytes: [UInt8]) {
        _ = bytes.withUnsafeBytes { Glibc.send(fd, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL)) }
    }

    /// Exactly `n` bytes, or nil if the server closed the connection.
    func receive(_ n: Int) -> [UInt8]? {
        var b = [UInt8](repeating: 0, count: n)
        let ok = b.withUnsafeMutableBytes { NBDSocket(fd: fd).readFully($0.baseAddress!, n) }
        return ok ? b : nil
    }

    /// True if the server has closed the connection (EOF or reset, not the receive timeout).
    func isClosedByServer() -> Bool {
        var byte: UInt8 = 0
        let n = recv(fd, &byte, 1, 0)
        return n == 0 || (n < 0 && errno != EAGAIN && errno != EWOULDBLOCK)
    }

    static func be(_ b: [UInt8], _ at: Int, _ n: Int) -> UInt64 { b[at..<at + n].reduce(0) { $0 << 8 | UInt64($1) } }

    /// The greeting, and our flags (fixed newstyle, no zeroes).
    func greet() -> UInt16? {
        guard let g = receive(18) else { return nil }
        send([0, 0, 0, 3])
        return UInt16(Self.be(g, 16, 2))
    }

    /// Sends one option and collects the replies up to ACK or the first error: (type, payload).
    func option(_ code: UInt32, _ data: [UInt8]) -> [(UInt32, [UInt8])] {
        var m = NBDMessage()
        m.append(NBD.optionMagic); m.append(code); m.append(UInt32(data.count)); m.bytes += data
        send(m.bytes)
        var replies: [(UInt32, [UInt8])] = []
        while let h = receive(20) {
            let type = UInt32(Self.be(h, 12, 4)), length = Int(Self.be(h, 16, 4))
            let payload = length > 0 ? (receive(length) ?? []) : []
            replies.append((type, payload))
            if type == NBD.repAck || type & 0x8000_0000 != 0 { break }
        }
        return replies
    }

    static func goPayload(_ name: String) -> [UInt8] {
        var m = NBDMessage()
        m.append(UInt32(name.utf8.count)); m.append(name); m.append(UInt16(0))
        return m.bytes
    }

    /// Greets and enters transmission on `export`; returns the transmission flags.
    func go(_ export: String) -> UInt16? {
        guard greet() != nil else { return nil }
        let replies = option(NBD.Option.go.rawValue, Self.goPayload(export))
        guard replies.last?.0 == NBD.repAck,
              let info = replies.first(where: { $0.0 == NBD.repInfo && Self.be($0.1, 0, 2) == 0 }) else { return nil }
        return UInt16(Self.be(info.1, 10, 2))
    }

    func request(_ command: UInt16, flags: UInt16 = 0, cookie: UInt64, offset: UInt64, length: UInt32, payload: [UInt8] = []) {
        var m = NBDMessage()
        m.append(NBD.requestMagic); m.append(flags); m.append(command); m.append(cookie); m.append(offset); m.append(length)
        send(m.bytes + payload)
    }

    /// A simple reply: (error, cookie), then `dataLength` bytes of data if it succeeded.
    func simpleReply(dataLength: Int = 0) -> (error: UInt32, cookie: UInt64, data: [UInt8])? {
        guard let h = receive(16), Self.be(h, 0, 4) == UInt64(NBD.simpleReplyMagic) else { return nil }
        let error = UInt32(Self.be(h, 4, 4))
        let data = error == 0 && dataLength > 0 ? (receive(dataLength) ?? []) : []
        return (error, Self.be(h, 8, 8), data)
    }
}
