import Core
@testable import Devices
import Glibc
import XCTest

final class FileDeviceTests: XCTestCase {
    /// A new sparse image of `size` bytes in a fresh directory (on disk: O_DIRECT works there).
    func makeImage(size: UInt64 = 1 << 20, direct: FileDevice.DirectIO = .on, in directory: String? = nil,
                   inline: Bool = true) throws -> FileDevice {
        let path = (directory ?? makeTemporaryDirectory(self)) + "/disk.img"
        var options = FileDevice.Options(direct: direct, createSize: size)
        options.inlineOnMemoryFileSystems = inline
        let file = try FileDevice(path: path, options: options)
        addTeardownBlock { file.close() }
        return file
    }

    /// What the file holds, read with plain pread: an independent check of the device.
    func fileBytes(_ file: FileDevice, _ count: Int, at offset: UInt64) -> [UInt8] {
        let fd = open(file.path, O_RDONLY)
        defer { close(fd) }
        var bytes = [UInt8](repeating: 0xEE, count: count)
        XCTAssertEqual(pread(fd, &bytes, count, off_t(offset)), count)
        return bytes
    }

    func testSynchronousWritesReadBackWithODirect() throws {
        let file = try makeImage()
        XCTAssertTrue(file.isDirect)
        try file.writePattern(8192, seed: 1, at: 4096)
        XCTAssertEqual(try file.readBytes(8192, at: 4096), TestBuffer.expected(8192, 1))
        XCTAssertEqual(fileBytes(file, 8192, at: 4096), TestBuffer.expected(8192, 1))
    }

    func testABurstOfAsynchronousWritesAndReads() throws {
        let file = try makeImage()
        let buffers = (0..<64).map { TestBuffer(count: 4096, pattern: UInt8($0)) }
        let writes = Completions()
        for (i, buffer) in buffers.enumerated() {
            file.submit(file.writeRequest(buffer, at: UInt64(i) * 4096, fua: i % 8 == 0), completion: writes.completion(UInt64(i)))
        }
        XCTAssertEqual(writes.wait(for: 64).values.filter { $0 == .success }.count, 64)
        for i in 0..<64 { XCTAssertEqual(fileBytes(file, 4096, at: UInt64(i) * 4096), TestBuffer.expected(4096, UInt8(i))) }

        let back = (0..<64).map { _ in TestBuffer(count: 4096) }
        let reads = Completions()
        for (i, buffer) in back.enumerated() { file.submit(file.readRequest(buffer, at: UInt64(i) * 4096), completion: reads.completion(UInt64(i))) }
        XCTAssertEqual(reads.wait(for: 64).values.filter { $0 == .success }.count, 64)
        for i in 0..<64 { XCTAssertEqual(back[i].bytes, TestBuffer.expected(4096, UInt8(i))) }
        XCTAssertEqual(file.submitAndWait(BlockRequest(operation: .flush, offset: 0, length: 0)), .success)
        withExtendedLifetime(buffers) {}
    }

    func testAFailedWaitForCompletionsFailsRequestsWithEIONotTheDaemon() throws {
        // io_getevents fails (EFAULT) when the first of them completes: every request in
        // flight, and every one after them, fails with EIO; none hangs, nothing traps.
        let file = try makeImage()
        file.failNextCompletionWait(errno: EFAULT)
        let buffers = (0..<32).map { TestBuffer(count: 4096, pattern: UInt8($0)) }
        let writes = Completions()
        for (i, buffer) in buffers.enumerated() {
            file.submit(file.writeRequest(buffer, at: UInt64(i) * 4096), completion: writes.completion(UInt64(i)))
        }
        let results = writes.wait(for: 32)
        XCTAssertEqual(results.count, 32, "every request completed")
        XCTAssertEqual(results.values.filter { if case .failure(let e) = $0 { e.errno == EIO } else { false } }.count, 32)
        guard case .failure(let later) = file.submitAndWait(file.writeRequest(buffers[0], at: 0)) else {
            return XCTFail("a request after the failure succeeded without a reaper")
        }
        XCTAssertEqual(later.errno, EIO)
        XCTAssertEqual(later.code, .io)
        file.close()   // returns: the reaper is gone, nothing waits for it
        withExtendedLifetime(buffers) {}
    }

