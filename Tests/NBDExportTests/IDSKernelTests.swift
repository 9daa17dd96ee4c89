import Core
@testable import Devices
import Foundation
import Glibc
import NBDExport
import TestPeers
import XCTest

/// The `ids` filter under the kernel's ext4 (through nbdfuse and a loop device): mkfs.ext4 on
/// the filter, `tar x` of a tree, `rm -r` of part of it, an append to a watched file, an
/// overwrite of a file under a denied directory; then the filter's map against debugfs on the
/// image, block by block, and the alerts it wrote.
final class IDSKernelTests: XCTestCase {
    func testIDSKeepsTrackThroughMkfsTarAndRm() throws {
        var template = Array("/var/tmp/softdev-ids.XXXXXX".utf8CString)
        let directory = String(cString: mkdtemp(&template)!)
        defer {
            if ProcessInfo.processInfo.environment["SOFTDEV_KEEP_TEST_FILES"] == nil { try? FileManager.default.removeItem(atPath: directory) } else { print("kept \(directory)") }
        }
        let image = "\(directory)/disk.img", rules = "\(directory)/rules.toml", alerts = "\(directory)/alerts.json"
        XCTAssertTrue(FileManager.default.createFile(atPath: image, contents: nil))
        XCTAssertEqual(truncate(image, 128 << 20), 0)
        try """
            [[alert]]
            path = "/etc/passwd"
            [[deny]]
            name = "boot is read-only"
            path = "/boot"
            [[alert]]
            signature = "SOFTDEV-IDS-TEST-SIGNATURE"
            """.write(toFile: rules, atomically: true, encoding: .utf8)
        let ids = try DeviceRegistry.open("ids(rules=\(rules), alerts=\(alerts)) | file(path=\(image))") as! IDSFilter
        defer { ids.close() }

        // The tree: a few directories deep, small and large files, /etc/passwd, /boot.
        let source = "\(directory)/tree"
        var files: [String: Int] = ["etc/passwd": 1800, "etc/hosts": 300, "boot/vmlinuz": 300_000, "boot/grub/grub.cfg": 5000]
        for d in 0..<6 {
            for f in 0..<25 { files["usr/share/doc/pkg\(d)/file\(f)"] = (d * 25 + f) * 1733 % 90_000 + 1 }
        }
        files["var/lib/big.bin"] = 3 << 20
        for (path, size) in files {
            let full = "\(source)/\(path)"
            try FileManager.default.createDirectory(atPath: (full as NSString).deletingLastPathComponent, withIntermediateDirectories: true)
            let bytes = (0..<size).map { UInt8(truncatingIfNeeded: $0 &* 31 &+ path.utf8.count) }
            XCTAssertTrue(FileManager.default.createFile(atPath: full, contents: Data(bytes)))
        }
        XCTAssertSucceeded(try runTool(.tar, ["-C", source, "-cf", "\(directory)/tree.tar", "."]), "tar c")
        let removed = ["usr/share/doc/pkg1", "usr/share/doc/pkg4"]

        try withKernelBlockDevice(ids) { loop, mountPoint in
            XCTAssertSucceeded(try runTool(.mkfsExt4, ["-q", "-F", "-b", "4096", loop]), "mkfs.ext4")
            XCTAssertSucceeded(try runTool(.mount, [loop, mountPoint]), "mount")
            XCTAssertSucceeded(try runTool(.tar, ["-C", mountPoint, "-xf", "\(directory)/tree.tar"]), "tar x")
            XCTAssertSucceeded(try runTool(.sync, []), "sync")
            for path in removed { try FileManager.default.removeItem(atPath: "\(mountPoint)/\(path)") }
            // A watched file appended to; a signature written.
            let passwd = try FileHandle(forWritingTo: URL(fileURLWithPath: "\(mountPoint)/etc/passwd"))
            try passwd.seekToEnd()
            try passwd.write(contentsOf: Data("intruder:x:0:0::/:/bin/sh\n".utf8))
            try passwd.synchronize()
            try passwd.close()
            XCTAssertTrue(FileManager.default.createFile(atPath: "\(mountPoint)/tmp-note", contents: Data(("x" + String(repeating: "SOFTDEV-IDS-TEST-SIGNATURE ", count: 10)).utf8)))
            XCTAssertSucceeded(try runTool(.sync, []), "sync")
            // An overwrite in place of a file under /boot: refused, so fsync reports the error.
            let denied = try runTool(.dd, ["if=/dev/zero", "of=\(mountPoint)/boot/vmlinuz", "bs=4096", "count=4", "conv=notrunc,fsync"])
            XCTAssertNotEqual(denied.status, 0, "the write to /boot/vmlinuz was refused: \(denied.stderr)")
            XCTAssertSucceeded(try runTool(.umount, [mountPoint]), "umount")
        }
        ids.settle()

        // The map against debugfs, block by block, for every file left.
        let debugfs = try Tool.debugfs.resolved()
        var checked = 0
        for (path, size) in files where !removed.contains(where: { path.hasPrefix($0 + "/") }) {
            let r = try runPath(debugfs, ["-R", "blocks /\(path)", image])
            let blocks = r.stdout.split(whereSeparator: { $0 == " " || $0 == "\n" }).compactMap { UInt64($0) }
            XCTAssertEqual(blocks.count, (size + 4095) / 4096, "debugfs blocks /\(path): \(r.stdout.prefix(200)) \(r.stderr)")
            for block in blocks {
                let owner = ids.owner(ofByte: block * 4096)
                XCTAssertEqual(owner?.paths, ["/" + path], "block \(block) of /\(path)")
                checked += 1
            }
        }
        XCTAssertGreaterThan(checked, 800)
        // The files removed are gone from the map.
        let gone = Set(files.keys.filter { path in removed.contains(where: { path.hasPrefix($0 + "/") }) }.map { "/" + $0 })
        XCTAssertEqual(gone.count, 50)
        for block in stride(from: UInt64(0), to: 128 << 20 / 4096, by: 1) {
            if let owner = ids.owner(ofByte: block * 4096), let path = owner.paths.first(where: gone.contains) {
                XCTFail("block \(block) still maps to removed \(path)")
            }
        }
        XCTAssertSucceeded(try runTool(.fsckExt4, ["-fn", image]), "fsck.ext4 -fn")
        // /boot/vmlinuz kept its bytes.
        let r = try runPath(debugfs, ["-R", "dump /boot/vmlinuz \(directory)/vmlinuz", image])
        XCTAssertEqual(r.status, 0, r.stderr)
        XCTAssertEqual(FileManager.default.contents(atPath: "\(directory)/vmlinuz"),
                       Data((0..<300_000).map { UInt8(truncatingIfNeeded: $0 &* 31 &+ "boot/vmlinuz".utf8.count) }))
        // The alerts.
        let lines = (try String(contentsOfFile: alerts, encoding: .utf8)).split(separator: "\n")
        XCTAssertTrue(lines.contains { $0.contains("\"path\":\"/etc/passwd\"") && $0.contains("\"action\":\"alert\"") }, "\(lines)")
        XCTAssertTrue(lines.contains { $0.contains("\"rule\":\"boot is read-only\"") && $0.contains("\"action\":\"deny\"") && $0.contains("/boot/vmlinuz") }, "\(lines)")
        XCTAssertTrue(lines.contains { $0.contains("signature") }, "\(lines)")
        XCTAssertTrue(lines.contains { $0.contains("name /etc/passwd now names inode") }, "the creation of /etc/passwd by tar: \(lines)")
    }
}
