import Core
import Glibc

/// A file of a device's own on-disk format (a map, an index, a store's chunks): reads and
/// writes that are whole or fail with the file's path and the offset, so that a truncated or
/// damaged file gives a message a user can act on, never a crash or wrong data.
final class FormatFile: @unchecked Sendable {
    let path: String
    let fd: Int32

    /// Opens `path` for reading and writing; `create` makes it if missing (mode 0600: the data
    /// of guests), `exclusive` refuses one that exists.
    init(_ path: String, create: Bool = false, exclusive: Bool = false, readOnly: Bool = false) throws(BlockError) {
        var flags = (readOnly ? O_RDONLY : O_RDWR) | O_CLOEXEC
        if create { flags |= O_CREAT }
        if exclusive { flags |= O_EXCL }
        let fd = Glibc.open(path, flags, 0o600)
        guard fd >= 0 else { throw BlockError.system("\(path)", errno: errno) }
        self.path = path
        self.fd = fd
    }

    deinit { Glibc.close(fd) }

    var size: UInt64 {
        get throws(BlockError) {
            var st = stat()
            guard fstat(fd, &st) == 0 else { throw BlockError.system("\(path): stat", errno: errno) }
            return UInt64(st.st_size)
        }
    }

    /// Reads `count` bytes at `offset`; fewer (the file ends) is an error naming `what`.
    func read(_ buffer: UnsafeMutableRawPointer, count: Int, at offset: UInt64, what: String) throws(BlockError) {
        let got = try readUpTo(buffer, count: count, at: offset)
        guard got == count else {
            throw BlockError(.io, "\(path): \(what) at offset \(offset + UInt64(got)) is cut short (the file ends; \(count - got) bytes missing)")
        }
    }

    /// Reads up to `count` bytes at `offset`, stopping only at the end of the file.
    func readUpTo(_ buffer: UnsafeMutableRawPointer, count: Int, at offset: UInt64) throws(BlockError) -> Int {
        var done = 0
        while done < count {
            let n = pread(fd, buffer + done, count - done, off_t(offset) + off_t(done))
            if n < 0 && errno == EINTR { continue }
            guard n >= 0 else { throw BlockError.system("\(path): read at offset \(offset + UInt64(done))", errno: errno) }
            if n == 0 { break }
            done += n
        }
        return done
    }

    /// `count` bytes at `offset`, as an array (see ``read(_:count:at:what:)``).
    func read(count: Int, at offset: UInt64, what: String) throws(BlockError) -> [UInt8] {
        var bytes = [UInt8](repeating: 0, count: count)
        let result = bytes.withUnsafeMutableBytes { b -> Result<Void, BlockError> in
            guard count > 0 else { return .success(()) }
            do throws(BlockError) { try read(b.baseAddress!, count: count, at: offset, what: what) } catch { return .failure(error) }
            return .success(())
        }
        try result.get()
        return bytes
    }

    func write(_ bytes: [UInt8], at offset: UInt64) throws(BlockError) {
        let result = bytes.withUnsafeBytes { b -> Result<Void, BlockError> in
            guard b.count > 0 else { return .success(()) }
            do throws(BlockError) { try write(b.baseAddress!, count: b.count, at: offset) } catch { return .failure(error) }
            return .success(())
        }
        try result.get()
    }

    func write(_ buffer: UnsafeRawPointer, count: Int, at offset: UInt64) throws(BlockError) {
        var done = 0
        while done < count {
            let n = pwrite(fd, buffer + done, count - done, off_t(offset) + off_t(done))
            if n < 0 && errno == EINTR { continue }
            guard n > 0 else { throw BlockError.system("\(path): write at offset \(offset + UInt64(done))", errno: n < 0 ? errno : ENOSPC) }
            done += n
        }
    }

    /// Makes what was written durable (the data and the size, not the timestamps).
    func sync() throws(BlockError) {
        guard fdatasync(fd) == 0 else { throw BlockError.system("\(path): fdatasync", errno: errno) }
    }

    func truncate(_ size: UInt64) throws(BlockError) {
        guard ftruncate(fd, off_t(size)) == 0 else { throw BlockError.system("\(path): truncate to \(size)", errno: errno) }
    }

    /// Gives `[offset, offset + length)` back to the file system (reads as zeroes); best effort,
    /// as the space is free either way.
    func punch(_ offset: UInt64, _ length: UInt64) {
        _ = LinuxFile.fallocate(fd, LinuxFile.FALLOC_FL_PUNCH_HOLE | LinuxFile.FALLOC_FL_KEEP_SIZE, offset, length)
    }

    /// Replaces `path`'s contents with `bytes` at once: written to a new file beside it, made
    /// durable, renamed over it, and the directory made durable.
    static func replace(_ path: String, with bytes: [UInt8]) throws(BlockError) {
        let temporary = path + ".new"
        unlink(temporary)
        let file = try FormatFile(temporary, create: true, exclusive: true)
        try file.write(bytes, at: 0)
        guard fsync(file.fd) == 0 else { throw BlockError.system("\(temporary): fsync", errno: errno) }
        guard rename(temporary, path) == 0 else { throw BlockError.system("rename \(temporary) to \(path)", errno: errno) }
        try syncDirectory(of: path)
    }

    /// Makes a file's name durable (after it was created or renamed).
    static func syncDirectory(of path: String) throws(BlockError) {
        let directory = path.contains("/") ? String(path[..<path.lastIndex(of: "/")!]) : "."
        let fd = Glibc.open(directory.isEmpty ? "/" : directory, O_RDONLY | O_DIRECTORY | O_CLOEXEC)
        guard fd >= 0 else { throw BlockError.system("\(directory)", errno: errno) }
        defer { Glibc.close(fd) }
        guard fsync(fd) == 0 else { throw BlockError.system("\(directory): fsync", errno: errno) }
    }
}
