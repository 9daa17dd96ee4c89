import Core
import Foundation
@testable import NBDExport
import TestPeers
import XCTest

/// fio's nbd engine (libnbd) with data verification, and the kernel's view through nbdfuse:
/// a loop device, ext4, files, fsck.
final class NBDFioAndKernelTests: XCTestCase {
    func testFioHasTheNbdEngine() throws {
        let r = try runTool(.fio, ["--enghelp"])
        XCTAssertTrue(r.stdout.split(separator: "\n").contains { $0.trimmingCharacters(in: .whitespaces) == "nbd" },
                      "this fio has no nbd engine (Debian's fio is built with libnbd):\n\(r.stdout)")
    }

    func testFioVerifiesCRC32CAtQueueDepth1And32() throws {
        // Completions on other threads, so replies really come back out of order at depth 32.
        let f = try ServerFixture([NBDExport(name: "d", device: SparseTestDevice(size: 64 << 20, asyncDelay: 10))])
        defer { f.stop() }
        for depth in [1, 32] {
            let r = try runTool(.fio, ["--name=verify", "--ioengine=nbd", "--uri=\(f.uri("d"))", "--rw=randwrite",
                                       "--bsrange=4k-128k", "--iodepth=\(depth)", "--size=32m", "--verify=crc32c",
                                       "--do_verify=1", "--verify_fatal=1", "--verify_state_save=0", "--output-format=json"])
            XCTAssertSucceeded(r, "fio verify at iodepth \(depth)")
            XCTAssertTrue(r.stdout.contains("\"error\" : 0"), r.stdout)
        }
    }

    func testKernelMountsExt4OnTheExportAndFsckIsClean() throws {
        try withKernelBlockDevice(SparseTestDevice(size: 128 << 20)) { loop, mountPoint in
            try mkfsFilesAndFsck(loop: loop, mountPoint: mountPoint)
        }
    }

    private func mkfsFilesAndFsck(loop: String, mountPoint: String) throws {
        XCTAssertSucceeded(try runTool(.mkfsExt4, ["-q", "-F", loop]), "mkfs.ext4")
        XCTAssertSucceeded(try runTool(.mount, [loop, mountPoint]), "mount")
        var files: [String: Data] = [:]
        for i in 0..<8 {
            let bytes = (0..<(i * 100_003 + 517)).map { UInt8(truncatingIfNeeded: $0 &* (i + 3)) }
            files["file\(i)"] = Data(bytes)
            XCTAssertTrue(FileManager.default.createFile(atPath: "\(mountPoint)/file\(i)", contents: Data(bytes)))
        }
        XCTAssertSucceeded(try runTool(.umount, [mountPoint]), "umount")
        XCTAssertSucceeded(try runTool(.fsckExt4, ["-fn", loop]), "fsck.ext4 -fn")

        XCTAssertSucceeded(try runTool(.mount, [loop, mountPoint]), "remount")
        for (name, data) in files {
            XCTAssertEqual(FileManager.default.contents(atPath: "\(mountPoint)/\(name)"), data, name)
        }
        XCTAssertSucceeded(try runTool(.umount, [mountPoint]), "umount after checking")
    }
}

/// Serves `device` over NBD and gives the kernel a block device of it (nbdfuse, then a loop
/// device) and an empty mount point; everything is taken down afterwards.
func withKernelBlockDevice(_ device: any BlockDevice, _ body: (_ loop: String, _ mountPoint: String) throws -> Void) throws {
    for tool in [Tool.nbdfuse, .losetup, .mkfsExt4, .fsckExt4, .mount, .umount, .fusermount3] { _ = try tool.resolved() }
    try Peers.require(access("/dev/fuse", R_OK | W_OK) == 0, "/dev/fuse (the kernel path needs FUSE)", install: "modprobe fuse")
    let f = try ServerFixture([NBDExport(name: "disk", device: device)])
    defer { f.stop() }
    let fuseDir = f.path("fuse"), mountPoint = f.path("mnt")
    try FileManager.default.createDirectory(atPath: fuseDir, withIntermediateDirectories: false)
    try FileManager.default.createDirectory(atPath: mountPoint, withIntermediateDirectories: false)

    // nbdfuse stays in the foreground serving the FUSE file until it is unmounted.
    let fuse = Process()
    fuse.executableURL = URL(fileURLWithPath: try Tool.nbdfuse.resolved())
    fuse.arguments = [fuseDir + "/disk", f.uri("disk")]
    try fuse.run()
    defer {
        // nbdfuse mounts the directory; the loop device may let go of the file a little late.
        for _ in 0..<50 where fuse.isRunning {
            if (try? runTool(.fusermount3, ["-u", fuseDir]))?.status == 0 { break }
            usleep(100_000)
        }
        if fuse.isRunning { _ = try? runTool(.fusermount3, ["-uz", fuseDir]); fuse.terminate() }
        fuse.waitUntilExit()
    }
    let image = fuseDir + "/disk"
    for _ in 0..<500 where !FileManager.default.fileExists(atPath: image) { usleep(10_000) }
    XCTAssertTrue(FileManager.default.fileExists(atPath: image), "nbdfuse did not mount")

    let attach = try runTool(.losetup, ["--find", "--show", image])
    XCTAssertSucceeded(attach, "losetup")
    let loop = attach.stdout.trimmingCharacters(in: .whitespacesAndNewlines)
    guard !loop.isEmpty else { return }
    defer {
        _ = try? runTool(.umount, [mountPoint])
        _ = try? runTool(.losetup, ["-d", loop])
    }
    try body(loop, mountPoint)
}
