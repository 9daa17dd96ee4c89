import Foundation
import Glibc

/// The scratch files benchmarks read: every byte written (non-zero), so that reads hit data
/// on disk or in the page cache, never holes the file system answers without I/O.
public enum BenchmarkFile {
    public static func fill(_ path: String, size: UInt64) throws {
        let fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o600)
        guard fd >= 0 else { throw HarnessFailure("cannot create \(path): \(String(cString: strerror(errno)))") }
        defer { close(fd) }
        let chunk = 1 << 20
        let buffer = UnsafeMutableRawPointer.allocate(byteCount: chunk, alignment: 4096)
        defer { buffer.deallocate() }
        for i in 0..<chunk { buffer.storeBytes(of: UInt8(truncatingIfNeeded: i &* 31 &+ 1), toByteOffset: i, as: UInt8.self) }
        var written: UInt64 = 0
        while written < size {
            let n = write(fd, buffer, Int(min(UInt64(chunk), size - written)))
            guard n > 0 else { throw HarnessFailure("cannot write \(path): \(String(cString: strerror(errno)))") }
            written += UInt64(n)
        }
        guard fsync(fd) == 0 else { throw HarnessFailure("cannot sync \(path): \(String(cString: strerror(errno)))") }
    }

    /// Reads the whole file through the page cache, so that two servers compared on it both
    /// start warm (the first one measured would otherwise pay for the cold reads).
    public static func warm(_ path: String) throws {
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { throw HarnessFailure("cannot open \(path): \(String(cString: strerror(errno)))") }
        defer { close(fd) }
        let chunk = 1 << 20
        let buffer = UnsafeMutableRawPointer.allocate(byteCount: chunk, alignment: 4096)
        defer { buffer.deallocate() }
        while read(fd, buffer, chunk) > 0 {}
    }

    /// Writes the file's dirty pages back and waits for them, outside any measured time: after
    /// a buffered write row, so that the next row (another server's) does not pay for them.
    public static func sync(_ path: String) throws {
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { throw HarnessFailure("cannot open \(path): \(String(cString: strerror(errno)))") }
        defer { close(fd) }
        guard fsync(fd) == 0 else { throw HarnessFailure("cannot sync \(path): \(String(cString: strerror(errno)))") }
    }

    /// The type of the file system that holds `path` (ext4, xfs, tmpfs, overlay ...), from the
    /// mount table: the entry whose mount point is the longest prefix of the resolved path.
    public static func fileSystemType(_ path: String) -> String? {
        guard let resolved = realpath(path, nil) else { return nil }
        let file = String(cString: resolved)
        free(resolved)
        // /proc/self/mounts: "device mount-point type options 0 0", a space in a name as \040.
        guard let mounts = try? String(contentsOfFile: "/proc/self/mounts", encoding: .utf8) else { return nil }
        var best: (point: String, type: String)?
        for line in mounts.split(separator: "\n") {
            let fields = line.split(separator: " ")
            guard fields.count >= 3 else { continue }
            let point = fields[1].replacingOccurrences(of: "\\040", with: " ")
            let under = point == "/" || file == point || file.hasPrefix(point + "/")
            // A later entry on the same point is mounted over the earlier one.
            if under, point.count >= best?.point.count ?? 0 { best = (point, String(fields[2])) }
        }
        return best?.type
    }
}
