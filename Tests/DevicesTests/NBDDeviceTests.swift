import Core
import Devices
import Foundation
import Glibc
import NBDExport
import NBDWire
import Synchronization
import TestPeers
import XCTest

final class NBDDeviceTests: XCTestCase {
    /// SoftDev's own NBD server on a unix socket, stopped after the test.
    private func serve(_ exports: [NBDExport]) throws -> String {
        let socket = makeTemporaryDirectory(self) + "/nbd.sock"
        let server = NBDServer(listen: .unix(path: socket), exports: exports)
        try server.start()
        addTeardownBlock { server.stop() }
        return socket
    }

    func testReadsAndWritesThroughSoftDevsServerWithManyRequestsInFlight() throws {
        let memory = MemoryDevice(size: 64 << 20)
        let socket = try serve([NBDExport(name: "disk", device: memory)])
        let device = try DeviceRegistry.open("nbd(socket=\(socket), export=disk)")
        defer { device.close() }
        XCTAssertEqual(device.geometry.size, 64 << 20)
        XCTAssertTrue(try XCTUnwrap(device as? NBDDevice).structuredReplies)
        XCTAssertTrue(device.capabilities.isSuperset(of: [.write, .flush, .fua, .discard, .writeZeroes, .multiConn]),
                      "\(device.capabilities)")

        let count = 64
        let writes = (0..<count).map { TestBuffer(count: 65536, pattern: UInt8($0)) }
        let written = Completions()
        for (i, buffer) in writes.enumerated() {
            device.submit(device.writeRequest(buffer, at: UInt64(i) * 65536, fua: i % 2 == 0), completion: written.completion(UInt64(i)))
        }
        XCTAssertEqual(written.wait(for: count).values.filter { $0 == .success }.count, count)
        let reads = (0..<count).map { _ in TestBuffer(count: 65536) }
        let read = Completions()
        for (i, buffer) in reads.enumerated() {
            device.submit(device.readRequest(buffer, at: UInt64(i) * 65536), completion: read.completion(UInt64(i)))
        }
        XCTAssertEqual(read.wait(for: count).values.filter { $0 == .success }.count, count)
        for i in 0..<count {
            XCTAssertEqual(reads[i].bytes, TestBuffer.expected(65536, UInt8(i)), "request \(i) read back")
            XCTAssertEqual(try memory.readBytes(65536, at: UInt64(i) * 65536), TestBuffer.expected(65536, UInt8(i)), "on the server")
        }
        try device.sync.flush()
        try device.sync.discard(at: 0, length: 65536)
        try device.sync.writeZeroes(at: 65536, length: 65536, mayDiscard: false)
        XCTAssertEqual(try device.readBytes(131072, at: 0), [UInt8](repeating: 0, count: 131072))
    }

    func testExtentsComeFromTheServersBlockStatus() throws {
        let memory = MemoryDevice(size: 64 << 20)
        try memory.writePattern(65536, seed: 1, at: 1 << 20)
        let socket = try serve([NBDExport(name: "", device: memory)])
        let device = try DeviceRegistry.open("nbd(socket=\(socket))")
        defer { device.close() }
        XCTAssertTrue(device.capabilities.contains(.extents))
        let extents = try device.extents(at: 0, length: 4 << 20)
        XCTAssertEqual(extents.first, BlockExtent(offset: 0, length: 1 << 20, isHole: true, isZero: true), "\(extents)")
        XCTAssertEqual(extents.dropFirst().first, BlockExtent(offset: 1 << 20, length: 65536, isHole: false, isZero: false), "\(extents)")
    }

