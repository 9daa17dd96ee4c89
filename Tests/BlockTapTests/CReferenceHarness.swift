import BlockTap
import CReference
import CXen
import Core
import Foundation
import Glibc
import XenStore

/// Lets C notify a local event channel: `ctx` is an unretained `LocalEventChannel`.
let creferenceNotify: @convention(c) (UnsafeMutableRawPointer?) -> Void = { ctx in
    Unmanaged<LocalEventChannel>.fromOpaque(ctx!).takeUnretainedValue().notify()
}

struct HarnessFailure: Error, CustomStringConvertible {
    let description: String
    init(_ d: String) { description = d }
}

/// Writes `nodes` under `directory` in one transaction (a xenbus handshake step).
func writeNodes(_ store: any XenStoreClient, _ directory: String, _ nodes: [(String, String)]) throws {
    try store.transaction { (tx) throws(XenStoreError) in
        for (key, value) in nodes { try store.write(directory + "/" + key, value, transaction: tx) }
    }
}

/// Polls `path` (a xenbus state node) until it holds one of `states`; throws on Closing/Closed
/// when those are not wanted, or after `timeoutSeconds`.
func waitForState(_ store: any XenStoreClient, _ path: String, _ states: Set<XenbusDeviceState>, timeoutSeconds: Double = 10) throws
    -> XenbusDeviceState {
    let deadline = monotonicSeconds() + timeoutSeconds
    while true {
        let raw = (try? store.readInt(path)).flatMap { $0 }.map { UInt32(truncatingIfNeeded: $0) } ?? 0
        let s = XenbusDeviceState(rawValue: raw) ?? .unknown
        if states.contains(s) { return s }
        if (s == .closing || s == .closed) && !states.contains(.closing) && !states.contains(.closed) {
            throw HarnessFailure("\(path) went to \(s)")
        }
        if monotonicSeconds() > deadline { throw HarnessFailure("\(path) did not reach \(states) (it is \(s))") }
        usleep(2000)
    }
}

/// The C conformance frontend (conformance.c) attached to a disk served by SoftDev's Swift
/// backend: Swift makes the guest's pages and event channel and does the xenstore handshake
/// (as Linux blkfront does: wait for InitWait, read the features, write ring-ref(s),
/// event-channel, ring-page-order, protocol, feature-persistent, Initialised, wait for
/// Connected); C owns the ring and every grant, and runs the checks.
final class CConformanceFrontend {
    static let dataPages: UInt32 = 2048
    let guest: LocalHypervisor
    let paths: XenbusDevicePaths
    let channel: LocalEventChannel
    let front: OpaquePointer
    let sectors: UInt64
    let persistent: Bool
    let maxIndirectSegments: UInt32

    init(guest: LocalHypervisor, paths: XenbusDevicePaths, ringOrder: Int, persistent wantPersistent: Bool, deviceBytes: UnsafeRawPointer?) throws {
        self.guest = guest
        self.paths = paths
        guard let memory = guest.memory else { throw HarnessFailure("not a guest") }
        let store = guest.store
        let be = paths.backendPath, fe = paths.frontendPath
        _ = try waitForState(store, be + "/state", [.initWait])
        let maxOrder = Int(try store.readInt(be + "/max-ring-page-order") ?? 0)
        guard ringOrder <= maxOrder else { throw HarnessFailure("backend offers ring order \(maxOrder) < \(ringOrder)") }
        let offered = try store.readInt(be + "/feature-persistent")
        let persistent = wantPersistent && offered == 1
        self.persistent = persistent
        maxIndirectSegments = UInt32(try store.readInt(be + "/feature-max-indirect-segments") ?? 0)
        let discard = (try store.readInt(be + "/feature-discard")) == 1

        let pages = LocalGuestPages(memory: memory)   // used for frames only: C makes the grants
        let ringFrame = try pages.allocate(pages: 1 << ringOrder)
        let dataFrame = try pages.allocate(pages: Int(Self.dataPages))
        guard let ch = try guest.events.allocateUnbound(remote: paths.backendDomain) as? LocalEventChannel else {
            throw HarnessFailure("not a local event channel")
        }
        channel = ch
        var env = cref_front_env()
        env.ring = pages.pointer(ringFrame)
        env.ring_frame = ringFrame
        env.ring_order = UInt32(ringOrder)
        env.grant_table = memory.base + Int(LOCALXEN_PAGE_SIZE)   // frames 1...128 (localxen.h)
        env.first_free_ref = 8                                      // Xen reserves refs 0..7
        env.free_refs = LOCALXEN_GRANT_ENTRIES - 8
        env.data = pages.pointer(dataFrame)
        env.data_frame = dataFrame
        env.data_pages = Self.dataPages
        env.backend_domid = paths.backendDomain
        env.persistent = persistent ? 1 : 0
        env.max_indirect_segments = maxIndirectSegments
        env.discard = discard ? 1 : 0
        env.discard_secure = UInt32(try store.readInt(be + "/discard-secure") ?? 0)
        env.wait_fd = ch.fileDescriptor
        env.notify = creferenceNotify
        env.notify_ctx = Unmanaged.passUnretained(ch).toOpaque()
        env.device_bytes = deviceBytes?.assumingMemoryBound(to: UInt8.self)
        var refs = [UInt32](repeating: 0, count: 16)
        guard let f = cref_front_init(&env, &refs) else { throw HarnessFailure("cref_front_init: errno \(errno)") }
        front = f

        let ringNodes = ringOrder == 0 ? [("ring-ref", "\(refs[0])")]
            : [("ring-page-order", "\(ringOrder)")] + (0..<(1 << ringOrder)).map { ("ring-ref\($0)", "\(refs[$0])") }
        try writeNodes(store, fe, ringNodes + [
            ("event-channel", "\(ch.localPort)"), ("protocol", "x86_64-abi"), ("feature-persistent", persistent ? "1" : "0"),
            ("state", "\(XenbusDeviceState.initialised.rawValue)")])
        _ = try waitForState(store, be + "/state", [.connected])
        sectors = try store.readInt(be + "/sectors") ?? 0
        try store.write(fe + "/state", "\(XenbusDeviceState.connected.rawValue)")
    }

