import Core
@testable import Devices
import Foundation
import Glibc
import NBDExport
import TestPeers
import XCTest

/// The content-addressable disk: bytes against a model, dedup within and across disks, the
/// chunks freed after a flush and collected at open, damaged files named at open, real NBD
/// clients, and SIGKILLs during writes.
final class CASDeviceTests: XCTestCase {
    private var directory = ""
    override func setUp() { directory = makeTemporaryDirectory(self) }

    private func open(_ map: String, size: UInt64? = 4 << 20, store: String = "store") throws -> CASDevice {
        try CASDevice(store: "\(directory)/\(store)", map: "\(directory)/\(map)", size: size)
    }

    /// Random writes (whole and partial chunks, across chunk borders, split between buffers),
    /// discards and write-zeroes against a byte model, read back before and after a reopen.
    func testRandomOperationsMatchAModelAcrossReopen() throws {
        let size = 1 << 20
        var model = [UInt8](repeating: 0, count: size)
        var random = SplitMix64(seed: 12)
        var device = try open("a.map", size: UInt64(size))
        for round in 0..<400 {
            let sectors = Int.random(in: 1...40, using: &random)
            let offset = Int.random(in: 0...(size / 512 - sectors), using: &random) * 512
            let length = sectors * 512
            switch Int.random(in: 0..<10, using: &random) {
            case 0:
                try device.sync.discard(at: UInt64(offset), length: UInt64(length))
                // Whole chunks inside the range read as zeroes; the rest keep their data.
                let first = (offset + 4095) / 4096 * 4096, end = (offset + length) / 4096 * 4096
                if first < end { for i in first..<end { model[i] = 0 } }
            case 1:
                try device.sync.writeZeroes(at: UInt64(offset), length: UInt64(length), mayDiscard: round % 2 == 0)
                for i in offset..<(offset + length) { model[i] = 0 }
            default:
                // Some data repeats (a small alphabet of chunks) so that dedup hits happen.
                let seed = UInt8(Int.random(in: 0..<6, using: &random))
                let bytes = (0..<length).map { UInt8(truncatingIfNeeded: ($0 % 4096) &* 13 &+ Int(seed)) }
                // Two buffers split at a sector that is not a chunk border.
                let cut = length > 512 ? 512 * Int.random(in: 1..<sectors, using: &random) : length
                var first = bytes[0..<cut].map { $0 }, second = bytes[cut...].map { $0 }
                try first.withUnsafeMutableBytes { a in try second.withUnsafeMutableBytes { b in
                    var vectors = [iovec(iov_base: a.baseAddress, iov_len: a.count), iovec(iov_base: b.baseAddress, iov_len: b.count)]
                    try vectors.withUnsafeMutableBufferPointer { v in
                        try device.sync.write(from: IOBuffers(v.baseAddress!, count: b.count > 0 ? 2 : 1), at: UInt64(offset), fua: round % 7 == 0)
                    }
                } }
                model.replaceSubrange(offset..<(offset + length), with: bytes)
            }
            if round % 50 == 0 { try device.sync.flush() }
        }
        XCTAssertEqual(try device.readBytes(size, at: 0), model, "before the reopen")
        // A partial read across chunk borders.
        XCTAssertEqual(try device.readBytes(3 * 512, at: 4096 - 512), Array(model[(4096 - 512)..<(4096 + 1024)]))
        device.close()
        device = try open("a.map", size: nil)
        XCTAssertEqual(try device.readBytes(size, at: 0), model, "after the reopen")
        // Holes are where the model is zero chunk by chunk.
        let extents = try device.extents(at: 0, length: UInt64(size))
        XCTAssertEqual(extents.reduce(0) { $0 + $1.length }, UInt64(size))
        for extent in extents where extent.isHole {
            XCTAssertTrue(model[Int(extent.offset)..<Int(extent.offset + extent.length)].allSatisfy { $0 == 0 })
        }
        device.close()
        let report = try CASStoreReport.read(store: "\(directory)/store", verify: true)
        XCTAssertEqual(report.damaged, [])
    }

