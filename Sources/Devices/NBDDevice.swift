import Core
import Dispatch
import Glibc
import NBDWire
import Synchronization

/// `nbd(socket=PATH | hostname=HOST, port=10809, export=NAME)`: a client of another NBD server
/// (qemu-nbd, nbdkit, another SoftDev), so that a stack can span machines (nbdkit's nbd
/// plugin, with its parameter names).
///
/// The handshake (`NBDClientHandshake`) is fixed newstyle: structured replies and the
/// base:allocation context if the server has them, then NBD_OPT_GO with the export name
/// (NBD_OPT_EXPORT_NAME with a server too old for GO), asking for the server's block sizes.
/// Replies may be simple or structured (data, hole and error chunks); `extents` asks the server
/// (NBD_CMD_BLOCK_STATUS) where it has base:allocation and reports all data where it has not.
/// The device can do what the server's transmission flags say: write unless READ_ONLY, flush,
/// FUA, trim and write-zeroes if advertised (write-zeroes is otherwise written as zero buffers,
/// FUA done as a flush after the write), multi-conn.
///
/// Many requests may be in flight: `submit` sends the request at once under a send lock and
/// returns; a reader thread matches each reply to its request by handle and completes it, in
/// whatever order the server answers. A request larger than the server's maximum payload is
/// sent as several commands and completes when the last of them is answered. When the
/// connection is lost (the server went away, or sent something that is not a reply to a
/// request of ours), every request in flight and every later one fails with `BlockError(.io)`.
///
/// Completions run on the reader thread. A completion may submit again, but must not wait for
/// another request of this device (the reader is the one that would complete it).
///
/// ```swift
/// let remote = try DeviceRegistry.open("stats | nbd(hostname=storage1, export=disk)")
/// ```
public final class NBDDevice: BlockDevice, @unchecked Sendable {
    public enum Address: Sendable, CustomStringConvertible {
        case unix(path: String)
        case tcp(host: String, port: UInt16)
        public var description: String {
            switch self {
            case .unix(let path): return "socket=\(path)"
            case .tcp(let host, let port): return "hostname=\(host), port=\(port)"
            }
        }
    }

    public let name = "nbd"
    public let geometry: BlockGeometry
    public let capabilities: BlockCapabilities
    /// The server's transmission flags (NBD_FLAG_*), as it sent them.
    public let transmissionFlags: UInt16
    /// The server sends structured replies (NBD_OPT_STRUCTURED_REPLY was accepted).
    public let structuredReplies: Bool
    /// "nbd(socket=..., export=...)": the prefix of every error message.
    public let label: String

    private let socket: NBDSocket
    /// The id of base:allocation, if the server reports holes (NBD_CMD_BLOCK_STATUS).
    private let baseAllocation: UInt32?
    /// The largest READ or WRITE payload the server takes.
    private let maxPayload: UInt64
    /// One request's header and payload go out together.
    private let sendLock = Mutex(())
    private let state = Mutex(State())
    /// Set once the reply thread runs (the last step of `init`).
    private var reader: PosixThread?

    private struct State {
        var inFlight: [UInt64: Command] = [:]
        var nextHandle: UInt64 = 1
        /// Set once, when the connection is lost or closed; every later request fails with it.
        var failure: BlockError?
        var closed = false
    }

    /// One NBD command on the wire: the whole of a request, or a piece of a large one.
    private struct Command {
        var type: NBD.Command
        var flags: UInt16 = 0
        var offset: UInt64
        var length: UInt64
        /// The payload of a WRITE, the destination of a READ's data.
        var vectors: [iovec] = []
        var request: PendingRequest
        /// Where a BLOCK_STATUS command's extents go.
        var extents: ExtentList?
    }

    /// The extents the server reports for one BLOCK_STATUS command (filled by the reader).
    private final class ExtentList: @unchecked Sendable {
        var extents: [BlockExtent] = []
    }

