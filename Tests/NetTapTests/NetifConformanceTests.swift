import Bench
import CReference
import CXen
import Core
import Foundation
import Glibc
import NetTap
import XCTest
import XenStore

/// SoftDev's netif backend driven by a netfront written in C with Xen's own ring macros
/// (Sources/CReference/netif_conformance.c): each C check is one assertion, by name.
final class NetifConformanceTests: XCTestCase {
    var lab: NetLab!
    override func setUpWithError() throws { lab = try NetLab() }
    override func tearDown() { lab.shutdown() }

    static let checks = ["ring-sizes", "tx-single-slot", "rx-single-slot", "tx-multi-slot-9000", "rx-multi-slot-9000",
                         "tx-gso-tcpv4-64k", "rx-gso-tcpv4-64k", "tx-csum-blank-is-partial", "tx-data-validated-is-validated",
                         "rx-checksum-flags", "two-queues", "short-first-slot-refused", "tx-one-response-per-slot",
                         "rx-responses-in-their-slots", "grants-released-by-responses"]

    /// One queue on one event channel (flat nodes), and two queues with split channels
    /// (queue-N/ nodes, event-channel-tx/-rx).
    func testCNetfrontAgainstTheSwiftBackend() throws {
        for (queues, split) in [(1, false), (2, true)] {
            let where_ = "\(queues) queue(s), split event channels \(split)"
            let endpoint = RecordingEndpoint()
            let (guest, paths) = try lab.guestWithVif(endpoint, name: "cnet\(queues)")
            let front = try CNetConformanceFrontend(guest: guest, paths: paths, queues: queues, split: split, endpoint: endpoint)
            let results = front.runSuite()
            XCTAssertEqual(results.map(\.name), Self.checks, where_)
            for r in results {
                XCTAssertTrue(r.passed, "\(where_): \(r.name): \(r.message)")
                if getenv("SOFTDEV_TEST_LOG") != nil { print("\(where_): \(r.name): \(r.passed ? "pass" : "FAIL") \(r.message)") }
            }
            XCTAssertEqual(try front.close(), 0, "\(where_): grants the backend still held after it closed")
            guest.destroy()
        }
    }
}

/// The endpoint below the backend as C sees it: the frames the guest sent, in order, and a way
/// to hand frames up to the guest.
private final class EndpointBridge {
    let endpoint: RecordingEndpoint
    var next = 0
    init(_ endpoint: RecordingEndpoint) { self.endpoint = endpoint }
}

private let endpointTake: @convention(c) (UnsafeMutableRawPointer?, UnsafeMutablePointer<UInt8>?, UInt32,
                                          UnsafeMutablePointer<cref_net_meta>?, UInt32) -> Int64 = { ctx, buffer, capacity, meta, timeout in
    let bridge = Unmanaged<EndpointBridge>.fromOpaque(ctx!).takeUnretainedValue()
    let frames = bridge.endpoint.received(bridge.next + 1, within: Double(timeout) / 1000)
    guard frames.count > bridge.next else { return -1 }
    let frame = frames[bridge.next]
    bridge.next += 1
    frame.withUnsafeBytes { b in _ = memcpy(buffer!, b.baseAddress!, min(b.count, Int(capacity))) }
    var m = cref_net_meta()
    m.queue = UInt32(frame.queue)
    switch frame.offload.checksum {
    case .none: m.csum = UInt8(CREF_NET_CSUM_NONE)
    case .validated: m.csum = UInt8(CREF_NET_CSUM_VALIDATED)
    case let .partial(start, offset):
        m.csum = UInt8(CREF_NET_CSUM_PARTIAL); m.csum_start = start; m.csum_offset = offset
    }
    if let gso = frame.offload.segmentation {
        m.gso_type = gso.kind == .tcpv4 ? Netif.gsoTCPv4 : Netif.gsoTCPv6
        m.gso_size = gso.size
    }
    meta!.pointee = m
    return Int64(frame.count)
}

private let endpointSend: @convention(c) (UnsafeMutableRawPointer?, UnsafePointer<UInt8>?, UInt32,
                                          UnsafePointer<cref_net_meta>?) -> Void = { ctx, bytes, length, meta in
    let bridge = Unmanaged<EndpointBridge>.fromOpaque(ctx!).takeUnretainedValue()
    let m = meta!.pointee
    var offload = FrameOffload()
    switch Int(m.csum) {
    case CREF_NET_CSUM_VALIDATED: offload.checksum = .validated
    case CREF_NET_CSUM_PARTIAL: offload.checksum = .partial(start: m.csum_start, offset: m.csum_offset)
    default: break
    }
    if m.gso_type != 0 { offload.segmentation = .init(kind: m.gso_type == Netif.gsoTCPv4 ? .tcpv4 : .tcpv6, size: m.gso_size) }
    bridge.endpoint.send(EthernetFrame(UnsafeBufferPointer(start: bytes!, count: Int(length)), offload: offload, queue: Int(m.queue)))
}