    func testABurstOnABufferedFileFromThePageCacheAndFromDisk() throws {
        // direct=off: requests run on worker threads, reads that hit the page cache inline.
        let file = try makeImage(size: 1 << 20, direct: .off)
        XCTAssertFalse(file.isDirect)
        let buffers = (0..<64).map { TestBuffer(count: 4096, pattern: UInt8($0 + 1)) }
        let writes = Completions()
        for (i, buffer) in buffers.enumerated() {
            file.submit(file.writeRequest(buffer, at: UInt64(i) * 4096, fua: i % 8 == 0), completion: writes.completion(UInt64(i)))
        }
        XCTAssertEqual(writes.wait(for: 64).values.filter { $0 == .success }.count, 64)
        XCTAssertEqual(file.submitAndWait(BlockRequest(operation: .flush, offset: 0, length: 0)), .success)
        for pass in ["page cache", "disk"] {
            if pass == "disk" {
                // Written back by the flush; dropping the cached pages makes RWF_NOWAIT fail
                // (EAGAIN) so that the reads go to the workers.
                let fd = open(file.path, O_RDONLY)
                XCTAssertEqual(posix_fadvise(fd, 0, 1 << 20, POSIX_FADV_DONTNEED), 0)
                close(fd)
            }
            let back = (0..<64).map { _ in TestBuffer(count: 4096) }
            let reads = Completions()
            for (i, buffer) in back.enumerated() { file.submit(file.readRequest(buffer, at: UInt64(i) * 4096), completion: reads.completion(UInt64(i))) }
            XCTAssertEqual(reads.wait(for: 64).values.filter { $0 == .success }.count, 64, pass)
            for i in 0..<64 { XCTAssertEqual(back[i].bytes, TestBuffer.expected(4096, UInt8(i + 1)), "\(pass): block \(i)") }
        }
        withExtendedLifetime(buffers) {}
    }

    /// A buffered file's writes queue behind the worker that is writing; the completion of
    /// the last may close the device (as a transport's last request may lead to its close)
    /// without waiting on that worker, and every write is in the file.
    func testTheLastQueuedWritesCompletionMayCloseTheDevice() throws {
        let file = try makeImage(size: 1 << 20, direct: .off, inline: false)
        XCTAssertFalse(file.servesInline, "a buffered file on a disk file system: writes go to workers")
        final class ClosingSink: BlockCompletionSink, @unchecked Sendable {
            let lock = NSLock()
            var results: [BlockResult] = []
            let closed = DispatchSemaphore(value: 0)
            let file: FileDevice, count: Int
            init(_ file: FileDevice, _ count: Int) { self.file = file; self.count = count }
            func complete(tag: UInt64, result: BlockResult) {
                let last = lock.withLock { results.append(result); return results.count == count }
                if last { file.close(); closed.signal() }
            }
        }
        let count = 48
        let sink = ClosingSink(file, count)
        let buffers = (0..<count).map { TestBuffer(count: 4096, pattern: UInt8($0 + 1)) }
        for (i, buffer) in buffers.enumerated() {
            file.submit(file.writeRequest(buffer, at: UInt64(i) * 4096, fua: false), completion: BlockCompletion(sink: sink, tag: UInt64(i)))
        }
        XCTAssertEqual(sink.closed.wait(timeout: .now() + 20), .success, "closed from the last completion, no deadlock")
        XCTAssertEqual(sink.lock.withLock { sink.results.filter { $0 == .success }.count }, count)
        for i in 0..<count { XCTAssertEqual(fileBytes(file, 4096, at: UInt64(i) * 4096), TestBuffer.expected(4096, UInt8(i + 1)), "block \(i)") }
        withExtendedLifetime(buffers) {}
    }

