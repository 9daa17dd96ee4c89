import CXen
import Core
import Foundation
import Glibc
import USBTap
import XenStore

/// A vendor-specific high-speed test device: bulk OUT ep 2 keeps what it gets, bulk IN ep 1
/// returns it; interrupt IN ep 3 waits until `press`; isochronous IN ep 4 fills each packet;
/// vendor request 0x42 IN answers "hello". It records what reached it.
final class LoopbackDevice: USBDevice, @unchecked Sendable {
    let name = "loopback"
    let speed = USBSpeed.high
    let descriptors: USBDescriptors
    private let lock = NSLock()
    private var stored: [UInt8] = []
    private var pendingInterrupt: [URB] = []
    private(set) var configurations: [UInt8] = []
    private(set) var standardSeen: [USBSetup] = []
    private(set) var resets = 0
    private(set) var cancelled = 0
    private(set) var closed = false
    private(set) var port: (any USBPortEvents)?

    init(serial: String = "0001") {
        let device: [UInt8] = [18, 1, 0x00, 0x02, 0xff, 0, 0, 64, 0x34, 0x12, 0x78, 0x56, 0x00, 0x01, 1, 2, 3, 1]
        var config: [UInt8] = [9, 2, 0, 0, 1, 1, 0, 0x80, 50]
        config += [9, 4, 0, 0, 4, 0xff, 0, 0, 0]
        config += [7, 5, 0x81, 2, 0x00, 0x02, 0]     // bulk IN 1, 512
        config += [7, 5, 0x02, 2, 0x00, 0x02, 0]     // bulk OUT 2
        config += [7, 5, 0x83, 3, 8, 0, 4]           // interrupt IN 3
        config += [7, 5, 0x84, 1, 0x00, 0x04, 1]     // iso IN 4, 1024
        config[2] = UInt8(config.count)
        descriptors = USBDescriptors(device: device, configurations: [config], strings: [1: "SoftDev", 2: "Loopback", 3: serial])
    }

    func submit(_ urb: URB) {
        lock.lock()
        if urb.type == .control, let s = urb.setup, s.kind == .standard { standardSeen.append(s) }
        switch (urb.type, urb.endpoint, urb.isIn) {
        case (.control, 0, true) where urb.setup?.request == 0x42:
            lock.unlock(); return urb.complete(in: Array("hello".utf8))
        case (.control, 0, false) where urb.setup?.request == 0x43:
            stored = Array(urb.buffer); lock.unlock(); urb.actualLength = urb.buffer.count; return urb.complete(.ok)
        case (.bulk, 2, false):
            stored = Array(urb.buffer); lock.unlock(); urb.actualLength = urb.buffer.count; return urb.complete(.ok)
        case (.bulk, 1, true):
            let s = stored; lock.unlock(); return urb.complete(in: s)
        case (.interrupt, 3, true):
            pendingInterrupt.append(urb); lock.unlock(); return
        case (.isochronous, 4, true):
            lock.unlock()
            for i in 0..<urb.isoPackets.count {
                let p = urb.isoPackets[i]
                let n = Int(p.length) / 2
                for b in 0..<n { urb.buffer[Int(p.offset) + b] = UInt8(truncatingIfNeeded: i &* 16 &+ b) }
                urb.isoPackets[i].actualLength = UInt32(n)
            }
            urb.actualLength = urb.buffer.count
            return urb.complete(.ok)
        default:
            lock.unlock(); return urb.complete(.stall)
        }
    }
    func cancel(_ urb: URB) {
        lock.lock()
        let found = pendingInterrupt.firstIndex { $0 === urb }
        if let found { pendingInterrupt.remove(at: found); cancelled += 1 }
        lock.unlock()
        if found != nil { urb.complete(.cancelled) }
    }
    /// Completes the oldest pending interrupt IN with `report`.
    func press(_ report: [UInt8]) -> Bool {
        lock.lock()
        guard !pendingInterrupt.isEmpty else { lock.unlock(); return false }
        let urb = pendingInterrupt.removeFirst()
        lock.unlock()
        urb.complete(in: report)
        return true
    }
    var pending: Int { lock.lock(); defer { lock.unlock() }; return pendingInterrupt.count }
    func setConfiguration(_ value: UInt8) -> USBStatus { lock.lock(); configurations.append(value); lock.unlock(); return .ok }
    /// A port reset cancels the interrupt URBs that wait (as the USBDevice contract says), on
    /// the caller's thread.
    func reset() {
        lock.lock(); resets += 1; let waiting = pendingInterrupt; pendingInterrupt = []; lock.unlock()
        for urb in waiting { urb.complete(.cancelled) }
    }
    func attach(to port: (any USBPortEvents)?) { lock.lock(); self.port = port; lock.unlock() }
    func close() { lock.lock(); closed = true; lock.unlock() }
}

