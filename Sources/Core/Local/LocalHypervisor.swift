import CXen
import Glibc
import Synchronization
import XenStore

/// Where an emulated hypervisor lives: a directory holding its control socket and its
/// xenstore socket (`xenstored.sock`, for `XENSTORED_PATH=... xenstore-ls`).
public struct LocalHypervisorAddress: Sendable, Equatable {
    public var directory: String
    public init(directory: String) { self.directory = directory }
    public var controlSocket: String { directory + "/hypervisor.sock" }
    public var storeSocket: String { directory + "/xenstored.sock" }
    /// The default: $SOFTDEV_LOCAL_HYPERVISOR, else /run/softdev/local.
    public static var `default`: LocalHypervisorAddress {
        LocalHypervisorAddress(directory: getenv("SOFTDEV_LOCAL_HYPERVISOR").map { String(cString: $0) } ?? "/run/softdev/local")
    }
}

/// Errors from the emulated hypervisor's control connection.
public enum LocalHypervisorError: Error, CustomStringConvertible {
    case cannotConnect(path: String, errno: Int32)
    case refused(operation: String, errno: Int32)
    case disconnected
    public var description: String {
        switch self {
        case let .cannotConnect(path, e):
            return "cannot connect to the local hypervisor at \(path): \(String(cString: strerror(e))) (start one with `softdev serve --hypervisor local --local-dir DIR`, and give the same directory here with --local-dir or SOFTDEV_LOCAL_HYPERVISOR)"
        case let .refused(op, e): return "local hypervisor refused \(op): \(String(cString: strerror(e)))"
        case .disconnected: return "the local hypervisor went away"
        }
    }
}

/// A domain's connection to the emulated hypervisor: a backend (domain 0) or a guest.
/// It offers the same ``Hypervisor`` interface as real Xen.
public final class LocalHypervisor: Hypervisor, @unchecked Sendable {
    public let domainID: DomainID
    public let address: LocalHypervisorAddress
    public var kind: String { "local" }
    public let grants: any GrantTable
    public let events: any EventChannels
    public let store: any XenStoreClient
    /// For a guest: its own memory, where it allocates pages and grants them.
    public let memory: LocalDomainMemory?
    /// For a guest: the one allocator of its pages and grant references, which every frontend
    /// of the guest shares (two allocators would hand out the same frames and references).
    public let pages: LocalGuestPages?

    private let control: LocalControlConnection

    /// Connects as the backend domain (0).
    public static func connectBackend(_ address: LocalHypervisorAddress = .default) throws -> LocalHypervisor {
        try LocalHypervisor(address: address, hello: LocalControlMessage(.helloBackend))
    }

    /// Creates a guest domain named `name` with `pages` 4 KiB pages of memory; it lives as long
    /// as this object (or this process).
    public static func createGuest(_ address: LocalHypervisorAddress = .default, name: String, pages: Int) throws -> LocalHypervisor {
        try LocalHypervisor(address: address, hello: LocalControlMessage(.createDomain, a: UInt32(pages), name: name))
    }

    private init(address: LocalHypervisorAddress, hello: LocalControlMessage) throws {
        self.address = address
        let (s, e) = LocalControlSocket.open(address.controlSocket) { Glibc.connect($0, $1, $2) }
        guard s >= 0 else { throw LocalHypervisorError.cannotConnect(path: address.controlSocket, errno: e) }
        let control = LocalControlConnection(s)
        // Until the end of this initialiser, a failure closes the connection (for a guest, the
        // hypervisor then destroys the domain it just created).
        var connected = false
        defer { if !connected { control.close() } }
        let (reply, fds) = try control.call(hello, expectFDs: hello.operation == LocalControlMessage.Operation.createDomain.rawValue ? 1 : 0)
        let me = DomainID(truncatingIfNeeded: reply.a)
        let memory = try fds.first.map { (fd) throws(GrantError) in try LocalDomainMemory(domain: me, fd: fd) }
        // The xenstore connection is made by the broker, bound to our domain id.
        let storeFD = try control.call(LocalControlMessage(.connectStore), expectFDs: 1).1[0]
        store = try XenStoreSocketClient(fileDescriptor: storeFD)
        grants = LocalGrantTable(me: me) { (domain) throws(GrantError) in
            if domain == me, let memory { return memory }
            return try control.openMemory(domain, as: me)
        }
        events = LocalEventChannels(control)
        domainID = me
        self.memory = memory
        pages = memory.map { LocalGuestPages(memory: $0) }
        self.control = control
        connected = true
    }