    /// A `BlockRequest` in flight: complete when every command it was split into is answered.
    private final class PendingRequest: @unchecked Sendable {
        let completion: BlockCompletion
        /// The request wants FUA and the server has none: flush once the write is done.
        let flushAfter: Bool
        private let progress: Mutex<(remaining: Int, error: BlockError?)>
        init(_ completion: BlockCompletion, flushAfter: Bool = false) {
            self.completion = completion; self.flushAfter = flushAfter
            progress = Mutex((0, nil))
        }
        /// Sets how many commands must be answered; called before the first is sent.
        func expect(_ commands: Int) { progress.withLock { $0.remaining = commands } }
        /// Records one command's result; true when it was the last one.
        func finished(_ error: BlockError?) -> (done: Bool, error: BlockError?) {
            progress.withLock { progress in
                if progress.error == nil { progress.error = error }
                progress.remaining -= 1
                return (progress.remaining == 0, progress.error)
            }
        }
    }

    // MARK: Opening

    /// Connects to `address` and negotiates `export`. Errors name the server and say what
    /// failed: "nbd(socket=/run/x.sock, export=disk): cannot connect: No such file or directory".
    public init(address: Address, export: String = "") throws(BlockError) {
        label = "nbd(\(address)\(export.isEmpty ? "" : ", export=\(export)"))"
        let fd = try NBDClientHandshake.connect(address, label: label)
        let connection = NBDSocket(fd: fd)
        var opened = false
        defer { if !opened { connection.close() } }
        socket = connection

        let info = try NBDClientHandshake(socket: connection, label: label).run(export: export)
        transmissionFlags = info.flags
        maxPayload = UInt64(info.maxPayload)
        let logical: UInt32 = info.minimumBlock > 512 ? 4096 : 512
        let physical = max(4096, min(info.preferredBlock, 1 << 20))
        geometry = BlockGeometry(size: info.size - info.size % UInt64(logical), logicalBlockSize: logical, physicalBlockSize: physical)
        guard geometry.size > 0 else { throw BlockError(.invalid, "\(label): the export is empty (\(info.size) bytes)") }
        var caps: BlockCapabilities = []
        if info.flags & NBD.tflagReadOnly == 0 {
            caps.insert(.write)
            // Without the command, write-zeroes still works (as writes of zeroes), just not cheaply.
            if info.flags & NBD.tflagSendWriteZeroes != 0 { caps.insert(.writeZeroes) }
            if info.flags & NBD.tflagSendFlush != 0 { caps.insert(.flush) }
            if info.flags & NBD.tflagSendFUA != 0 || info.flags & NBD.tflagSendFlush != 0 { caps.insert(.fua) }
            if info.flags & NBD.tflagSendTrim != 0 { caps.insert(.discard) }
        }
        if info.flags & NBD.tflagCanMultiConn != 0 { caps.insert(.multiConn) }
        if info.baseAllocation != nil { caps.insert(.extents) }
        baseAllocation = info.baseAllocation
        structuredReplies = info.structuredReplies
        capabilities = caps

        // The reader thread owns the receiving side of the socket until `close`, which joins it
        // (so it need not hold the device).
        do throws(ThreadStartError) {
            reader = try PosixThread("\(label)'s replies") { [unowned(unsafe) self] in readReplies() }
        } catch {
            throw BlockError.system("\(label): cannot start the reply thread", errno: error.errno)
        }
        opened = true
    }

    deinit { close() }

    // MARK: Transmission

    public func submit(_ request: BlockRequest, completion: BlockCompletion) {
        let writes = request.operation == .write || request.operation == .writeZeroes || request.operation == .discard
        if writes && !capabilities.contains(.write) {
            return completion.complete(.failure(BlockError(.readOnly, "\(label): the export is read-only")))
        }
        switch request.operation {
        case .discard where !capabilities.contains(.discard):
            return completion.complete(.failure(BlockError(.notSupported, "\(label): the server does not do trim")))
        case .flush where !capabilities.contains(.flush):
            return completion.complete(.success)  // a server without flush has nothing to make durable
        case _ where request.operation != .flush && request.length == 0:
            return completion.complete(.success)  // NBD leaves length 0 undefined; there is nothing to do
        default: break
        }
        let fua = request.fua && (request.operation == .write || request.operation == .writeZeroes)
        let nativeFUA = transmissionFlags & NBD.tflagSendFUA != 0
        let pending = PendingRequest(completion, flushAfter: fua && !nativeFUA)
        var commands = self.commands(for: request, pending)
        if fua && nativeFUA { for i in commands.indices { commands[i].flags |= NBD.cmdFlagFUA } }
        pending.expect(commands.count)
        send(commands)
    }

