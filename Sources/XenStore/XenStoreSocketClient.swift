import Glibc
import Synchronization

/// A `XenStoreClient` speaking the xenstored wire protocol over a stream: a Unix socket (this
/// module's `XenStoreServer`, or xenstored's /run/xenstored/socket), an already-connected
/// descriptor (from `XenStoreServer.connect(as:)`), or Xen's /dev/xen/xenbus device.
///
/// Any number of threads may call at once: each request carries its own request id and a reader
/// thread hands each reply to the caller waiting for that id, and routes XS_WATCH_EVENT messages
/// into `watchEvents`. When the connection dies, or a reply does not come within
/// `replyTimeout` seconds, calls throw `.disconnected` instead of hanging.
public final class XenStoreSocketClient: XenStoreClient, @unchecked Sendable {
    public var watchEvents: XenStoreWatchQueue { channel.watchEvents }
    private let channel: Channel

    /// Takes ownership of a connected stream descriptor (closed if this throws: the reader
    /// thread could not start).
    public init(fileDescriptor: Int32, replyTimeout: Double = 30) throws(XenStoreError) {
        do {
            channel = try Channel(fd: fileDescriptor, replyTimeout: replyTimeout)
        } catch {
            Glibc.close(fileDescriptor)
            throw error
        }
    }

    /// Connects to a xenstored-compatible Unix socket.
    public convenience init(socketPath: String, replyTimeout: Double = 30) throws(XenStoreError) {
        guard var address = XenStorePOSIX.unixAddress(socketPath) else { throw .invalid("socket path too long: \(socketPath)") }
        let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { throw .disconnected(XenStorePOSIX.errorText("socket")) }
        guard XenStorePOSIX.withSockaddr(&address, { connect(fd, $0, $1) }) == 0 else {
            let text = XenStorePOSIX.errorText("connect to \(socketPath)")
            Glibc.close(fd)
            throw .disconnected(text)
        }
        try self.init(fileDescriptor: fd, replyTimeout: replyTimeout)
    }

    /// Opens Xen's xenbus device, which carries the same protocol to the real xenstored.
    public convenience init(xenbusDevice path: String = "/dev/xen/xenbus", replyTimeout: Double = 30) throws(XenStoreError) {
        let fd = open(path, O_RDWR | O_CLOEXEC)
        guard fd >= 0 else { throw .disconnected(XenStorePOSIX.errorText("open \(path)")) }
        try self.init(fileDescriptor: fd, replyTimeout: replyTimeout)
    }

    /// Connects as libxenstore's xs_open does: `$XENSTORED_PATH` if set, else
    /// /run/xenstored/socket; a path that is not a socket is opened as the xenbus device, and
    /// without a socket it falls back to /dev/xen/xenbus.
    public static func connectToSystemStore(replyTimeout: Double = 30) throws(XenStoreError) -> XenStoreSocketClient {
        let path = getenv("XENSTORED_PATH").map { String(cString: $0) }
        var info = stat()
        for candidate in [path ?? "/run/xenstored/socket", "/dev/xen/xenbus"] where stat(candidate, &info) == 0 {
            if (info.st_mode & S_IFMT) == S_IFSOCK {
                return try XenStoreSocketClient(socketPath: candidate, replyTimeout: replyTimeout)
            }
            return try XenStoreSocketClient(xenbusDevice: candidate, replyTimeout: replyTimeout)
        }
        throw .disconnected("no xenstore: neither \(path ?? "/run/xenstored/socket") nor /dev/xen/xenbus exists")
    }

    deinit { channel.shutdown() }

    /// Closes the connection; calls in flight and later calls throw `.disconnected`.
    public func close() { channel.shutdown() }

    // MARK: XenStoreClient

    public func read(_ path: String, transaction: XenStoreTransaction) throws(XenStoreError) -> [UInt8] {
        try call(XenStoreMessageType.read, [path], transaction, path)
    }

    public func write(_ path: String, _ value: [UInt8], transaction: XenStoreTransaction) throws(XenStoreError) {
        // "path\0value": the value is not NUL-terminated.
        _ = try channel.request(XenStoreMessageType.write, XenStoreMessage.nulTerminated([path]) + value, transaction, path)
    }

    public func mkdir(_ path: String, transaction: XenStoreTransaction) throws(XenStoreError) {
        _ = try call(XenStoreMessageType.mkdir, [path], transaction, path)
    }

    public func remove(_ path: String, transaction: XenStoreTransaction) throws(XenStoreError) {
        _ = try call(XenStoreMessageType.remove, [path], transaction, path)
    }

    public func directory(_ path: String, transaction: XenStoreTransaction) throws(XenStoreError) -> [String] {
        do {
            return strings(try call(XenStoreMessageType.directory, [path], transaction, path))
        } catch .other("E2BIG") {
            return try directoryInParts(path, transaction)
        }
    }

