import Foundation
import TestPeers
import XCTest

/// The crash harness on `compress | file`: 200 SIGKILLs of the serving process during random
/// 4 KiB writes and flushes (SOFTDEV_CRASH_ITERATIONS for more) over 16 KiB chunks, so that
/// every write makes a new version of its chunk elsewhere and moves the map. After each kill
/// the container opens (its header, map blocks and entries are checked: the format's check),
/// every flushed write reads back (each chunk's checksum verified), nothing reads garbage.
final class CompressCrashTests: XCTestCase {
    func testCompressSurvivesSIGKILL() throws {
        let directory = makeTemporaryDirectory(self)
        var options = CrashHarness.Options(spec: "compress(size=8M, chunk=16K) | file(path=\(directory)/c.img, size=64M)")
        options.blocks = 2048
        options.flushEvery = 4
        try CrashHarness.runChecked("compress", options: options, directory: directory)
    }
}
