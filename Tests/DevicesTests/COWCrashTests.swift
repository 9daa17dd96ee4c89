import Foundation
import TestPeers
import XCTest

/// The crash harness on `cow | file`: 200 SIGKILLs of the serving process during random 4 KiB
/// writes and flushes (SOFTDEV_CRASH_ITERATIONS for more) over 8 KiB clusters, so that most
/// writes are partial-cluster first writes that copy from the base and set bits. After each
/// kill the overlay opens (its header and map checksums are the format's check), every flushed
/// write reads back, and nothing reads back garbage; every 50 kills and at the end the base
/// is checked to be untouched.
final class COWCrashTests: XCTestCase {
    func testCOWSurvivesSIGKILL() throws {
        let directory = makeTemporaryDirectory(self)
        let base = "\(directory)/base.img", overlay = "\(directory)/overlay.img"
        let size = 16 << 20
        XCTAssertTrue(FileManager.default.createFile(atPath: base, contents: nil))
        XCTAssertEqual(truncate(base, off_t(size)), 0)
        var options = CrashHarness.Options(spec: "cow(base=\"file(path=\(base), readonly=true)\", cluster=8K) | file(path=\(overlay), size=\(size + (1 << 20)))")
        options.blocks = 4096   // the 16 MiB base: ~2000 clusters to allocate over the run
        options.flushEvery = 4
        let iterations = options.iterations
        options.check = { iteration in
            guard iteration % 50 == 49 || iteration == iterations - 1 else { return }
            let handle = try FileHandle(forReadingFrom: URL(fileURLWithPath: base))
            defer { try? handle.close() }
            let bytes = try handle.readToEnd() ?? Data()
            XCTAssertEqual(bytes.count, size)
            XCTAssertTrue(bytes.allSatisfy { $0 == 0 }, "the base is never written (kill \(iteration))")
        }
        try CrashHarness.runChecked("cow", options: options, directory: directory)
    }
}
