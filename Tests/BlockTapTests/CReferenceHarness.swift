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
/// with a ``LocalFrontend`` (as Linux blkfront does: wait for InitWait, read the features,
/// write ring-ref(s), event-channel, ring-page-order, protocol, feature-persistent,
/// Initialised, wait for Connected); C owns the ring and every grant, and runs the checks.
final class CConformanceFrontend {
    static let dataPages: UInt32 = 2048
    let link: LocalFrontend
    let channel: LocalEventChannel
    let front: OpaquePointer
    let sectors: UInt64
    let persistent: Bool
    let maxIndirectSegments: UInt32

    init(guest: LocalHypervisor, paths: XenbusDevicePaths, ringOrder: Int, persistent wantPersistent: Bool, deviceBytes: UnsafeRawPointer?) throws {
        guard let memory = guest.memory else { throw HarnessFailure("not a guest") }
        link = try LocalFrontend(hypervisor: guest, frontendPath: paths.frontendPath)
        let features = try link.backendNodes(["max-ring-page-order", "feature-persistent", "feature-max-indirect-segments",
                                              "feature-discard", "discard-secure"])
        func feature(_ key: String) -> UInt32 { features[key].flatMap { UInt32($0) } ?? 0 }
        let maxOrder = Int(feature("max-ring-page-order"))
        guard ringOrder <= maxOrder else { throw HarnessFailure("backend offers ring order \(maxOrder) < \(ringOrder)") }
        let persistent = wantPersistent && feature("feature-persistent") == 1
        self.persistent = persistent
        maxIndirectSegments = feature("feature-max-indirect-segments")
        let discard = feature("feature-discard") == 1

        let pages = link.pages   // used for frames only: C makes the grants
        let ringFrame = try pages.allocate(pages: 1 << ringOrder)
        let dataFrame = try pages.allocate(pages: Int(Self.dataPages))
        guard let ch = try link.makeChannel() as? LocalEventChannel else { throw HarnessFailure("not a local event channel") }
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
        env.discard_secure = feature("discard-secure")
        env.wait_fd = ch.fileDescriptor
        env.notify = creferenceNotify
        env.notify_ctx = Unmanaged.passUnretained(ch).toOpaque()
        env.device_bytes = deviceBytes?.assumingMemoryBound(to: UInt8.self)
        var refs = [UInt32](repeating: 0, count: 16)
        guard let f = cref_front_init(&env, &refs) else { throw HarnessFailure("cref_front_init: errno \(errno)") }
        front = f

        let ringNodes = ringOrder == 0 ? [("ring-ref", "\(refs[0])")]
            : [("ring-page-order", "\(ringOrder)")] + (0..<(1 << ringOrder)).map { ("ring-ref\($0)", "\(refs[$0])") }
        try link.connect(nodes: ringNodes + [("event-channel", "\(ch.localPort)"), ("protocol", "x86_64-abi"),
                                             ("feature-persistent", persistent ? "1" : "0")])
        sectors = try link.backendNodes(["sectors"])["sectors"].flatMap { UInt64($0) } ?? 0
    }

    /// Runs the suite; returns (name, passed, message) per check.
    func runSuite() -> [(name: String, passed: Bool, message: String)] {
        creferenceSuite(capacity: 128) { cref_front_run_suite(front, sectors, $0, $1) }
    }

    /// Closes as blkfront does (Closing, backend closes, Closed), then revokes every grant;
    /// returns how many the backend had not released.
    func close() throws -> Int {
        try link.close()
        return Int(cref_front_free(front))
    }
}
