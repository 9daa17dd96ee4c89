import Core
import Devices
import Foundation
import Glibc
import NBDExport
import TestPeers
import XCTest

/// Real clients on a `cow | file` stack served over NBD: qemu-img convert and compare, qemu-io
/// writes, reads and discards, nbdcopy both ways; and the kernel through nbdfuse: an ext4 base
/// gets files through the overlay, fsck is clean, the base is untouched until `softdev commit`,
/// after which the base alone holds the files and fsck is clean on it.
final class COWClientTests: SoftDiskClientTestCase {
    func testQemuImgQemuIOAndNbdcopy() throws {
        let size = 8 << 20
        let base = "\(directory)/base.img", overlay = "\(directory)/overlay.img"
        let original = patternBytes(size, seed: 3)
        FileManager.default.createFile(atPath: base, contents: Data(original))
        let (server, device, uri) = try serve("cow(base=\"file(path=\(base), readonly=true)\") | file(path=\(overlay), size=\(size + (1 << 20)))")
        defer { server.stop(); device.close() }

        // qemu-img: the overlay reads as the base, then takes a whole new image.
        _ = try run("qemu-img", "qemu-utils", ["compare", "-f", "raw", base, "-F", "raw", uri])
        let source = "\(directory)/source.raw"
        var model = patternBytes(size, seed: 4)
        model.replaceSubrange((2 << 20)..<(3 << 20), with: repeatElement(0, count: 1 << 20))   // zeroes: write-zeroes over NBD
        FileManager.default.createFile(atPath: source, contents: Data(model))
        _ = try run("qemu-img", "qemu-utils", ["convert", "-n", "-f", "raw", source, "-O", "raw", uri])
        _ = try run("qemu-img", "qemu-utils", ["compare", "-f", "raw", source, "-F", "raw", uri])

        // qemu-io: unaligned writes (the client's read-modify-write), reads with a pattern, a discard.
        _ = try run("qemu-io", "qemu-utils", ["-f", "raw", "-c", "write -P 0xab 1000000 70000", "-c", "write -P 0xcd 4096 512", uri])
        model.replaceSubrange(1_000_000..<1_070_000, with: repeatElement(0xAB, count: 70000))
        model.replaceSubrange(4096..<4608, with: repeatElement(0xCD, count: 512))
        var output = try run("qemu-io", "qemu-utils", ["-f", "raw", "-c", "read -P 0xab 1000000 70000", "-c", "read -P 0xcd 4096 512", uri])
        XCTAssertFalse(output.contains("verification failed"), output)
        output = try run("qemu-io", "qemu-utils", ["-f", "raw", "-c", "discard 4194304 1048576", uri])
        model.replaceSubrange((4 << 20)..<(5 << 20), with: original[(4 << 20)..<(5 << 20)])

        // nbdcopy: out to a file, then a file in.
        let out = "\(directory)/out.raw"
        _ = try run("nbdcopy", "libnbd-bin", [uri, out])
        XCTAssertTrue(try bytes(out) == model, "nbdcopy reads what qemu-img and qemu-io wrote, the base under the discard")
        let other = patternBytes(size, seed: 5)
        FileManager.default.createFile(atPath: source, contents: Data(other))
        _ = try run("nbdcopy", "libnbd-bin", [source, uri])
        _ = try run("qemu-img", "qemu-utils", ["compare", "-f", "raw", source, "-F", "raw", uri])
        XCTAssertTrue(try bytes(base) == original, "the base is never written")
    }

    func testKernelExt4ThroughTheOverlayThenCommit() throws {
        try requireKernelPath()
        let base = "\(directory)/base.img", overlay = "\(directory)/overlay.img"
        let size = 64 << 20
        FileManager.default.createFile(atPath: base, contents: nil)
        truncate(base, off_t(size))
        _ = try run("mkfs.ext4", "e2fsprogs", ["-q", "-F", base])
        let pristine = try bytes(base)
        let stack = "cow(base=\"file(path=\(base), readonly=true)\") | file(path=\(overlay), size=\(size + (1 << 20)))"
        var files: [String: Data] = [:]
        do {
            let (server, device, uri) = try serve(stack)
            defer { server.stop(); device.close() }
            try withKernelDisk(uri) { loop, mountPoint in
                _ = try run("mount", "mount", [loop, mountPoint])
                files = writeFiles(in: mountPoint)
                _ = try run("umount", "mount", [mountPoint])
                _ = try run("fsck.ext4", "e2fsprogs", ["-fn", loop])
            }
        }
        XCTAssertTrue(try bytes(base) == pristine, "the base is untouched before the commit")
        let (status, output) = try Peers.run(try SoftDevBinary.path(), ["commit", stack])
        XCTAssertEqual(status, 0, output)
        _ = try run("fsck.ext4", "e2fsprogs", ["-fn", base])
        let mountPoint = "\(directory)/base-mnt"
        try FileManager.default.createDirectory(atPath: mountPoint, withIntermediateDirectories: false)
        _ = try run("mount", "mount", ["-o", "loop,ro", base, mountPoint])
        defer { _ = try? Peers.run(try Peers.program("umount", package: "mount"), [mountPoint]) }
        for (name, data) in files {
            XCTAssertEqual(FileManager.default.contents(atPath: "\(mountPoint)/\(name)"), data, "\(name) in the committed base")
        }
    }
}
