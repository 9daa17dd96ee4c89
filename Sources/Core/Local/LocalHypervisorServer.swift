import CXen
import Glibc
import Synchronization
import XenStore

/// The emulated hypervisor: the broker that creates guest domains (a sealed memfd of memory
/// each), hands domain memory to the backend domain (0, and no other), pairs event channels (a
/// socket pair each), and runs the xenstore server. Every client connection is one domain; when a guest's connection
/// closes, the guest is destroyed (its xenstore home removed, `@releaseDomain` fired), just as
/// when a real guest crashes.
public final class LocalHypervisorServer: @unchecked Sendable {
    public let address: LocalHypervisorAddress
    public let storeServer: XenStoreServer

    private struct Port {
        /// The control connection that opened it: when that connection goes (its process
        /// died), the port is closed, as the kernel closes an evtchn device's ports.
        var owner: Int32
        var remote: DomainID
        var remotePort: EventPort?
        /// Held for as long as this port exists: a copy of the peer's end, so that the peer
        /// closing its end (or dying) never hangs ours up; a hung-up socket polls readable for
        /// ever and would spin the thread that waits on it. Nothing reads it.
        var peerEnd: Int32
        /// Held only while unbound: the end the binding side will receive, and the copy of
        /// ours that its port will keep as its `peerEnd`.
        var pending: (end: Int32, keep: Int32)?
        /// Closes what the broker holds for this port.
        func release() {
            Glibc.close(peerEnd)
            if let pending { Glibc.close(pending.end); Glibc.close(pending.keep) }
        }
    }
    private struct Domain {
        var memoryFD: Int32   // -1 for domain 0
        var ports: [EventPort: Port] = [:]
        var nextPort: EventPort = 1
        var storeConnections = 0
    }
    /// What a guest domain may have, as Xen's per-domain max_event_channels and xenstored's
    /// quotas bound a guest: event channel ports open at once, and xenstore connections made
    /// in its life (a guest needs one). Each holds descriptors in this process, and a guest
    /// must not exhaust the descriptors every other domain needs. Domain 0 serves every guest
    /// and has no such bound.
    static let guestPortLimit = 64
    static let guestStoreConnectionLimit = 4
    private struct State {
        var domains: [DomainID: Domain] = [0: Domain(memoryFD: -1)]
        var nextDomain: DomainID = 1
        var connectionDomain: [Int32: DomainID] = [:]
    }
    private let state = Mutex(State())
    private let listener: Int32
    private let wake: Int32
    private var thread: PosixThread?
    private let running = Atomic<Bool>(false)
    private let closed = Atomic<Bool>(false)
    /// Our own dom0 connection to the store, for what a toolstack writes at domain creation.
    private var admin: XenStoreSocketClient?

    /// Creates the directory (mode 0700) and binds both sockets; `start` begins serving.
    public init(address: LocalHypervisorAddress) throws {
        self.address = address
        try Self.makeDirectory(address.directory)
        storeServer = XenStoreServer(socketPath: address.storeSocket)
        let wake = cxen_eventfd(0, Int32(CXEN_EFD_CLOEXEC))
        guard wake >= 0 else { throw LocalHypervisorError.cannotConnect(path: address.controlSocket, errno: errno) }
        do {
            listener = try Self.listen(address.controlSocket)
        } catch {
            Glibc.close(wake)
            throw error
        }
        self.wake = wake
    }

    deinit { stop() }

    private static func makeDirectory(_ path: String) throws {
        var partial = ""
        for component in path.split(separator: "/") {
            partial += "/" + component
            if mkdir(partial, 0o700) != 0 && errno != EEXIST {
                throw LocalHypervisorError.cannotConnect(path: partial, errno: errno)
            }
        }
    }

    private static func listen(_ path: String) throws -> Int32 {
        unlink(path)
        let (s, bindErrno) = LocalControlSocket.open(path) { Glibc.bind($0, $1, $2) }
        guard s >= 0 else { throw LocalHypervisorError.cannotConnect(path: path, errno: bindErrno) }
        guard chmod(path, 0o600) == 0, Glibc.listen(s, 64) == 0 else {
            let e = errno; Glibc.close(s)
            throw LocalHypervisorError.cannotConnect(path: path, errno: e)
        }
        return s
    }

    /// Starts the xenstore server and the broker's thread; throws (and serves nothing) if
    /// either cannot start.
    public func start() throws {
        do {
            try storeServer.start()
            admin = try storeServer.connect(as: 0)
            try admin?.write("/local/domain/0/name", "Domain-0")
            try admin?.write("/local/domain/0/domid", "0")
            running.store(true, ordering: .sequentiallyConsistent)
            // The thread holds the server until `stop` ends it.
            thread = try PosixThread("the local hypervisor's broker") { [self] in serve() }
        } catch {
            stop()
            throw error
        }
    }

