/// Why an event channel operation failed.
public enum EventChannelError: Error, Equatable, Sendable, CustomStringConvertible {
    case noSuchPort(domain: DomainID, port: EventPort)
    case noSuchDomain(DomainID)
    case portInUse(domain: DomainID, port: EventPort)
    case system(operation: String, errno: Int32)
    public var description: String {
        switch self {
        case let .noSuchPort(d, p): return "domain \(d) has no unbound event channel port \(p) for us"
        case let .noSuchDomain(d): return "domain \(d) does not exist"
        case let .portInUse(d, p): return "event channel port \(p) of domain \(d) is already bound"
        case let .system(op, e): return "\(op) failed: errno \(e)"
        }
    }
}

/// Event channels: allocate or bind the local end of an inter-domain channel.
public protocol EventChannels: AnyObject, Sendable {
    /// Binds to `remotePort`, which `remote` allocated unbound for us (a backend's usual call).
    func bindInterdomain(remote: DomainID, remotePort: EventPort) throws(EventChannelError) -> any EventChannel
    /// Allocates a port that `remote` may bind to (a frontend's usual call).
    func allocateUnbound(remote: DomainID) throws(EventChannelError) -> any EventChannel
}

/// The local end of an event channel. One thread owns it; `notify` may come from any thread.
public protocol EventChannel: AnyObject, Sendable {
    var localPort: EventPort { get }
    /// Readable (poll POLLIN) while an event is pending: put it in a poll set beside other fds.
    var fileDescriptor: Int32 { get }
    /// Signals the other end.
    func notify()
    /// Clears the pending event and unmasks the port; returns whether one was pending.
    @discardableResult func consume() -> Bool
    /// Clears the pending event and leaves the port masked: the peer's notifications stay
    /// pending, undelivered, until `unmask`. Returns whether one was pending. A ring thread
    /// takes the event so, serves the ring, and unmasks only then (XSA-332: Linux's
    /// `xen_irq_lateeoi`), so that a peer notifying in a loop cannot keep it spinning.
    @discardableResult func takePending() -> Bool
    /// Unmasks the port after `takePending`: an event that came meanwhile is delivered now
    /// (the descriptor becomes readable again).
    func unmask()
    /// Waits up to `timeoutMilliseconds` (-1: forever) for an event, then consumes it.
    func wait(timeoutMilliseconds: Int32) -> Bool
    /// Closes this end; the peer's notifications go nowhere after this.
    func close()
}

extension EventChannel {
    /// Both halves at once, for a thread that has nothing to serve between them (a frontend).
    @discardableResult public func consume() -> Bool {
        guard takePending() else { return false }   // nothing delivered, nothing masked
        unmask()
        return true
    }
}
