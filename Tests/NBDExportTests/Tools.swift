import Bench
import Foundation
import XCTest
@testable import NBDExport

/// The external clients the interop tests drive, and the Debian package each comes from: a
/// missing client is a failure that names what to install, never a skip.
enum Tool: String {
    case qemuImg = "qemu-img", qemuIO = "qemu-io", nbdinfo, nbdcopy, nbdfuse, fio, nbdkit
    case losetup, mkfsExt4 = "mkfs.ext4", fsckExt4 = "fsck.ext4", mount, umount, fusermount3

    var package: String {
        switch self {
        case .qemuImg, .qemuIO: return "qemu-utils"
        case .nbdinfo, .nbdcopy: return "libnbd-bin"
        case .nbdfuse: return "nbdfuse"
        case .fio: return "fio"
        case .nbdkit: return "nbdkit"
        case .losetup, .mount, .umount: return "mount"
        case .mkfsExt4, .fsckExt4: return "e2fsprogs"
        case .fusermount3: return "fuse3"
        }
    }
}

struct ToolMissing: Error, CustomStringConvertible {
    let tool: Tool
    var description: String { "\(tool.rawValue) is not installed: apt-get install \(tool.package)" }
}

struct ProcessResult {
    let status: Int32
    let stdout: String
    let stderr: String
}

/// Runs a client to the end and returns what it printed.
@discardableResult
func runTool(_ tool: Tool, _ arguments: [String]) throws -> ProcessResult {
    try runPath(try tool.resolved(), arguments)
}

func runPath(_ path: String, _ arguments: [String]) throws -> ProcessResult {
    let (status, out, err) = try NBDBenchmark.execute(path, arguments)
    return ProcessResult(status: status, stdout: out, stderr: err)
}

extension Tool {
    func resolved() throws -> String {
        for dir in ["/usr/bin", "/usr/sbin", "/bin", "/sbin", "/usr/local/bin"] {
            let p = "\(dir)/\(rawValue)"
            if access(p, X_OK) == 0 { return p }
        }
        throw ToolMissing(tool: self)
    }
}
