import Core
@testable import Devices
import Foundation
import Glibc
import NBDExport
import TestPeers
import XCTest

/// The time-travelling disk: every point read back against a model while the live disk goes
/// on, snapshots, times, retention folding into the base, rollback, damaged logs, real NBD
/// clients on a point while the disk is live, and SIGKILLs during writes.
final class TimeTravelTests: XCTestCase {
    private var directory = ""
    private let size = 1 << 20
    override func setUp() { directory = makeTemporaryDirectory(self) }

    private var log: String { "\(directory)/log" }
    private var base: String { "\(directory)/base.img" }

    /// A base image with a pattern, so that reads that fall through to it are seen.
    private func makeBase() throws -> [UInt8] {
        let bytes = (0..<size).map { UInt8(truncatingIfNeeded: $0 / 512 &* 3 &+ 1) }
        try Data(bytes).write(to: URL(fileURLWithPath: base))
        return bytes
    }

    private func open(_ parameters: String = "") throws -> any BlockDevice {
        try DeviceRegistry.open("timetravel(log=\(log)\(parameters)) | file(path=\(base), direct=off)")
    }

    /// Random writes, zeroes and discards; the model of the disk after each record; every
    /// tenth point opened as a device of its own while the live disk stays open.
    private func randomHistory(_ device: any BlockDevice, model: inout [UInt8], rounds: Int, seed: UInt64) throws -> [UInt64: [UInt8]] {
        var random = SplitMix64(seed: seed)
        var history: [UInt64: [UInt8]] = [:]
        var sequence = (device as! TimeTravelFilter).log.lastSequence
        for round in 0..<rounds {
            let sectors = Int.random(in: 1...24, using: &random)
            let offset = Int.random(in: 0...(size / 512 - sectors), using: &random) * 512
            let length = sectors * 512
            if round % 9 == 8 {
                try device.sync.writeZeroes(at: UInt64(offset), length: UInt64(length), mayDiscard: true)
                model.replaceSubrange(offset..<(offset + length), with: repeatElement(0, count: length))
            } else if round % 13 == 12 {
                try device.sync.discard(at: UInt64(offset), length: UInt64(length))
                model.replaceSubrange(offset..<(offset + length), with: repeatElement(0, count: length))
            } else {
                let seed = UInt8(truncatingIfNeeded: round)
                try device.writePattern(length, seed: seed, at: UInt64(offset))
                model.replaceSubrange(offset..<(offset + length), with: TestBuffer.expected(length, seed))
            }
            sequence += 1
            history[sequence] = model
        }
        return history
    }

    func testEveryPointReadsBackWhileTheDiskIsLive() throws {
        var model = try makeBase()
        let original = model
        let live = try open()
        defer { live.close() }
        let history = try randomHistory(live, model: &model, rounds: 300, seed: 5)
        XCTAssertEqual(try live.readBytes(size, at: 0), model, "the live disk")
        for sequence in history.keys.sorted() where sequence % 10 == 0 {
            let point = try open(", seq=\(sequence)")
            XCTAssertEqual(try point.readBytes(size, at: 0), history[sequence], "record \(sequence)")
            XCTAssertEqual(point.submitAndWait(BlockRequest(operation: .write, offset: 0, length: 512, buffers: TestBuffer(count: 512).buffers)).errorCode, .readOnly)
            point.close()
        }
        // Record 0 is the base itself, which no write touched.
        let origin = try open(", seq=0")
        XCTAssertEqual(try origin.readBytes(size, at: 0), original)
        origin.close()
        XCTAssertEqual(try Data(contentsOf: URL(fileURLWithPath: base)), Data(original), "writes go to the log, not the base")
    }

    /// Reads of any length at any sector, into buffers scattered in pieces of 512 bytes and up
    /// (a block's piece often spans two: the bounce path), match the model: the log's
    /// versions, the base's runs between them, read as runs.
    func testScatteredReadsAtAnyOffsetMatchTheModel() throws {
        var model = try makeBase()
        let live = try open()
        defer { live.close() }
        _ = try randomHistory(live, model: &model, rounds: 120, seed: 11)
        var random = SplitMix64(seed: 12)
        for _ in 0..<300 {
            let sectors = Int.random(in: 1...64, using: &random)
            let offset = Int.random(in: 0...(size / 512 - sectors), using: &random) * 512
            let length = sectors * 512
            var pieces: [Int] = []
            var left = length
            while left > 0 {
                let piece = min(left, Int.random(in: 1...12, using: &random) * 512)
                pieces.append(piece)
                left -= piece
            }
            // A sector's gap after each piece: no two pieces are contiguous in memory.
            let memory = UnsafeMutableRawPointer.allocate(byteCount: length + pieces.count * 512, alignment: 4096)
            defer { memory.deallocate() }
            var vectors: [iovec] = []
            var at = 0
            for piece in pieces {
                vectors.append(iovec(iov_base: memory + at, iov_len: piece))
                at += piece + 512
            }
            try vectors.withUnsafeMutableBufferPointer { v in
                try live.sync.read(into: IOBuffers(v.baseAddress!, count: v.count), at: UInt64(offset))
            }
            var got: [UInt8] = []
            for v in vectors { got += UnsafeRawBufferPointer(start: v.iov_base, count: v.iov_len) }
            XCTAssertEqual(got, Array(model[offset..<(offset + length)]), "\(length) bytes at \(offset) in \(pieces.count) pieces")
        }
    }

