import Core
import Devices
import Foundation
import XCTest

final class LogFilterTests: XCTestCase {
    private func lines(_ path: String) throws -> [[String: Any]] {
        try String(contentsOfFile: path, encoding: .utf8).split(separator: "\n").map { line in
            try XCTUnwrap(JSONSerialization.jsonObject(with: Data(line.utf8)) as? [String: Any], String(line))
        }
    }

    func testEveryRequestIsOneJSONLine() throws {
        let path = makeTemporaryDirectory(self) + "/requests.log"
        let device = try DeviceRegistry.open("log(logfile=\(path)) | error(error-pread-rate=1, error-offset=64K) | memory(size=1M)")
        let data = TestBuffer(count: 4096, pattern: 1)
        XCTAssertEqual(device.submitAndWait(device.writeRequest(data, at: 8192, fua: true)), .success)
        XCTAssertEqual(try device.readBytes(4096, at: 8192), TestBuffer.expected(4096, 1))
        XCTAssertThrowsError(try device.readBytes(512, at: 65536))
        XCTAssertEqual(device.submitAndWait(BlockRequest(operation: .writeZeroes, offset: 0, length: 65536, mayDiscard: true)), .success)
        try device.sync.flush()
        device.close()

        let log = try lines(path)
        XCTAssertEqual(log.count, 5)
        XCTAssertEqual(log.map { $0["op"] as? String }, ["write", "read", "read", "write-zeroes", "flush"])
        XCTAssertEqual(log.map { $0["id"] as? Int }, [1, 2, 3, 4, 5])
        XCTAssertEqual(log.map { $0["result"] as? String }, ["ok", "ok", "EIO", "ok", "ok"])
        XCTAssertEqual(log[0]["offset"] as? Int, 8192)
        XCTAssertEqual(log[0]["length"] as? Int, 4096)
        XCTAssertEqual(log[0]["flags"] as? [String], ["fua"])
        XCTAssertEqual(log[3]["flags"] as? [String], ["may-discard"])
        XCTAssertEqual(log[2]["offset"] as? Int, 65536)
        XCTAssertTrue((log[2]["error"] as? String)?.contains("injected EIO") == true)
        XCTAssertNil(log[0]["error"])
        for line in log {
            XCTAssertNotNil(line["duration_ns"] as? Int)
            let time = try XCTUnwrap(line["time"] as? String)
            XCTAssertNotNil(ISO8601DateFormatter.withFractions.date(from: time), time)
        }
    }

    func testAppendsWhenAsked() throws {
        let path = makeTemporaryDirectory(self) + "/requests.log"
        for _ in 0..<2 {
            let device = try DeviceRegistry.open("log(logfile=\(path), logappend=true) | null(size=1M)")
            try device.sync.flush()
            device.close()
        }
        XCTAssertEqual(try lines(path).count, 2)
        let device = try DeviceRegistry.open("log(logfile=\(path)) | null(size=1M)")
        device.close()
        XCTAssertEqual(try lines(path).count, 0, "without logappend the file starts empty")
    }

    func testJSONStringsAreEscaped() throws {
        let path = makeTemporaryDirectory(self) + "/requests.log"
        let log = try LogFilter(next: QuotingDevice(), path: path)
        XCTAssertThrowsError(try log.sync.flush())
        log.close()
        XCTAssertEqual(try lines(path).first?["error"] as? String, "a \"quoted\"\\ message\n\u{1}")
    }

    func testUnwritableLogfileIsReported() {
        XCTAssertEqual(specError("log(logfile=/nonexistent/x.log) | null(size=1M)"),
                       "log(logfile=/nonexistent/x.log): cannot open: No such file or directory")
        XCTAssertEqual(specError("log | null(size=1M)"), "log: missing parameter 'logfile'")
    }
}

/// Fails every flush with a message JSON must escape.
private final class QuotingDevice: SynchronousBlockDevice {
    let name = "quoting"
    let geometry = BlockGeometry(size: 1 << 20)
    let capabilities: BlockCapabilities = [.flush]
    func read(into buffers: IOBuffers, at offset: UInt64) throws(BlockError) { buffers.zero() }
    func flush() throws(BlockError) { throw BlockError(.io, "a \"quoted\"\\ message\n\u{1}") }
}

extension ISO8601DateFormatter {
    static let withFractions: ISO8601DateFormatter = {
        let f = ISO8601DateFormatter()
        f.formatOptions = [.withInternetDateTime, .withFractionalSeconds]
        return f
    }()
}