    deinit { destroy() }

    private let destroyed = Atomic<Bool>(false)
    /// Ends this domain: for a guest, the hypervisor destroys it (as when it crashes).
    public func destroy() {
        guard !destroyed.exchange(true, ordering: .sequentiallyConsistent) else { return }
        (store as? XenStoreSocketClient)?.close()
        control.close()
    }

    /// Another domain's whole memory, for mapping its grants: the broker hands it to domain 0 only.
    func openMemory(_ domain: DomainID) throws(GrantError) -> LocalDomainMemory {
        if domain == domainID, let memory { return memory }
        return try control.openMemory(domain, as: domainID)
    }
}

/// The control connection: one request and its reply at a time, shared by the hypervisor
/// object, its grant table and its event channels.
final class LocalControlConnection: @unchecked Sendable {
    private let socket: Int32
    private let lock = Mutex<Bool>(false)   // closed

    init(_ socket: Int32) { self.socket = socket }

    /// Sends `m` and waits for its reply, which must carry `expectFDs` descriptors.
    func call(_ m: LocalControlMessage, expectFDs: Int = 0) throws -> (LocalControlMessage, [Int32]) {
        try lock.withLock { closed in
            guard !closed, m.send(on: socket),
                  let (reply, fds) = LocalControlMessage.receive(on: socket, maxFDs: max(expectFDs, 1)) else {
                throw LocalHypervisorError.disconnected
            }
            guard reply.status == 0 else {
                fds.forEach { Glibc.close($0) }
                throw LocalHypervisorError.refused(operation: "\(m.operation)", errno: reply.status)
            }
            guard fds.count == expectFDs else { fds.forEach { Glibc.close($0) }; throw LocalHypervisorError.disconnected }
            return (reply, fds)
        }
    }

    /// `domain`'s memory, asked for by domain `me`.
    func openMemory(_ domain: DomainID, as me: DomainID) throws(GrantError) -> LocalDomainMemory {
        let fds: [Int32]
        do { fds = try call(LocalControlMessage(.openMemory, a: UInt32(domain)), expectFDs: 1).1 }
        catch LocalHypervisorError.refused(_, let e) where e == EPERM {
            throw .system(operation: "domain \(me) mapping grants of domain \(domain) (on the local hypervisor only domain 0 maps grants)", errno: EPERM)
        }
        catch { throw .noSuchDomain(domain) }
        return try LocalDomainMemory(domain: domain, fd: fds[0])
    }

    /// Closes the connection; later calls throw `.disconnected`. Idempotent.
    func close() {
        lock.withLock { closed in
            if !closed { Glibc.close(socket) }
            closed = true
        }
    }
}

/// Event channels through the broker: it creates a socket pair and hands each end its socket.
final class LocalEventChannels: EventChannels, @unchecked Sendable {
    private let control: LocalControlConnection
    init(_ control: LocalControlConnection) { self.control = control }

    private func channel(_ m: LocalControlMessage, remote: DomainID, port: EventPort) throws(EventChannelError) -> any EventChannel {
        let reply: LocalControlMessage, fds: [Int32]
        do { (reply, fds) = try control.call(m, expectFDs: 1) }
        catch LocalHypervisorError.refused(_, let e) where e == ESRCH { throw .noSuchDomain(remote) }
        catch LocalHypervisorError.refused(_, let e) where e == EBUSY { throw .portInUse(domain: remote, port: port) }
        catch LocalHypervisorError.refused(_, let e) { throw .noSuchPort(domain: remote, port: port) .orSystem(e) }
        catch { throw .system(operation: "event channel", errno: EPIPE) }
        let control = control
        return LocalEventChannel(port: reply.a, socket: fds[0]) { port in
            _ = try? control.call(LocalControlMessage(.closePort, a: port))
        }
    }

    func bindInterdomain(remote: DomainID, remotePort: EventPort) throws(EventChannelError) -> any EventChannel {
        try channel(LocalControlMessage(.bindInterdomain, a: UInt32(remote), b: remotePort), remote: remote, port: remotePort)
    }
    func allocateUnbound(remote: DomainID) throws(EventChannelError) -> any EventChannel {
        try channel(LocalControlMessage(.allocUnbound, a: UInt32(remote)), remote: remote, port: 0)
    }
}

extension EventChannelError {
    fileprivate func orSystem(_ e: Int32) -> EventChannelError { e == ENOENT || e == EINVAL ? self : .system(operation: "event channel", errno: e) }
}
