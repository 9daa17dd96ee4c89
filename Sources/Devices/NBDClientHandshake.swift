import Core
import Glibc
import NBDWire

/// Opening a connection for the `nbd` device: the socket (unix or TCP), then the client side of
/// the fixed newstyle handshake: structured replies and base:allocation if the server has them,
/// then NBD_OPT_GO (NBD_OPT_EXPORT_NAME for a server without it). Errors name the server and
/// say what failed.
struct NBDClientHandshake {
    /// What the handshake learned about the export.
    struct ExportInfo {
        var size: UInt64 = 0
        var flags: UInt16 = 0
        var minimumBlock: UInt32 = 1
        var preferredBlock: UInt32 = 4096
        var maxPayload: UInt32 = NBD.maxPayload
        var structuredReplies = false
        /// The id the server gave base:allocation, if it serves it.
        var baseAllocation: UInt32?
    }

    /// A connected stream socket to `address`.
    static func connect(_ address: NBDDevice.Address, label: String) throws(BlockError) -> Int32 {
        switch address {
        case .unix(let path):
            guard path.utf8.count <= UnixSocketAddress.maxPathBytes else {
                throw BlockError(.invalid, "\(label): the socket path is longer than \(UnixSocketAddress.maxPathBytes) bytes")
            }
            let fd = Glibc.socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
            guard fd >= 0 else { throw BlockError.system("\(label): socket", errno: errno) }
            let ok = UnixSocketAddress.with(path) { Glibc.connect(fd, $0, $1) }
            guard ok == 0 else { let e = errno; Glibc.close(fd); throw BlockError.system("\(label): cannot connect", errno: e) }
            return fd
        case .tcp(let host, let port):
            var hints = addrinfo()
            hints.ai_socktype = Int32(SOCK_STREAM.rawValue)
            hints.ai_flags = AI_NUMERICSERV
            var list: UnsafeMutablePointer<addrinfo>?
            let rc = getaddrinfo(host, String(port), &hints, &list)
            guard rc == 0 else {
                throw BlockError(.io, "\(label): cannot resolve \(host): \(String(cString: gai_strerror(rc)))")
            }
            defer { freeaddrinfo(list) }
            var lastError = ECONNREFUSED
            var ai = list
            while let a = ai {
                ai = a.pointee.ai_next
                let fd = Glibc.socket(a.pointee.ai_family, a.pointee.ai_socktype | Int32(SOCK_CLOEXEC.rawValue), a.pointee.ai_protocol)
                guard fd >= 0 else { lastError = errno; continue }
                if Glibc.connect(fd, a.pointee.ai_addr, a.pointee.ai_addrlen) == 0 {
                    // Requests are whole messages already; Nagle would only delay them.
                    var one: Int32 = 1
                    setsockopt(fd, Int32(IPPROTO_TCP), TCP_NODELAY, &one, socklen_t(MemoryLayout<Int32>.size))
                    return fd
                }
                lastError = errno
                Glibc.close(fd)
            }
            throw BlockError.system("\(label): cannot connect", errno: lastError)
        }
    }

    let socket: NBDSocket
    let label: String

    func fail(_ what: String) -> BlockError { BlockError(.io, "\(label): handshake: \(what)") }

    func read(_ count: Int) throws(BlockError) -> [UInt8] {
        var bytes = [UInt8](repeating: 0, count: count)
        guard count == 0 || bytes.withUnsafeMutableBytes({ socket.readFully($0.baseAddress!, count) }) else {
            throw fail("the server closed the connection")
        }
        return bytes
    }

    func send(_ message: NBDMessage) throws(BlockError) {
        guard socket.writeFully(message.bytes) else { throw fail("the server closed the connection") }
    }

    func sendOption(_ option: NBD.Option, _ data: [UInt8]) throws(BlockError) {
        var m = NBDMessage()
        m.append(NBD.optionMagic)
        m.append(option.rawValue)
        m.append(UInt32(data.count))
        m.bytes += data
        try send(m)
    }

