import Bench
import BlockTap
import CReference
import CXen
import Core
import Foundation
import Glibc
import XenStore

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
        _ = try XenbusDeviceState.wait(store, be + "/state", for: [.initWait])
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
        _ = try XenbusDeviceState.wait(store, be + "/state", for: [.connected])
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
        _ = try XenbusDeviceState.wait(store, paths.backendPath + "/state", for: [.closing, .closed])
        try store.write(paths.frontendPath + "/state", "\(XenbusDeviceState.closed.rawValue)")
        _ = try XenbusDeviceState.wait(store, paths.backendPath + "/state", for: [.closed])
        let busy = Int(cref_front_free(front))
        channel.close()
        return busy
    }
}