    /// The same chunks written to two disks of one store are stored once; zeroes not at all;
    /// overwritten chunks are freed after a flush, and their space punched out.
    func testDedupAcrossDisksAndFreeingAfterFlush() throws {
        let a = try open("a.map"), b = try open("b.map")
        try a.writePattern(256 << 10, seed: 1, at: 0)
        try b.writePattern(256 << 10, seed: 1, at: 1 << 20)   // the same 64 chunks, elsewhere on another disk
        try b.writePattern(64 << 10, seed: 2, at: 0)
        let zeroes = TestBuffer(count: 64 << 10, pattern: nil)
        memset(zeroes.memory, 0, 64 << 10)
        try withExtendedLifetime(zeroes) { try a.sync.write(from: zeroes.buffers, at: 2 << 20, fua: false) }
        // The test pattern (i * 7 + seed, bytes) repeats every 256 bytes: every chunk of one
        // seed is the same chunk.
        var stats = a.statistics
        XCTAssertEqual(stats.chunks, 2, "one chunk per seed, none for zeroes")
        XCTAssertEqual(stats.references, 64 + 64 + 16)
        XCTAssertGreaterThan(stats.savings, 0.98)
        // Overwrite disk b's seed-2 chunks with seed 3: seed 2's chunk is unnamed but held until b flushes.
        try b.writePattern(64 << 10, seed: 3, at: 0)
        XCTAssertEqual(b.statistics.chunks, 2)
        try b.sync.flush()
        stats = b.statistics
        XCTAssertEqual(stats.chunks, 2)
        XCTAssertEqual(stats.references, 64 + 64 + 16)
        XCTAssertEqual(try b.readBytes(64 << 10, at: 0), TestBuffer.expected(64 << 10, 3))
        XCTAssertEqual(try a.readBytes(256 << 10, at: 0), TestBuffer.expected(256 << 10, 1))
        XCTAssertEqual(try b.readBytes(256 << 10, at: 1 << 20), TestBuffer.expected(256 << 10, 1))
        a.close(); b.close()
        let report = try CASStoreReport.read(store: "\(directory)/store", verify: true)
        XCTAssertEqual(report.disks.count, 2)
        XCTAssertEqual(report.chunks, 2)
        XCTAssertEqual(report.damaged, [])
    }

    /// Chunks no map names (written after the last flush before a crash) are collected when
    /// the store is opened again: the chunk file shrinks.
    func testUnflushedChunksAreCollectedAtOpen() throws {
        let store = "\(directory)/store"
        let device = try open("a.map")
        try device.writePattern(4096, seed: 9, at: 0)
        for i in 1..<32 { try device.writePattern(4096, seed: UInt8(100 + i), at: UInt64(i) * 8192) }
        XCTAssertEqual(device.statistics.chunks, 32)
        try device.sync.discard(at: 8192, length: 31 * 8192)
        device.close()
        // What a crash leaves: chunks and hashes after the last one a map names.
        let chunks = try FileHandle(forWritingTo: URL(fileURLWithPath: "\(store)/chunks"))
        try chunks.truncate(atOffset: 4096)
        try chunks.seekToEnd()
        try chunks.write(contentsOf: Data(repeating: 0x77, count: 31 * 4096))
        try chunks.close()
        let fresh = try CASStoreReport.read(store: store, verify: true)
        XCTAssertEqual(fresh.chunks, 1)
        XCTAssertEqual(fresh.references, 1)
        var st = stat()
        XCTAssertEqual(stat("\(store)/chunks", &st), 0)
        XCTAssertEqual(st.st_size, 4096, "the garbage tail is cut off")
    }

    /// Damaged or foreign files give errors naming the file and the offset, never a crash.
    func testDamagedFilesAreNamedAtOpen() throws {
        let device = try open("a.map")
        try device.writePattern(8192, seed: 4, at: 0)
        device.close()
        let map = "\(directory)/a.map", store = "\(directory)/store"
        func expectError(_ fragment: String, file: StaticString = #filePath, line: UInt = #line) {
            XCTAssertThrowsError(try open("a.map", size: nil), file: file, line: line) { error in
                XCTAssertTrue("\(error)".contains(fragment), "\(error)", file: file, line: line)
            }
        }
        let original = try Data(contentsOf: URL(fileURLWithPath: map))
        // An entry naming a chunk past the store's end.
        var damaged = original
        damaged.replaceSubrange(4096 + 8..<4096 + 16, with: [0xff, 0xff, 0, 0, 0, 0, 0, 0])
        try damaged.write(to: URL(fileURLWithPath: map))
        expectError("\(map): the entry of block 1 at offset 4104 names chunk 65534")
        // The magic.
        damaged = original
        damaged[0] = 0x41
        try damaged.write(to: URL(fileURLWithPath: map))
        expectError("\(map): not a cas map (no SDCASMAP magic at offset 0)")
        // Entries cut short.
        try original.prefix(4096 + 100).write(to: URL(fileURLWithPath: map))
        expectError("\(map): the cas map's entries at offset 4196 is cut short")
        try original.write(to: URL(fileURLWithPath: map))
        // The index cut short.
        XCTAssertEqual(truncate("\(store)/index", 16), 0)
        expectError("\(store)/index: the hash of chunk 0 at offset 0 is missing")
        // A chunk's data damaged: the store's own check finds it.
        let index = "\(store)/index"
        XCTAssertEqual(truncate(index, 0), 0)
        XCTAssertEqual(unlink(map), 0)
        XCTAssertEqual(unlink("\(store)/disks"), 0)
        let again = try open("a.map")
        try again.writePattern(4096, seed: 4, at: 0)
        again.close()
        let chunks = try FileHandle(forWritingTo: URL(fileURLWithPath: "\(store)/chunks"))
        try chunks.seek(toOffset: 100)
        try chunks.write(contentsOf: Data([0x55]))
        try chunks.close()
        let report = try CASStoreReport.read(store: store, verify: true)
        XCTAssertEqual(report.damaged.count, 1)
        XCTAssertTrue(report.damaged.first?.contains("chunk 0 at offset 0") == true, "\(report.damaged)")
        // A map that exists but is not one of the store's disks; a size that differs.
        FileManager.default.createFile(atPath: "\(directory)/stray.map", contents: Data(count: 8192))
        XCTAssertThrowsError(try open("stray.map")) { XCTAssertTrue("\($0)".contains("is not one of the store"), "\($0)") }
        XCTAssertThrowsError(try open("a.map", size: 8 << 20)) { XCTAssertTrue("\($0)".contains("not 8388608 bytes"), "\($0)") }
        XCTAssertThrowsError(try open("new.map", size: nil)) { XCTAssertTrue("\($0)".contains("give size="), "\($0)") }
    }