    func testMisalignedBuffersGoThroughABounceBuffer() throws {
        let file = try makeImage()
        // 3 bytes past a page boundary: O_DIRECT would fail this with EINVAL.
        let data = TestBuffer(count: 8192, misalign: 3, pattern: 7)
        XCTAssertEqual(file.submitAndWait(file.writeRequest(data, at: 0)), .success)
        let back = TestBuffer(count: 8192, misalign: 5)
        XCTAssertEqual(file.submitAndWait(file.readRequest(back, at: 0)), .success)
        XCTAssertEqual(back.bytes, TestBuffer.expected(8192, 7))

        try file.write(from: data.buffers, at: 65536, fua: true)
        try file.read(into: back.buffers, at: 65536)
        XCTAssertEqual(back.bytes, TestBuffer.expected(8192, 7))
        XCTAssertEqual(fileBytes(file, 8192, at: 65536), TestBuffer.expected(8192, 7))
    }

    func testFallsBackToBufferedIOWithoutODirect() throws {
        // ramfs has no O_DIRECT: open fails with EINVAL.
        let directory = try mountTemporary(self, type: "ramfs")
        XCTAssertThrowsError(try FileDevice(path: directory + "/disk.img", options: .init(direct: .on, createSize: 1 << 20))) { error in
            XCTAssertEqual((error as? BlockError)?.code, .notSupported)
            XCTAssertEqual((error as? BlockError)?.message,
                           "file(path=\(directory)/disk.img): this file system does not support O_DIRECT (use direct=auto or direct=off)")
        }
        // Served by the workers (as on a disk file system that refuses RWF_NOWAIT): ramfs answers
        // RWF_NOWAIT with EOPNOTSUPP, and submitted reads still arrive, via the workers.
        let file = try makeImage(direct: .auto, in: directory, inline: false)
        XCTAssertFalse(file.isDirect)
        XCTAssertFalse(file.servesInline)
        let data = TestBuffer(count: 4096, misalign: 1, pattern: 4)
        XCTAssertEqual(file.submitAndWait(file.writeRequest(data, at: 8192, fua: true)), .success)
        XCTAssertEqual(try file.readBytes(4096, at: 8192), TestBuffer.expected(4096, 4))
        for _ in 0..<2 {
            let back = TestBuffer(count: 4096)
            XCTAssertEqual(file.submitAndWait(file.readRequest(back, at: 8192)), .success)
            XCTAssertEqual(back.bytes, TestBuffer.expected(4096, 4))
        }
    }

    func testAFileOnAMemoryFileSystemIsServedOnTheSubmittingThread() throws {
        for type in ["tmpfs", "ramfs"] {
            let directory = try mountTemporary(self, type: type, options: type == "tmpfs" ? "size=8m" : nil)
            let file = try makeImage(direct: .off, in: directory)
            XCTAssertTrue(file.servesInline, type)
            let buffers = (0..<32).map { TestBuffer(count: 4096, pattern: UInt8($0 + 1)) }
            let writes = Completions()
            // Inline means complete before submit returns.
            for (i, buffer) in buffers.enumerated() {
                file.submit(file.writeRequest(buffer, at: UInt64(i) * 8192, fua: i % 4 == 0), completion: writes.completion(UInt64(i)))
                XCTAssertEqual(writes.arrived[UInt64(i)], .success, "\(type): write \(i) completed inline")
            }
            XCTAssertEqual(file.submitAndWait(BlockRequest(operation: .flush, offset: 0, length: 0)), .success)
            for i in 0..<32 { XCTAssertEqual(fileBytes(file, 4096, at: UInt64(i) * 8192), TestBuffer.expected(4096, UInt8(i + 1)), type) }
            let back = TestBuffer(count: 4096)
            XCTAssertEqual(file.submitAndWait(file.readRequest(back, at: 31 * 8192)), .success)
            XCTAssertEqual(back.bytes, TestBuffer.expected(4096, 32), type)
            withExtendedLifetime(buffers) {}
        }
    }

