import Core
@testable import Devices
import Foundation
import Glibc
import TestPeers
import XCTest

/// The `ids` filter on file systems made by mke2fs (no kernel needed): the map read at open
/// against debugfs, the rules on writes, bad rule files.
final class IDSFilterTests: XCTestCase {
    private var directory = ""
    override func setUp() { directory = makeTemporaryDirectory(self) }

    /// An ext4 image of `files` (path: size) made by `mke2fs -d`, with `options` for mke2fs.
    private func makeImage(_ files: [String: Int], options: [String] = []) throws -> String {
        let tree = "\(directory)/tree", image = "\(directory)/fs.img"
        for (path, size) in files {
            let full = "\(tree)/\(path)"
            try FileManager.default.createDirectory(atPath: (full as NSString).deletingLastPathComponent, withIntermediateDirectories: true)
            XCTAssertTrue(FileManager.default.createFile(atPath: full, contents: Data((0..<size).map { UInt8(truncatingIfNeeded: $0 &+ size) })))
        }
        let mke2fs = try Peers.program("mke2fs", package: "e2fsprogs")
        let (status, output) = try Peers.run(mke2fs, ["-q", "-F", "-b", "4096", "-t", "ext4"] + options + ["-d", tree, image, "64M"])
        XCTAssertEqual(status, 0, output)
        return image
    }

    private func rules(_ text: String) throws -> String {
        let path = "\(directory)/rules.toml"
        try text.write(toFile: path, atomically: true, encoding: .utf8)
        return path
    }

    /// The map of a file system read at open, against `debugfs -R "blocks PATH"`, for ext4
    /// with extents and for ext2-style block maps (indirect blocks).
    func testMapAtOpenMatchesDebugfs() throws {
        let files = ["etc/passwd": 1500, "boot/vmlinuz": 700_000, "a/b/c/deep.txt": 10, "big.bin": 5 << 20, "empty": 0]
        let debugfs = try Peers.program("debugfs", package: "e2fsprogs")
        for options in [[], ["-O", "^extent,^64bit,^flex_bg"]] {
            let image = try makeImage(files, options: options)
            let ids = try DeviceRegistry.open("ids(rules=\(try rules(""))) | file(path=\(image))") as! IDSFilter
            for (path, size) in files {
                let (status, output) = try Peers.run(debugfs, ["-R", "blocks /\(path)", image])
                XCTAssertEqual(status, 0, output)
                let blocks = output.split(whereSeparator: { $0 == " " || $0 == "\n" }).compactMap { UInt64($0) }
                // Block maps list their indirect blocks too.
                XCTAssertGreaterThanOrEqual(blocks.count, (size + 4095) / 4096, "\(options) /\(path): \(output)")
                for block in blocks {
                    XCTAssertEqual(ids.owner(ofByte: block * 4096)?.paths, ["/" + path], "\(options): block \(block) of /\(path)")
                }
            }
            ids.close()
            try FileManager.default.removeItem(atPath: image)
            try FileManager.default.removeItem(atPath: "\(directory)/tree")
        }
    }

