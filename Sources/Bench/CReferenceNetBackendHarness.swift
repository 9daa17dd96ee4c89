import CReference
import CXen
import Core
import Foundation
import Glibc
import XenStore

/// The C reference netif backend (netif_reference_backend.c) playing the backend of a guest's
/// vif whose backend directory no service watches: Swift does netback's side of the xenstore
/// handshake (the features, InitWait; at the frontend's Initialised or Connected: the queue's
/// rings and event channels), maps the rings with the backend domain's grant table, and C
/// serves them: tx frames copied out and dropped, rx buffers filled with generated frames.
public final class CReferenceNetBackendHarness: BackendHarness, @unchecked Sendable {
    public let backend: LocalHypervisor
    public let guest: LocalHypervisor
    public let paths: XenbusDevicePaths
    /// The C backend's poll window, as `NetifBackendOptions.pollMicroseconds` for SoftDev's.
    public var pollMicroseconds = 0
    private var rings: [(GrantMapping, GrantRef)] = []
    private var channels: [LocalEventChannel] = []
    private var served: OpaquePointer?

    public init(backend: LocalHypervisor, guest: LocalHypervisor, paths: XenbusDevicePaths) {
        self.backend = backend; self.guest = guest; self.paths = paths
    }

    /// Advertises netback's features for one queue and waits in InitWait.
    public func advertise() throws {
        try writeNodes(backend.store, paths.backendPath, [
            ("feature-rx-copy", "1"), ("feature-rx-flip", "0"), ("feature-sg", "1"), ("feature-gso-tcpv4", "1"),
            ("feature-gso-tcpv6", "1"), ("feature-split-event-channels", "1"), ("multi-queue-max-queues", "1"),
            ("state", "\(XenbusDeviceState.initWait.rawValue)")])
    }

    /// Why `connectInBackground` failed (``BackendHarness``).
    public var connectError: Error?

    /// Waits for the frontend, maps its rings, binds its event channel(s), starts the C backend
    /// and goes Connected.
    public func connect() throws {
        let store = backend.store
        let fe = paths.frontendPath
        _ = try XenbusDeviceState.wait(store, fe + "/state", for: [.initialised, .connected])
        func number(_ key: String) throws -> UInt64? { try store.readInt(fe + "/" + key) }
        guard try number("request-rx-copy") == 1 else { throw HarnessFailure("the frontend did not request rx-copy") }
        guard let txRef = try number("tx-ring-ref"), let rxRef = try number("rx-ring-ref") else { throw HarnessFailure("no ring refs") }
        let ports = try [number("event-channel-tx"), number("event-channel-rx")].compactMap { $0 }
        let single = try number("event-channel")
        guard ports.count == 2 || single != nil else { throw HarnessFailure("no event channel") }
        for ref in [txRef, rxRef] {
            let r = GrantRef(ref)
            rings.append((try backend.grants.mapContiguous(domain: paths.frontendDomain, refs: [r], writable: true), r))
        }
        for port in ports.count == 2 ? ports : [single!] {
            guard let ch = try backend.events.bindInterdomain(remote: paths.frontendDomain, remotePort: EventPort(port)) as? LocalEventChannel else {
                throw HarnessFailure("not a local event channel")
            }
            channels.append(ch)
        }
        guard let memory = guest.memory else { throw HarnessFailure("not a guest") }
        var config = cref_net_backend_config()
        config.guest_memory = memory.base
        config.total_frames = memory.totalFrames
        config.tx_ring = rings[0].0.base
        config.rx_ring = rings[1].0.base
        config.domid = paths.backendDomain
        config.gso = try number("feature-gso-tcpv4") == 1 ? 1 : 0
        config.tx_wait_fd = channels[0].fileDescriptor
        config.rx_wait_fd = channels.last!.fileDescriptor
        config.notify = creferenceNotify
        config.tx_notify_ctx = Unmanaged.passUnretained(channels[0]).toOpaque()
        config.rx_notify_ctx = Unmanaged.passUnretained(channels.last!).toOpaque()
        config.poll_us = UInt32(clamping: pollMicroseconds)
        guard let b = cref_net_backend_start(&config) else { throw HarnessFailure("cref_net_backend_start: errno \(errno)") }
        served = b
        try store.write(paths.backendPath + "/state", "\(XenbusDeviceState.connected.rawValue)")
    }

    /// From now on, fill the guest's rx buffers with `size`-byte frames (0: none), with a GSO
    /// extra of `gsoSize` for frames larger than an MTU.
    public func generate(frameSize size: Int, gsoSize: UInt16 = 0) {
        if let b = served { cref_net_backend_set_rx(b, UInt32(size), gsoSize) }
    }

    /// Counters so far.
    public var stats: cref_net_backend_stats {
        var s = cref_net_backend_stats()
        if let b = served { cref_net_backend_get_stats(b, &s) }
        return s
    }

    /// Stops the C backend, unmaps the rings, goes Closed.
    @discardableResult public func stop() -> cref_net_backend_stats {
        var stats = cref_net_backend_stats()
        if let b = served { cref_net_backend_stop(b, &stats); served = nil }
        for (mapping, ref) in rings { backend.grants.unmap(mapping, refs: [ref]) }
        rings = []
        channels.forEach { $0.close() }
        channels = []
        try? backend.store.write(paths.backendPath + "/state", "\(XenbusDeviceState.closed.rawValue)")
        return stats
    }
}