    /// `request` as NBD commands, each within the server's limits.
    private func commands(for request: BlockRequest, _ pending: PendingRequest) -> [Command] {
        func pieces(_ limit: UInt64, _ make: (UInt64, UInt64) -> Command) -> [Command] {
            var list: [Command] = []
            var done: UInt64 = 0
            repeat {
                let n = min(limit, request.length - done)
                list.append(make(done, n))
                done += n
            } while done < request.length
            return list
        }
        // Trim and zero carry no payload, so only the 32-bit length field limits them.
        let bigLimit = UInt64(1 << 31)
        switch request.operation {
        case .read, .write:
            let type: NBD.Command = request.operation == .read ? .read : .write
            return pieces(maxPayload) { done, n in
                Command(type: type, offset: request.offset + done, length: n,
                        vectors: Self.slice(request.buffers, from: Int(done), count: Int(n)), request: pending)
            }
        case .flush:
            return [Command(type: .flush, offset: 0, length: 0, request: pending)]
        case .discard:
            return pieces(bigLimit) { done, n in Command(type: .trim, offset: request.offset + done, length: n, request: pending) }
        case .writeZeroes where transmissionFlags & NBD.tflagSendWriteZeroes != 0:
            let flags = request.mayDiscard ? 0 : NBD.cmdFlagNoHole
            return pieces(bigLimit) { done, n in
                Command(type: .writeZeroes, flags: flags, offset: request.offset + done, length: n, request: pending)
            }
        case .writeZeroes:
            // No WRITE_ZEROES on this server: WRITEs whose payload is one shared zeroed buffer.
            return pieces(min(maxPayload, UInt64(Self.zeroesSize))) { done, n in
                Command(type: .write, offset: request.offset + done, length: n,
                        vectors: [iovec(iov_base: Self.zeroes, iov_len: Int(n))], request: pending)
            }
        }
    }

    private static let zeroesSize = 1 << 20
    /// Only ever read (as WRITE payload), so one buffer serves every request.
    private static let zeroes: UnsafeMutableRawPointer = calloc(1, zeroesSize)!

    /// The iovecs covering bytes `[from, from + count)` of `buffers`.
    private static func slice(_ buffers: some Sequence<UnsafeMutableRawBufferPointer>, from: Int, count: Int) -> [iovec] {
        var vectors: [iovec] = []
        var skip = from, left = count
        for buffer in buffers where left > 0 {
            if skip >= buffer.count { skip -= buffer.count; continue }
            let n = min(buffer.count - skip, left)
            vectors.append(iovec(iov_base: buffer.baseAddress! + skip, iov_len: n))
            left -= n
            skip = 0
        }
        return vectors
    }

    /// Registers `commands` under fresh handles and sends them. If the connection is already
    /// lost they fail at once; if it is lost while sending, the reader fails what is registered.
    private func send(_ commands: [Command]) {
        let handles: [UInt64]? = state.withLock { state in
            guard state.failure == nil else { return nil }
            return commands.map { command in
                let handle = state.nextHandle
                state.nextHandle &+= 1
                state.inFlight[handle] = command
                return handle
            }
        }
        guard let handles else {
            let failure = state.withLock { $0.failure }!
            return finish(commands[0].request, results: Array(repeating: failure, count: commands.count))
        }
        sendLock.withLock { _ in
            for (command, handle) in zip(commands, handles) {
                var header = (UInt64(0), UInt64(0), UInt64(0), UInt32(0))  // 28 bytes, 8-aligned
                let sent = withUnsafeMutableBytes(of: &header) { raw -> Bool in
                    let h = raw.baseAddress!
                    h.storeBE(NBD.requestMagic, at: 0)
                    h.storeBE(command.flags, at: 4)
                    h.storeBE(command.type.rawValue, at: 6)
                    h.storeBE(handle, at: 8)
                    h.storeBE(command.offset, at: 16)
                    h.storeBE(UInt32(command.length), at: 24)
                    var vectors = [iovec(iov_base: h, iov_len: NBD.requestHeaderSize)]
                    if command.type == .write { vectors += command.vectors }
                    return vectors.withUnsafeMutableBufferPointer { socket.writeFully($0.baseAddress!, count: $0.count) }
                }
                guard sent else {
                    // The reader wakes, finds the connection gone and fails every registered command.
                    lose("cannot send to the server (it closed the connection)")
                    return
                }
            }
        }
    }

