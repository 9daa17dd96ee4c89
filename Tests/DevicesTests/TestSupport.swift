import Core
import Devices
import Dispatch
import Foundation
import Glibc
import Synchronization
import TestPeers
import XCTest

/// Page-aligned memory for I/O, with one iovec over it that starts `misalign` bytes in.
final class TestBuffer {
    let memory: UnsafeMutableRawPointer
    let count: Int
    let vector = UnsafeMutablePointer<iovec>.allocate(capacity: 1)

    init(count: Int, misalign: Int = 0, pattern seed: UInt8? = nil) {
        var memory: UnsafeMutableRawPointer?
        precondition(posix_memalign(&memory, 4096, count + misalign) == 0)
        self.memory = memory!
        self.count = count
        vector.pointee = iovec(iov_base: memory! + misalign, iov_len: count)
        if let seed { fill(seed) } else { memset(memory! + misalign, 0xEE, count) }
    }
    deinit { free(memory); vector.deallocate() }

    var buffers: IOBuffers { IOBuffers(vector, count: 1) }
    var bytes: [UInt8] { Array(UnsafeRawBufferPointer(start: vector.pointee.iov_base, count: count)) }
    func fill(_ seed: UInt8) {
        let p = vector.pointee.iov_base!.assumingMemoryBound(to: UInt8.self)
        for i in 0..<count { p[i] = UInt8(truncatingIfNeeded: i &* 7 &+ Int(seed)) }
    }
    static func expected(_ count: Int, _ seed: UInt8) -> [UInt8] {
        (0..<count).map { UInt8(truncatingIfNeeded: $0 &* 7 &+ Int(seed)) }
    }
}

/// Records completions and lets a test wait for them.
final class Completions: BlockCompletionSink, @unchecked Sendable {
    private let results = Mutex<[UInt64: BlockResult]>([:])
    private let done = DispatchSemaphore(value: 0)

    func complete(tag: UInt64, result: BlockResult) {
        results.withLock { results in
            XCTAssertNil(results[tag], "request \(tag) completed twice")
            results[tag] = result
        }
        done.signal()
    }
    func completion(_ tag: UInt64) -> BlockCompletion { BlockCompletion(sink: self, tag: tag) }
    /// The results so far, without waiting.
    var arrived: [UInt64: BlockResult] { results.withLock { $0 } }

    /// Waits for `count` completions (failing the test after 10 s) and returns all results.
    func wait(for count: Int) -> [UInt64: BlockResult] {
        for _ in 0..<count {
            if done.wait(timeout: .now() + 10) == .timedOut { XCTFail("a completion did not arrive"); break }
        }
        return results.withLock { $0 }
    }
}

extension BlockDevice {
    /// Submits one request and waits for its completion.
    func submitAndWait(_ request: BlockRequest) -> BlockResult {
        let completions = Completions()
        submit(request, completion: completions.completion(1))
        return completions.wait(for: 1)[1] ?? .failure(BlockError(.io, "no completion"))
    }
    func writeRequest(_ buffer: TestBuffer, at offset: UInt64, fua: Bool = false) -> BlockRequest {
        BlockRequest(operation: .write, offset: offset, length: UInt64(buffer.count), buffers: buffer.buffers, fua: fua)
    }
    func readRequest(_ buffer: TestBuffer, at offset: UInt64) -> BlockRequest {
        BlockRequest(operation: .read, offset: offset, length: UInt64(buffer.count), buffers: buffer.buffers)
    }
    /// Writes `count` bytes of the test pattern `seed` at `offset` synchronously.
    func writePattern(_ count: Int, seed: UInt8, at offset: UInt64, fua: Bool = false) throws {
        let buffer = TestBuffer(count: count, pattern: seed)
        try withExtendedLifetime(buffer) { try sync.write(from: buffer.buffers, at: offset, fua: fua) }
    }
    /// Reads `count` bytes at `offset` synchronously.
    func readBytes(_ count: Int, at offset: UInt64) throws -> [UInt8] {
        let buffer = TestBuffer(count: count)
        try withExtendedLifetime(buffer) { try sync.read(into: buffer.buffers, at: offset) }
        return buffer.bytes
    }
}

