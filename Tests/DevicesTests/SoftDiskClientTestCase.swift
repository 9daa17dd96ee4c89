import Core
import Devices
import Foundation
import Glibc
import NBDExport
import TestPeers
import XCTest

/// What the tests of real clients on a soft disk share: a stack served over NBD on a unix
/// socket, client programs run to their end, and the kernel's view of the export through
/// nbdfuse and a loop device.
class SoftDiskClientTestCase: XCTestCase {
    var directory = ""

    override func setUp() {
        directory = makeTemporaryDirectory(self)
    }

    /// `spec` opened and served as the export "d"; its URI.
    func serve(_ spec: String) throws -> (NBDServer, any BlockDevice, String) {
        let device = try DeviceRegistry.open(spec)
        let socket = "\(directory)/nbd-\(UUID().uuidString.prefix(8)).sock"
        let server = NBDServer(listen: .unix(path: socket), exports: [NBDExport(name: "d", device: device)])
        try server.start()
        return (server, device, "nbd+unix:///d?socket=\(socket)")
    }

    /// Runs a client to its end; fails the test unless it exits 0.
    @discardableResult
    func run(_ tool: String, _ package: String, _ arguments: [String], file: StaticString = #filePath, line: UInt = #line) throws -> String {
        let (status, output) = try Peers.run(try Peers.program(tool, package: package), arguments)
        XCTAssertEqual(status, 0, "\(tool) \(arguments.joined(separator: " ")): \(output)", file: file, line: line)
        return output
    }

    func bytes(_ path: String) throws -> [UInt8] { [UInt8](try Data(contentsOf: URL(fileURLWithPath: path))) }

    /// The kernel path's tools, root and /dev/fuse: missing, the test fails in CI and is
    /// skipped elsewhere, saying why.
    func requireKernelPath() throws {
        for (tool, package) in [("nbdfuse", "nbdfuse"), ("losetup", "mount"), ("mkfs.ext4", "e2fsprogs"), ("fsck.ext4", "e2fsprogs"),
                                ("mount", "mount"), ("umount", "mount"), ("fusermount3", "fuse3")] {
            _ = try Peers.program(tool, package: package)
        }
        guard getuid() == 0 else { throw XCTSkip("mount and losetup need root") }
        try Peers.require(access("/dev/fuse", R_OK | W_OK) == 0, "/dev/fuse (the kernel path needs FUSE)", install: "modprobe fuse")
    }

    /// The export at `uri` as a FUSE file (nbdfuse) on a loop device: `body` gets the loop
    /// device and an empty directory to mount it on; everything is let go afterwards.
    func withKernelDisk(_ uri: String, _ body: (_ loop: String, _ mountPoint: String) throws -> Void) throws {
        let fuseDir = "\(directory)/fuse-\(UUID().uuidString.prefix(8))", mountPoint = "\(directory)/mnt-\(UUID().uuidString.prefix(8))"
        try FileManager.default.createDirectory(atPath: fuseDir, withIntermediateDirectories: false)
        try FileManager.default.createDirectory(atPath: mountPoint, withIntermediateDirectories: false)
        let fuse = Process()
        fuse.executableURL = URL(fileURLWithPath: try Peers.program("nbdfuse", package: "nbdfuse"))
        fuse.arguments = [fuseDir + "/disk", uri]
        try fuse.run()
        defer {
            // The loop device may let go of the FUSE file a little late.
            for _ in 0..<50 where fuse.isRunning {
                if (try? Peers.run(try Peers.program("fusermount3", package: "fuse3"), ["-u", fuseDir]))?.status == 0 { break }
                usleep(100_000)
            }
            if fuse.isRunning { fuse.terminate() }
            fuse.waitUntilExit()
        }
        let image = fuseDir + "/disk"
        for _ in 0..<500 where !FileManager.default.fileExists(atPath: image) { usleep(10_000) }
        let loop = try run("losetup", "mount", ["--find", "--show", image]).trimmingCharacters(in: .whitespacesAndNewlines)
        guard loop.hasPrefix("/dev/loop") else { return XCTFail("losetup: \(loop)") }
        defer { _ = try? Peers.run(try Peers.program("losetup", package: "mount"), ["-d", loop]) }
        defer { _ = try? Peers.run(try Peers.program("umount", package: "mount"), [mountPoint], errors: false) }
        try body(loop, mountPoint)
    }

    /// Files of several sizes written under `directory`, returned by name.
    func writeFiles(in directory: String, count: Int = 8) -> [String: Data] {
        var files: [String: Data] = [:]
        for i in 0..<count {
            let data = Data((0..<(i * 300_007 + 517)).map { UInt8(truncatingIfNeeded: $0 &* (i + 3)) })
            files["file\(i)"] = data
            XCTAssertTrue(FileManager.default.createFile(atPath: "\(directory)/file\(i)", contents: data))
        }
        return files
    }
}