    private func finish(_ request: PendingRequest, results: [BlockError?]) {
        for error in results { finish(request, error) }
    }

    /// One command of `request` was answered (or failed); completes the request after its last.
    private func finish(_ request: PendingRequest, _ error: BlockError?) {
        let (done, failure) = request.finished(error)
        guard done else { return }
        if failure == nil && request.flushAfter {
            // Emulated FUA: the write is done, now make it durable.
            let flush = PendingRequest(request.completion)
            flush.expect(1)
            return send([Command(type: .flush, offset: 0, length: 0, request: flush)])
        }
        request.completion.complete(failure.map { .failure($0) } ?? .success)
    }

    /// Marks the connection lost (once) and wakes the reader, which fails what is in flight.
    private func lose(_ reason: String) {
        state.withLock { state in
            if state.failure == nil { state.failure = BlockError(.io, "\(label): \(reason)") }
        }
        socket.shutdown()
    }

    /// The reader thread: one reply (simple) or reply chunk (structured) at a time, matched to
    /// its command by handle. What a structured reply has done so far is the reader's alone.
    private func readReplies() {
        var progress: [UInt64: (covered: UInt64, error: BlockError?)] = [:]
        var magic: UInt32 = 0
        while true {
            guard socket.readFully(&magic, 4) else { return failAll("the server closed the connection") }
            let failure: String?
            switch UInt32(bigEndian: magic) {
            case NBD.simpleReplyMagic: failure = readSimpleReply()
            case NBD.structuredReplyMagic: failure = readChunk(&progress)
            default: failure = "the server sent a malformed reply"
            }
            if let failure { return failAll(failure) }
        }
    }

    /// The rest of a simple reply; the reason the connection cannot go on, or nil.
    private func readSimpleReply() -> String? {
        var header = (UInt64(0), UInt64(0))  // 12 bytes used; no padding, unlike (UInt32, UInt64)
        guard withUnsafeMutableBytes(of: &header, { socket.readFully($0.baseAddress!, 12) }) else {
            return "the server closed the connection"
        }
        let (error, handle) = withUnsafeBytes(of: &header) { ($0.baseAddress!.loadBE(UInt32.self, at: 0), $0.baseAddress!.loadBE(UInt64.self, at: 4)) }
        guard let command = state.withLock({ $0.inFlight.removeValue(forKey: handle) }) else {
            return "the server answered a request we did not send (handle \(handle))"
        }
        if error == 0 && command.type == .read && !receive(command, at: 0, count: Int(command.length)) {
            finish(command.request, BlockError(.io, "\(label): the server closed the connection during a read"))
            return "the server closed the connection"
        }
        finish(command.request, error == 0 ? nil : self.error(error, command, ""))
        return nil
    }