    func testSnapshotsTimesReopenAndRollback() throws {
        var model = try makeBase()
        var live = try open()
        _ = try randomHistory(live, model: &model, rounds: 40, seed: 1)
        try TimeTravel.snapshot(log: log, name: "first")
        let atFirst = model
        XCTAssertThrowsError(try TimeTravel.snapshot(log: log, name: "first")) { XCTAssertTrue("\($0)".contains("already has a snapshot named first")) }
        usleep(20_000)
        let between = TimeTravelRecord.now()
        usleep(20_000)
        _ = try randomHistory(live, model: &model, rounds: 40, seed: 2)
        let point = try open(", snapshot=first")
        XCTAssertEqual(try point.readBytes(size, at: 0), atFirst)
        point.close()
        let byTime = try open(", time=\(Double(between) / 1e9)")
        XCTAssertEqual(try byTime.readBytes(size, at: 0), atFirst, "the last record before the time is the mark")
        byTime.close()
        live.close()
        // The list, read without the log.
        let report = try TimeTravelReport.read(log: log)
        XCTAssertEqual(report.records, 81)
        XCTAssertEqual(report.snapshots.map(\.name), ["first"])
        XCTAssertEqual(report.snapshots.first?.sequence, 41)
        // Reopened: the same present; then rolled back to the snapshot.
        live = try open()
        XCTAssertEqual(try live.readBytes(size, at: 0), model)
        XCTAssertThrowsError(try TimeTravel.rollback(log: log, to: .snapshot("first"))) { XCTAssertTrue("\($0)".contains("is open in this process")) }
        live.close()
        XCTAssertEqual(try TimeTravel.rollback(log: log, to: .snapshot("first")), 41)
        live = try open()
        XCTAssertEqual(try live.readBytes(size, at: 0), atFirst, "rolled back")
        try live.writePattern(4096, seed: 77, at: 8192)
        live.close()
        XCTAssertEqual(try TimeTravelReport.read(log: log).lastSequence, 42, "new records follow the point rolled back to")
        XCTAssertThrowsError(try open(", snapshot=none")) { XCTAssertTrue("\($0)".contains("no snapshot named none")) }
    }

    /// Small segments and a bound on the log: the oldest segments fold into the base, the
    /// present and the points kept still read back, points folded away are refused, and a
    /// point open as a device holds retention back.
    func testRetentionFoldsTheOldestSegmentsIntoTheBase() throws {
        var model = try makeBase()
        let live = try open(", segment=64K, max-log=256K")
        defer { live.close() }
        _ = try randomHistory(live, model: &model, rounds: 50, seed: 3)
        let pinned = (live as! TimeTravelFilter).log.lastSequence
        let held = try open(", seq=\(pinned)")
        let atPinned = model
        var history = try randomHistory(live, model: &model, rounds: 400, seed: 4)
        let filter = live as! TimeTravelFilter
        XCTAssertLessThan(filter.log.baseSequence, pinned, "no fold passes an open point")
        XCTAssertEqual(try held.readBytes(size, at: 0), atPinned)
        held.close()
        history.merge(try randomHistory(live, model: &model, rounds: 400, seed: 6)) { $1 }
        let folded = filter.log.baseSequence
        XCTAssertGreaterThan(folded, pinned, "segments folded once the point closed")
        XCTAssertEqual(try live.readBytes(size, at: 0), model)
        let report = try TimeTravelReport.read(log: log)
        XCTAssertLessThanOrEqual(report.bytes, 256 << 10 + 64 << 10 + 8192, "the log stays near its bound")
        XCTAssertThrowsError(try open(", seq=\(folded - 1)")) { XCTAssertTrue("\($0)".contains("not in the log"), "\($0)") }
        if let kept = history.keys.filter({ $0 > folded }).min() {
            let point = try open(", seq=\(kept)")
            XCTAssertEqual(try point.readBytes(size, at: 0), history[kept])
            point.close()
        }
    }