    /// Runs the suite; returns (name, passed, message) per check.
    func runSuite() -> [(name: String, passed: Bool, message: String)] {
        var results = [cref_check](repeating: cref_check(), count: 128)
        let n = Int(cref_front_run_suite(front, sectors, &results, Int32(results.count)))
        return results.prefix(min(n, results.count)).map { c in
            var c = c
            let name = withUnsafeBytes(of: &c.name) { String(cString: $0.bindMemory(to: CChar.self).baseAddress!) }
            let message = withUnsafeBytes(of: &c.message) { String(cString: $0.bindMemory(to: CChar.self).baseAddress!) }
            return (name, c.passed != 0, message)
        } + (n > results.count ? [("results", false, "\(n - results.count) results did not fit")] : [])
    }

    /// Closes as blkfront does (Closing, backend closes, Closed), then revokes every grant;
    /// returns how many the backend had not released.
    func close() throws -> Int {
        let store = guest.store
        try store.write(paths.frontendPath + "/state", "\(XenbusDeviceState.closing.rawValue)")
        _ = try waitForState(store, paths.backendPath + "/state", [.closing, .closed])
        try store.write(paths.frontendPath + "/state", "\(XenbusDeviceState.closed.rawValue)")
        _ = try waitForState(store, paths.backendPath + "/state", [.closed])
        let busy = Int(cref_front_free(front))
        channel.close()
        return busy
    }
}

/// The C reference backend (reference_backend.c) playing the backend of a guest's disk whose
/// backend directory no service watches: Swift does the backend's xenstore handshake and maps
/// the ring (with the backend domain's grant table), C serves the ring.
final class CReferenceBackendHarness: @unchecked Sendable {
    let backend: LocalHypervisor
    let guest: LocalHypervisor
    let paths: XenbusDevicePaths
    let sectors: UInt64
    private var ringMapping: GrantMapping?
    private var ringRefs: [GrantRef] = []
    private var channel: LocalEventChannel?
    private var served: OpaquePointer?

    init(backend: LocalHypervisor, guest: LocalHypervisor, paths: XenbusDevicePaths, sectors: UInt64) {
        self.backend = backend; self.guest = guest; self.paths = paths; self.sectors = sectors
    }

    /// Advertises the features and waits in InitWait (call before the frontend connects).
    func advertise() throws {
        try writeNodes(backend.store, paths.backendPath, [
            ("feature-flush-cache", "1"), ("feature-discard", "1"), ("feature-persistent", "1"),
            ("feature-max-indirect-segments", "256"), ("max-ring-page-order", "4"), ("multi-queue-max-queues", "1"),
            ("state", "\(XenbusDeviceState.initWait.rawValue)")])
    }

    /// `connect()` on its own thread (the frontend's set-up blocks until we are Connected);
    /// `done` runs after it, with `connectError` set if it failed.
    private(set) var connectError: Error?
    func connectInBackground(done: @escaping @Sendable () -> Void) {
        Thread.detachNewThread {
            do { try self.connect() } catch { self.connectError = error }
            done()
        }
    }

    /// Waits for the frontend's Initialised, maps its ring, binds its event channel, starts the
    /// C backend and goes Connected.
    func connect() throws {
        let store = backend.store
        let fe = paths.frontendPath
        _ = try waitForState(store, fe + "/state", [.initialised, .connected])
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
        guard let b = cref_backend_start(&config) else { throw HarnessFailure("cref_backend_start: errno \(errno)") }
        served = b
        try writeNodes(store, paths.backendPath, [
            ("sectors", "\(sectors)"), ("info", "0"), ("sector-size", "512"), ("physical-sector-size", "512"),
            ("state", "\(XenbusDeviceState.connected.rawValue)")])
    }

    /// Stops the C backend (it unmaps its persistent grants), unmaps the ring, goes Closed.
    @discardableResult func stop() -> cref_backend_stats {
        var stats = cref_backend_stats()
        if let b = served { cref_backend_stop(b, &stats); served = nil }
        if let m = ringMapping { ringRefs.withUnsafeBufferPointer { backend.grants.unmap(m, refs: $0) }; ringMapping = nil }
        channel?.close()
        channel = nil
        try? backend.store.write(paths.backendPath + "/state", "\(XenbusDeviceState.closed.rawValue)")
        return stats
    }
}
