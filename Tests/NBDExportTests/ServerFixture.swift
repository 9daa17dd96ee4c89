import Core
import Foundation
@testable import NBDExport
import XCTest

/// A running `NBDServer` on a unix socket in a fresh temporary directory.
final class ServerFixture {
    let directory: String
    let socketPath: String
    let server: NBDServer

    init(_ exports: [NBDExport], pollMicroseconds: Int = AdaptivePoller.defaultMicroseconds) throws {
        var template = Array("/tmp/softdev-nbd.XXXXXX".utf8CString)
        guard let d = mkdtemp(&template) else { throw POSIXError(.EIO) }
        directory = String(cString: d)
        socketPath = directory + "/nbd.sock"
        server = NBDServer(listen: .unix(path: socketPath), exports: exports, pollMicroseconds: pollMicroseconds)
        try server.start()
    }

    /// The libnbd / qemu URI of an export.
    func uri(_ export: String = "") -> String { "nbd+unix:///\(export)?socket=\(socketPath)" }
    func path(_ name: String) -> String { directory + "/" + name }

    func stop() {
        server.stop()
        try? FileManager.default.removeItem(atPath: directory)
    }
}

/// Asserts that a client exited 0, showing what it printed if not.
func XCTAssertSucceeded(_ r: ProcessResult, _ what: String, file: StaticString = #filePath, line: UInt = #line) {
    XCTAssertEqual(r.status, 0, "\(what) failed:\n\(r.stdout)\n\(r.stderr)", file: file, line: line)
}

/// Writes `size` bytes of a deterministic pattern with holes (every fourth MiB left empty).
func writePatternFile(_ path: String, size: Int, seed: UInt8 = 1) throws {
    _ = FileManager.default.createFile(atPath: path, contents: nil)
    let h = try FileHandle(forWritingTo: URL(fileURLWithPath: path))
    defer { try? h.close() }
    try h.truncate(atOffset: UInt64(size))
    let mib = 1 << 20
    var chunk = [UInt8](repeating: 0, count: mib)
    for m in 0..<(size / mib) where m % 4 != 3 {
        for i in 0..<mib { chunk[i] = UInt8(truncatingIfNeeded: (i * 31 + m * 7) ^ Int(seed)) }
        try h.seek(toOffset: UInt64(m * mib))
        h.write(Data(chunk))
    }
}