    /// XS_DIRECTORY_PART, for a child list longer than one payload (libxenstore's
    /// xs_directory_part): fetch from growing offsets, starting over if the node's generation
    /// changes between parts.
    private func directoryInParts(_ path: String, _ transaction: XenStoreTransaction) throws(XenStoreError) -> [String] {
        var list: [UInt8] = []
        var generation: ArraySlice<UInt8>? = nil
        while true {
            let reply = try call(XenStoreMessageType.directoryPart, [path, String(list.count)], transaction, path)
            guard let nul = reply.firstIndex(of: 0) else { throw .invalid("malformed directory part") }
            let thisGeneration = reply[..<nul]
            if let g = generation, g != thisGeneration { list = []; generation = nil; continue }
            generation = thisGeneration
            let part = reply[(nul + 1)...]
            let finished = part.last == 0 && (part.count == 1 || part.dropLast().last == 0)
            list.append(contentsOf: finished ? part.dropLast() : part)
            if finished { return strings(list) }
            guard !part.isEmpty else { throw .invalid("empty directory part") }
        }
    }

    public func permissions(_ path: String, transaction: XenStoreTransaction) throws(XenStoreError) -> [XenStorePermission] {
        var out: [XenStorePermission] = []
        for text in strings(try call(XenStoreMessageType.getPermissions, [path], transaction, path)) {
            guard let p = XenStorePermission(Substring(text)) else { throw .invalid("bad permission \(text) on \(path)") }
            out.append(p)
        }
        return out
    }

    public func setPermissions(_ path: String, _ permissions: [XenStorePermission], transaction: XenStoreTransaction) throws(XenStoreError) {
        _ = try call(XenStoreMessageType.setPermissions, [path] + permissions.map(\.description), transaction, path)
    }

    public func startTransaction() throws(XenStoreError) -> XenStoreTransaction {
        // The request carries an empty string; the reply is the id in decimal.
        let reply = strings(try call(XenStoreMessageType.transactionStart, [""], .none, "transaction"))
        guard let text = reply.first, let id = UInt32(text), id != 0 else { throw .invalid("bad transaction id") }
        return XenStoreTransaction(id: id)
    }

    public func endTransaction(_ transaction: XenStoreTransaction, commit: Bool) throws(XenStoreError) {
        _ = try call(XenStoreMessageType.transactionEnd, [commit ? "T" : "F"], transaction, "transaction \(transaction.id)")
    }

    public func watch(_ path: String, token: String) throws(XenStoreError) {
        _ = try call(XenStoreMessageType.watch, [path, token], .none, path)
    }

    public func unwatch(_ path: String, token: String) throws(XenStoreError) {
        _ = try call(XenStoreMessageType.unwatch, [path, token], .none, path)
    }

    public func domainPath(_ domain: UInt16) throws(XenStoreError) -> String {
        guard let path = strings(try call(XenStoreMessageType.getDomainPath, [String(domain)], .none, "domain \(domain)")).first
        else { throw .invalid("empty domain path") }
        return path
    }

    // MARK: beyond XenStoreClient

    /// XS_IS_DOMAIN_INTRODUCED (domain 0 only).
    public func isDomainIntroduced(_ domain: UInt16) throws(XenStoreError) -> Bool {
        strings(try call(XenStoreMessageType.isDomainIntroduced, [String(domain)], .none, "domain \(domain)")).first == "T"
    }

    /// XS_RESET_WATCHES: drops all of this connection's watches and transactions.
    public func resetWatches() throws(XenStoreError) {
        _ = try call(XenStoreMessageType.resetWatches, [""], .none, "reset watches")
    }

    private func call(_ type: UInt32, _ arguments: [String], _ transaction: XenStoreTransaction, _ path: String) throws(XenStoreError) -> [UInt8] {
        try channel.request(type, XenStoreMessage.nulTerminated(arguments), transaction, path)
    }

    private func strings(_ payload: [UInt8]) -> [String] { XenStoreMessage(type: 0, payload: payload).strings }
}

extension XenStoreSocketClient {
    /// The connection and its reader thread. Separate from the client so that the thread does not
    /// keep the client alive: dropping the client shuts the channel down.
    final class Channel: @unchecked Sendable {
        let watchEvents: XenStoreWatchQueue
        private let fd: Int32
        private let stopFD: Int32
        private let replyTimeout: Double
        private let writeLock = Mutex(())
        private let nextRequestID = Atomic<UInt32>(1)
        private let condition = XenStoreCondition()
        // Guarded by `condition`:
        private var waiting = Set<UInt32>()
        private var replies: [UInt32: XenStoreMessage] = [:]
        private var failure: String?
        private var reader: XenStoreThread?