    func testAStackSpansTwoServers() throws {
        // memory <- server A <- stats | nbd <- server B <- nbd: what the issue calls spanning machines.
        let memory = MemoryDevice(size: 8 << 20)
        let first = try serve([NBDExport(name: "disk", device: memory)])
        let middle = try DeviceRegistry.open("stats | nbd(socket=\(first), export=disk)")
        addTeardownBlock { middle.close() }
        let second = try serve([NBDExport(name: "relay", device: middle)])
        let device = try DeviceRegistry.open("nbd(socket=\(second), export=relay)")
        defer { device.close() }
        XCTAssertEqual(device.geometry.size, 8 << 20)
        try device.writePattern(65536, seed: 8, at: 1 << 20, fua: true)
        XCTAssertEqual(try device.readBytes(65536, at: 1 << 20), TestBuffer.expected(65536, 8))
        XCTAssertEqual(try memory.readBytes(65536, at: 1 << 20), TestBuffer.expected(65536, 8))
        XCTAssertEqual(try device.extents(at: 0, length: 2 << 20).first?.isHole, true, "holes pass through both servers")
        XCTAssertEqual((middle as? StatsFilter)?.snapshot()[.write].count, 1)
    }

    func testThreadsSubmittingAtOnceDoNotMixTheirRequests() throws {
        let memory = MemoryDevice(size: 16 << 20)
        let socket = try serve([NBDExport(name: "", device: memory)])
        let device = try DeviceRegistry.open("nbd(socket=\(socket))")
        defer { device.close() }
        let failures = Atomic<Int>(0)
        DispatchQueue.concurrentPerform(iterations: 8) { thread in
            for i in 0..<32 {
                let offset = UInt64(thread * 32 + i) * 16384
                do {
                    try device.writePattern(16384, seed: UInt8(truncatingIfNeeded: thread * 32 + i), at: offset)
                    if try device.readBytes(16384, at: offset) != TestBuffer.expected(16384, UInt8(truncatingIfNeeded: thread * 32 + i)) {
                        failures.add(1, ordering: .relaxed)
                    }
                } catch {
                    failures.add(1, ordering: .relaxed)
                }
            }
        }
        XCTAssertEqual(failures.load(ordering: .relaxed), 0)
    }

    func testARequestLargerThanTheServersMaximumIsSplit() throws {
        let memory = MemoryDevice(size: 64 << 20)
        let socket = try serve([NBDExport(name: "", device: memory)])
        let device = try DeviceRegistry.open("nbd(socket=\(socket))")
        defer { device.close() }
        let size = 40 << 20  // more than the 32 MiB a server takes in one command
        let data = TestBuffer(count: size, pattern: 7)
        XCTAssertEqual(device.submitAndWait(device.writeRequest(data, at: 4096)), .success)
        // memcmp rather than arrays: 40 MiB of array work is slow in a debug build.
        for source in [memory, device] as [any BlockDevice] {
            let back = TestBuffer(count: size)
            XCTAssertEqual(source.submitAndWait(source.readRequest(back, at: 4096)), .success)
            XCTAssertEqual(memcmp(back.vector.pointee.iov_base, data.vector.pointee.iov_base, size), 0, "\(source.name) has the data")
        }
    }

    func testCapabilitiesFollowTheServersFlags() throws {
        let memory = MemoryDevice(size: 1 << 20)
        try memory.writePattern(4096, seed: 4, at: 0)
        let socket = try serve([NBDExport(name: "rw", device: memory), NBDExport(name: "ro", device: memory, readOnly: true)])
        let device = try DeviceRegistry.open("nbd(socket=\(socket), export=ro)")
        defer { device.close() }
        XCTAssertTrue(device.capabilities.isDisjoint(with: [.write, .flush, .fua, .discard, .writeZeroes]), "\(device.capabilities)")
        XCTAssertEqual(try device.readBytes(4096, at: 0), TestBuffer.expected(4096, 4))
        let data = TestBuffer(count: 4096, pattern: 1)
        XCTAssertEqual(device.submitAndWait(device.writeRequest(data, at: 0)).errorCode, .readOnly)
        XCTAssertEqual(try memory.readBytes(4096, at: 0), TestBuffer.expected(4096, 4))
    }