extension BlockResult {
    var errorCode: BlockError.Code? {
        if case .failure(let error) = self { return error.code }
        return nil
    }
}

/// A fresh directory for one test, removed afterwards. Under /var/tmp because /tmp may be a
/// tmpfs, and the O_DIRECT tests need a disk file system.
func makeTemporaryDirectory(_ test: XCTestCase) -> String {
    var template = Array("/var/tmp/softdev-devices-XXXXXX".utf8CString)
    let path = String(cString: mkdtemp(&template)!)
    test.addTeardownBlock { _ = try? FileManager.default.removeItem(atPath: path) }
    return path
}

/// Mounts a file system of `type` on a fresh directory (root only), unmounted afterwards.
func mountTemporary(_ test: XCTestCase, type: String, options: String? = nil) throws -> String {
    guard getuid() == 0 else { throw XCTSkip("mounting \(type) needs root") }
    let path = makeTemporaryDirectory(test)
    guard mount(type, path, type, 0, options) == 0 else {
        throw XCTSkip("cannot mount \(type): \(String(cString: strerror(errno)))")
    }
    test.addTeardownBlock { umount2(path, 2 /* MNT_DETACH */) }
    return path
}

/// Deterministic bytes (xorshift), different per seed.
func patternBytes(_ count: Int, seed: UInt64) -> [UInt8] {
    var state = seed &* 0x9E37_79B9_7F4A_7C15 | 1
    return (0..<count).map { _ in
        state ^= state << 13; state ^= state >> 7; state ^= state << 17
        return UInt8(truncatingIfNeeded: state)
    }
}

/// The message `spec` fails to open with, or "" if it opens (it is closed again).
func openError(_ spec: String) -> String {
    do {
        let device = try DeviceRegistry.open(spec)
        device.close()
        return ""
    } catch {
        return error.message
    }
}

/// An image file with metadata, damaged one copy at a time: each damaged copy is written to the
/// file and opened through `spec`, and the error must name the file and say where.
struct DamagedImage {
    let path: String
    let spec: String
    let good: [UInt8]

    init(path: String, spec: String) throws {
        self.path = path; self.spec = spec
        good = [UInt8](try Data(contentsOf: URL(fileURLWithPath: path)))
    }

    /// The error of opening the image changed by `change`.
    func open(_ change: (inout [UInt8]) -> Void) -> String {
        var bytes = good
        change(&bytes)
        FileManager.default.createFile(atPath: path, contents: Data(bytes))
        return openError(spec)
    }

    /// `message` names the file and holds each fragment.
    func check(_ message: String, _ fragments: [String], file: StaticString = #filePath, line: UInt = #line) {
        XCTAssertTrue(message.contains(path), "names the file: \(message)", file: file, line: line)
        for fragment in fragments { XCTAssertTrue(message.contains(fragment), "'\(fragment)' in: \(message)", file: file, line: line) }
    }

    func restore() { FileManager.default.createFile(atPath: path, contents: Data(good)) }
}