    func testOnlyODirectFilesHoldAnAioContext() throws {
        /// Events reserved by every process's io_setup (buffered files never use libaio).
        func aioEvents() throws -> Int {
            let text = try String(contentsOfFile: "/proc/sys/fs/aio-nr", encoding: .utf8)
            return Int(text.trimmingCharacters(in: .whitespacesAndNewlines)) ?? -1
        }
        let before = try aioEvents()
        let buffered = try makeImage(direct: .off)
        XCTAssertFalse(buffered.isDirect)
        XCTAssertEqual(try aioEvents(), before, "a buffered file set up an aio context")
        let direct = try makeImage(direct: .on)
        XCTAssertGreaterThanOrEqual(try aioEvents(), before + 128, "an O_DIRECT file has its 128-event context")
        withExtendedLifetime(direct) {}
    }

    func testABufferedFileOnADiskFileSystemIsNotServedInline() throws {
        let file = try makeImage(direct: .off)
        XCTAssertEqual(file.servesInline, false, "the test directory is not on tmpfs")
    }

    func testExtentsFollowWritesAndDiscards() throws {
        let file = try makeImage()
        XCTAssertEqual(try file.extents(at: 0, length: 1 << 20), [BlockExtent(offset: 0, length: 1 << 20, isHole: true, isZero: true)])
        try file.writePattern(65536, seed: 2, at: 262144)
        XCTAssertEqual(try file.extents(at: 0, length: 1 << 20), [
            BlockExtent(offset: 0, length: 262144, isHole: true, isZero: true),
            BlockExtent(offset: 262144, length: 65536, isHole: false, isZero: false),
            BlockExtent(offset: 327680, length: (1 << 20) - 327680, isHole: true, isZero: true),
        ])
        XCTAssertEqual(file.submitAndWait(BlockRequest(operation: .discard, offset: 262144, length: 65536)), .success)
        XCTAssertEqual(try file.extents(at: 0, length: 1 << 20), [BlockExtent(offset: 0, length: 1 << 20, isHole: true, isZero: true)])
        XCTAssertEqual(try file.readBytes(65536, at: 262144), [UInt8](repeating: 0, count: 65536))
    }

    func testWriteZeroesReadsBackZeroes() throws {
        let file = try makeImage()
        try file.writePattern(131072, seed: 3, at: 0)
        try file.writeZeroes(at: 0, length: 65536, mayDiscard: false)
        try file.writeZeroes(at: 65536, length: 65536, mayDiscard: true)
        XCTAssertEqual(try file.readBytes(131072, at: 0), [UInt8](repeating: 0, count: 131072))
        let extents = try file.extents(at: 0, length: 131072)
        // mayDiscard punches a hole; ZERO_RANGE may leave data or (ext4: unwritten extents) a hole.
        XCTAssertTrue(extents.allSatisfy { $0.isHole || $0.offset + $0.length <= 65536 }, "\(extents)")
    }

    func testAFullFileSystemIsNoSpaceNeverSuccess() throws {
        // O_DIRECT through libaio where tmpfs has it (Linux 6.6+), and buffered on the
        // submitting thread (direct=off on tmpfs).
        for direct in [FileDevice.DirectIO.auto, .off] {
            let directory = try mountTemporary(self, type: "tmpfs", options: "size=256k")
            let file = try makeImage(size: 1 << 20, direct: direct, in: directory)
            try fillPastTheEnd(file)
        }
    }