    /// A torn record at the end of the last segment is cut off; damage elsewhere is named.
    func testTornTailIsCutAndDamageIsNamed() throws {
        var model = try makeBase()
        var live = try open(", segment=16K")
        _ = try randomHistory(live, model: &model, rounds: 60, seed: 9)
        live.close()
        let segments = TimeTravelLog.segmentNames(log)
        XCTAssertGreaterThan(segments.count, 2)
        // A torn write at the end of the last segment.
        let last = "\(log)/\(segments.last!.name)"
        let handle = try FileHandle(forWritingTo: URL(fileURLWithPath: last))
        try handle.seekToEnd()
        try handle.write(contentsOf: Data([0x54, 0x54, 0x4c, 0x52, 1, 0, 0, 0, 0xff]))
        try handle.close()
        live = try open()
        XCTAssertEqual(try live.readBytes(size, at: 0), model)
        live.close()
        // A flipped byte in a middle segment's payload.
        let middle = "\(log)/\(segments[1].name)"
        var bytes = try Data(contentsOf: URL(fileURLWithPath: middle))
        bytes[100] ^= 0xff
        try bytes.write(to: URL(fileURLWithPath: middle))
        XCTAssertThrowsError(try open()) { error in
            XCTAssertTrue("\(error)".contains("\(middle): damaged: record") && "\(error)".contains("at offset 0 fails its CRC"), "\(error)")
        }
    }

    /// qemu-img and nbdcopy on the live disk and, over NBD while it is live, on a snapshot.
    func testRealNBDClientsOnTheLiveDiskAndAPoint() throws {
        _ = try makeBase()
        let live = try open()
        let socket = "\(directory)/nbd.sock"
        let source = "\(directory)/source.raw", back = "\(directory)/back.raw"
        var random = SplitMix64(seed: 8)
        let bytes = (0..<size).map { _ in UInt8(truncatingIfNeeded: random.next()) }
        try Data(bytes).write(to: URL(fileURLWithPath: source))
        let qemuImg = try Peers.program("qemu-img", package: "qemu-utils")
        let nbdcopy = try Peers.program("nbdcopy", package: "libnbd-bin")
        let server = NBDServer(listen: .unix(path: socket), exports: [NBDExport(name: "live", device: live)])
        try server.start()
        var r = try Peers.run(qemuImg, ["convert", "-n", "-f", "raw", "-O", "raw", source, "nbd+unix:///live?socket=\(socket)"])
        XCTAssertEqual(r.status, 0, r.output)
        try TimeTravel.snapshot(log: log, name: "copied")
        try live.writePattern(65536, seed: 3, at: 0)   // the guest goes on
        server.stop()
        let point = try open(", snapshot=copied")
        let pointServer = NBDServer(listen: .unix(path: socket), exports: [NBDExport(name: "copied", device: point)])
        try pointServer.start()
        defer { pointServer.stop(); point.close(); live.close() }
        r = try Peers.run(qemuImg, ["compare", "-f", "raw", "-F", "raw", source, "nbd+unix:///copied?socket=\(socket)"])
        XCTAssertEqual(r.status, 0, r.output)
        r = try Peers.run(nbdcopy, ["nbd+unix:///copied?socket=\(socket)", back])
        XCTAssertEqual(r.status, 0, r.output)
        XCTAssertTrue(try Data(contentsOf: URL(fileURLWithPath: back)) == Data(bytes))
        XCTAssertEqual(try live.readBytes(65536, at: 0), TestBuffer.expected(65536, 3))
    }

    /// SIGKILLs of the serving process during writes and flushes, small segments so that
    /// kills land at segment changes and in folds too.
    func testTimeTravelSurvivesSIGKILL() throws {
        let image = "\(directory)/crash.img"
        FileManager.default.createFile(atPath: image, contents: Data(count: 1 << 20))
        let options = CrashHarness.Options(spec: "timetravel(log=\(directory)/crash-log, segment=256K, max-log=1M) | file(path=\(image))")
        let report = try CrashHarness(options: options).run(directory: directory)
        print("timetravel crash harness: \(report)")
        XCTAssertEqual(report.iterations, options.iterations)
        XCTAssertGreaterThan(report.flushesCompleted, 0)
        XCTAssertGreaterThan(report.writesAcknowledged, options.iterations)
        XCTAssertGreaterThan(try TimeTravelReport.read(log: "\(directory)/crash-log").baseSequence, 0, "folds happened")
    }
}
