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
    public private(set) var grants: any GrantTable = NoGrants()
    public private(set) var events: any EventChannels = NoEvents()
    public let store: any XenStoreClient
    /// For a guest: its own memory, where it allocates pages and grants them.
    public let memory: LocalDomainMemory?

    private let control: Int32
    private let controlLock = Mutex<Void>(())

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
        control = try Self.connect(address.controlSocket)
        guard hello.send(on: control), let (reply, fds) = LocalControlMessage.receive(on: control, maxFDs: 1) else {
            Glibc.close(control); throw LocalHypervisorError.disconnected
        }
        guard reply.status == 0 else { Glibc.close(control); throw LocalHypervisorError.refused(operation: "hello", errno: reply.status) }
        domainID = DomainID(truncatingIfNeeded: reply.a)
        if hello.operation == LocalControlMessage.Operation.createDomain.rawValue {
            guard let fd = fds.first else { Glibc.close(control); throw LocalHypervisorError.disconnected }
            memory = try LocalDomainMemory(domain: domainID, fd: fd)
        } else {
            memory = nil
        }
        // The xenstore connection is made by the broker, bound to our domain id.
        let storeFD: Int32
        do {
            let (_, sfds) = try Self.call(control, LocalControlMessage(.connectStore), expectFDs: 1)
            storeFD = sfds[0]
        }
        do {
            store = try XenStoreSocketClient(fileDescriptor: storeFD)
        } catch {
            Glibc.close(control)   // for a guest, the hypervisor then destroys the domain
            throw error
        }
        grants = LocalGrantTable(me: domainID) { [unowned self] (d) throws(GrantError) in try self.openMemory(d) }
        events = LocalEventChannels(self)
    }

    deinit { destroy() }

    private let destroyed = Atomic<Bool>(false)
    /// Ends this domain: for a guest, the hypervisor destroys it (as when it crashes).
    public func destroy() {
        guard !destroyed.exchange(true, ordering: .sequentiallyConsistent) else { return }
        (store as? XenStoreSocketClient)?.close()
        Glibc.close(control)
    }

    private static func connect(_ path: String) throws -> Int32 {
        let (s, e) = LocalControlSocket.open(path) { Glibc.connect($0, $1, $2) }
        guard s >= 0 else { throw LocalHypervisorError.cannotConnect(path: path, errno: e) }
        return s
    }

    private static func call(_ control: Int32, _ m: LocalControlMessage, expectFDs: Int) throws -> (LocalControlMessage, [Int32]) {
        guard m.send(on: control), let (reply, fds) = LocalControlMessage.receive(on: control, maxFDs: max(expectFDs, 1)) else {
            throw LocalHypervisorError.disconnected
        }
        guard reply.status == 0 else {
            fds.forEach { Glibc.close($0) }
            throw LocalHypervisorError.refused(operation: "\(m.operation)", errno: reply.status)
        }
        guard fds.count == expectFDs else { fds.forEach { Glibc.close($0) }; throw LocalHypervisorError.disconnected }
        return (reply, fds)
    }

    /// One request and its reply, serialised on the control connection.
    func call(_ m: LocalControlMessage, expectFDs: Int = 0) throws -> (LocalControlMessage, [Int32]) {
        try controlLock.withLock { _ in try Self.call(control, m, expectFDs: expectFDs) }
    }

    /// Another domain's whole memory, for mapping its grants: the broker hands it to domain 0 only.
    func openMemory(_ domain: DomainID) throws(GrantError) -> LocalDomainMemory {
        if domain == domainID, let memory { return memory }
        let fds: [Int32]
        do { fds = try call(LocalControlMessage(.openMemory, a: UInt32(domain)), expectFDs: 1).1 }
        catch LocalHypervisorError.refused(_, let e) where e == EPERM {
            throw .system(operation: "domain \(domainID) mapping grants of domain \(domain) (on the local hypervisor only domain 0 maps grants)", errno: EPERM)
        }
        catch { throw .noSuchDomain(domain) }
        return try LocalDomainMemory(domain: domain, fd: fds[0])
    }

    /// Whether `domain` still exists, and its name.
    public func domainName(_ domain: DomainID) -> String? {
        (try? call(LocalControlMessage(.domainInfo, a: UInt32(domain))))?.0.name
    }
}

/// Placeholders used only while the hypervisor object is being initialised.
private final class NoGrants: GrantTable, @unchecked Sendable {
    func mapContiguous(domain: DomainID, refs: [GrantRef], writable: Bool) throws(GrantError) -> GrantMapping { throw .noSuchDomain(domain) }
    func mapBatch(domain: DomainID, refs: UnsafeBufferPointer<GrantRef>, writable: Bool, pages: UnsafeMutableBufferPointer<UnsafeMutableRawPointer>) throws(GrantError) -> GrantMapping { throw .noSuchDomain(domain) }
    func unmap(_ mapping: GrantMapping, refs: UnsafeBufferPointer<GrantRef>) {}
    func copy(_ segments: UnsafeMutableBufferPointer<GrantCopySegment>) {}
}
private final class NoEvents: EventChannels, @unchecked Sendable {
    func bindInterdomain(remote: DomainID, remotePort: EventPort) throws(EventChannelError) -> any EventChannel { throw .noSuchDomain(remote) }
    func allocateUnbound(remote: DomainID) throws(EventChannelError) -> any EventChannel { throw .noSuchDomain(remote) }
}

/// Event channels through the broker: it creates a socket pair and hands each end its socket.
final class LocalEventChannels: EventChannels, @unchecked Sendable {
    private unowned let hypervisor: LocalHypervisor
    init(_ hypervisor: LocalHypervisor) { self.hypervisor = hypervisor }

    private func channel(_ m: LocalControlMessage, remote: DomainID, port: EventPort) throws(EventChannelError) -> any EventChannel {
        let reply: LocalControlMessage, fds: [Int32]
        do { (reply, fds) = try hypervisor.call(m, expectFDs: 1) }
        catch LocalHypervisorError.refused(_, let e) where e == ESRCH { throw .noSuchDomain(remote) }
        catch LocalHypervisorError.refused(_, let e) where e == EBUSY { throw .portInUse(domain: remote, port: port) }
        catch LocalHypervisorError.refused(_, let e) { throw .noSuchPort(domain: remote, port: port) .orSystem(e) }
        catch { throw .system(operation: "event channel", errno: EPIPE) }
        let h = hypervisor
        return LocalEventChannel(port: reply.a, socket: fds[0]) { port in
            _ = try? h.call(LocalControlMessage(.closePort, a: port))
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
