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
}