/// 64 writes of 12 KiB in flight at once, then 64 reads: each reads back what it wrote.
func checkConcurrentRequests(_ device: any BlockDevice, file: StaticString = #filePath, line: UInt = #line) {
    let buffers = (0..<64).map { TestBuffer(count: 12288, pattern: UInt8($0)) }
    let completions = Completions()
    for (i, buffer) in buffers.enumerated() {
        device.submit(device.writeRequest(buffer, at: UInt64(i) * 100_352), completion: completions.completion(UInt64(i)))
    }
    XCTAssertTrue(completions.wait(for: 64).values.allSatisfy { $0 == .success }, file: file, line: line)
    let reads = (0..<64).map { _ in TestBuffer(count: 12288) }
    let readCompletions = Completions()
    for (i, buffer) in reads.enumerated() {
        device.submit(device.readRequest(buffer, at: UInt64(i) * 100_352), completion: readCompletions.completion(UInt64(i)))
    }
    XCTAssertTrue(readCompletions.wait(for: 64).values.allSatisfy { $0 == .success }, file: file, line: line)
    for (i, buffer) in reads.enumerated() { XCTAssertTrue(buffer.bytes == TestBuffer.expected(12288, UInt8(i)), "request \(i)", file: file, line: line) }
}

/// `steps` random operations on the device `stack` opens, starting from `model` (what it holds):
/// writes of 512 B to 40 KiB at any sector (`data` makes each one's bytes), a quarter of them
/// FUA, flushes, write-zeroes, and discards (`discarded` says what a discarded range reads as
/// afterwards); after each, a random read matches the model, then the whole device after close
/// and reopen.
func checkRandomOperations(_ stack: String, model start: [UInt8], steps: Int, seed: UInt64,
                           data: (_ length: Int, _ step: Int, _ random: inout SplitMix64) -> [UInt8],
                           discarded: (_ model: inout [UInt8], _ range: Range<Int>) -> Void,
                           file: StaticString = #filePath, line: UInt = #line) throws {
    let size = start.count
    var device = try DeviceRegistry.open(stack)
    var model = start
    var random = SplitMix64(seed: seed)
    for step in 0..<steps {
        let sectors = size / 512
        let offset = Int(random.next() % UInt64(sectors)) * 512
        let length = min(size - offset, (Int(random.next() % 80) + 1) * 512)
        switch random.next() % 10 {
        case 0:
            try device.sync.flush()
        case 1:
            try device.sync.writeZeroes(at: UInt64(offset), length: UInt64(length), mayDiscard: true)
            model.replaceSubrange(offset..<offset + length, with: repeatElement(0, count: length))
        case 2:
            try device.sync.discard(at: UInt64(offset), length: UInt64(length))
            discarded(&model, offset..<offset + length)
        default:
            let bytes = data(length, step, &random)
            try device.writeBytes(bytes, at: UInt64(offset), fua: random.next() % 4 == 0)
            model.replaceSubrange(offset..<offset + length, with: bytes)
        }
        let readOffset = Int(random.next() % UInt64(sectors)) * 512
        let readLength = min(size - readOffset, (Int(random.next() % 160) + 1) * 512)
        XCTAssertTrue(try device.readBytes(readLength, at: UInt64(readOffset)) == Array(model[readOffset..<readOffset + readLength]),
                      "step \(step): read \(readOffset)+\(readLength)", file: file, line: line)
    }
    XCTAssertTrue(try device.readBytes(size, at: 0) == model, "the whole device", file: file, line: line)
    device.close()
    device = try DeviceRegistry.open(stack)
    XCTAssertTrue(try device.readBytes(size, at: 0) == model, "the whole device after reopening", file: file, line: line)
    device.close()
}

extension BlockDevice {
    /// Writes `bytes` at `offset` synchronously, from page-aligned memory.
    func writeBytes(_ bytes: [UInt8], at offset: UInt64, fua: Bool = false) throws {
        let buffer = TestBuffer(count: bytes.count)
        bytes.withUnsafeBytes { buffer.vector.pointee.iov_base!.copyMemory(from: $0.baseAddress!, byteCount: bytes.count) }
        try withExtendedLifetime(buffer) { try sync.write(from: buffer.buffers, at: offset, fua: fua) }
    }
}

/// The bytes a file takes on disk (its blocks, not its length).
func allocatedBytes(_ path: String) -> Int {
    var st = stat()
    stat(path, &st)
    return Int(st.st_blocks) * 512
}