        init(fd: Int32, replyTimeout: Double) throws(XenStoreError) {
            self.fd = fd
            self.replyTimeout = replyTimeout
            watchEvents = try XenStoreWatchQueue()
            let stop = try XenStorePOSIX.eventFD()
            stopFD = stop
            do {
                reader = try XenStoreThread("a xenstore connection's reader") { [self] in readLoop() }
            } catch {
                Glibc.close(stop)
                throw error
            }
        }

        /// Sends one request and waits for its reply's payload; an XS_ERROR reply throws the
        /// error it names, about `path`.
        func request(_ type: UInt32, _ payload: [UInt8], _ transaction: XenStoreTransaction, _ path: String) throws(XenStoreError) -> [UInt8] {
            guard payload.count <= XenStoreLimits.payloadMax else { throw .invalid("request for \(path) exceeds \(XenStoreLimits.payloadMax) bytes") }
            var id = nextRequestID.wrappingAdd(1, ordering: .relaxed).oldValue
            if id == 0 { id = nextRequestID.wrappingAdd(1, ordering: .relaxed).oldValue }
            let message = XenStoreMessage(type: type, requestID: id, transactionID: transaction.id, payload: payload)
            if let reason = condition.withLock({ () -> String? in
                if failure == nil { waiting.insert(id) }
                return failure
            }) { throw .disconnected(reason) }
            let sent = writeLock.withLock { _ in XenStorePOSIX.writeAll(fd, message.encoded()) }
            if !sent { fail(XenStorePOSIX.errorText("write")) }
            let deadline = XenStoreCondition.deadline(after: replyTimeout)
            let outcome = condition.withLock { () -> Result<XenStoreMessage, XenStoreError> in
                defer { waiting.remove(id) }
                while true {
                    if let reply = replies.removeValue(forKey: id) { return .success(reply) }
                    if let reason = failure { return .failure(.disconnected(reason)) }
                    if !condition.wait(until: deadline) && replies[id] == nil {
                        return .failure(.disconnected("no reply for \(path) within \(replyTimeout) s"))
                    }
                }
            }
            let reply = try outcome.get()
            if reply.type == XenStoreMessageType.error {
                throw XenStoreError(wireName: reply.firstString ?? "EINVAL", path: path)
            }
            return reply.payload
        }

        /// Marks the connection dead and wakes every waiter.
        private func fail(_ reason: String) {
            condition.withLock {
                if failure == nil { failure = reason }
                condition.broadcast()
            }
        }

        /// Fails every call, stops the reader and closes the descriptor. Idempotent.
        func shutdown() {
            fail("connection closed")
            let thread = condition.withLock { () -> XenStoreThread? in
                defer { reader = nil }
                return reader
            }
            guard let thread else { return }
            XenStorePOSIX.signal(stopFD)
            thread.join()
            Glibc.close(fd)
            Glibc.close(stopFD)
        }

        private func readLoop() {
            var buffer: [UInt8] = []
            var chunk = [UInt8](repeating: 0, count: 65536)
            while true {
                var fds = [pollfd(fd: fd, events: Int16(POLLIN), revents: 0), pollfd(fd: stopFD, events: Int16(POLLIN), revents: 0)]
                let n = poll(&fds, 2, -1)
                if n < 0 { if errno == EINTR { continue }; fail(XenStorePOSIX.errorText("poll")); return }
                if fds[1].revents != 0 { return }
                let got = chunk.withUnsafeMutableBytes { Glibc.read(fd, $0.baseAddress!, $0.count) }
                if got < 0 && (errno == EINTR || errno == EAGAIN) { continue }
                guard got > 0 else { fail(got == 0 ? "xenstore closed the connection" : XenStorePOSIX.errorText("read")); return }
                buffer.append(contentsOf: chunk[..<got])
                while let header = XenStoreMessage.decodeHeader(buffer) {
                    guard header.length <= XenStoreLimits.payloadMax else { fail("reply longer than XENSTORE_PAYLOAD_MAX"); return }
                    let total = XenStoreLimits.headerSize + Int(header.length)
                    guard buffer.count >= total else { break }
                    let message = XenStoreMessage(type: header.type, requestID: header.requestID, transactionID: header.transactionID,
                                                  payload: Array(buffer[XenStoreLimits.headerSize..<total]))
                    buffer.removeFirst(total)
                    route(message)
                }
            }
        }

        private func route(_ message: XenStoreMessage) {
            if message.type == XenStoreMessageType.watchEvent {
                let parts = message.strings
                if parts.count >= 2 { watchEvents.push(XenStoreWatchEvent(path: parts[0], token: parts[1])) }
                return
            }
            condition.withLock {
                // A reply nobody waits for any more (its caller timed out) is dropped.
                guard waiting.contains(message.requestID) else { return }
                replies[message.requestID] = message
                condition.broadcast()
            }
        }
    }
}