    func testFUAIsAFlushAfterTheWriteWhenTheServerHasNoFUA() throws {
        let stats = StatsFilter(next: MemoryDevice(size: 1 << 20))
        let socket = try serve([NBDExport(name: "", device: NoFUA(next: stats))])
        let device = try DeviceRegistry.open("nbd(socket=\(socket))")
        defer { device.close() }
        XCTAssertTrue(device.capabilities.contains(.fua), "FUA is emulated with flush")
        let data = TestBuffer(count: 4096, pattern: 3)
        XCTAssertEqual(device.submitAndWait(device.writeRequest(data, at: 0, fua: true)), .success)
        XCTAssertEqual(stats.snapshot()[.write].count, 1)
        XCTAssertEqual(stats.snapshot()[.flush].count, 1, "the write was followed by a flush")
    }

    func testServerErrorsArriveAsTheirErrno() throws {
        let below = try DeviceRegistry.open("error(error=ENOSPC, error-pwrite-rate=1, error-pread-rate=1, error-offset=64K) | memory(size=1M)")
        let socket = try serve([NBDExport(name: "", device: below)])
        let device = try DeviceRegistry.open("nbd(socket=\(socket))")
        defer { device.close() }
        try device.writePattern(4096, seed: 1, at: 0)
        XCTAssertThrowsError(try device.writePattern(4096, seed: 1, at: 65536)) { error in
            XCTAssertEqual((error as? BlockError)?.code, .noSpace)
            XCTAssertEqual("\(error)", "nbd(socket=\(socket)): write at 65536+4096: ENOSPC")
        }
        XCTAssertThrowsError(try device.readBytes(4096, at: 65536), "a structured error chunk") { error in
            XCTAssertEqual((error as? BlockError)?.code, .noSpace)
            XCTAssertTrue("\(error)".hasPrefix("nbd(socket=\(socket)): read at 65536+4096: ENOSPC"), "\(error)")
        }
        XCTAssertEqual(try device.readBytes(4096, at: 0), TestBuffer.expected(4096, 1), "the connection survives an error reply")
    }

    func testTCPHostnameAndPort() throws {
        let memory = MemoryDevice(size: 1 << 20)
        let server = NBDServer(listen: .tcp(host: "127.0.0.1", port: 0), exports: [NBDExport(name: "disk", device: memory)])
        try server.start()
        defer { server.stop() }
        let port = try XCTUnwrap(server.boundPort)
        let device = try DeviceRegistry.open("nbd(hostname=127.0.0.1, port=\(port), export=disk)")
        defer { device.close() }
        try device.writePattern(8192, seed: 2, at: 8192)
        XCTAssertEqual(try memory.readBytes(8192, at: 8192), TestBuffer.expected(8192, 2))
    }

    func testAServerThatDisconnectsFailsPendingAndLaterRequests() throws {
        let socket = makeTemporaryDirectory(self) + "/nbd.sock"
        let server = try HangingUpServer(socket: socket, requestsBeforeHangingUp: 3)
        let device = try DeviceRegistry.open("nbd(socket=\(socket))")
        defer { device.close() }
        let buffers = (0..<3).map { _ in TestBuffer(count: 4096) }
        let completions = Completions()
        for (i, buffer) in buffers.enumerated() {
            device.submit(device.readRequest(buffer, at: UInt64(i) * 4096), completion: completions.completion(UInt64(i)))
        }
        let results = completions.wait(for: 3)
        XCTAssertEqual(results.count, 3)
        XCTAssertTrue(results.values.allSatisfy { $0.errorCode == .io }, "\(results)")
        XCTAssertEqual(device.submitAndWait(device.readRequest(buffers[0], at: 0)).errorCode, .io, "later requests fail at once")
        XCTAssertThrowsError(try device.sync.flush()) { XCTAssertTrue("\($0)".contains("closed the connection"), "\($0)") }
        server.join()
    }

    func testAServerThatDisconnectsDuringLargeWritesFailsThemAll() throws {
        let socket = makeTemporaryDirectory(self) + "/nbd.sock"
        let server = try HangingUpServer(socket: socket, requestsBeforeHangingUp: 1)
        let device = try DeviceRegistry.open("nbd(socket=\(socket))")
        defer { device.close() }
        let buffers = (0..<4).map { _ in TestBuffer(count: 4 << 20, pattern: 1) }
        let completions = Completions()
        for (i, buffer) in buffers.enumerated() {
            device.submit(device.writeRequest(buffer, at: 0), completion: completions.completion(UInt64(i)))
        }
        let results = completions.wait(for: 4)
        XCTAssertEqual(results.count, 4)
        XCTAssertTrue(results.values.allSatisfy { $0.errorCode == .io }, "\(results)")
        server.join()
    }

