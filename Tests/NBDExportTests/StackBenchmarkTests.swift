import Bench
import Core
import Foundation
import TestPeers
import XCTest

/// `softdev bench --stacks` with a qemu-nbd peer that cannot serve: qemu's luks driver takes
/// only UTF-8 passphrases, so a binary key file leaves its row out (and says why) rather than
/// abort the whole bench. (Speed is printed by `softdev bench`, never asserted here.)
final class StackBenchmarkTests: XCTestCase {
    private var directory = ""

    override func setUpWithError() throws {
        directory = try NBDBenchmark.temporaryDirectory()
    }

    override func tearDown() {
        try? FileManager.default.removeItem(atPath: directory)
    }

    private func file(_ name: String, _ bytes: [UInt8]) -> String {
        let path = "\(directory)/\(name)"
        FileManager.default.createFile(atPath: path, contents: Data(bytes))
        return path
    }

    /// Binary key bytes (0xff is never UTF-8), and an image for qemu to try.
    private func binaryKeyAndImage() -> (key: String, image: String) {
        (file("binary-key", [0xff, 0xfe, 0x00, 0x80, 0x41, 0xc3]), file("image", [UInt8](repeating: 0, count: 1 << 20)))
    }

    func testNonUTF8KeyFilesAreNamedBeforeQemuIsTried() {
        XCTAssertNil(StackBenchmark.qemuLuksProblem(keyfile: file("text-key", Array("correct horse battery staple".utf8))))
        let (key, _) = binaryKeyAndImage()
        let problem = StackBenchmark.qemuLuksProblem(keyfile: key)
        XCTAssertTrue(problem?.contains("UTF-8") == true && problem?.contains(key) == true, problem ?? "nil")
        // A key file that cannot be read here is left for qemu-nbd to report.
        XCTAssertNil(StackBenchmark.qemuLuksProblem(keyfile: "\(directory)/missing"))
    }

    func testQemuNBDThatExitsIsLeftOutWithItsMessage() throws {
        guard try Peers.available("qemu-nbd", package: "qemu-utils") else { throw XCTSkip("qemu-nbd is not installed") }
        let (key, image) = binaryKeyAndImage()
        let arguments = StackBenchmark.qemuLuks(image: image, keyfile: key, direct: false)
        XCTAssertThrowsError(try StackBenchmark.startQemuNBD(arguments, socket: "\(directory)/q.sock")) { error in
            let reason = (error as? StackBenchmark.LeftOut)?.reason ?? "\(error)"
            // qemu-nbd makes its socket, then fails to open the image and exits: its own words.
            XCTAssertTrue(reason.hasPrefix("qemu-nbd exited") && reason.contains("UTF-8"), reason)
        }
    }

    func testTheOtherTargetsAreMeasuredWithoutTheFailedPeer() throws {
        _ = try Peers.program("fio", package: "fio")
        guard try Peers.available("qemu-nbd", package: "qemu-utils") else { throw XCTSkip("qemu-nbd is not installed") }
        let size: UInt64 = 64 << 20
        let (key, image) = binaryKeyAndImage()
        var bench = StackBenchmark(workloads: try BenchmarkWorkload.select("1m-read"), milliseconds: 200, size: 16 << 20, offset: 0,
                                   pollMicroseconds: 0)
        bench.rounds = 1
        let device = SparseTestDevice(size: size)
        var leftOut: [(String, String)] = []
        let rows = try bench.run(targets: [.init(label: "sparse", device: device),
                                           .init(label: "qemu-nbd luks", qemuNBD: StackBenchmark.qemuLuks(image: image, keyfile: key, direct: false))],
                                 leftOut: { leftOut.append(($0.label, $1)) })
        XCTAssertEqual(rows.map(\.target), ["sparse"])
        XCTAssertGreaterThan(rows.first?.iops ?? 0, 0)
        XCTAssertEqual(leftOut.map(\.0), ["qemu-nbd luks"])
        XCTAssertTrue(leftOut.first?.1.contains("UTF-8") == true, leftOut.first?.1 ?? "")
    }
}
