import Bench
import Foundation
@testable import NBDExport
import TestPeers
import XCTest

/// The external clients the interop tests drive, and the Debian package each comes from. A
/// missing client fails the test in CI and skips it elsewhere, naming what to install (`Peers`).
enum Tool: String {
    case qemuImg = "qemu-img", qemuIO = "qemu-io", nbdinfo, nbdcopy, nbdfuse, fio, nbdkit
    case losetup, mkfsExt4 = "mkfs.ext4", fsckExt4 = "fsck.ext4", debugfs, mount, umount, fusermount3, tar, sync, dd

    var package: String {
        switch self {
        case .qemuImg, .qemuIO: return "qemu-utils"
        case .nbdinfo, .nbdcopy: return "libnbd-bin"
        case .nbdfuse: return "nbdfuse"
        case .fio: return "fio"
        case .nbdkit: return "nbdkit"
        case .losetup, .mount, .umount: return "mount"
        case .mkfsExt4, .fsckExt4, .debugfs: return "e2fsprogs"
        case .tar: return "tar"
        case .sync, .dd: return "coreutils"
        case .fusermount3: return "fuse3"
        }
    }
}

struct ProcessResult {
    let status: Int32
    let stdout: String
    let stderr: String
}

/// Runs a client to the end and returns what it printed.
@discardableResult
func runTool(_ tool: Tool, _ arguments: [String], file: StaticString = #filePath, line: UInt = #line) throws -> ProcessResult {
    try runPath(try tool.resolved(file: file, line: line), arguments)
}

func runPath(_ path: String, _ arguments: [String]) throws -> ProcessResult {
    let (status, out, err) = try NBDBenchmark.execute(path, arguments)
    return ProcessResult(status: status, stdout: out, stderr: err)
}

extension Tool {
    func resolved(file: StaticString = #filePath, line: UInt = #line) throws -> String {
        try Peers.program(rawValue, package: package, file: file, line: line)
    }
}