    private func fillPastTheEnd(_ file: FileDevice) throws {
        let buffers = (0..<16).map { TestBuffer(count: 65536, pattern: UInt8($0)) }
        let completions = Completions()
        for (i, buffer) in buffers.enumerated() {
            file.submit(file.writeRequest(buffer, at: UInt64(i) * 65536), completion: completions.completion(UInt64(i)))
        }
        let results = completions.wait(for: 16)
        let succeeded = results.filter { $0.value == .success }.map(\.key)
        XCTAssertLessThanOrEqual(succeeded.count, 4, "256 KiB cannot hold more than four 64 KiB writes")
        XCTAssertTrue(results.values.contains { $0.errorCode == .noSpace })
        XCTAssertTrue(results.values.allSatisfy { $0 == .success || $0.errorCode == .noSpace })
        for i in succeeded { XCTAssertEqual(fileBytes(file, 65536, at: i * 65536), TestBuffer.expected(65536, UInt8(i))) }
        XCTAssertThrowsError(try file.writePattern(65536, seed: 1, at: 15 * 65536)) { error in
            XCTAssertEqual((error as? BlockError)?.code, .noSpace)
        }
        withExtendedLifetime(buffers) {}
    }

    func testReadOnlyRejectsWrites() throws {
        let path = makeTemporaryDirectory(self) + "/disk.img"
        try FileDevice(path: path, options: .init(createSize: 1 << 20)).close()
        let file = try DeviceRegistry.open("file(path=\"\(path)\", readonly=true)")
        defer { file.close() }
        XCTAssertFalse(file.capabilities.contains(.write))
        XCTAssertThrowsError(try file.writePattern(4096, seed: 1, at: 0)) { XCTAssertEqual(($0 as? BlockError)?.code, .readOnly) }
        let data = TestBuffer(count: 4096, pattern: 1)
        XCTAssertEqual(file.submitAndWait(file.writeRequest(data, at: 0)).errorCode, .readOnly)
        XCTAssertEqual(file.submitAndWait(BlockRequest(operation: .discard, offset: 0, length: 4096)).errorCode, .readOnly)
        XCTAssertEqual(try file.readBytes(4096, at: 0), [UInt8](repeating: 0, count: 4096))
    }

    func testOpenErrorsSayWhatFailed() {
        XCTAssertThrowsError(try FileDevice(path: "/nonexistent/disk.img")) { error in
            XCTAssertEqual((error as? BlockError)?.message, "file(path=/nonexistent/disk.img): cannot open: No such file or directory")
        }
        XCTAssertThrowsError(try FileDevice(path: "/dev/null")) { error in
            XCTAssertEqual((error as? BlockError)?.message, "file(path=/dev/null): not a regular file or a block device")
        }
    }
}

/// A transport that collects an O_DIRECT file's completions on its own thread.
final class FileCompletionSourceTests: XCTestCase {
    final class Sink: BlockCompletionSink, @unchecked Sendable {
        let lock = NSLock()
        var results: [BlockResult] = []
        var threads: [pthread_t] = []
        func complete(tag: UInt64, result: BlockResult) { lock.withLock { results.append(result); threads.append(pthread_self()) } }
    }

    func testCompletionsAreCollectedOnTheTransportsThreadOnceEach() throws {
        let path = FileManager.default.temporaryDirectory.appendingPathComponent("source-\(getpid()).img").path
        defer { unlink(path) }
        let device = try FileDevice(path: path, options: .init(direct: .auto, createSize: 1 << 20))
        defer { device.close() }
        guard device.isDirect else { throw XCTSkip("no O_DIRECT on \(path)'s file system: nothing to collect") }
        let source = try XCTUnwrap(device.attachCompletionSource(), "an O_DIRECT file has a completion source")
        let sink = Sink()
        let buffer = TestBuffer(count: 4096, pattern: 9)
        for i in 0..<8 {
            device.submit(BlockRequest(operation: .write, offset: UInt64(i) * 4096, length: 4096, buffers: buffer.buffers),
                          completion: BlockCompletion(sink: sink, tag: UInt64(i)))
        }
        let deadline = monotonicSeconds() + 10
        while sink.lock.withLock({ sink.results.count }) < 8 && monotonicSeconds() < deadline {
            var p = pollfd(fd: source.fileDescriptor, events: Int16(POLLIN), revents: 0)
            if poll(&p, 1, 100) > 0 { source.collect() }
        }
        XCTAssertEqual(sink.results, Array(repeating: .success, count: 8), "each write completed once")
        XCTAssertTrue(sink.threads.contains { pthread_equal($0, pthread_self()) != 0 }, "collected here, not only by the reaper")
        source.detach()
        // Detached: the reaper collects again.
        let back = TestBuffer(count: 4096)
        try withExtendedLifetime(back) { try device.sync.read(into: back.buffers, at: 7 * 4096) }
        XCTAssertEqual(back.bytes, buffer.bytes, "what was written reads back through the reaper")
    }
}