    func run(export: String) throws(BlockError) -> ExportInfo {
        // A server that accepts and says nothing must not hold `open` for ever.
        var timeout = timeval(tv_sec: 30, tv_usec: 0)
        setsockopt(socket.fd, SOL_SOCKET, SO_RCVTIMEO, &timeout, socklen_t(MemoryLayout<timeval>.size))
        defer {
            var none = timeval()
            setsockopt(socket.fd, SOL_SOCKET, SO_RCVTIMEO, &none, socklen_t(MemoryLayout<timeval>.size))
        }
        var greeting = NBDPayloadReader(try read(18))
        let magic = UInt64(greeting.u32()!) << 32 | UInt64(greeting.u32()!)
        guard magic == NBD.initMagic else { throw fail("not an NBD server (no NBDMAGIC)") }
        let optionMagic = UInt64(greeting.u32()!) << 32 | UInt64(greeting.u32()!)
        let serverFlags = greeting.u16()!
        guard optionMagic == NBD.optionMagic, serverFlags & NBD.flagFixedNewstyle != 0 else {
            throw fail("the server does not speak the fixed newstyle protocol")
        }
        let noZeroes = serverFlags & NBD.flagNoZeroes != 0
        var flags = NBDMessage()
        flags.append(UInt32(NBD.flagFixedNewstyle | (noZeroes ? NBD.flagNoZeroes : 0)))
        try send(flags)

        var info = ExportInfo()
        info.structuredReplies = try negotiate(.structuredReply, [])
        if info.structuredReplies {
            var query = NBDMessage()
            query.append(UInt32(export.utf8.count))
            query.append(export)
            query.append(UInt32(1))
            query.append(UInt32(NBD.baseAllocation.utf8.count))
            query.append(NBD.baseAllocation)
            _ = try negotiate(.setMetaContext, query.bytes) { type, payload in
                guard type == NBD.repMetaContext, let id = payload.u32(), payload.string(payload.remaining) == NBD.baseAllocation else {
                    return
                }
                info.baseAllocation = id
            }
        }

        var go = NBDMessage()
        go.append(UInt32(export.utf8.count))
        go.append(export)
        go.append(UInt16(1))
        go.append(NBD.infoBlockSize)
        try sendOption(.go, go.bytes)
        var haveExport = false
        while true {
            let (type, data) = try reply(to: .go)
            var payload = NBDPayloadReader(data)
            switch type {
            case NBD.repAck:
                guard haveExport else { throw fail("the server acknowledged NBD_OPT_GO without the export's size") }
                return info
            case NBD.repInfo:
                switch payload.u16() {
                case NBD.infoExport?:
                    guard let hi = payload.u32(), let lo = payload.u32(), let f = payload.u16() else { throw fail("short NBD_INFO_EXPORT") }
                    info.size = UInt64(hi) << 32 | UInt64(lo)
                    info.flags = f
                    haveExport = true
                case NBD.infoBlockSize?:
                    guard let minimum = payload.u32(), let preferred = payload.u32(), let maximum = payload.u32() else {
                        throw fail("short NBD_INFO_BLOCK_SIZE")
                    }
                    info.minimumBlock = minimum
                    info.preferredBlock = preferred
                    info.maxPayload = max(4096, min(maximum, NBD.maxPayload))
                default: break  // information we did not ask for
                }
            case NBD.repErrUnsup:
                return try exportName(export, noZeroes: noZeroes)
            case _ where type & 0x8000_0000 != 0:
                let message = String(decoding: data, as: UTF8.self)
                let reason = type == NBD.repErrUnknown ? "unknown export '\(export)'" : "the server refused export '\(export)'"
                throw BlockError(.io, "\(label): \(reason)" + (message.isEmpty ? "" : ": \(message)"))
            default: break
            }
        }
    }

    /// One option reply to `option`: its type and payload.
    func reply(to option: NBD.Option) throws(BlockError) -> (UInt32, [UInt8]) {
        var header = NBDPayloadReader(try read(20))
        let replyMagic = UInt64(header.u32()!) << 32 | UInt64(header.u32()!)
        let answered = header.u32()!, type = header.u32()!, length = header.u32()!
        guard replyMagic == NBD.optionReplyMagic, answered == option.rawValue, length <= NBD.maxOptionLength else {
            throw fail("malformed reply to option \(option)")
        }
        return (type, try read(Int(length)))
    }

    /// Sends an option whose replies end with an ACK (true) or an error (false, the
    /// server does not do it); `each` sees the replies before the ACK.
    func negotiate(_ option: NBD.Option, _ data: [UInt8],
                   _ each: (UInt32, inout NBDPayloadReader) -> Void = { _, _ in }) throws(BlockError) -> Bool {
        try sendOption(option, data)
        while true {
            let (type, data) = try reply(to: option)
            if type == NBD.repAck { return true }
            if type & 0x8000_0000 != 0 { return false }
            var payload = NBDPayloadReader(data)
            each(type, &payload)
        }
    }

    /// The old way to pick an export, for servers without NBD_OPT_GO.
    func exportName(_ export: String, noZeroes: Bool) throws(BlockError) -> ExportInfo {
        try sendOption(.exportName, Array(export.utf8))
        var reply = NBDPayloadReader(try read(10))
        _ = try read(noZeroes ? 0 : 124)
        var info = ExportInfo()
        info.size = UInt64(reply.u32()!) << 32 | UInt64(reply.u32()!)
        info.flags = reply.u16()!
        return info
    }
}