    /// nbdkit with `arguments` on a unix socket, stopped after the test; without nbdkit the
    /// test fails in CI and skips elsewhere.
    private func nbdkit(_ arguments: [String], file: StaticString = #filePath, line: UInt = #line) throws -> String {
        let nbdkit = try Peers.program("nbdkit", package: "nbdkit", file: file, line: line)
        let socket = makeTemporaryDirectory(self) + "/nbdkit.sock"
        let process = Process()
        process.executableURL = URL(fileURLWithPath: nbdkit)
        process.arguments = ["-f", "-U", socket] + arguments
        try process.run()
        addTeardownBlock { process.terminate(); process.waitUntilExit() }
        for _ in 0..<500 where !FileManager.default.fileExists(atPath: socket) { usleep(10_000) }
        return socket
    }

    func testAgainstNbdkitMemoryWithStructuredReplies() throws {
        try againstNbdkitMemory(structuredReplies: true)
    }

    func testAgainstNbdkitMemoryWithSimpleReplies() throws {
        try againstNbdkitMemory(structuredReplies: false)
    }

    private func againstNbdkitMemory(structuredReplies: Bool) throws {
        let socket = try nbdkit((structuredReplies ? [] : ["--no-sr"]) + ["memory", "64M"])
        let device = try DeviceRegistry.open("nbd(socket=\(socket))")
        defer { device.close() }
        XCTAssertEqual(try XCTUnwrap(device as? NBDDevice).structuredReplies, structuredReplies)
        XCTAssertEqual(device.capabilities.contains(.extents), structuredReplies, "block status needs structured replies")
        XCTAssertEqual(device.geometry.size, 64 << 20)
        XCTAssertTrue(device.capabilities.isSuperset(of: [.write, .flush, .fua, .discard, .writeZeroes]), "\(device.capabilities)")
        let writes = (0..<16).map { TestBuffer(count: 65536, pattern: UInt8($0)) }
        let completions = Completions()
        for (i, buffer) in writes.enumerated() {
            device.submit(device.writeRequest(buffer, at: UInt64(i) * (1 << 20)), completion: completions.completion(UInt64(i)))
        }
        XCTAssertEqual(completions.wait(for: 16).values.filter { $0 == .success }.count, 16)
        for i in 0..<16 { XCTAssertEqual(try device.readBytes(65536, at: UInt64(i) * (1 << 20)), TestBuffer.expected(65536, UInt8(i))) }
        try device.writePattern(4096, seed: 9, at: 0, fua: true)
        try device.sync.flush()
        try device.sync.discard(at: 1 << 20, length: 65536)
        try device.sync.writeZeroes(at: 2 << 20, length: 65536, mayDiscard: true)
        XCTAssertEqual(try device.readBytes(65536, at: 1 << 20), [UInt8](repeating: 0, count: 65536))
        XCTAssertEqual(try device.readBytes(65536, at: 2 << 20), [UInt8](repeating: 0, count: 65536))
        XCTAssertEqual(try device.readBytes(4096, at: 0), TestBuffer.expected(4096, 9))
    }

    func testWriteZeroesAreWrittenWhenTheServerHasNone() throws {
        let socket = try nbdkit(["--filter=nozero", "memory", "4M"])
        let device = try DeviceRegistry.open("nbd(socket=\(socket))")
        defer { device.close() }
        XCTAssertEqual(try XCTUnwrap(device as? NBDDevice).transmissionFlags & NBD.tflagSendWriteZeroes, 0)
        try device.writePattern(3 << 20, seed: 5, at: 0)
        try device.sync.writeZeroes(at: 4096, length: (2 << 20) + 8192, mayDiscard: false)
        let back = try device.readBytes(3 << 20, at: 0)
        XCTAssertEqual(Array(back[0..<4096]), TestBuffer.expected(4096, 5))
        XCTAssertTrue(back[4096..<((2 << 20) + 12288)].allSatisfy { $0 == 0 })
        XCTAssertEqual(back[(2 << 20) + 12288], TestBuffer.expected((2 << 20) + 12289, 5).last)
    }