    /// Stops serving, closes the sockets and lets every domain go. Idempotent; a stopped
    /// server does not start again.
    public func stop() {
        if running.exchange(false, ordering: .sequentiallyConsistent) {
            var one: UInt64 = 1
            _ = Glibc.write(wake, &one, 8)
            thread?.join()
            thread = nil
        }
        guard !closed.exchange(true, ordering: .sequentiallyConsistent) else { return }
        admin?.close()
        storeServer.stop()
        Glibc.close(listener); Glibc.close(wake)
        unlink(address.controlSocket)
        state.withLock { s in
            for (_, d) in s.domains {
                if d.memoryFD >= 0 { Glibc.close(d.memoryFD) }
                for (_, p) in d.ports { p.release() }
            }
            s.domains = [0: Domain(memoryFD: -1)]
        }
    }

    /// The ids of the live domains, domain 0 first.
    public var domains: [DomainID] { state.withLock { $0.domains.keys.sorted() } }

    private func serve() {
        var connections: [Int32] = []
        while running.load(ordering: .sequentiallyConsistent) {
            var fds = [pollfd(fd: listener, events: Int16(POLLIN), revents: 0), pollfd(fd: wake, events: Int16(POLLIN), revents: 0)]
            fds += connections.map { pollfd(fd: $0, events: Int16(POLLIN), revents: 0) }
            if poll(&fds, nfds_t(fds.count), -1) < 0 { continue }
            if fds[1].revents != 0 { break }
            if fds[0].revents & Int16(POLLIN) != 0 {
                let c = accept(listener, nil, nil)
                if c >= 0 {
                    // Replies go out without waiting (see `handle`), and no child inherits it.
                    _ = fcntl(c, F_SETFL, fcntl(c, F_GETFL) | O_NONBLOCK)
                    _ = fcntl(c, F_SETFD, FD_CLOEXEC)
                    connections.append(c)
                } else if errno == EMFILE || errno == ENFILE {
                    usleep(10_000)   // out of descriptors: serve the others rather than spin
                }
            }
            for p in fds.dropFirst(2) where p.revents != 0 {
                if !handle(connection: p.fd) {
                    disconnect(p.fd)
                    connections.removeAll { $0 == p.fd }
                }
            }
        }
        for c in connections { disconnect(c) }
    }

    /// Serves one message; false when the connection is done (EOF, error, malformed message).
    private func handle(connection c: Int32) -> Bool {
        guard let (m, stray) = LocalControlMessage.receive(on: c, maxFDs: 0) else { return false }
        stray.forEach { Glibc.close($0) }
        var reply = LocalControlMessage()
        reply.operation = m.operation
        var fds: [Int32] = []
        var closeAfterSend: [Int32] = []
        let me = state.withLock { $0.connectionDomain[c] }
        switch (LocalControlMessage.Operation(rawValue: m.operation), me) {
        case (.helloBackend, nil):
            state.withLock { $0.connectionDomain[c] = 0 }
            reply.a = 0
        case (.createDomain, nil):
            let pages = min(Int(m.a), 1 << 22)   // at most 16 GiB
            guard pages > 0, let (id, fd) = createDomain(name: m.name, pages: pages) else { reply.status = ENOMEM; break }
            state.withLock { $0.connectionDomain[c] = id }
            reply.a = UInt32(id)
            fds = [fd]
        case (.openMemory, .some(let me)):
            // Only domain 0 is handed a guest's memory, all of it, as Xen's dom0 may map any
            // guest's frames; its grant table then checks each grant (grantee, read-only) as Xen
            // does. A file descriptor cannot be narrowed to the pages granted to a domain, so a
            // guest domain gets none: another guest's memory is never in its reach, and a backend
            // in a guest (a driver domain) needs real Xen.
            guard me == 0 else { reply.status = EPERM; break }
            guard let fd = state.withLock({ $0.domains[DomainID(truncatingIfNeeded: m.a)]?.memoryFD }), fd >= 0 else {
                reply.status = ESRCH; break
            }
            fds = [fd]
        case (.allocUnbound, .some(let me)):
            switch allocUnbound(me, remote: DomainID(truncatingIfNeeded: m.a), owner: c) {
            case .success(let (port, end)):
                reply.a = port
                fds = [end]
                closeAfterSend = fds
            case .failure(let e): reply.status = e.rawValue
            }
        case (.bindInterdomain, .some(let me)):
            switch bind(me, remote: DomainID(truncatingIfNeeded: m.a), remotePort: m.b, owner: c) {
            case .success(let (port, end)):
                reply.a = port
                fds = [end]
                closeAfterSend = fds
            case .failure(let e): reply.status = e.rawValue
            }
        case (.closePort, .some(let me)):
            closePort(me, m.a)
        case (.connectStore, .some(let me)):
            let allowed = state.withLock { s in
                guard me == 0 || (s.domains[me]?.storeConnections ?? 0) < Self.guestStoreConnectionLimit else { return false }
                s.domains[me]?.storeConnections += 1
                return true
            }
            guard allowed else { reply.status = EDQUOT; break }
            var pair: [Int32] = [-1, -1]
            guard socketpair(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0, &pair) == 0 else {
                reply.status = errno; break
            }
            storeServer.addConnection(fileDescriptor: pair[0], domain: me)
            fds = [pair[1]]
            closeAfterSend = fds
        default:
            reply.status = EINVAL
        }
        // Without waiting: a domain that does not read its replies (its socket's queue is
        // full) is dropped, as xenstored drops a client that does not read, rather than let it
        // stop this thread, which serves every domain.
        let sent = reply.send(on: c, fds: fds)
        closeAfterSend.forEach { Glibc.close($0) }
        return sent
    }

