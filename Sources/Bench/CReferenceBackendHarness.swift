import CReference
import CXen
import Core
import Foundation
import Glibc
import XenStore

/// The C reference backend (reference_backend.c) playing the backend of a guest's disk whose
/// backend directory no service watches: Swift does the backend's xenstore handshake and maps
/// the ring (with the backend domain's grant table), C serves the ring.
public final class CReferenceBackendHarness: BackendHarness, @unchecked Sendable {
    public let backend: LocalHypervisor
    public let guest: LocalHypervisor
    public let paths: XenbusDevicePaths
    public let sectors: UInt64
    /// The C backend's poll window, as `BlkifBackendOptions.pollMicroseconds` for SoftDev's.
    public var pollMicroseconds = 0
    private var ringMapping: GrantMapping?
    private var ringRefs: [GrantRef] = []
    private var channel: LocalEventChannel?
    private var served: OpaquePointer?

    public init(backend: LocalHypervisor, guest: LocalHypervisor, paths: XenbusDevicePaths, sectors: UInt64) {
        self.backend = backend; self.guest = guest; self.paths = paths; self.sectors = sectors
    }

    /// Advertises the features and waits in InitWait (call before the frontend connects).
    public func advertise() throws {
        try writeNodes(backend.store, paths.backendPath, [
            ("feature-flush-cache", "1"), ("feature-discard", "1"), ("feature-persistent", "1"),
            ("feature-max-indirect-segments", "256"), ("max-ring-page-order", "4"), ("multi-queue-max-queues", "1"),
            ("state", "\(XenbusDeviceState.initWait.rawValue)")])
    }

    /// Why `connectInBackground` failed (``BackendHarness``).
    public var connectError: Error?

    /// Waits for the frontend's Initialised, maps its ring, binds its event channel, starts the
    /// C backend and goes Connected.
    public func connect() throws {
        let store = backend.store
        let fe = paths.frontendPath
        _ = try XenbusDeviceState.wait(store, fe + "/state", for: [.initialised, .connected])
        let order = Int(try store.readInt(fe + "/ring-page-order") ?? 0)
        if order == 0, let r = try store.readInt(fe + "/ring-ref") { ringRefs = [GrantRef(r)] } else {
            for i in 0..<(1 << order) {
                guard let r = try store.readInt(fe + "/ring-ref\(i)") else { throw HarnessFailure("no ring-ref\(i)") }
                ringRefs.append(GrantRef(r))
            }
        }
        guard let port = try store.readInt(fe + "/event-channel") else { throw HarnessFailure("no event-channel") }
        let persistent = (try store.readInt(fe + "/feature-persistent")) == 1
        let mapping = try backend.grants.mapContiguous(domain: paths.frontendDomain, refs: ringRefs, writable: true)
        ringMapping = mapping
        guard let ch = try backend.events.bindInterdomain(remote: paths.frontendDomain, remotePort: EventPort(port)) as? LocalEventChannel else {
            throw HarnessFailure("not a local event channel")
        }
        channel = ch
        // The guest's memory as the backend sees it: this process already maps it (the guest is
        // ours), and the C backend validates every grant in it as LocalGrantTable does.
        guard let memory = guest.memory else { throw HarnessFailure("not a guest") }
        var config = cref_backend_config()
        config.guest_memory = memory.base
        config.total_frames = memory.totalFrames
        config.ring = mapping.base
        config.ring_order = UInt32(order)
        config.domid = paths.backendDomain
        config.persistent = persistent ? 1 : 0
        config.max_indirect_segments = 256
        config.sectors = sectors
        config.wait_fd = ch.fileDescriptor
        config.notify_fd = -1
        config.notify = creferenceNotify
        config.notify_ctx = Unmanaged.passUnretained(ch).toOpaque()
        config.poll_us = UInt32(clamping: pollMicroseconds)
        guard let b = cref_backend_start(&config) else { throw HarnessFailure("cref_backend_start: errno \(errno)") }
        served = b
        try writeNodes(store, paths.backendPath, [
            ("sectors", "\(sectors)"), ("info", "0"), ("sector-size", "512"), ("physical-sector-size", "512"),
            ("state", "\(XenbusDeviceState.connected.rawValue)")])
    }

    /// Stops the C backend (it unmaps its persistent grants), unmaps the ring, goes Closed.
    @discardableResult public func stop() -> cref_backend_stats {
        var stats = cref_backend_stats()
        if let b = served { cref_backend_stop(b, &stats); served = nil }
        if let m = ringMapping { ringRefs.withUnsafeBufferPointer { backend.grants.unmap(m, refs: $0) }; ringMapping = nil }
        channel?.close()
        channel = nil
        try? backend.store.write(paths.backendPath + "/state", "\(XenbusDeviceState.closed.rawValue)")
        return stats
    }
}
