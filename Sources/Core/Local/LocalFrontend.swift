import XenStore

/// The frontend half of any paravirtual device, for a guest of the local hypervisor: the
/// xenbus handshake, shared rings in granted pages, and event channels, as a guest kernel's
/// xenbus driver does them. A class's frontend (Swift blkfront, netfront, usbfront) adds only
/// its protocol: which rings, which nodes, what goes in the requests.
///
/// ```swift
/// let link = try LocalFrontend(hypervisor: guest, frontendPath: fe)    // backend in InitWait
/// let features = try link.backendNodes(["feature-rx-copy"])
/// let tx = try link.makeRing(NetifTxRing.self, pageOrder: 0)
/// let rx = try link.makeRing(NetifRxRing.self, pageOrder: 0)
/// let channel = try link.makeChannel()
/// try link.connect(nodes: tx.nodes(name: "tx-ring-ref") + rx.nodes(name: "rx-ring-ref")
///                         + [("event-channel", "\(channel.localPort)")])
/// ...
/// try link.close()
/// ```
public final class LocalFrontend: @unchecked Sendable {
    public let hypervisor: LocalHypervisor
    public let pages: LocalGuestPages
    public let frontendPath: String
    public let backendPath: String
    public let backendDomain: DomainID
    public var store: any XenStoreClient { hypervisor.store }
    /// Made by `makeChannel`, closed by `close`.
    public private(set) var channels: [any EventChannel] = []

    public struct Failure: Error, CustomStringConvertible {
        public let description: String
        public init(_ d: String) { description = d }
    }

    /// A shared ring in pages of the guest, initialised (SHARED_RING_INIT) and granted to the
    /// backend. The frontend's protocol keeps `ring` and drives it.
    public struct Ring<T: RingTypes> {
        public var ring: FrontRing<T>
        public let frame: UInt32
        public let refs: [GrantRef]
        /// The nodes that tell the backend where the ring is: `name` alone for a one-page ring
        /// (blkif's ring-ref, netif's tx-ring-ref), `name0`..`nameN` for 2^order pages (blkif's
        /// ring-ref%u, with ring-page-order written beside them by the caller); `prefix` is a
        /// directory such as "queue-1/".
        public func nodes(prefix: String = "", name: String = "ring-ref") -> [(String, String)] {
            if refs.count == 1 { return [(prefix + name, "\(refs[0])")] }
            return refs.enumerated().map { (prefix + name + "\($0.offset)", "\($0.element)") }
        }
    }

    /// Finds the backend of the device at `frontendPath` (written by the toolstack) and waits
    /// until it has written its features (InitWait, or later if it is ahead).
    public init(hypervisor: LocalHypervisor, frontendPath: String, timeoutSeconds: Double = 10) throws {
        guard let pages = hypervisor.pages else { throw Failure("a frontend needs a guest domain") }
        self.hypervisor = hypervisor
        self.pages = pages
        self.frontendPath = frontendPath
        let store = hypervisor.store
        guard let be = try store.readString(frontendPath + "/backend"), let bid = try store.readInt(frontendPath + "/backend-id"),
              bid <= UInt64(DomainID.max) else {
            throw Failure("\(frontendPath) has no backend (was the device attached?)")
        }
        backendPath = be
        backendDomain = DomainID(bid)
        try waitForBackend([.initWait, .initialised, .connected], timeoutSeconds: timeoutSeconds)
    }

    /// Waits until the backend's state is one of `states`; Closing or Closed (unless awaited)
    /// throws at once with the backend's `error` node.
    @discardableResult
    public func waitForBackend(_ states: Set<XenbusDeviceState>, timeoutSeconds: Double = 10) throws -> XenbusDeviceState {
        try XenbusDeviceState.wait(store, backendPath + "/state", for: states, timeoutSeconds: timeoutSeconds)
    }

    /// The backend's nodes among `keys` that exist (its features, or after connect its
    /// device's description), by key.
    public func backendNodes(_ keys: [String]) throws -> [String: String] {
        var found: [String: String] = [:]
        for k in keys { if let v = try store.readString(backendPath + "/" + k) { found[k] = v } }
        return found
    }

    /// Allocates 2^`pageOrder` contiguous pages, initialises a shared ring of `T` in them, and
    /// grants each page to the backend, writable.
    public func makeRing<T: RingTypes>(_ type: T.Type = T.self, pageOrder: Int) throws -> Ring<T> {
        let count = 1 << pageOrder
        let frame = try pages.allocate(pages: count)
        let ring = FrontRing<T>(initializing: pages.pointer(frame), bytes: count * xenPageSize)
        let refs = try grant(frame: frame, count: count, readOnly: false)
        return Ring(ring: ring, frame: frame, refs: refs)
    }

    /// Grants `count` pages from `frame` to the backend.
    public func grant(frame: UInt32, count: Int, readOnly: Bool) throws -> [GrantRef] {
        try (0..<count).map { try pages.grant(frame: frame + UInt32($0), to: backendDomain, readOnly: readOnly) }
    }

    /// Allocates an event channel port the backend binds to (its number goes in a node).
    public func makeChannel() throws -> any EventChannel {
        let channel = try hypervisor.events.allocateUnbound(remote: backendDomain)
        channels.append(channel)
        return channel
    }

    /// Writes `nodes` (ring references, event channels, features; keys relative to the
    /// frontend's directory) and the state Initialised in one transaction, as a guest's
    /// xenbus driver does, then waits for the backend to connect and says Connected too.
    public func connect(nodes: [(String, String)], timeoutSeconds: Double = 10) throws {
        let store = self.store
        let fe = frontendPath
        try store.transaction { (tx) throws(XenStoreError) in
            for (k, v) in nodes { try store.write(fe + "/" + k, v, transaction: tx) }
            try store.write(fe + "/state", "\(XenbusDeviceState.initialised.rawValue)", transaction: tx)
        }
        try waitForBackend([.connected], timeoutSeconds: timeoutSeconds)
        try store.write(fe + "/state", "\(XenbusDeviceState.connected.rawValue)")
    }

    /// Closes as a guest's driver does: Closing, wait for the backend to close, Closed, wait
    /// again; then the event channels. A backend that does not answer in time is not waited
    /// for further (the guest goes on regardless).
    public func close(timeoutSeconds: Double = 10) throws {
        try store.write(frontendPath + "/state", "\(XenbusDeviceState.closing.rawValue)")
        _ = try? waitForBackend([.closing, .closed], timeoutSeconds: timeoutSeconds)
        try store.write(frontendPath + "/state", "\(XenbusDeviceState.closed.rawValue)")
        _ = try? waitForBackend([.closed], timeoutSeconds: timeoutSeconds)
        for c in channels { c.close() }
        channels = []
    }
}