    private func createDomain(name: String, pages: Int) -> (DomainID, Int32)? {
        let frames = Int(LocalDomainMemory.firstDataFrame) + pages
        let fd = cxen_memfd_create("softdev-domain", UInt32(CXEN_MFD_CLOEXEC))
        guard fd >= 0 else { return nil }
        guard ftruncate(fd, off_t(frames * xenPageSize)) == 0, cxen_seal_size(fd) == 0 else { Glibc.close(fd); return nil }
        let id: DomainID = state.withLock { s in
            let id = s.nextDomain
            s.nextDomain = s.nextDomain == 0x7fef ? 1 : s.nextDomain + 1   // DOMID_FIRST_RESERVED
            s.domains[id] = Domain(memoryFD: fd)
            return id
        }
        if let p = mmap(nil, xenPageSize, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0), p != MAP_FAILED {
            let h = p.assumingMemoryBound(to: localxen_domain_header.self)
            h.pointee.magic = LOCALXEN_MAGIC
            h.pointee.domid = UInt32(id)
            h.pointee.total_frames = UInt32(frames)
            munmap(p, xenPageSize)
        }
        introduceInStore(id, name: name.isEmpty ? "guest\(id)" : name)
        return (id, fd)
    }

    /// A new unbound port of `me` for `remote`; returns it and `me`'s end of its socket pair.
    private func allocUnbound(_ me: DomainID, remote: DomainID, owner: Int32) -> Result<(EventPort, Int32), Errno> {
        var pair: [Int32] = [-1, -1]
        guard socketpair(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue) | Int32(SOCK_NONBLOCK.rawValue), 0, &pair) == 0 else {
            return .failure(Errno(rawValue: errno))
        }
        // `me` gets pair[0]; the binder will get pair[1]. Each port keeps a copy of the other's.
        let keepTheirs = fcntl(pair[1], F_DUPFD_CLOEXEC, 0), keepMine = fcntl(pair[0], F_DUPFD_CLOEXEC, 0)
        let port: Result<EventPort, Errno> = keepTheirs < 0 || keepMine < 0 ? .failure(Errno(rawValue: EMFILE)) : state.withLock { s in
            guard s.domains[remote] != nil, var d = s.domains[me] else { return .failure(Errno(rawValue: ESRCH)) }
            guard me == 0 || d.ports.count < Self.guestPortLimit else { return .failure(Errno(rawValue: ENOSPC)) }
            let port = d.nextPort
            d.nextPort += 1
            d.ports[port] = Port(owner: owner, remote: remote, remotePort: nil, peerEnd: keepTheirs, pending: (pair[1], keepMine))
            s.domains[me] = d
            return .success(port)
        }
        if case .failure = port {
            for fd in pair + [keepTheirs, keepMine] where fd >= 0 { Glibc.close(fd) }
        }
        return port.map { ($0, pair[0]) }
    }

    /// Binds a port of `me` to `remote`'s unbound `remotePort`; returns it and `me`'s end.
    private func bind(_ me: DomainID, remote: DomainID, remotePort: EventPort, owner: Int32) -> Result<(EventPort, Int32), Errno> {
        state.withLock { s in
            guard var r = s.domains[remote] else { return .failure(Errno(rawValue: ESRCH)) }
            guard var p = r.ports[remotePort], p.remote == me else { return .failure(Errno(rawValue: ENOENT)) }
            guard let pending = p.pending, p.remotePort == nil else { return .failure(Errno(rawValue: EBUSY)) }
            guard var d = s.domains[me] else { return .failure(Errno(rawValue: ESRCH)) }
            guard me == 0 || d.ports.count < Self.guestPortLimit else { return .failure(Errno(rawValue: ENOSPC)) }
            let port = d.nextPort
            d.nextPort += 1
            d.ports[port] = Port(owner: owner, remote: remote, remotePort: remotePort, peerEnd: pending.keep, pending: nil)
            p.remotePort = port
            p.pending = nil
            r.ports[remotePort] = p
            s.domains[remote] = r
            s.domains[me] = d
            return .success((port, pending.end))
        }
    }

    private func closePort(_ me: DomainID, _ port: EventPort) {
        state.withLock { s in close(me, port, &s) }
    }

    /// Closes `me`'s `port`. As Xen's evtchn_close, the peer's port of a bound pair becomes
    /// unbound again, for `me`: a new binding (a backend started again after it was killed)
    /// takes it over, on the same socket pair, so the peer's end goes on working unchanged.
    private func close(_ me: DomainID, _ port: EventPort, _ s: inout State) {
        guard let p = s.domains[me]?.ports.removeValue(forKey: port) else { return }
        guard let rp = p.remotePort, var r = s.domains[p.remote]?.ports[rp] else { p.release(); return }
        let end = fcntl(r.peerEnd, F_DUPFD_CLOEXEC, 0)
        guard end >= 0 else {
            p.release()
            s.domains[p.remote]?.ports[rp]?.remotePort = nil
            return
        }
        // Our old end (a copy) for the next binder; the copy of the peer's end we held becomes
        // the one its port will keep.
        r.remotePort = nil
        r.pending = (end, p.peerEnd)
        s.domains[p.remote]!.ports[rp] = r
    }

    private func disconnect(_ c: Int32) {
        Glibc.close(c)
        guard let id = state.withLock({ $0.connectionDomain.removeValue(forKey: c) }) else { return }
        guard id != 0 else {
            // A process of domain 0 (the daemon, a tool) went: its ports close with it.
            state.withLock { s in
                for (port, p) in s.domains[0]?.ports ?? [:] where p.owner == c { close(0, port, &s) }
            }
            return
        }
        let gone: Domain? = state.withLock { s in
            let d = s.domains.removeValue(forKey: id)
            // Ports others left unbound for the dead domain can never be bound now.
            for k in s.domains.keys {
                for (port, p) in s.domains[k]!.ports where p.remote == id {
                    if let f = p.pending { Glibc.close(f.end); Glibc.close(f.keep) }
                    s.domains[k]!.ports[port]?.pending = nil
                }
            }
            return d
        }
        if let d = gone {
            if d.memoryFD >= 0 { Glibc.close(d.memoryFD) }
            for (_, p) in d.ports { p.release() }
        }
        // As the toolstack does when a domain dies: remove its home, then tell watchers.
        try? admin?.remove("/local/domain/\(id)", transaction: .none)
        try? storeServer.releaseDomain(id)
    }

    /// Writes the guest's home as libxl does: readable by the guest, `device` and `data` its own.
    private func introduceInStore(_ id: DomainID, name: String) {
        guard let admin else { return }
        let home = "/local/domain/\(id)"
        let readOnly = [XenStorePermission(domain: 0, access: .none), XenStorePermission(domain: id, access: .read)]
        let own = [XenStorePermission(domain: id, access: .none)]
        try? admin.transaction { (tx) throws(XenStoreError) in
            try admin.mkdir(home, transaction: tx)
            try admin.setPermissions(home, readOnly, transaction: tx)
            try admin.write(home + "/name", Array(name.utf8), transaction: tx)
            try admin.write(home + "/domid", Array("\(id)".utf8), transaction: tx)
            for dir in ["device", "data", "control"] {
                try admin.mkdir(home + "/" + dir, transaction: tx)
                try admin.setPermissions(home + "/" + dir, dir == "data" ? own : readOnly, transaction: tx)
            }
        }
        storeServer.introduceDomain(id)
    }
}

/// An errno value as an error.
public struct Errno: Error, Equatable, Sendable {
    public let rawValue: Int32
    public init(rawValue: Int32) { self.rawValue = rawValue }
}
