import Core
@testable import Devices
import Foundation
import Glibc
import NBDExport
import Synchronization
import XCTest

/// When a thread cannot start (pthread_create's EAGAIN at the process's thread limit), the one
/// device, connection or domain that needed it fails with an error that says so; the process
/// goes on, and so does everything else it serves.
final class ThreadStartFailureTests: XCTestCase {
    /// Runs `body` while no thread can start: a new thread's default stack is made 64 TiB,
    /// more than the machine can map.
    private func whileThreadsCannotStart<T>(_ body: () throws -> T) rethrows -> T {
        typealias DefaultAttributes = @convention(c) (UnsafeMutablePointer<pthread_attr_t>) -> Int32
        let get = unsafeBitCast(dlsym(nil, "pthread_getattr_default_np")!, to: DefaultAttributes.self)
        let set = unsafeBitCast(dlsym(nil, "pthread_setattr_default_np")!, to: DefaultAttributes.self)
        var saved = pthread_attr_t(), huge = pthread_attr_t()
        _ = get(&saved); pthread_attr_init(&huge); pthread_attr_setstacksize(&huge, 1 << 46); _ = set(&huge)
        defer { _ = set(&saved) }
        return try body()
    }

    func testAFileDeviceFailsToOpen() throws {
        // O_DIRECT: its completion thread starts at open.
        let directory = makeTemporaryDirectory(self)
        let path = directory + "/direct.img"
        let options = FileDevice.Options(direct: .on, createSize: 1 << 20)
        try whileThreadsCannotStart {
            XCTAssertThrowsError(try FileDevice(path: path, options: options)) {
                XCTAssertEqual(($0 as? BlockError)?.message, "file(path=\(path)): cannot start the completion thread: Resource temporarily unavailable")
            }
        }
        let file = try FileDevice(path: path, options: options)
        defer { file.close() }
        try file.writePattern(4096, seed: 7, at: 0)
        XCTAssertEqual(try file.readBytes(4096, at: 0), TestBuffer.expected(4096, 7), "with threads, it opens")
    }

    /// A buffered file starts no thread: what may block runs on its transport's workers, and
    /// when none can start, on the transport's own thread (late rather than never).
    func testABufferedFileOpensWithoutThreadsAndItsRequestsRunWhenNoWorkerCanStart() throws {
        let directory = makeTemporaryDirectory(self)
        let path = directory + "/buffered.img"
        let file = try whileThreadsCannotStart { try FileDevice(path: path, options: FileDevice.Options(direct: .off, createSize: 1 << 20)) }
        defer { file.close() }
        let pool = BlockWorkers(limit: 2, purpose: "a test transport's workers")
        defer { pool.stop() }
        let ready = DispatchSemaphore(value: 0), go = DispatchSemaphore(value: 0), done = DispatchSemaphore(value: 0)
        let outcome = Mutex<String>("not run")
        try PosixThread.detached("a test transport") {
            pool.adopt()
            ready.signal()
            go.wait()
            do {
                try file.writePattern(65536, seed: 3, at: 4096)
                let back = try file.readBytes(65536, at: 4096)
                outcome.withLock { $0 = back == TestBuffer.expected(65536, 3) ? "ok" : "wrong data" }
            } catch {
                outcome.withLock { $0 = "\(error)" }
            }
            done.signal()
        }
        ready.wait()
        whileThreadsCannotStart {
            go.signal()
            done.wait()
        }
        XCTAssertEqual(outcome.withLock { $0 }, "ok")
        XCTAssertEqual(pool.threadCount, 0, "no worker could start: the transport's thread ran them")
    }

    func testAnNBDServerDropsOnlyThatClientOrFailsToStart() throws {
        let socket = makeTemporaryDirectory(self) + "/nbd.sock"
        let server = NBDServer(listen: .unix(path: socket), exports: [NBDExport(name: "disk", device: MemoryDevice(size: 1 << 20))])
        try server.start()
        defer { server.stop() }
        let spec = "nbd(socket=\(socket), export=disk)"
        let other = NBDServer(listen: .unix(path: socket + "2"), exports: [NBDExport(name: "disk", device: NullDevice(size: 1 << 20))])
        try whileThreadsCannotStart {
            XCTAssertThrowsError(try DeviceRegistry.open(spec), "the server has no thread for this client")
            XCTAssertThrowsError(try other.start()) {
                XCTAssertEqual("\($0)", "start the NBD listener's thread: Resource temporarily unavailable")
            }
        }
        XCTAssertFalse(FileManager.default.fileExists(atPath: socket + "2"), "the failed server removed its socket")
        let device = try DeviceRegistry.open(spec)
        defer { device.close() }
        try device.writePattern(4096, seed: 3, at: 0)
        XCTAssertEqual(try device.readBytes(4096, at: 0), TestBuffer.expected(4096, 3), "the server still serves")
    }

    func testALocalHypervisorOrAGuestFailsToStartAndLeavesNothing() throws {
        let address = LocalHypervisorAddress(directory: makeTemporaryDirectory(self) + "/local")
        let broker = try LocalHypervisorServer(address: address)
        defer { broker.stop() }
        try broker.start()
        let stillborn = try LocalHypervisorServer(address: LocalHypervisorAddress(directory: makeTemporaryDirectory(self) + "/other"))
        try whileThreadsCannotStart {
            XCTAssertThrowsError(try stillborn.start()) {
                XCTAssertEqual("\($0)", "xenstore: cannot start a thread for the xenstore server: Resource temporarily unavailable")
            }
            // A guest's xenstore connection needs a reader thread: no guest, and no domain left.
            XCTAssertThrowsError(try LocalHypervisor.createGuest(address, name: "threadless", pages: 16)) {
                XCTAssertEqual("\($0)", "xenstore: cannot start a thread for a xenstore connection's reader: Resource temporarily unavailable")
            }
        }
        XCTAssertThrowsError(try LocalHypervisor.connectBackend(stillborn.address), "the failed broker serves nothing")
        for _ in 0..<100 where broker.domains != [0] { usleep(10_000) }
        XCTAssertEqual(broker.domains, [0], "the half-made guest was destroyed")
        XCTAssertNoThrow(try LocalHypervisor.createGuest(address, name: "with threads", pages: 16))
    }
}
