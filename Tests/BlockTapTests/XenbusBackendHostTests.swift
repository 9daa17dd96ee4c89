import BlockTap
import Core
import Foundation
import Synchronization
import XCTest
import XenStore

/// A disk that takes requests and completes none until told: a device stuck on a dead server.
final class HangingDisk: BlockDevice, @unchecked Sendable {
    let name = "hanging"
    let geometry = BlockGeometry(size: 1 << 20)
    let capabilities: BlockCapabilities = [.write, .flush]
    private let lock = NSLock()
    private var held: [BlockCompletion] = []
    private(set) var closed = false

    var heldCount: Int { lock.withLock { held.count } }
    func submit(_ request: BlockRequest, completion: BlockCompletion) { lock.withLock { held.append(completion) } }
    func read(into buffers: IOBuffers, at offset: UInt64) throws(BlockError) {}
    /// Completes what it holds, with an error (the server came back to say no).
    func release() {
        let all = lock.withLock { () -> [BlockCompletion] in defer { held.removeAll() }; return held }
        for c in all { c.complete(.failure(BlockError(.io, "released"))) }
    }
    func close() { lock.withLock { closed = true } }
}

/// A backend of another type (what the net and USB taps add): it records the handshake.
final class RecordingDriver: XenbusBackendDriver, @unchecked Sendable {
    let events = NSLock()
    var log: [String] = []
    func note(_ s: String) { events.withLock { log.append(s) } }
    func advertise(_ device: XenbusBackendDevice) throws { try device.store.write(device.backendPath + "/feature-test", "1") }
    func connect(_ device: XenbusBackendDevice) throws { note("connect") }
    func disconnect(_ device: XenbusBackendDevice) { note("disconnect") }
    func unplugged(_ device: XenbusBackendDevice) { note("unplugged") }
}

final class PosixThreadBox: Sendable { let done = Atomic<Bool>(false) }

/// One xenbus host per xenstore connection serves every backend type, and no device can stall
/// the watch thread that all guests' devices share.
final class XenbusBackendHostTests: XCTestCase {
    func testOneHostServesTwoBackendTypesOnOneConnection() throws {
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("softdev-host-\(getpid())-\(UInt32.random(in: 0...UInt32.max))").path
        let address = LocalHypervisorAddress(directory: dir)
        let server = try LocalHypervisorServer(address: address)
        try server.start()
        defer { server.stop(); try? FileManager.default.removeItem(atPath: dir) }
        let backend = try LocalHypervisor.connectBackend(address)
        let disk = TestDisk(size: 1 << 20)
        let host = XenbusBackendHost(hypervisor: backend)
        host.register(BlockTapService.backend { _, _ in disk })
        let recorder = RecordingDriver()
        host.register(XenbusBackendType(name: "softdev-test") { _, _ in recorder })
        try host.start()
        defer { host.stop() }
        XCTAssertEqual(host.backendTypes, ["softdev-test", "softdev-vbd"])

        // A second dispatcher on the same connection would steal the host's events: refused.
        XCTAssertThrowsError(try WatchDispatcher(store: backend.store).start()) { error in
            XCTAssertTrue("\(error)".contains("already serves this xenstore connection"), "\(error)")
        }

        let guest = try LocalHypervisor.createGuest(address, name: "both", pages: 4096)
        let vbd = try BlockTapService.attach(store: backend.store, guest: guest.domainID, disk: try VirtualDisk("xvda"), spec: "disk")
        let other = XenbusDevicePaths(frontendDomain: guest.domainID, frontendType: "vtest", backendType: "softdev-test", deviceID: 0)
        try XenbusToolstack.attach(backend.store, other, frontend: [:], backend: ["params": "x"])

        let front = try LocalBlockFrontend(hypervisor: guest, frontendPath: vbd.frontendPath)
        try front.write(sector: 8, [UInt8](repeating: 0x5A, count: 4096))
        XCTAssertEqual(try front.read(sector: 8, count: 4096), [UInt8](repeating: 0x5A, count: 4096))

        let test = XenbusDeviceState.poll(guest.store, other.backendPath + "/state", timeoutSeconds: 10) { $0 == .initWait }
        XCTAssertTrue(test.reached, "the second type's device reached InitWait (it is \(test.state))")
        XCTAssertEqual(try guest.store.readString(other.backendPath + "/feature-test"), "1")
        try guest.store.write(other.frontendPath + "/state", "\(XenbusDeviceState.initialised.rawValue)")
        let connected = XenbusDeviceState.poll(guest.store, other.backendPath + "/state", timeoutSeconds: 10) { $0 == .connected }
        XCTAssertTrue(connected.reached, "the second type's device connected (it is \(connected.state))")
        XCTAssertEqual(host.count, 2)

        try backend.store.remove(other.backendPath, transaction: .none)
        try waitUntil("the test device to be unplugged") { host.count == 1 }
        XCTAssertEqual(recorder.events.withLock { recorder.log }, ["connect", "disconnect", "unplugged"])
    }

