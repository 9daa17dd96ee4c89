import Glibc
import Synchronization

/// An in-memory xenstore served over the xenstored wire protocol, so that Xen's own tools
/// (`XENSTORED_PATH=<socket> xenstore-ls`) and `XenStoreSocketClient` can use it.
///
/// Clients connect to a Unix stream socket (acting as domain 0, like xenstored's socket
/// connections) or are attached in process with `connect(as:)`, acting as a chosen domain, which
/// is how the local hypervisor connects its guests. One thread runs a poll loop over all
/// connections; a client that sends a malformed message gets an error reply, and one that sends
/// a length beyond XENSTORE_PAYLOAD_MAX, or stops reading its replies, is dropped, as cxenstored
/// does. Call `stop()` when done: the poll thread keeps the server alive until then.
public final class XenStoreServer: @unchecked Sendable {
    public typealias ConnectionID = UInt64

    /// A client that lets this much output pile up unread is dropped.
    static let outputLimit = 1 << 20

    private struct Connection {
        var fd: Int32
        var input: [UInt8] = []
        var output: [UInt8] = []
    }

    private struct State {
        let tree = XenStoreTree()
        var connections: [ConnectionID: Connection] = [:]
        var lastID: ConnectionID = 0
        var stopping = false
        /// Why the server stopped serving by itself (see `run`).
        var failure: String?
    }

    /// The socket path, if the server listens on one.
    public let socketPath: String?
    private let state = Mutex(State())
    /// Made by `start` (-1 before: waking a server that does not run yet does nothing).
    private var wakeFD: Int32 = -1
    private var listenFD: Int32 = -1
    private var thread: XenStoreThread?

    /// A server that will listen on `socketPath` (replacing a stale socket there), or only take
    /// in-process connections if nil. Nothing happens until `start()`.
    public init(socketPath: String? = nil) {
        self.socketPath = socketPath
    }

    deinit {
        stop()
        if wakeFD >= 0 { Glibc.close(wakeFD) }
    }

    /// Creates the socket (mode 0660) and starts the poll thread.
    public func start() throws(XenStoreError) {
        precondition(thread == nil, "XenStoreServer started twice")
        if wakeFD < 0 { wakeFD = try XenStorePOSIX.eventFD() }
        if let path = socketPath { listenFD = try Self.listen(on: path) }
        do {
            thread = try XenStoreThread("the xenstore server") { [self] in run() }
        } catch {
            closeListener()
            throw error
        }
    }