    /// The rest of one structured reply chunk; the reason the connection cannot go on, or nil.
    private func readChunk(_ progress: inout [UInt64: (covered: UInt64, error: BlockError?)]) -> String? {
        var raw = (UInt64(0), UInt64(0))
        guard withUnsafeMutableBytes(of: &raw, { socket.readFully($0.baseAddress!, 16) }) else { return "the server closed the connection" }
        let (flags, type, handle, length) = withUnsafeBytes(of: &raw) {
            ($0.baseAddress!.loadBE(UInt16.self, at: 0), $0.baseAddress!.loadBE(UInt16.self, at: 2),
             $0.baseAddress!.loadBE(UInt64.self, at: 4), $0.baseAddress!.loadBE(UInt32.self, at: 12))
        }
        guard let command = state.withLock({ $0.inFlight[handle] }) else {
            return "the server answered a request we did not send (handle \(handle))"
        }
        let malformed = "the server sent a malformed reply chunk (type \(type), \(length) bytes) for \(command.type)"
        switch type {
        case NBD.replyTypeNone:
            guard length == 0, flags & NBD.replyFlagDone != 0 else { return malformed }
        case NBD.replyTypeOffsetData:
            guard command.type == .read, length >= 8, let offset = readU64() else { return malformed }
            let count = UInt64(length - 8)
            guard offset >= command.offset, count <= command.length, offset - command.offset <= command.length - count else { return malformed }
            guard receive(command, at: Int(offset - command.offset), count: Int(count)) else { return "the server closed the connection" }
            progress[handle, default: (0, nil)].covered += count
        case NBD.replyTypeOffsetHole:
            guard command.type == .read, length == 12, let offset = readU64(), let hole = readU32() else { return malformed }
            let count = UInt64(hole)
            guard offset >= command.offset, count <= command.length, offset - command.offset <= command.length - count else { return malformed }
            for v in Self.slice(command.vectors.lazy.map { UnsafeMutableRawBufferPointer(start: $0.iov_base, count: $0.iov_len) },
                                from: Int(offset - command.offset), count: Int(count)) {
                memset(v.iov_base, 0, v.iov_len)
            }
            progress[handle, default: (0, nil)].covered += count
        case NBD.replyTypeBlockStatus:
            guard let list = command.extents, length >= 4, (length - 4) % 8 == 0, length <= 1 << 20,
                  let payload = readBytes(Int(length)) else { return malformed }
            var reader = NBDPayloadReader(payload)
            guard reader.u32() == baseAllocation else { break }  // a context we did not ask for
            var position = command.offset
            while let extentLength = reader.u32(), let state = reader.u32() {
                list.extents.append(BlockExtent(offset: position, length: UInt64(extentLength),
                                                isHole: state & NBD.stateHole != 0, isZero: state & NBD.stateZero != 0))
                position += UInt64(extentLength)
            }
        case _ where type & 0x8000 != 0:
            guard length >= 6, length <= NBD.maxOptionLength, let payload = readBytes(Int(length)) else { return malformed }
            var reader = NBDPayloadReader(payload)
            let error = reader.u32()!, messageLength = Int(reader.u16()!)
            let message = reader.string(messageLength) ?? ""
            if progress[handle]?.error == nil {
                progress[handle, default: (0, nil)].error = self.error(error, command, message.isEmpty ? "" : " (the server says: \(message))")
            }
        default:
            return malformed
        }
        guard flags & NBD.replyFlagDone != 0 else { return nil }
        state.withLock { _ = $0.inFlight.removeValue(forKey: handle) }
        let done = progress.removeValue(forKey: handle)
        var failure = done?.error
        if failure == nil && command.type == .read && (done?.covered ?? 0) != command.length {
            failure = BlockError(.io, "\(label): the server's reply covered \(done?.covered ?? 0) of the \(command.length) bytes read")
        }
        if failure == nil && command.type == .blockStatus && command.extents?.extents.isEmpty != false {
            failure = BlockError(.io, "\(label): the server's block status reply had no extents")
        }
        finish(command.request, failure)
        return nil
    }

    private func error(_ wire: UInt32, _ command: Command, _ detail: String) -> BlockError {
        var error = NBD.error(fromWire: wire, "\(label): \(command.type) at \(command.offset)+\(command.length)")
        error.message += detail
        return error
    }

    /// Reads `count` bytes of a read's data into its buffers, from `position` on.
    private func receive(_ command: Command, at position: Int, count: Int) -> Bool {
        let buffers = command.vectors.lazy.map { UnsafeMutableRawBufferPointer(start: $0.iov_base, count: $0.iov_len) }
        return Self.slice(buffers, from: position, count: count).allSatisfy { socket.readFully($0.iov_base!, $0.iov_len) }
    }

    private func readBytes(_ count: Int) -> [UInt8]? {
        var bytes = [UInt8](repeating: 0, count: count)
        guard count == 0 || bytes.withUnsafeMutableBytes({ socket.readFully($0.baseAddress!, count) }) else { return nil }
        return bytes
    }
    private func readU64() -> UInt64? {
        var value: UInt64 = 0
        return socket.readFully(&value, 8) ? UInt64(bigEndian: value) : nil
    }
    private func readU32() -> UInt32? {
        var value: UInt32 = 0
        return socket.readFully(&value, 4) ? UInt32(bigEndian: value) : nil
    }

    /// The connection is gone: fail every command in flight and every later request.
    private func failAll(_ reason: String) {
        let (lost, failure) = state.withLock { state in
            if state.failure == nil { state.failure = BlockError(.io, "\(label): \(reason)") }
            defer { state.inFlight.removeAll() }
            return (Array(state.inFlight.values), state.failure!)
        }
        socket.shutdown()
        for command in lost { finish(command.request, failure) }
    }

    // MARK: Synchronous operations (through `submit`; never call them from a completion)

    private final class Waiter: BlockCompletionSink, @unchecked Sendable {
        let done = DispatchSemaphore(value: 0)
        var result = BlockResult.success
        func complete(tag: UInt64, result: BlockResult) { self.result = result; done.signal() }
    }

