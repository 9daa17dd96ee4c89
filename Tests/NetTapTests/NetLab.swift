import CXen
import Core
import Foundation
import Glibc
import NetTap
import XenStore

/// An endpoint for the tests: records what the guest sends and hands frames to the guest.
final class RecordingEndpoint: NetDevice, @unchecked Sendable {
    let name = "recorder"
    let offloads: NetOffloads = .all
    private let lock = NSCondition()
    private var frames: [EthernetFrame] = []
    private var receiver: (any NetFrameReceiver)?
    private(set) var acceptedOffloads: NetOffloads = []
    private(set) var closed = false

    func fromGuest(_ frame: EthernetFrame) {
        lock.lock(); frames.append(frame); lock.broadcast(); lock.unlock()
    }
    func connect(_ receiver: any NetFrameReceiver, accepting offloads: NetOffloads) {
        lock.lock(); self.receiver = receiver; acceptedOffloads = offloads; lock.unlock()
    }
    func close() { lock.lock(); receiver = nil; closed = true; lock.unlock() }

    /// A frame for the guest, as a TAP's reader would hand it up.
    func send(_ frame: EthernetFrame) {
        lock.lock(); let r = receiver; lock.unlock()
        r?.toGuest(frame)
    }
    /// Frames for the guest all at once, as a TAP's reader hands up what one read-until-empty got.
    func send(_ batch: [EthernetFrame]) {
        lock.lock(); let r = receiver; lock.unlock()
        r?.toGuest(batch)
    }
    /// `count` copies of a frame for the guest as one run, as the generator hands them up.
    func send(_ frame: EthernetFrame, repeating count: Int) {
        lock.lock(); let r = receiver; lock.unlock()
        r?.toGuest(frame, repeating: count)
    }
    /// Waits up to `seconds` for `count` frames from the guest; returns what came.
    func received(_ count: Int, within seconds: Double = 5) -> [EthernetFrame] {
        let deadline = Date(timeIntervalSinceNow: seconds)
        lock.lock(); defer { lock.unlock() }
        while frames.count < count && lock.wait(until: deadline) {}
        return frames
    }
    var count: Int { lock.lock(); defer { lock.unlock() }; return frames.count }
}

/// An emulated hypervisor and a backend serving `softdev-vif` devices, in this process but
/// talking through the sockets, memfds and eventfds separate processes would use.
final class NetLab {
    let address: LocalHypervisorAddress
    let server: LocalHypervisorServer
    let backend: LocalHypervisor
    let host: XenbusBackendHost
    final class Shared: @unchecked Sendable {
        let lock = NSLock()
        var devices: [String: any NetDevice] = [:]
        var log: [String] = []
    }
    let shared = Shared()

    init(options: NetifBackendOptions = NetifBackendOptions()) throws {
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("softdev-netlab-\(getpid())-\(UInt32.random(in: 0...UInt32.max))").path
        address = LocalHypervisorAddress(directory: dir)
        server = try LocalHypervisorServer(address: address)
        try server.start()
        backend = try LocalHypervisor.connectBackend(address)
        let shared = self.shared
        host = NetTapService.makeHost(hypervisor: backend, options: options, log: { line in
            shared.lock.lock(); shared.log.append(line); shared.lock.unlock()
            if getenv("SOFTDEV_TEST_LOG") != nil { print(line) }
        }) { spec in
            shared.lock.lock(); defer { shared.lock.unlock() }
            guard let d = shared.devices[spec] else { throw NetifConnectError("no test device \(spec)") }
            return d
        }
        try host.start()
    }

    func shutdown() {
        host.stop()
        server.stop()
        try? FileManager.default.removeItem(atPath: address.directory)
    }

    /// Creates a guest with vif `vif` over `device`; returns the guest and the frontend path.
    func guestWithVif(_ device: any NetDevice, name: String = "guest", vif: UInt32 = 0) throws -> (LocalHypervisor, XenbusDevicePaths) {
        let guest = try LocalHypervisor.createGuest(address, name: name, pages: 4096)
        let key = "\(name)-vif\(vif)-\(guest.domainID)"
        shared.lock.lock(); shared.devices[key] = device; shared.lock.unlock()
        let paths = XenbusDevicePaths(frontendDomain: guest.domainID, backendDomain: 0, frontendType: NetTapService.frontendType,
                                      backendType: NetTapService.backendType, deviceID: vif)
        let (fe, be) = NetTapService.nodes(XenbusDeviceName(name: "\(vif)", deviceID: vif), spec: key,
                                           mac: NetTapService.defaultMAC(guest: guest.domainID, vif: vif))
        try XenbusToolstack.attach(backend.store, paths, frontend: fe, backend: be)
        return (guest, paths)
    }

    /// A guest with vif 0 over `device` and its netfront connected with the options `configure` sets.
    func frontend(over device: any NetDevice, _ configure: (inout LocalNetFrontend.Options) -> Void)
        throws -> (front: LocalNetFrontend, guest: LocalHypervisor, paths: XenbusDevicePaths) {
        let (guest, paths) = try guestWithVif(device)
        var options = LocalNetFrontend.Options()
        configure(&options)
        return (try LocalNetFrontend(hypervisor: guest, frontendPath: paths.frontendPath, options: options), guest, paths)
    }

    func logged(_ text: String) -> Bool {
        shared.lock.lock(); defer { shared.lock.unlock() }
        return shared.log.contains { $0.contains(text) }
    }
}

/// Frames for the tests.
enum TestFrames {
    /// An Ethernet + IPv4 + TCP frame of `count` bytes with a payload pattern; `partial`
    /// leaves the TCP checksum as the pseudo-header sum, as a guest with checksum offload does.
    static func tcp4(count: Int, seed: UInt8 = 1, partial: Bool = false) -> EthernetFrame {
        var b = [UInt8](repeating: 0, count: count)
        b[0..<6] = [0x00, 0x16, 0x3e, 0, 0, 2]; b[6..<12] = [0x00, 0x16, 0x3e, 0, 0, 1]
        b[12] = 0x08; b[13] = 0x00
        b[14] = 0x45
        let ipLength = count - 14
        b[16] = UInt8(ipLength >> 8 & 0xff); b[17] = UInt8(ipLength & 0xff)
        b[22] = 64; b[23] = 6
        b[26..<30] = [10, 0, 0, 1]; b[30..<34] = [10, 0, 0, 2]
        b[34] = 0x30; b[35] = 0x39; b[36] = 0; b[37] = 80
        b[46] = 0x50; b[47] = 0x18
        for i in 54..<count { b[i] = UInt8(truncatingIfNeeded: i &* 7 &+ Int(seed)) }
        var frame = EthernetFrame(b)
        if partial, let h = FrameHeaders(frame) { FrameChecksum.preparePartial(&frame, headers: h) }
        return frame
    }
}
