import CReference
import CXen
import Core
import Foundation
import Glibc
import XenStore

/// The C usbfront (usbif_conformance.c) attached to a `softdev-vusb` controller: Swift makes
/// the guest's pages and event channel and does the xenstore handshake as xen-hcd does
/// (num-ports and usb-ver read at probe, urb-ring-ref, conn-ring-ref and one event-channel,
/// then Connected); C owns both rings and every grant, and runs the checks or the bench.
/// The test's hands (typing on the keyboard, plugging a port) are closures C calls back.
public final class CUSBConformanceFrontend {
    public let link: LocalFrontend
    public let front: OpaquePointer
    private let hands: Hands

    /// What C calls back: type text on the keyboard; write a port's spec ("" empties it).
    public final class Hands {
        let type: (String) -> Bool
        let setPort: (Int, String) -> Bool
        public init(type: @escaping (String) -> Bool, setPort: @escaping (Int, String) -> Bool) { self.type = type; self.setPort = setPort }
    }

    public init(guest: LocalHypervisor, paths: XenbusDevicePaths, layout: cref_usb_layout, hands: Hands) throws {
        guard let memory = guest.memory else { throw HarnessFailure("not a guest") }
        let link = try LocalFrontend(hypervisor: guest, frontendPath: paths.frontendPath)
        self.link = link
        self.hands = hands
        let features = try link.backendNodes(["num-ports", "usb-ver"])
        guard let ports = features["num-ports"].flatMap({ UInt8($0) }), ports >= layout.ports else {
            throw HarnessFailure("the backend has \(features["num-ports"] ?? "no") num-ports, the layout \(layout.ports)")
        }
        let pages = link.pages   // frames only: C makes the grants
        let urbRing = try pages.allocate(pages: 1), connRing = try pages.allocate(pages: 1)
        let data = try pages.allocate(pages: Int(CREF_USB_DATA_PAGES))
        guard let channel = try link.makeChannel() as? LocalEventChannel else { throw HarnessFailure("not a local event channel") }
        var env = cref_usbfront_env()
        env.urb_ring = pages.pointer(urbRing); env.urb_ring_frame = urbRing
        env.conn_ring = pages.pointer(connRing); env.conn_ring_frame = connRing
        env.data = pages.pointer(data); env.data_frame = data
        env.grant_table = memory.base + Int(LOCALXEN_PAGE_SIZE)   // frames 1...128 (localxen.h)
        env.first_free_ref = 8                                      // Xen reserves refs 0..7
        env.free_refs = LOCALXEN_GRANT_ENTRIES - 8
        env.backend_domid = paths.backendDomain
        env.wait_fd = channel.fileDescriptor
        env.notify = creferenceNotify
        env.notify_ctx = Unmanaged.passUnretained(channel).toOpaque()
        env.type_text = { ctx, text in
            Unmanaged<Hands>.fromOpaque(ctx!).takeUnretainedValue().type(String(cString: text!)) ? 0 : -1
        }
        env.set_port = { ctx, port, spec in
            Unmanaged<Hands>.fromOpaque(ctx!).takeUnretainedValue().setPort(Int(port), String(cString: spec!)) ? 0 : -1
        }
        env.test_ctx = Unmanaged.passUnretained(hands).toOpaque()
        env.layout = layout
        var urbRef: UInt32 = 0, connRef: UInt32 = 0
        guard let f = cref_usbfront_init(&env, &urbRef, &connRef) else { throw HarnessFailure("cref_usbfront_init: errno \(errno)") }
        front = f
        try link.connect(nodes: [("urb-ring-ref", "\(urbRef)"), ("conn-ring-ref", "\(connRef)"), ("event-channel", "\(channel.localPort)")])
    }

    /// Runs the suite; (name, passed, message) per check.
    public func runSuite() -> [(name: String, passed: Bool, message: String)] {
        creferenceSuite(capacity: 64) { cref_usbfront_run_suite(front, $0, $1) }
    }

    /// Closes as xen-hcd does, then revokes every grant; how many the backend had not released.
    public func close() throws -> Int {
        try link.close()
        return Int(cref_usbfront_free(front))
    }
}

/// Runs a C suite that writes up to `capacity` results (`run(results, max)` returns how many
/// checks ran) and reads them as (name, passed, message); checks that did not fit are a failure.
public func creferenceSuite(capacity: Int, _ run: (UnsafeMutablePointer<cref_check>, Int32) -> Int32)
    -> [(name: String, passed: Bool, message: String)] {
    var results = [cref_check](repeating: cref_check(), count: capacity)
    let n = Int(results.withUnsafeMutableBufferPointer { run($0.baseAddress!, Int32(capacity)) })
    return results.prefix(min(n, capacity)).map { c in
        var c = c
        let name = withUnsafeBytes(of: &c.name) { String(cString: $0.bindMemory(to: CChar.self).baseAddress!) }
        let message = withUnsafeBytes(of: &c.message) { String(cString: $0.bindMemory(to: CChar.self).baseAddress!) }
        return (name, c.passed != 0, message)
    } + (n > capacity ? [("results", false, "\(n - capacity) results did not fit")] : [])
}
