import Core
import Glibc
import NBDWire

/// What a client and the server agreed on in the handshake.
struct NBDSession {
    var export: NBDExport
    var structuredReplies: Bool
    /// The client selected base:allocation with OPT_SET_META_CONTEXT for this export.
    var baseAllocation: Bool
    /// The client learned the minimum block size (NBD_INFO_BLOCK_SIZE) and agreed to it.
    var enforceBlockSize: Bool
}

/// The fixed newstyle handshake as qemu-nbd and nbdkit speak it: the server's greeting, the
/// client's flags, then options until OPT_GO or OPT_EXPORT_NAME picks an export (or the
/// client aborts). Each malformed option gets an error reply; the connection survives it.
struct NBDNegotiation {
    let socket: NBDSocket
    let exports: [NBDExport]
    private var noZeroes = false
    private var structured = false
    /// The export the meta context was set for, and whether base:allocation was selected.
    private var metaExport: String?
    private var metaBaseAllocation = false

    init(socket: NBDSocket, exports: [NBDExport]) { self.socket = socket; self.exports = exports }

    private enum Failure: Error { case disconnect }

    /// Runs the handshake; nil if the client went away, aborted or broke the protocol.
    mutating func run() -> NBDSession? {
        do { return try negotiate() } catch { return nil }
    }

    private mutating func negotiate() throws(Failure) -> NBDSession {
        var greeting = NBDMessage()
        greeting.append(NBD.initMagic)
        greeting.append(NBD.optionMagic)
        greeting.append(NBD.flagFixedNewstyle | NBD.flagNoZeroes)
        try send(greeting)

        var clientFlags: UInt32 = 0
        guard socket.readFully(&clientFlags, 4) else { throw .disconnect }
        clientFlags = UInt32(bigEndian: clientFlags)
        // Unknown client flags mean a client we do not understand: the spec says close.
        guard clientFlags & ~UInt32(NBD.flagFixedNewstyle | NBD.flagNoZeroes) == 0 else { throw .disconnect }
        noZeroes = clientFlags & UInt32(NBD.flagNoZeroes) != 0

        while true {
            var header = [UInt8](repeating: 0, count: 16)
            guard header.withUnsafeMutableBytes({ socket.readFully($0.baseAddress!, 16) }) else { throw .disconnect }
            let (magic, option, length) = header.withUnsafeBytes {
                ($0.baseAddress!.loadBE(UInt64.self, at: 0), $0.baseAddress!.loadBE(UInt32.self, at: 8),
                 $0.baseAddress!.loadBE(UInt32.self, at: 12))
            }
            guard magic == NBD.optionMagic, length <= NBD.maxOptionLength else { throw .disconnect }
            var data = [UInt8](repeating: 0, count: Int(length))
            if length > 0 {
                guard data.withUnsafeMutableBytes({ socket.readFully($0.baseAddress!, Int(length)) }) else { throw .disconnect }
            }
            if let session = try handle(option, data) { return session }
        }
    }

    /// One option; a session when the client is done negotiating.
    private mutating func handle(_ code: UInt32, _ data: [UInt8]) throws(Failure) -> NBDSession? {
        guard let option = NBD.Option(rawValue: code) else {
            try reply(code, NBD.repErrUnsup, message: "option \(code) is not supported")
            return nil
        }
        switch option {
        case .exportName:
            // No way to say "unknown export" here but to hang up (the old way, kept for old clients).
            let name = String(decoding: data, as: UTF8.self)
            guard let export = find(name) else { throw .disconnect }
            var m = NBDMessage()
            m.append(export.device.geometry.size)
            m.append(export.transmissionFlags)
            if !noZeroes { m.bytes += [UInt8](repeating: 0, count: 124) }
            try send(m)
            return session(export, enforce: false)

        case .abort:
            // The client may already be gone; the reply is a courtesy.
            _ = try? reply(code, NBD.repAck)
            throw .disconnect

        case .list:
            guard data.isEmpty else { return try invalid(code, "OPT_LIST takes no data") }
            for export in exports {
                var m = NBDMessage()
                m.append(UInt32(export.name.utf8.count))
                m.append(export.name)
                m.append(export.description)
                try reply(code, NBD.repServer, m.bytes)
            }
            try reply(code, NBD.repAck)
            return nil

        case .structuredReply:
            guard data.isEmpty else { return try invalid(code, "OPT_STRUCTURED_REPLY takes no data") }
            structured = true
            try reply(code, NBD.repAck)
            return nil

        case .info, .go:
            var r = NBDPayloadReader(data)
            guard let nameLength = r.u32(), let name = r.string(Int(nameLength)), let count = r.u16(),
                  r.remaining == Int(count) * 2 else {
                return try invalid(code, "malformed OPT_INFO/OPT_GO")
            }
            var requests: [UInt16] = []
            for _ in 0..<count { requests.append(r.u16()!) }
            guard let export = find(name) else {
                try reply(code, NBD.repErrUnknown, message: "no export named '\(name)'")
                return nil
            }
            try sendInfo(code, export, requests: requests)
            try reply(code, NBD.repAck)
            guard option == .go else { return nil }
            return session(export, enforce: export.enforceDeviceBlockSize && requests.contains(NBD.infoBlockSize))

        case .listMetaContext, .setMetaContext:
            try metaContext(option, data)
            return nil

        case .peekExport, .startTLS, .extendedHeaders:
            try reply(code, NBD.repErrUnsup, message: "\(option) is not supported")
            return nil
        }
    }