    private func perform(_ request: BlockRequest) throws(BlockError) {
        try wait { submit(request, completion: $0) }
    }

    private func wait(_ start: (BlockCompletion) -> Void) throws(BlockError) {
        let waiter = Waiter()
        start(BlockCompletion(sink: waiter, tag: 0))
        waiter.done.wait()
        if case .failure(let error) = waiter.result { throw error }
    }

    /// The server's base:allocation map (NBD_CMD_BLOCK_STATUS), which may end before
    /// `offset + length`; all data if the server does not report holes.
    public func extents(at offset: UInt64, length: UInt64) throws(BlockError) -> [BlockExtent] {
        guard baseAllocation != nil else { return [BlockExtent(offset: offset, length: length, isHole: false, isZero: false)] }
        let list = ExtentList()
        try wait { completion in
            let pending = PendingRequest(completion)
            pending.expect(1)
            send([Command(type: .blockStatus, offset: offset, length: min(length, 1 << 31), request: pending, extents: list)])
        }
        return list.extents
    }

    public func read(into buffers: IOBuffers, at offset: UInt64) throws(BlockError) {
        try perform(BlockRequest(operation: .read, offset: offset, length: UInt64(buffers.byteCount), buffers: buffers))
    }
    public func write(from buffers: IOBuffers, at offset: UInt64, fua: Bool) throws(BlockError) {
        try perform(BlockRequest(operation: .write, offset: offset, length: UInt64(buffers.byteCount), buffers: buffers, fua: fua))
    }
    public func flush() throws(BlockError) {
        try perform(BlockRequest(operation: .flush, offset: 0, length: 0))
    }
    public func discard(at offset: UInt64, length: UInt64) throws(BlockError) {
        try perform(BlockRequest(operation: .discard, offset: offset, length: length))
    }
    public func writeZeroes(at offset: UInt64, length: UInt64, mayDiscard: Bool) throws(BlockError) {
        try perform(BlockRequest(operation: .writeZeroes, offset: offset, length: length, mayDiscard: mayDiscard))
    }

    /// Waits (up to 10 s) for the requests in flight, says goodbye (NBD_CMD_DISCONNECT), and
    /// closes the connection. Requests still in flight then fail.
    public func close() {
        let first = state.withLock { state in
            defer { state.closed = true }
            return !state.closed
        }
        guard first, let reader else { return }
        var waited = 0
        while waited < 10_000 && state.withLock({ !$0.inFlight.isEmpty && $0.failure == nil }) {
            usleep(1000)
            waited += 1
        }
        if state.withLock({ $0.failure == nil }) {
            sendLock.withLock { _ in
                var header = [UInt8](repeating: 0, count: NBD.requestHeaderSize)
                header.withUnsafeMutableBytes { h in
                    h.baseAddress!.storeBE(NBD.requestMagic, at: 0)
                    h.baseAddress!.storeBE(NBD.Command.disconnect.rawValue, at: 6)
                }
                _ = socket.writeFully(header)
            }
        }
        lose("the device is closed")
        reader.join()
        socket.close()
    }
}

extension NBDDevice {
    public static let descriptor = DeviceDescriptor(
        name: "nbd", kind: .device,
        summary: "A client of another NBD server (qemu-nbd, nbdkit, softdev), so that a stack can span machines.",
        parameters: [
            DeviceParameter("socket", "The server's unix socket. Give this or hostname."),
            DeviceParameter("hostname", "The server's host name or address, for TCP. Give this or socket."),
            DeviceParameter("port", "The server's TCP port (default 10809)."),
            DeviceParameter("export", "The export name (default: the server's default export, \"\")."),
            DeviceParameter("uri", "Instead of the others, an NBD URI in quotes: \"nbd://HOST[:PORT]/EXPORT\" or \"nbd+unix:///EXPORT?socket=PATH\"."),
        ],
        open: { parameters, _ throws(DeviceSpecError) in
            if let uri = parameters.string("uri") {
                guard ["socket", "hostname", "port", "export"].allSatisfy({ parameters.string($0) == nil }) else {
                    throw DeviceSpecError("nbd: uri= says it all; give it without socket=, hostname=, port= or export=")
                }
                let (address, export) = try parse(uri: uri)
                return try DeviceSpecError.opening { () throws(BlockError) in try NBDDevice(address: address, export: export) }
            }
            let address: Address
            switch (parameters.string("socket"), parameters.string("hostname")) {
            case (let path?, nil):
                guard parameters.string("port") == nil else { throw DeviceSpecError("nbd: port= goes with hostname=, not socket=") }
                address = .unix(path: path)
            case (nil, let host?):
                address = .tcp(host: host, port: try parameters.integer("port", in: UInt16(1)...UInt16.max) ?? 10809)
            case (.some, .some): throw DeviceSpecError("nbd: give socket= or hostname=, not both")
            case (nil, nil): throw DeviceSpecError("nbd: give socket=PATH or hostname=HOST (and port=)")
            }
            let export = parameters.string("export") ?? ""
            return try DeviceSpecError.opening { () throws(BlockError) in try NBDDevice(address: address, export: export) }
        })
}