/// The C netfront (netif_conformance.c) attached to a vif served by SoftDev's backend: Swift
/// makes the guest's pages and event channels and does the xenstore handshake as netfront does
/// (tx-ring-ref, rx-ring-ref and event channels per queue, request-rx-copy, the features,
/// straight to Connected); C owns the rings and every grant, and runs the checks.
final class CNetConformanceFrontend {
    let link: LocalFrontend
    let front: OpaquePointer
    private let bridge: EndpointBridge

    init(guest: LocalHypervisor, paths: XenbusDevicePaths, queues: Int, split wantSplit: Bool, endpoint: RecordingEndpoint) throws {
        guard let memory = guest.memory else { throw HarnessFailure("not a guest") }
        let link = try LocalFrontend(hypervisor: guest, frontendPath: paths.frontendPath)
        self.link = link
        let features = try link.backendNodes(["multi-queue-max-queues", "feature-split-event-channels"])
        guard queues <= Int(features["multi-queue-max-queues"] ?? "1") ?? 1 else { throw HarnessFailure("backend offers fewer than \(queues) queues") }
        let split = wantSplit && features["feature-split-event-channels"] == "1"
        let bridge = EndpointBridge(endpoint)
        self.bridge = bridge
        let pages = link.pages   // frames only: C makes the grants
        var env = cref_netfront_env()
        env.grant_table = memory.base + Int(LOCALXEN_PAGE_SIZE)   // frames 1...128 (localxen.h)
        env.first_free_ref = 8                                      // Xen reserves refs 0..7
        env.free_refs = LOCALXEN_GRANT_ENTRIES - 8
        env.backend_domid = paths.backendDomain
        env.split_event_channels = split ? 1 : 0
        env.queues = UInt32(queues)
        env.notify = creferenceNotify
        env.endpoint_take = endpointTake
        env.endpoint_send = endpointSend
        env.endpoint_ctx = Unmanaged.passUnretained(bridge).toOpaque()
        var channels: [(tx: LocalEventChannel, rx: LocalEventChannel)] = []
        try withUnsafeMutableBytes(of: &env.queue) { raw in
            let q = raw.bindMemory(to: cref_net_queue_env.self)
            for i in 0..<queues {
                let txRing = try pages.allocate(pages: 1), rxRing = try pages.allocate(pages: 1)
                let txData = try pages.allocate(pages: Int(CREF_NET_QUEUE_PAGES)), rxData = try pages.allocate(pages: Int(CREF_NET_QUEUE_PAGES))
                guard let tx = try link.makeChannel() as? LocalEventChannel,
                      let rx = split ? try link.makeChannel() as? LocalEventChannel : tx else { throw HarnessFailure("not a local event channel") }
                channels.append((tx, rx))
                q[i].tx_ring = pages.pointer(txRing); q[i].tx_ring_frame = txRing
                q[i].rx_ring = pages.pointer(rxRing); q[i].rx_ring_frame = rxRing
                q[i].tx_data = pages.pointer(txData); q[i].tx_data_frame = txData
                q[i].rx_data = pages.pointer(rxData); q[i].rx_data_frame = rxData
                q[i].tx_wait_fd = tx.fileDescriptor; q[i].rx_wait_fd = rx.fileDescriptor
                q[i].tx_notify_ctx = Unmanaged.passUnretained(tx).toOpaque()
                q[i].rx_notify_ctx = Unmanaged.passUnretained(rx).toOpaque()
            }
        }
        var txRefs = [UInt32](repeating: 0, count: Int(CREF_NET_MAX_QUEUES)), rxRefs = txRefs
        guard let f = cref_netfront_init(&env, &txRefs, &rxRefs) else { throw HarnessFailure("cref_netfront_init: errno \(errno)") }
        front = f
        var nodes: [(String, String)] = [("request-rx-copy", "1"), ("feature-rx-notify", "1"), ("feature-sg", "1"),
                                         ("feature-gso-tcpv4", "1"), ("feature-gso-tcpv6", "1"), ("feature-ipv6-csum-offload", "1")]
        if features["multi-queue-max-queues"] != nil { nodes.append(("multi-queue-num-queues", "\(queues)")) }
        for (i, c) in channels.enumerated() {
            let prefix = queues == 1 ? "" : "queue-\(i)/"
            nodes += [(prefix + "tx-ring-ref", "\(txRefs[i])"), (prefix + "rx-ring-ref", "\(rxRefs[i])")]
            nodes += split ? [(prefix + "event-channel-tx", "\(c.tx.localPort)"), (prefix + "event-channel-rx", "\(c.rx.localPort)")]
                : [(prefix + "event-channel", "\(c.tx.localPort)")]
        }
        try link.connect(nodes: nodes)
    }

    /// Runs the suite; returns (name, passed, message) per check.
    func runSuite() -> [(name: String, passed: Bool, message: String)] {
        creferenceSuite(capacity: 64) { cref_netfront_run_suite(front, $0, $1) }
    }

    /// Closes as netfront does, then revokes every grant; returns how many the backend still held.
    func close() throws -> Int {
        try link.close()
        return Int(cref_netfront_free(front))
    }
}