    /// qemu-img, qemu-io and nbdcopy through the NBD export, byte for byte.
    func testRealNBDClients() throws {
        let device = try open("a.map", size: 16 << 20)
        let socket = "\(directory)/nbd.sock"
        let server = NBDServer(listen: .unix(path: socket), exports: [NBDExport(name: "d", device: device)])
        try server.start()
        defer { server.stop(); device.close() }
        let uri = "nbd+unix:///d?socket=\(socket)"
        let source = "\(directory)/source.raw", back = "\(directory)/back.raw"
        // Half repeated chunks, half distinct, a hole.
        var bytes = [UInt8](repeating: 0, count: 16 << 20)
        var random = SplitMix64(seed: 3)
        for i in 0..<(8 << 20) { bytes[i] = UInt8(truncatingIfNeeded: i % 4096 / 3) }
        for i in (10 << 20)..<(16 << 20) { bytes[i] = UInt8(truncatingIfNeeded: random.next()) }
        try Data(bytes).write(to: URL(fileURLWithPath: source))
        let qemuImg = try Peers.program("qemu-img", package: "qemu-utils")
        let qemuIO = try Peers.program("qemu-io", package: "qemu-utils")
        let nbdcopy = try Peers.program("nbdcopy", package: "libnbd-bin")
        var r = try Peers.run(qemuImg, ["convert", "-n", "-f", "raw", "-O", "raw", source, uri])
        XCTAssertEqual(r.status, 0, r.output)
        r = try Peers.run(qemuImg, ["compare", "-f", "raw", "-F", "raw", source, uri])
        XCTAssertEqual(r.status, 0, r.output)
        XCTAssertLessThan(device.statistics.chunks, 1700, "the repeated half is stored once")
        r = try Peers.run(qemuIO, ["-f", "raw", "-c", "write -P 0xab 1000 5000", "-c", "read -P 0xab 1000 5000", "-c", "read -P 0 9437184 4096", uri])
        XCTAssertEqual(r.status, 0, r.output)
        XCTAssertFalse(r.output.contains("verification failed"), r.output)
        bytes.replaceSubrange(1000..<6000, with: repeatElement(0xab, count: 5000))
        r = try Peers.run(nbdcopy, [uri, back])
        XCTAssertEqual(r.status, 0, r.output)
        XCTAssertTrue(try Data(contentsOf: URL(fileURLWithPath: back)) == Data(bytes), "nbdcopy reads back what was written")
    }

    /// SIGKILLs of the serving process during writes and flushes (2 KiB writes: half chunks,
    /// read-modify-write), checked by the harness and by the store's own check every 50 kills.
    func testCASSurvivesSIGKILL() throws {
        let store = "\(directory)/crash-store"
        let spec = "cas(store=\(store), map=\(directory)/crash.map, size=1M)"
        var options = CrashHarness.Options(spec: spec)
        options.blockSize = 2048
        let iterations = options.iterations
        let softdev = try SoftDevBinary.path()
        options.check = { iteration in
            guard iteration % 50 == 49 || iteration == iterations - 1 else { return }
            let (status, output) = try Peers.run(softdev, ["cas-info", store, "--verify"])
            XCTAssertEqual(status, 0, "softdev cas-info --verify after kill \(iteration): \(output)")
        }
        let report = try CrashHarness(options: options).run(directory: directory)
        print("cas crash harness: \(report)")
        XCTAssertEqual(report.iterations, iterations)
        XCTAssertGreaterThan(report.flushesCompleted, 0)
        XCTAssertGreaterThan(report.writesAcknowledged, iterations)
    }
}
