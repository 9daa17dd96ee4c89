import Foundation
import Glibc

/// One `softdev serve` per backend directory: two daemons watching the same
/// `backend/softdev-vbd` would both try to connect every disk and break each other's. Held with
/// flock on a file that records the holder's pid, so a crashed daemon leaves no stale lock.
public final class ServeLock {
    public let path: String
    private let fd: Int32

    /// Takes the lock at `path` (creating its directory), or says who holds it.
    public init(path: String) throws {
        self.path = path
        try? FileManager.default.createDirectory(atPath: (path as NSString).deletingLastPathComponent, withIntermediateDirectories: true)
        let fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC, 0o644)
        guard fd >= 0 else {
            throw ServeConfigError("cannot open the lock \(path): \(String(cString: strerror(errno)))")
        }
        guard flock(fd, LOCK_EX | LOCK_NB) == 0 else {
            var buffer = [UInt8](repeating: 0, count: 32)
            let n = read(fd, &buffer, buffer.count - 1)
            close(fd)
            let holder = n > 0 ? String(decoding: buffer[0..<n], as: UTF8.self).trimmingCharacters(in: .whitespacesAndNewlines) : "?"
            throw ServeConfigError("another softdev serve (pid \(holder)) is serving here (\(path)); stop it first")
        }
        ftruncate(fd, 0)
        let pid = "\(getpid())\n"
        _ = pid.withCString { write(fd, $0, strlen($0)) }
        self.fd = fd
    }

    deinit {
        ftruncate(fd, 0)
        close(fd)   // releases the flock
    }

    /// Whether a daemon holds the lock at `path` now: the pid it records is a live process.
    /// (Reading, not locking: a daemon starting this instant must not find it taken.)
    public static func isHeld(at path: String) -> Bool {
        guard let text = try? String(contentsOfFile: path, encoding: .utf8),
              let pid = pid_t(text.trimmingCharacters(in: .whitespacesAndNewlines)), pid > 0 else { return false }
        return kill(pid, 0) == 0 || errno == EPERM
    }

    /// Where the daemon for `choice` locks: beside the local hypervisor's sockets, or in
    /// /run/softdev on Xen.
    public static func path(for choice: HypervisorChoice) -> String {
        runDirectory(for: choice) + "/serve.lock"
    }

    /// Where the daemon for `choice` takes control requests (`softdev type`).
    public static func controlPath(for choice: HypervisorChoice) -> String {
        runDirectory(for: choice) + "/control.sock"
    }

    /// The daemon's place for what outlives one run of it (the lock, the rings' records):
    /// /run/softdev on Xen, the local hypervisor's directory otherwise.
    public static func runDirectory(for choice: HypervisorChoice) -> String {
        choice.resolved == .xen ? "/run/softdev" : choice.localAddress.directory
    }
}
