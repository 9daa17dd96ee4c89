import Core
import Glibc
import NBDWire

/// Serves block devices to NBD clients (qemu, nbdkit's and libnbd's tools, nbdfuse, the
/// kernel's nbd-client) over a unix socket or TCP: the fixed newstyle handshake, several named
/// exports, structured replies, base:allocation block status, and pipelined requests answered
/// out of order as the device completes them. One thread per client; a client that breaks the
/// protocol is dropped alone.
///
/// ```swift
/// let server = NBDServer(listen: try .parse("unix:/run/softdev/disk.sock"),
///                        exports: [NBDExport(name: "disk", device: device)])
/// try server.start()
/// // qemu-img info 'nbd+unix:///disk?socket=/run/softdev/disk.sock'
/// server.stop()
/// ```
public final class NBDServer: @unchecked Sendable {
    public let address: NBDListenAddress
    public let exports: [NBDExport]
    /// How long an idle connection polls its socket before blocking (see `AdaptivePoller`); 0 never polls.
    public let pollMicroseconds: Int

    private let lock = ConditionLock()
    private var listenFD: Int32 = -1
    private var wakePipe: (Int32, Int32) = (-1, -1)
    private var connections: [ObjectIdentifier: NBDConnection] = [:]
    /// Client sockets still negotiating, so `stop` can wake them too.
    private var negotiating: [Int32: NBDSocket] = [:]
    private var threads = 0
    private var stopping = false
    private var rmwLocks: [String: ConditionLock] = [:]
    private var port: UInt16?
    /// The threads the exports' devices block on, shared by the connections (nbdkit's server
    /// threads), started as needed.
    private let workers = BlockWorkers(limit: NBDServer.workerThreads, purpose: "the NBD export's block workers")
    /// At most this many requests block at once (nbdkit's default --threads).
    public static let workerThreads = 16

    /// An export named twice is a mistake in the caller's configuration.
    public init(listen address: NBDListenAddress, exports: [NBDExport], pollMicroseconds: Int = AdaptivePoller.defaultMicroseconds) {
        precondition(Set(exports.map(\.name)).count == exports.count, "NBD export names must be unique")
        precondition(pollMicroseconds >= 0, "a poll window is not negative")
        self.address = address
        self.exports = exports
        self.pollMicroseconds = pollMicroseconds
        for e in exports { rmwLocks[e.name] = ConditionLock() }
    }

    /// The TCP port the server listens on (useful with port 0); nil for unix sockets.
    public var boundPort: UInt16? { lock.withLock { port } }

    /// The number of clients in the transmission phase.
    public var clientCount: Int { lock.withLock { connections.count } }

    /// Binds the address and starts accepting clients on a thread of its own.
    public func start() throws(NBDSystemError) {
        precondition(!exports.isEmpty, "an NBD server needs at least one export")
        let fd = try NBDListener.open(address)
        var p: [Int32] = [0, 0]
        guard pipe(&p) == 0 else { let e = NBDSystemError("pipe"); close(fd); throw e }
        for f in p { _ = fcntl(f, F_SETFD, FD_CLOEXEC) }
        lock.withLock {
            listenFD = fd
            wakePipe = (p[0], p[1])
            if case .tcp = address { port = TCPListener.boundPort(fd) }
            threads += 1
        }
        do throws(ThreadStartError) {
            try spawnThread("the NBD listener") { [self] in acceptLoop(fd) }
        } catch {
            threadEnded()
            stop()   // closes the listener and removes its socket
            throw NBDSystemError("start the NBD listener's thread", errno: error.errno)
        }
    }

    /// Stops accepting, disconnects every client, waits until their in-flight requests have
    /// completed, and removes the unix socket.
    public func stop() {
        let (fd, wake) = lock.withLock { () -> (Int32, Int32) in
            stopping = true
            for c in connections.values { c.shutdown() }
            for s in negotiating.values { s.shutdown() }
            return (listenFD, wakePipe.1)
        }
        guard fd >= 0 else { return }
        var byte: UInt8 = 1
        _ = write(wake, &byte, 1)
        lock.withLock { while threads > 0 { lock.wait() } }
        workers.stop()
        close(fd); close(wakePipe.0); close(wakePipe.1)
        lock.withLock { listenFD = -1 }
        if case .unix(let path) = address { unlink(path) }
    }

    private func acceptLoop(_ fd: Int32) {
        defer { threadEnded() }
        while true {
            var fds = [pollfd(fd: fd, events: Int16(POLLIN), revents: 0),
                       pollfd(fd: lock.withLock { wakePipe.0 }, events: Int16(POLLIN), revents: 0)]
            let n = poll(&fds, 2, -1)
            if n < 0 && errno == EINTR { continue }
            if fds[1].revents != 0 || lock.withLock({ stopping }) { return }
            guard fds[0].revents & Int16(POLLIN) != 0 else { continue }
            let client = accept(fd, nil, nil)
            // EMFILE or a client that gave up before we accepted: keep serving the others.
            if client < 0 { if errno == EMFILE || errno == ENFILE { usleep(10_000) }; continue }
            _ = fcntl(client, F_SETFD, FD_CLOEXEC)
            if case .tcp = address {
                // Replies are whole messages already; Nagle would only delay them.
                var one: Int32 = 1
                setsockopt(client, Int32(IPPROTO_TCP), TCP_NODELAY, &one, socklen_t(MemoryLayout<Int32>.size))
            }
            let socket = NBDSocket(fd: client)
            let accepted = lock.withLock { () -> Bool in
                guard !stopping else { return false }
                negotiating[client] = socket
                threads += 1
                return true
            }
            guard accepted else { socket.close(); return }
            do throws(ThreadStartError) {
                try spawnThread("an NBD connection") { [self] in serve(socket) }
            } catch {
                // No thread for this client: it alone is dropped, the others are served.
                lock.withLock { negotiating[client] = nil }
                socket.close()
                threadEnded()
            }
        }
    }

    /// One client, from the handshake to the end of transmission.
    private func serve(_ socket: NBDSocket) {
        defer { threadEnded() }
        workers.adopt()
        var negotiation = NBDNegotiation(socket: socket, exports: exports)
        let session = negotiation.run()
        let connection = session.map { NBDConnection(socket: socket, session: $0, rmwLock: rmwLocks[$0.export.name]!,
                                                       poller: AdaptivePoller(microseconds: pollMicroseconds)) }
        let proceed = lock.withLock { () -> Bool in
            negotiating[socket.fd] = nil
            guard let connection, !stopping else { return false }
            connections[ObjectIdentifier(connection)] = connection
            return true
        }
        guard proceed, let connection else { socket.close(); return }
        connection.run()
        lock.withLock { connections[ObjectIdentifier(connection)] = nil }
    }

    private func threadEnded() {
        lock.withLock { threads -= 1; lock.broadcast() }
    }
}