    /// Partition tables that nbdkit's partitioning plugin writes, read through `nbd`.
    func testPartitionsOfTablesNbdkitMakes() throws {
        let directory = makeTemporaryDirectory(self)
        let files = try (1...5).map { n -> String in
            let path = directory + "/part\(n).img"
            let file = try FileDevice(path: path, options: .init(direct: .off, createSize: 1 << 20))
            try file.writePattern(4096, seed: UInt8(n), at: 0)
            file.close()
            return path
        }
        for type in ["mbr", "gpt"] {
            let socket = try nbdkit(["partitioning"] + files + ["partition-type=\(type)"])
            // With more than four, an MBR has primaries 1-3, the extended partition 4, logical 5 and 6.
            for n in 1...5 {
                let number = type == "mbr" && n > 3 ? n + 1 : n
                let partition = try DeviceRegistry.open("partition(partition=\(number)) | nbd(socket=\(socket))")
                defer { partition.close() }
                XCTAssertEqual(partition.geometry.size, 1 << 20, "\(type) partition \(n)")
                XCTAssertEqual(try partition.readBytes(4096, at: 0), TestBuffer.expected(4096, UInt8(n)), "\(type) partition \(n)")
            }
        }
    }

    func testURIsAsQemuAndLibnbdWriteThem() throws {
        func parsed(_ uri: String) throws -> String {
            let (address, export) = try NBDDevice.parse(uri: uri)
            return "\(address) export=\(export)"
        }
        XCTAssertEqual(try parsed("nbd://storage1/disk"), "hostname=storage1, port=10809 export=disk")
        XCTAssertEqual(try parsed("nbd://10.0.0.2:10810/"), "hostname=10.0.0.2, port=10810 export=")
        XCTAssertEqual(try parsed("nbd://[::1]:7000/my%20disk"), "hostname=::1, port=7000 export=my disk")
        XCTAssertEqual(try parsed("nbd://"), "hostname=localhost, port=10809 export=")
        XCTAssertEqual(try parsed("nbd+unix:///disk?socket=/run/x.sock"), "socket=/run/x.sock export=disk")
        XCTAssertThrowsError(try parsed("nbds://storage1/disk")) { XCTAssertTrue("\($0)".contains("TLS"), "\($0)") }
        XCTAssertThrowsError(try parsed("nbd+unix:///disk")) { XCTAssertTrue("\($0)".contains("needs ?socket=PATH"), "\($0)") }
        XCTAssertThrowsError(try parsed("nbd://host:http/")) { XCTAssertTrue("\($0)".contains("port 'http'"), "\($0)") }
        XCTAssertThrowsError(try parsed("http://host/")) { XCTAssertTrue("\($0)".contains("is not nbd://"), "\($0)") }

        let memory = MemoryDevice(size: 1 << 20)
        let socket = try serve([NBDExport(name: "a disk", device: memory)])
        let device = try DeviceRegistry.open(#"nbd(uri="nbd+unix:///a%20disk?socket=\#(socket)")"#)
        defer { device.close() }
        try device.writePattern(4096, seed: 6, at: 0)
        XCTAssertEqual(try memory.readBytes(4096, at: 0), TestBuffer.expected(4096, 6))
        XCTAssertEqual(specError(#"nbd(uri="nbd://x/", export=y)"#),
                       "nbd: uri= says it all; give it without socket=, hostname=, port= or export=")
    }

    func testSpecErrorsSayWhatIsWrong() throws {
        let socket = try serve([NBDExport(name: "disk", device: MemoryDevice(size: 1 << 20))])
        XCTAssertEqual(specError("nbd"), "nbd: give socket=PATH or hostname=HOST (and port=)")
        XCTAssertEqual(specError("nbd(socket=/x, hostname=y)"), "nbd: give socket= or hostname=, not both")
        XCTAssertEqual(specError("nbd(hostname=localhost, port=http)"), "nbd: port 'http' is not a whole number from 1 to 65535")
        XCTAssertEqual(specError("nbd(socket=/nonexistent/nbd.sock)"),
                       "nbd(socket=/nonexistent/nbd.sock): cannot connect: No such file or directory")
        let unknown = try XCTUnwrap(specError("nbd(socket=\(socket), export=nope)"))
        XCTAssertTrue(unknown.hasPrefix("nbd(socket=\(socket), export=nope): unknown export 'nope'"), unknown)
    }
}

/// The device below without FUA, so that the server does not advertise it.
private final class NoFUA: BlockFilter, @unchecked Sendable {
    override var capabilities: BlockCapabilities { next.capabilities.subtracting(.fua) }
}

/// A server that negotiates one 1 MiB export, reads `requestsBeforeHangingUp` request headers
/// and hangs up without answering any.
private final class HangingUpServer: @unchecked Sendable {
    private let listener: Int32
    private let done = DispatchSemaphore(value: 0)

    init(socket path: String, requestsBeforeHangingUp count: Int) throws {
        let listener = Glibc.socket(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0)
        self.listener = listener
        var addr = sockaddr_un()
        addr.sun_family = sa_family_t(AF_UNIX)
        withUnsafeMutableBytes(of: &addr.sun_path) { $0.copyBytes(from: Array(path.utf8)) }
        let bound = withUnsafePointer(to: &addr) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(listener, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
        }
        guard bound == 0, listen(listener, 1) == 0 else { throw POSIXError(.EADDRINUSE) }
        let done = done
        Thread.detachNewThread {
            defer { close(listener); done.signal() }
            let fd = accept(listener, nil, nil)
            guard fd >= 0 else { return }
            defer { close(fd) }
            let socket = NBDSocket(fd: fd)
            var greeting = NBDMessage()
            greeting.append(NBD.initMagic); greeting.append(NBD.optionMagic); greeting.append(NBD.flagFixedNewstyle | NBD.flagNoZeroes)
            guard socket.writeFully(greeting.bytes) else { return }
            var header = [UInt8](repeating: 0, count: 16)
            guard header.withUnsafeMutableBytes({ socket.readFully($0.baseAddress!, 4) }) else { return }
            // Options until GO; every other option is refused as unsupported.
            while true {
                guard header.withUnsafeMutableBytes({ socket.readFully($0.baseAddress!, 16) }) else { return }
                let (code, length) = header.withUnsafeBytes { ($0.baseAddress!.loadBE(UInt32.self, at: 8), $0.baseAddress!.loadBE(UInt32.self, at: 12)) }
                var option = [UInt8](repeating: 0, count: Int(length))
                guard option.isEmpty || option.withUnsafeMutableBytes({ socket.readFully($0.baseAddress!, $0.count) }) else { return }
                if code == NBD.Option.go.rawValue { break }
                var refusal = NBDMessage()
                refusal.append(NBD.optionReplyMagic); refusal.append(code); refusal.append(NBD.repErrUnsup); refusal.append(UInt32(0))
                guard socket.writeFully(refusal.bytes) else { return }
            }
            var reply = NBDMessage()
            for (type, payload) in [(NBD.repInfo, 12), (NBD.repAck, 0)] {
                reply.append(NBD.optionReplyMagic); reply.append(NBD.Option.go.rawValue); reply.append(type); reply.append(UInt32(payload))
                if payload > 0 { reply.append(NBD.infoExport); reply.append(UInt64(1 << 20)); reply.append(NBD.tflagHasFlags | NBD.tflagSendFlush) }
            }
            guard socket.writeFully(reply.bytes) else { return }
            var request = [UInt8](repeating: 0, count: NBD.requestHeaderSize)
            for _ in 0..<count { _ = request.withUnsafeMutableBytes { socket.readFully($0.baseAddress!, NBD.requestHeaderSize) } }
        }
    }

    func join() { _ = done.wait(timeout: .now() + 10) }
}