    func testAStuckDeviceDoesNotStallAnotherGuest() throws {
        let lab = try LocalLab()
        defer { lab.shutdown() }
        let hanging = HangingDisk()
        let (a, pa) = try lab.guestWithDisk(hanging, name: "stuck")
        let frontA = try LocalBlockFrontend(hypervisor: a, frontendPath: pa.frontendPath)
        // A request the device never completes, then the guest closes the disk under it.
        let (request, _) = try frontA.makeRequest(id: 1, write: false, sector: 0, firstPage: 0, pageCount: 1)
        frontA.queues[0].ring.putRequest(request)
        frontA.queues[0].pushRequests()
        try waitUntil("the request to reach the device") { hanging.heldCount == 1 }
        try a.store.write(pa.frontendPath + "/state", "\(XenbusDeviceState.closed.rawValue)")

        // Another guest attaches, connects and does I/O meanwhile, within a second or two
        // (before, it waited for as long as the stuck device took: here for ever).
        let (b, pb) = try lab.guestWithDisk(TestDisk(size: 1 << 20), name: "healthy")
        let frontB = try LocalBlockFrontend(hypervisor: b, frontendPath: pb.frontendPath, timeoutSeconds: 2)
        try frontB.write(sector: 0, [UInt8](repeating: 7, count: 4096))
        XCTAssertEqual(try frontB.read(sector: 0, count: 4096), [UInt8](repeating: 7, count: 4096))

        // The stuck device is closed after the teardown timeout, and reported.
        let closed = XenbusDeviceState.poll(a.store, pa.backendPath + "/state", timeoutSeconds: 20) { $0 == .closed }
        XCTAssertTrue(closed.reached, "the stuck device's backend closed (it is \(closed.state))")
        XCTAssertTrue(lab.logged("still busy"), "the stuck teardown is reported")
        XCTAssertFalse(hanging.closed, "the stack stays open while a request is in it")

        // The device completes at last: the teardown ends; detaching releases the stack.
        hanging.release()
        try waitUntil("the teardown to end") { lab.logged("teardown ended") }
        try lab.backend.store.write(pa.backendPath + "/online", "0")
        try waitUntil("the stuck device's stack to be closed") { hanging.closed }
    }

    func testStoppingTheHostDoesNotWaitForAStuckDevice() throws {
        let lab = try LocalLab()
        let hanging = HangingDisk()
        defer { hanging.release() }
        let (a, pa) = try lab.guestWithDisk(hanging, name: "stuck")
        let front = try LocalBlockFrontend(hypervisor: a, frontendPath: pa.frontendPath)
        let (request, _) = try front.makeRequest(id: 1, write: true, sector: 0, firstPage: 0, pageCount: 1)
        front.queues[0].ring.putRequest(request)
        front.queues[0].pushRequests()
        try waitUntil("the request to reach the device") { hanging.heldCount == 1 }
        // SIGTERM's path: before, it waited for the device for ever.
        let stopped = PosixThreadBox()
        try PosixThread.detached("stopping the lab") {
            lab.shutdown()
            stopped.done.store(true, ordering: .releasing)
        }
        let deadline = monotonicSeconds() + lab.service.teardownTimeout + 10
        while !stopped.done.load(ordering: .acquiring) && monotonicSeconds() < deadline { usleep(10_000) }
        XCTAssertTrue(stopped.done.load(ordering: .acquiring), "the host stopped while its device was stuck")
        XCTAssertEqual(hanging.heldCount, 1, "the write was never acknowledged")
    }

    private func waitUntil(_ what: String, timeout: Double = 20, _ condition: () throws -> Bool) throws {
        let deadline = monotonicSeconds() + timeout
        while try !condition() {
            guard monotonicSeconds() < deadline else { XCTFail("timed out waiting for \(what)"); return }
            usleep(5_000)
        }
    }
}
