import Core
import Devices
import Glibc
import XCTest

final class StatsFilterTests: XCTestCase {
    func testCountsMatchTheIODone() throws {
        let stats = StatsFilter(next: MemoryDevice(size: 1 << 20))
        for i in 0..<3 { try stats.writePattern(4096, seed: UInt8(i), at: UInt64(i) * 4096) }
        let buffers = (0..<2).map { _ in TestBuffer(count: 8192) }
        let completions = Completions()
        for (i, buffer) in buffers.enumerated() { stats.submit(stats.readRequest(buffer, at: 0), completion: completions.completion(UInt64(i))) }
        XCTAssertEqual(completions.wait(for: 2).values.filter { $0 == .success }.count, 2)
        XCTAssertEqual(buffers[0].bytes, TestBuffer.expected(4096, 0) + TestBuffer.expected(4096, 1), "data passes through unchanged")
        try stats.sync.flush()
        try stats.sync.discard(at: 0, length: 65536)

        let snapshot = stats.snapshot()
        XCTAssertEqual(snapshot[.write].count, 3)
        XCTAssertEqual(snapshot[.write].bytes, 3 * 4096)
        XCTAssertEqual(snapshot[.read].count, 2)
        XCTAssertEqual(snapshot[.read].bytes, 2 * 8192)
        XCTAssertEqual(snapshot[.read].timedCount, 2, "asynchronous requests are timed too")
        XCTAssertEqual(snapshot[.flush].count, 1)
        XCTAssertEqual(snapshot[.discard].bytes, 65536)
        XCTAssertEqual(snapshot[.writeZeroes].count, 0)
        XCTAssertLessThanOrEqual(snapshot[.write].minNanoseconds, snapshot[.write].averageNanoseconds)
        XCTAssertLessThanOrEqual(snapshot[.write].averageNanoseconds, snapshot[.write].maxNanoseconds)
        XCTAssertTrue(snapshot.report().contains("write"))
        XCTAssertFalse(snapshot.report().contains("write-zeroes"), "operations that did not happen are left out")
    }

    func testCountsErrors() throws {
        let path = makeTemporaryDirectory(self) + "/disk.img"
        try FileDevice(path: path, options: .init(createSize: 1 << 20)).close()
        let stats = try XCTUnwrap(try DeviceRegistry.open("stats | file(path=\(path), readonly=true)") as? StatsFilter)
        defer { stats.close() }
        let data = TestBuffer(count: 4096, pattern: 1)
        XCTAssertEqual(stats.submitAndWait(stats.writeRequest(data, at: 0)).errorCode, .readOnly)
        XCTAssertThrowsError(try stats.writePattern(4096, seed: 1, at: 0))
        XCTAssertEqual(stats.snapshot()[.write].count, 2)
        XCTAssertEqual(stats.snapshot()[.write].errors, 2)
    }

    func testWritesTheReportOnClose() throws {
        let report = makeTemporaryDirectory(self) + "/stats.txt"
        let device = try DeviceRegistry.open("stats(file=\(report)) | null(size=1M)")
        _ = try device.readBytes(4096, at: 0)
        device.close()
        let text = try String(contentsOfFile: report, encoding: .utf8)
        XCTAssertTrue(text.contains("read"), text)
        XCTAssertTrue(text.split(separator: "\n").contains { $0.contains("read") && $0.contains("4096") }, text)
    }
}