/// An emulated hypervisor and a backend serving `softdev-vusb` controllers.
final class USBLab {
    let address: LocalHypervisorAddress
    let server: LocalHypervisorServer
    let backend: LocalHypervisor
    let host: XenbusBackendHost
    final class Shared: @unchecked Sendable {
        let lock = NSLock()
        var devices: [String: any USBDevice] = [:]
        /// Stacks opened anew at each open (a policy judging them, as the daemon's open does).
        var openers: [String: @Sendable () throws -> any USBDevice] = [:]
        var log: [String] = []
    }
    let shared = Shared()

    init() throws {
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("softdev-usblab-\(getpid())-\(UInt32.random(in: 0...UInt32.max))").path
        address = LocalHypervisorAddress(directory: dir)
        server = try LocalHypervisorServer(address: address)
        try server.start()
        backend = try LocalHypervisor.connectBackend(address)
        let shared = self.shared
        host = USBTapService.makeHost(hypervisor: backend, log: { line in
            shared.lock.lock(); shared.log.append(line); shared.lock.unlock()
            if getenv("SOFTDEV_TEST_LOG") != nil { print(line) }
        }) { spec in
            shared.lock.lock()
            let (device, opener) = (shared.devices[spec], shared.openers[spec])
            shared.lock.unlock()
            if let opener { return try opener() }
            guard let device else { throw UsbifConnectError("no test device \(spec)") }
            return device
        }
        try host.start()
    }

    func shutdown() {
        host.stop()
        server.stop()
        try? FileManager.default.removeItem(atPath: address.directory)
    }

    /// Registers `device` under `key` (a port's spec names it).
    func register(_ device: any USBDevice, as key: String) {
        shared.lock.lock(); shared.devices[key] = device; shared.lock.unlock()
    }

    /// Registers `open` under `key`: each open of a port naming `key` runs it.
    func register(as key: String, _ open: @escaping @Sendable () throws -> any USBDevice) {
        shared.lock.lock(); shared.openers[key] = open; shared.lock.unlock()
    }

    /// A guest with a controller of `ports` ports, `plugged` by spec.
    func guestWithController(name: String = "guest", ports: Int = 4, usbVersion: Int = 2, plugged: [Int: String]) throws
        -> (LocalHypervisor, XenbusDevicePaths) {
        let guest = try LocalHypervisor.createGuest(address, name: name, pages: 4096)
        let paths = XenbusDevicePaths(frontendDomain: guest.domainID, backendDomain: 0, frontendType: USBTapService.frontendType,
                                      backendType: USBTapService.backendType, deviceID: 0)
        let (fe, be) = USBTapService.nodes(ports: ports, usbVersion: usbVersion, plugged: plugged)
        try XenbusToolstack.attach(backend.store, paths, frontend: fe, backend: be)
        return (guest, paths)
    }

    /// Empties `port` of the controller at `paths` and waits until the frontend sees it go.
    func unplug(_ port: Int, of paths: XenbusDevicePaths, front: LocalUSBFrontend) throws {
        try backend.store.write(paths.backendPath + "/port/\(port)", "")
        try front.waitForPort(port, plugged: false)
    }

    func logged(_ text: String) -> Bool {
        shared.lock.lock(); defer { shared.lock.unlock() }
        return shared.log.contains { $0.contains(text) }
    }
}

/// Polls `condition` every millisecond for up to `seconds`; whether it came true.
func eventually(seconds: Double = 2, _ condition: () -> Bool) -> Bool {
    let end = monotonicSeconds() + seconds
    while !condition() {
        guard monotonicSeconds() < end else { return false }
        usleep(1000)
    }
    return true
}