/// A transport whose thread has nothing else to do lets a buffered file run the request on it.
final class FileCallerMayWaitTests: XCTestCase {
    func testABufferedRequestRunsOnTheCallersThreadWhenItMayWaitElseOnAWorker() throws {
        let path = FileManager.default.temporaryDirectory.appendingPathComponent("maywait-\(getpid()).img").path
        defer { unlink(path) }
        let device = try FileDevice(path: path, options: .init(direct: .off, createSize: 1 << 20))
        defer { device.close() }
        let sink = FileCompletionSourceTests.Sink()
        let buffer = TestBuffer(count: 4096, pattern: 3)
        var request = BlockRequest(operation: .write, offset: 0, length: 4096, buffers: buffer.buffers)
        request.callerMayWait = true
        device.submit(request, completion: BlockCompletion(sink: sink, tag: 0))
        XCTAssertEqual(sink.lock.withLock { sink.results }, [.success], "done before submit returned")
        XCTAssertTrue(pthread_equal(sink.threads[0], pthread_self()) != 0, "on this thread")
        guard !device.servesInline else { return }   // tmpfs: every request runs here anyway
        request.callerMayWait = false
        request.offset = 4096
        device.submit(request, completion: BlockCompletion(sink: sink, tag: 1))
        let deadline = monotonicSeconds() + 10
        while sink.lock.withLock({ sink.results.count }) < 2 && monotonicSeconds() < deadline { usleep(1000) }
        XCTAssertEqual(sink.lock.withLock { sink.results }, [.success, .success])
        XCTAssertTrue(pthread_equal(sink.threads[1], pthread_self()) == 0, "otherwise on a worker")
        withExtendedLifetime(buffer) {}
    }

    /// A plugged thread's buffered writes wait for its plug's flush: a flush by a thread that
    /// would wait anyway (an NBD reader before it waits for its client) writes them there and
    /// then, in order; another flush (a ring's sweep) hands them to a worker.
    func testPluggedBufferedWritesAreWrittenByAFlushThatMayWaitElseByAWorker() throws {
        let path = makeTemporaryDirectory(self) + "/disk.img"
        var options = FileDevice.Options(direct: .off, createSize: 1 << 20)
        options.inlineOnMemoryFileSystems = false
        let file = try FileDevice(path: path, options: options)
        defer { file.close() }
        let sink = FileCompletionSourceTests.Sink()
        let buffers = (0..<16).map { TestBuffer(count: 4096, pattern: UInt8(0x40 + $0)) }
        BlockPlug.begin()
        for i in 0..<8 {
            file.submit(file.writeRequest(buffers[i], at: UInt64(i) * 4096, fua: false), completion: BlockCompletion(sink: sink, tag: UInt64(i)))
        }
        usleep(20_000)
        XCTAssertEqual(sink.lock.withLock { sink.results.count }, 0, "held until the flush")
        BlockPlug.flush(callerMayWait: true)
        XCTAssertEqual(sink.lock.withLock { sink.results }, Array(repeating: BlockResult.success, count: 8), "written by the flush")
        XCTAssertTrue(sink.lock.withLock { sink.threads.allSatisfy { pthread_equal($0, pthread_self()) != 0 } }, "on this thread")
        for i in 8..<16 {
            file.submit(file.writeRequest(buffers[i], at: UInt64(i) * 4096, fua: false), completion: BlockCompletion(sink: sink, tag: UInt64(i)))
        }
        BlockPlug.end()
        let deadline = monotonicSeconds() + 10
        while sink.lock.withLock({ sink.results.count }) < 16 && monotonicSeconds() < deadline { usleep(1000) }
        XCTAssertEqual(sink.lock.withLock { sink.results.count }, 16)
        XCTAssertTrue(sink.lock.withLock { sink.threads[8...].allSatisfy { pthread_equal($0, pthread_self()) == 0 } }, "on a worker")
        let fd = open(path, O_RDONLY)
        defer { close(fd) }
        for i in 0..<16 {
            var bytes = [UInt8](repeating: 0, count: 4096)
            XCTAssertEqual(pread(fd, &bytes, 4096, off_t(i * 4096)), 4096)
            XCTAssertEqual(bytes, TestBuffer.expected(4096, UInt8(0x40 + i)), "block \(i)")
        }
        withExtendedLifetime(buffers) {}
    }
}