    /// Writes to a denied file fail and leave the image as it was; writes to a watched file
    /// and of a signature raise alerts and land; a denied block range too.
    func testRulesOnWrites() throws {
        let image = try makeImage(["etc/passwd": 1500, "boot/vmlinuz": 20000, "home/notes": 100])
        let alerts = "\(directory)/alerts.json"
        let ruleFile = try rules("""
            [[alert]]
            path = "/etc/passwd"
            [[deny]]
            path = "/boot/"
            [[alert]]
            signature-hex = "deadbeefcafe"
            [[deny]]
            name = "the superblock"
            blocks = [0, 0]
            """)
        let ids = try DeviceRegistry.open("ids(rules=\(ruleFile), alerts=\(alerts)) | file(path=\(image))") as! IDSFilter
        defer { ids.close() }
        let debugfs = try Peers.program("debugfs", package: "e2fsprogs")
        func firstBlock(_ path: String) throws -> UInt64 {
            let (_, output) = try Peers.run(debugfs, ["-R", "blocks \(path)", image])
            return output.split(whereSeparator: { $0 == " " || $0 == "\n" }).compactMap { UInt64($0) }.first!
        }
        let boot = try firstBlock("/boot/vmlinuz"), passwd = try firstBlock("/etc/passwd"), notes = try firstBlock("/home/notes")
        let before = try ids.readBytes(4096, at: boot * 4096)
        XCTAssertEqual(ids.owner(ofByte: boot * 4096)?.paths, ["/boot/vmlinuz"], "block \(boot)")
        func write(_ device: IDSFilter, _ buffer: TestBuffer, at offset: UInt64) -> BlockResult {
            withExtendedLifetime(buffer) { device.submitAndWait(device.writeRequest(buffer, at: offset)) }
        }
        XCTAssertEqual(write(ids, TestBuffer(count: 4096, pattern: 1), at: boot * 4096).errorCode, .readOnly)
        XCTAssertTrue(try ids.readBytes(4096, at: boot * 4096) == before, "nothing of a denied write lands")
        XCTAssertEqual(write(ids, TestBuffer(count: 4096, pattern: 2), at: passwd * 4096), .success)
        XCTAssertTrue(try ids.readBytes(4096, at: passwd * 4096) == TestBuffer.expected(4096, 2))
        let signed = TestBuffer(count: 4096, pattern: 3)
        let signature: [UInt8] = [0xde, 0xad, 0xbe, 0xef, 0xca, 0xfe]
        (signed.vector.pointee.iov_base! + 1000).copyMemory(from: signature, byteCount: 6)
        XCTAssertEqual(write(ids, signed, at: notes * 4096), .success)
        XCTAssertEqual(write(ids, TestBuffer(count: 512, pattern: 4), at: 0).errorCode, .readOnly)
        XCTAssertEqual(ids.alerts, 4)
        let lines = try String(contentsOfFile: alerts, encoding: .utf8).split(separator: "\n")
        XCTAssertEqual(lines.count, 4)
        guard lines.count == 4 else { return }
        XCTAssertTrue(lines[0].contains("\"action\":\"deny\"") && lines[0].contains("\"path\":\"/boot/vmlinuz\""), String(lines[0]))
        XCTAssertTrue(lines[1].contains("\"action\":\"alert\"") && lines[1].contains("\"path\":\"/etc/passwd\""), String(lines[1]))
        XCTAssertTrue(lines[2].contains("holds the signature"), String(lines[2]))
        XCTAssertTrue(lines[3].contains("\"rule\":\"the superblock\""), String(lines[3]))
        // A disk with no file system yet: no map, the rules by block and signature still apply.
        let blank = "\(directory)/blank.img"
        FileManager.default.createFile(atPath: blank, contents: Data(count: 1 << 20))
        let empty = try DeviceRegistry.open("ids(rules=\(ruleFile)) | file(path=\(blank))") as! IDSFilter
        XCTAssertNil(empty.owner(ofByte: 4096))
        XCTAssertEqual(write(empty, TestBuffer(count: 4096, pattern: 5), at: 8192), .success)
        empty.close()
    }

    func testBadRuleFilesAreRefusedWithTheirPlace() throws {
        let image = "\(directory)/x.img"
        FileManager.default.createFile(atPath: image, contents: Data(count: 1 << 20))
        for (text, expected) in [
            ("[[alert]]\npath = \"etc\"", "path must be an absolute path"),
            ("[[alert]]\npath = \"/a\"\nblocks = [1, 2]", "exactly one of"),
            ("[[block]]\npath = \"/a\"", "unknown table 'block'"),
            ("[[alert]\npath = 1", "rules.toml:1:"),
            ("[[deny]]\nsignature-hex = \"abc\"", "pairs of hex digits"),
        ] {
            XCTAssertThrowsError(try DeviceRegistry.open("ids(rules=\(try rules(text))) | file(path=\(image))")) { error in
                XCTAssertTrue("\(error)".contains(expected), "\(text): \(error)")
            }
        }
    }
}
