import BlockTap
import Core
import Foundation
import Glibc
import XenStore

/// A dense RAM disk for the tests (the Devices module has the real ones).
final class TestDisk: SynchronousBlockDevice, @unchecked Sendable {
    let name = "testdisk"
    let geometry: BlockGeometry
    let capabilities: BlockCapabilities = [.write, .flush, .discard]
    var bytes: UnsafeMutableRawPointer
    private let lock = NSLock()
    var flushes = 0, discards = 0

    init(size: Int) {
        geometry = BlockGeometry(size: UInt64(size))
        bytes = .allocate(byteCount: size, alignment: 4096)
        memset(bytes, 0, size)
    }
    deinit { bytes.deallocate() }

    func read(into buffers: IOBuffers, at offset: UInt64) throws(BlockError) {
        lock.lock(); defer { lock.unlock() }
        buffers.copy(from: bytes + Int(offset), count: buffers.byteCount)
    }
    func write(from buffers: IOBuffers, at offset: UInt64, fua: Bool) throws(BlockError) {
        lock.lock(); defer { lock.unlock() }
        buffers.copy(to: bytes + Int(offset), count: buffers.byteCount)
    }
    func flush() throws(BlockError) { lock.lock(); flushes += 1; lock.unlock() }
    func discard(at offset: UInt64, length: UInt64) throws(BlockError) {
        lock.lock(); defer { lock.unlock() }
        discards += 1
        memset(bytes + Int(offset), 0, Int(length))
    }
}

/// An emulated hypervisor, a backend daemon serving `softdev-vbd` devices and helpers to make
/// guests, all in this process but talking through the same sockets, memfds and eventfds as
/// separate processes would.
final class LocalLab {
    let address: LocalHypervisorAddress
    let server: LocalHypervisorServer
    let backend: LocalHypervisor
    let service: XenbusBackendHost
    /// The test's devices by spec name, and the backend's log.
    final class Shared: @unchecked Sendable {
        let lock = NSLock()
        var devices: [String: any BlockDevice] = [:]
        var log: [String] = []
    }
    let shared = Shared()

    init(options: BlkifBackendOptions = BlkifBackendOptions(), teardownTimeout: Double = 5) throws {
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("softdev-lab-\(getpid())-\(UInt32.random(in: 0...UInt32.max))").path
        address = LocalHypervisorAddress(directory: dir)
        server = try LocalHypervisorServer(address: address)
        try server.start()
        backend = try LocalHypervisor.connectBackend(address)
        let shared = self.shared
        service = BlockTapService.makeHost(hypervisor: backend, options: options, teardownTimeout: teardownTimeout, log: { line in
            shared.lock.lock(); shared.log.append(line); shared.lock.unlock()
            if getenv("SOFTDEV_TEST_LOG") != nil { print(line) }
        }) { spec, _ in
            shared.lock.lock(); defer { shared.lock.unlock() }
            guard let d = shared.devices[spec] else { throw BlkifConnectError("no test device \(spec)") }
            return d
        }
        try service.start()
    }

    func shutdown() {
        service.stop()
        server.stop()
        try? FileManager.default.removeItem(atPath: address.directory)
    }

    /// Creates a guest and attaches `device` to it as `disk`.
    func guestWithDisk(_ device: any BlockDevice, name: String = "guest", disk: String = "xvda", pages: Int = 8192) throws
        -> (LocalHypervisor, XenbusDevicePaths) {
        let guest = try LocalHypervisor.createGuest(address, name: name, pages: pages)
        let key = "\(name)-\(disk)-\(guest.domainID)"
        shared.lock.lock(); shared.devices[key] = device; shared.lock.unlock()
        let paths = try BlockTapService.attach(store: backend.store, guest: guest.domainID, disk: try VirtualDisk(disk), spec: key)
        return (guest, paths)
    }
}


extension LocalLab {
    /// Whether the backend logged a line containing `text`.
    func logged(_ text: String) -> Bool {
        shared.lock.lock(); defer { shared.lock.unlock() }
        return shared.log.contains { $0.contains(text) }
    }
}