/// A plugged thread's O_DIRECT requests go to the kernel together when the plug ends.
final class FilePlugTests: XCTestCase {
    func testPluggedWritesAndReadsStartAtTheEndAndReadBack() throws {
        let path = FileManager.default.temporaryDirectory.appendingPathComponent("plug-\(getpid()).img").path
        defer { unlink(path) }
        var options = FileDevice.Options(direct: .auto, createSize: 1 << 20)
        options.batchSubmits = true
        let file = try FileDevice(path: path, options: options)
        defer { file.close() }
        guard file.isDirect else { throw XCTSkip("no O_DIRECT on \(path)'s file system: nothing is held") }
        let opened = try XCTUnwrap(DeviceRegistry.open("file(path=\(path), batch=true)") as? FileDevice)
        XCTAssertTrue(opened.batchSubmits, "batch=true in a spec")
        opened.close()
        let buffers = (0..<48).map { TestBuffer(count: 4096, pattern: UInt8($0)) }
        let writes = Completions()
        BlockPlug.begin()
        for (i, buffer) in buffers.enumerated() {
            file.submit(file.writeRequest(buffer, at: UInt64(i) * 4096, fua: false), completion: writes.completion(UInt64(i)))
        }
        usleep(20_000)
        XCTAssertTrue(writes.arrived.isEmpty, "nothing completed while held")
        XCTAssertEqual(fileBytes(0, path: path), [UInt8](repeating: 0, count: 4096), "held until the plug ends")
        BlockPlug.end()
        XCTAssertEqual(writes.wait(for: 48).values.filter { $0 == .success }.count, 48)
        let back = (0..<48).map { _ in TestBuffer(count: 4096) }
        let reads = Completions()
        BlockPlug.batch {
            for (i, buffer) in back.enumerated() { file.submit(file.readRequest(buffer, at: UInt64(i) * 4096), completion: reads.completion(UInt64(i))) }
        }
        XCTAssertEqual(reads.wait(for: 48).values.filter { $0 == .success }.count, 48)
        for i in 0..<48 { XCTAssertEqual(back[i].bytes, TestBuffer.expected(4096, UInt8(i)), "block \(i)") }
        // A synchronous read while plugged flushes and returns (no wait for a held request).
        let one = TestBuffer(count: 4096)
        try BlockPlug.batch { try file.sync.read(into: one.buffers, at: 5 * 4096) }
        XCTAssertEqual(one.bytes, TestBuffer.expected(4096, 5))
        withExtendedLifetime((buffers, back, one)) {}
    }

    func fileBytes(_ offset: off_t, path: String) -> [UInt8] {
        let fd = open(path, O_RDONLY)
        defer { close(fd) }
        var bytes = [UInt8](repeating: 0xEE, count: 4096)
        XCTAssertEqual(pread(fd, &bytes, 4096, offset), 4096)
        return bytes
    }
}