    private static func listen(on path: String) throws(XenStoreError) -> Int32 {
        guard var address = XenStorePOSIX.unixAddress(path) else { throw .invalid("socket path too long: \(path)") }
        var info = stat()
        if lstat(path, &info) == 0 {
            // Replace a socket left by an earlier run, but never delete anything else.
            guard (info.st_mode & S_IFMT) == S_IFSOCK else { throw .exists(path) }
            unlink(path)
        }
        let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue) | Int32(SOCK_NONBLOCK.rawValue), 0)
        guard fd >= 0 else { throw .other(XenStorePOSIX.errorText("socket")) }
        let bound = XenStorePOSIX.withSockaddr(&address) { bind(fd, $0, $1) }
        guard bound == 0, chmod(path, 0o660) == 0, Glibc.listen(fd, 64) == 0 else {
            let text = XenStorePOSIX.errorText("listen on \(path)")
            Glibc.close(fd)
            throw .other(text)
        }
        return fd
    }

    /// Stops the poll thread and closes every connection and the socket. Idempotent.
    public func stop() {
        let wasRunning = state.withLock { s -> Bool in
            let was = !s.stopping
            s.stopping = true
            return was
        }
        guard wasRunning else { return }
        wake()
        thread?.join()
        thread = nil
        state.withLock { s in
            for id in Array(s.connections.keys) { drop(id, &s) }
        }
        closeListener()
    }

    private func closeListener() {
        guard listenFD >= 0 else { return }
        Glibc.close(listenFD)
        listenFD = -1
        if let path = socketPath { unlink(path) }
    }

    // MARK: in-process connections and domains

    /// A client connected through a socketpair, acting as `domain` (0 is privileged). The
    /// server does not introduce the domain; call `introduceDomain(_:)` for that.
    public func connect(as domain: UInt16) throws(XenStoreError) -> XenStoreSocketClient {
        var pair: [Int32] = [-1, -1]
        guard socketpair(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0, &pair) == 0 else {
            throw .other(XenStorePOSIX.errorText("socketpair"))
        }
        addConnection(fileDescriptor: pair[0], domain: domain)
        return try XenStoreSocketClient(fileDescriptor: pair[1])
    }

    /// Serves an already-connected stream descriptor as `domain`; the server owns it from now on.
    /// After a `failure` it is closed at once (ID 0): its client sees the store gone.
    @discardableResult
    public func addConnection(fileDescriptor fd: Int32, domain: UInt16) -> ConnectionID {
        _ = fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK)
        let id = state.withLock { s -> ConnectionID in
            if s.failure != nil { Glibc.close(fd); return 0 }
            s.lastID += 1
            s.connections[s.lastID] = Connection(fd: fd)
            s.tree.addConnection(s.lastID, domain: domain)
            return s.lastID
        }
        wake()
        return id
    }

    /// Marks `domain` introduced (what XS_INTRODUCE does) and fires @introduceDomain watches.
    public func introduceDomain(_ domain: UInt16) {
        state.withLock { s in
            s.tree.introduceDomain(domain)
            deliver(&s)
        }
        wake()
    }

    /// Releases `domain` (what XS_RELEASE does): fires @releaseDomain watches and closes the
    /// connections acting for that domain, as xenstored does when a domain dies.
    public func releaseDomain(_ domain: UInt16) throws(XenStoreError) {
        try state.withLock { (s) throws(XenStoreError) in
            for id in try s.tree.releaseDomain(domain) { drop(id, &s) }
            deliver(&s)
        }
        wake()
    }

    public func isDomainIntroduced(_ domain: UInt16) -> Bool {
        state.withLock { $0.tree.isIntroduced(domain) }
    }

    /// Why the server stopped serving by itself, or nil while it serves (or was stopped).
    public var failure: String? { state.withLock { $0.failure } }

    /// The number of open connections (for tests and diagnostics).
    public var connectionCount: Int { state.withLock { $0.connections.count } }

    // MARK: the poll loop

    private func wake() { XenStorePOSIX.signal(wakeFD) }

    private func run() {
        var fds: [pollfd] = []
        var ids: [ConnectionID] = []
        while true {
            let stopping = state.withLock { s -> Bool in
                fds = [pollfd(fd: wakeFD, events: Int16(POLLIN), revents: 0),
                       pollfd(fd: listenFD, events: Int16(POLLIN), revents: 0)]   // fd -1 is ignored
                ids = []
                for (id, c) in s.connections {
                    fds.append(pollfd(fd: c.fd, events: Int16(POLLIN) | (c.output.isEmpty ? 0 : Int16(POLLOUT)), revents: 0))
                    ids.append(id)
                }
                return s.stopping
            }
            if stopping { return }
            let n = poll(&fds, nfds_t(fds.count), -1)
            if n < 0 {
                if errno == EINTR { continue }
                // poll itself failed (EINVAL: more descriptors than RLIMIT_NOFILE; ENOMEM), so
                // no connection can be served: close them all, so that every client sees the
                // store go away and reports it, and stop, rather than trap or spin.
                let reason = XenStorePOSIX.errorText("xenstore server: poll")
                fputs("softdev: \(reason); the xenstore server stops serving\n", stderr)
                state.withLock { s in
                    s.failure = reason
                    for id in Array(s.connections.keys) { drop(id, &s) }
                }
                return
            }
            if fds[0].revents != 0 {
                var v: UInt64 = 0
                _ = Glibc.read(wakeFD, &v, 8)
            }
            if fds[1].revents != 0 { acceptClients() }
            state.withLock { s in
                for (i, id) in ids.enumerated() where fds[i + 2].revents != 0 {
                    let events = Int32(fds[i + 2].revents)
                    if events & Int32(POLLOUT) != 0 { flush(id, &s) }
                    if events & (Int32(POLLIN) | Int32(POLLHUP) | Int32(POLLERR)) != 0 { receive(id, &s) }
                }
            }
        }
    }

    private func acceptClients() {
        while true {
            let fd = accept(listenFD, nil, nil)
            if fd < 0 { return }   // EAGAIN: no more; other errors: try again on the next poll
            _ = fcntl(fd, F_SETFD, FD_CLOEXEC)
            addConnection(fileDescriptor: fd, domain: 0)   // socket clients are the toolstack: domain 0
        }
    }

    /// Reads what a connection sent and answers every complete message in it.
    private func receive(_ id: ConnectionID, _ s: inout State) {
        guard let fd = s.connections[id]?.fd else { return }
        var chunk = [UInt8](repeating: 0, count: 65536)
        let n = chunk.withUnsafeMutableBytes { Glibc.read(fd, $0.baseAddress!, $0.count) }
        if n < 0 && (errno == EAGAIN || errno == EINTR) { return }
        guard n > 0 else { drop(id, &s); return }   // EOF or error: the client is gone
        s.connections[id]!.input.append(contentsOf: chunk[..<n])
        while let connection = s.connections[id], let header = XenStoreMessage.decodeHeader(connection.input) {
            // A length beyond the limit leaves no way to find the next message: drop the client.
            guard header.length <= XenStoreLimits.payloadMax else { drop(id, &s); return }
            let total = XenStoreLimits.headerSize + Int(header.length)
            guard connection.input.count >= total else { break }
            let request = XenStoreMessage(type: header.type, requestID: header.requestID,
                                          transactionID: header.transactionID,
                                          payload: Array(connection.input[XenStoreLimits.headerSize..<total]))
            s.connections[id]!.input.removeFirst(total)
            let reply = s.tree.handle(request, from: id)
            s.connections[id]?.output.append(contentsOf: reply.encoded())
            deliver(&s)
        }
        flush(id, &s)
    }

    /// Queues the tree's watch events on their connections and sends what the sockets take.
    private func deliver(_ s: inout State) {
        let events = s.tree.outbox
        s.tree.outbox = []
        var touched = Set<ConnectionID>()
        for (id, event) in events where s.connections[id] != nil {
            s.connections[id]!.output.append(contentsOf: XenStoreMessage.watchEvent(event).encoded())
            touched.insert(id)
        }
        for id in touched { flush(id, &s) }
    }

    private func flush(_ id: ConnectionID, _ s: inout State) {
        guard let c = s.connections[id], !c.output.isEmpty else { return }
        let n = XenStorePOSIX.writeSome(c.fd, c.output)
        if n > 0 {
            s.connections[id]!.output.removeFirst(n)
        } else if n < 0 && errno != EAGAIN && errno != EINTR {
            drop(id, &s); return
        }
        if s.connections[id]!.output.count > Self.outputLimit { drop(id, &s) }
    }

    private func drop(_ id: ConnectionID, _ s: inout State) {
        guard let c = s.connections.removeValue(forKey: id) else { return }
        Glibc.close(c.fd)
        s.tree.removeConnection(id)
    }
}