    private func session(_ export: NBDExport, enforce: Bool) -> NBDSession {
        NBDSession(export: export, structuredReplies: structured,
                   baseAllocation: structured && metaBaseAllocation && metaExport == export.name,
                   enforceBlockSize: enforce)
    }

    /// The empty name is the default export, the first one.
    private func find(_ name: String) -> NBDExport? {
        name.isEmpty ? exports.first : exports.first { $0.name == name }
    }

    private func sendInfo(_ code: UInt32, _ export: NBDExport, requests: [UInt16]) throws(Failure) {
        var m = NBDMessage()
        m.append(NBD.infoExport)
        m.append(export.device.geometry.size)
        m.append(export.transmissionFlags)
        try reply(code, NBD.repInfo, m.bytes)
        if requests.contains(NBD.infoName) {
            m = NBDMessage(); m.append(NBD.infoName); m.append(export.name)
            try reply(code, NBD.repInfo, m.bytes)
        }
        if requests.contains(NBD.infoDescription) && !export.description.isEmpty {
            m = NBDMessage(); m.append(NBD.infoDescription); m.append(export.description)
            try reply(code, NBD.repInfo, m.bytes)
        }
        // Sent even when not asked: a client that ignores it loses nothing, and the minimum
        // we enforce only applies to clients that asked.
        let enforce = export.enforceDeviceBlockSize && requests.contains(NBD.infoBlockSize)
        let (minimum, preferred, maximum) = export.blockSizes(enforced: enforce)
        m = NBDMessage(); m.append(NBD.infoBlockSize); m.append(minimum); m.append(preferred); m.append(maximum)
        try reply(code, NBD.repInfo, m.bytes)
    }

    /// OPT_LIST_META_CONTEXT and OPT_SET_META_CONTEXT: we know one context, base:allocation.
    private mutating func metaContext(_ option: NBD.Option, _ data: [UInt8]) throws(Failure) {
        let code = option.rawValue
        guard structured || option == .listMetaContext else {
            _ = try invalid(code, "negotiate structured replies before meta contexts"); return
        }
        var r = NBDPayloadReader(data)
        guard let nameLength = r.u32(), let name = r.string(Int(nameLength)), let count = r.u32() else {
            _ = try invalid(code, "malformed meta context option"); return
        }
        var queries: [String] = []
        for _ in 0..<count {
            guard let l = r.u32(), let q = r.string(Int(l)) else { _ = try invalid(code, "malformed meta context query"); return }
            queries.append(q)
        }
        guard r.remaining == 0 else { _ = try invalid(code, "trailing bytes in meta context option"); return }
        guard let export = find(name) else {
            try reply(code, NBD.repErrUnknown, message: "no export named '\(name)'"); return
        }
        // LIST with no queries, or with the namespace "base:", lists everything we have.
        let selected: Bool
        if option == .listMetaContext {
            selected = queries.isEmpty || queries.contains { $0 == "base:" || $0 == NBD.baseAllocation }
        } else {
            selected = queries.contains(NBD.baseAllocation)
            metaExport = export.name
            metaBaseAllocation = selected
        }
        if selected {
            var m = NBDMessage()
            m.append(NBD.baseAllocationID)
            m.append(NBD.baseAllocation)
            try reply(code, NBD.repMetaContext, m.bytes)
        }
        try reply(code, NBD.repAck)
    }

    private func invalid(_ code: UInt32, _ message: String) throws(Failure) -> NBDSession? {
        try reply(code, NBD.repErrInvalid, message: message)
        return nil
    }

    private func reply(_ option: UInt32, _ type: UInt32, _ payload: [UInt8] = [], message: String? = nil) throws(Failure) {
        let body = message.map { Array($0.utf8) } ?? payload
        var m = NBDMessage()
        m.append(NBD.optionReplyMagic)
        m.append(option)
        m.append(type)
        m.append(UInt32(body.count))
        m.bytes += body
        try send(m)
    }

    private func send(_ m: NBDMessage) throws(Failure) {
        guard socket.writeFully(m.bytes) else { throw .disconnect }
    }
}