extension NBDDevice {
    /// The server and export of an NBD URI, as qemu and libnbd write them (the NBD project's
    /// doc/uri.md): `nbd://HOST[:PORT]/EXPORT` (HOST defaults to localhost, an IPv6 address is
    /// in brackets) or `nbd+unix:///EXPORT?socket=PATH`; the export is percent-decoded.
    public static func parse(uri: String) throws(DeviceSpecError) -> (Address, export: String) {
        func fail(_ why: String) -> DeviceSpecError { DeviceSpecError("nbd: uri '\(uri)' \(why)") }
        if uri.hasPrefix("nbds") { throw fail("asks for TLS, which the nbd device does not do") }
        let isUnix = uri.hasPrefix("nbd+unix://")
        guard isUnix || uri.hasPrefix("nbd://") else { throw fail("is not nbd://HOST[:PORT]/EXPORT or nbd+unix:///EXPORT?socket=PATH") }
        var rest = Substring(uri.dropFirst(isUnix ? 11 : 6))
        var socket: String?
        if let mark = rest.firstIndex(of: "?") {
            for item in rest[rest.index(after: mark)...].split(separator: "&") {
                guard item.hasPrefix("socket=") else { throw fail("has a query parameter other than socket: '\(item)'") }
                socket = percentDecoded(item.dropFirst(7))
            }
            rest = rest[..<mark]
        }
        let slash = rest.firstIndex(of: "/") ?? rest.endIndex
        let authority = rest[..<slash]
        let export = percentDecoded(rest[slash...].dropFirst())
        if isUnix {
            guard authority.isEmpty else { throw fail("has a host, which nbd+unix does not take (nbd+unix:///EXPORT?socket=PATH)") }
            guard let socket, !socket.isEmpty else { throw fail("needs ?socket=PATH") }
            return (.unix(path: socket), export)
        }
        guard socket == nil else { throw fail("has ?socket=, which only nbd+unix takes") }
        var host = authority, port: Substring?
        if authority.hasPrefix("[") {
            guard let close = authority.firstIndex(of: "]") else { throw fail("has no ] after the IPv6 address") }
            host = authority[authority.index(after: authority.startIndex)..<close]
            let after = authority[authority.index(after: close)...]
            guard after.isEmpty || after.hasPrefix(":") else { throw fail("has something other than :PORT after ]") }
            if !after.isEmpty { port = after.dropFirst() }
        } else if let colon = authority.lastIndex(of: ":") {
            host = authority[..<colon]
            port = authority[authority.index(after: colon)...]
        }
        var number: UInt16 = 10809
        if let port {
            guard let p = UInt16(port), p > 0 else { throw fail("has a port '\(port)' that is not a number from 1 to 65535") }
            number = p
        }
        return (.tcp(host: host.isEmpty ? "localhost" : String(host), port: number), export)
    }

    /// `text` with each %XX replaced by the byte it stands for.
    private static func percentDecoded(_ text: Substring) -> String {
        var bytes: [UInt8] = []
        var utf8 = Array(text.utf8)[...]
        while let byte = utf8.popFirst() {
            if byte == UInt8(ascii: "%"), utf8.count >= 2, let value = UInt8(String(decoding: utf8.prefix(2), as: UTF8.self), radix: 16) {
                bytes.append(value)
                utf8 = utf8.dropFirst(2)
            } else {
                bytes.append(byte)
            }
        }
        return String(decoding: bytes, as: UTF8.self)
    }
}
