import CXen
import Core
import Foundation
import Glibc

/// The daemon's control socket (`<run directory>/control.sock`, mode 0600): one request per
/// connection, one line each way. Today it carries `softdev type`'s keystrokes to a guest's
/// soft keyboard:
///
///     type DOMID PORT BASE64TEXT\n   ->   ok\n   |   error MESSAGE\n
public final class ControlSocket: @unchecked Sendable {
    public let path: String
    private let fd: Int32
    private let stopEvent: Int32
    private var thread: PosixThread?
    private let handle: @Sendable (_ words: [String]) throws -> Void

    /// Binds `path` (replacing a stale socket) and serves each request with `handle`.
    public init(path: String, handle: @escaping @Sendable ([String]) throws -> Void) throws {
        self.path = path; self.handle = handle
        unlink(path)
        guard path.utf8.count <= UnixSocketAddress.maxPathBytes else { throw ServeConfigError("control socket path \(path) is too long") }
        let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { throw ServeConfigError("control socket: \(String(cString: strerror(errno)))") }
        let bound = UnixSocketAddress.with(path) { bind(fd, $0, $1) }
        guard bound == 0, chmod(path, 0o600) == 0, listen(fd, 8) == 0 else {
            let e = errno
            Glibc.close(fd)
            throw ServeConfigError("control socket \(path): \(String(cString: strerror(e)))")
        }
        self.fd = fd
        stopEvent = cxen_eventfd(0, Int32(CXEN_EFD_CLOEXEC))
    }

    public func start() throws {
        thread = try PosixThread("control socket") { [self] in serve() }
    }

    public func stop() {
        var one: UInt64 = 1
        _ = write(stopEvent, &one, 8)
        _ = thread?.join(timeout: 5)
        Glibc.close(fd); Glibc.close(stopEvent)
        unlink(path)
    }

    private func serve() {
        var fds = [pollfd(fd: fd, events: Int16(POLLIN), revents: 0), pollfd(fd: stopEvent, events: Int16(POLLIN), revents: 0)]
        while true {
            guard poll(&fds, 2, -1) > 0 else { if errno == EINTR { continue } else { return } }
            if fds[1].revents != 0 { return }
            let client = accept(fd, nil, nil)
            guard client >= 0 else { continue }
            var timeout = timeval(tv_sec: 2, tv_usec: 0)
            setsockopt(client, SOL_SOCKET, SO_RCVTIMEO, &timeout, socklen_t(MemoryLayout<timeval>.size))
            var line = [UInt8]()
            var byte: UInt8 = 0
            while line.count < 65536, read(client, &byte, 1) == 1, byte != 10 { line.append(byte) }
            let words = String(decoding: line, as: UTF8.self).split(separator: " ").map(String.init)
            let reply: String
            do { try handle(words); reply = "ok\n" } catch { reply = "error \(error)\n" }
            _ = reply.withCString { write(client, $0, strlen($0)) }
            Glibc.close(client)
        }
    }

    /// Sends one request to the daemon at `path` and returns nothing or throws its error.
    public static func request(path: String, _ words: [String]) throws {
        let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        defer { Glibc.close(fd) }
        guard UnixSocketAddress.with(path, { connect(fd, $0, $1) }) == 0 else {
            throw ServeConfigError("no softdev serve answers at \(path) (\(String(cString: strerror(errno)))): is the daemon running?")
        }
        let line = words.joined(separator: " ") + "\n"
        _ = line.withCString { write(fd, $0, strlen($0)) }
        var reply = [UInt8](), byte: UInt8 = 0
        while read(fd, &byte, 1) == 1, byte != 10 { reply.append(byte) }
        let text = String(decoding: reply, as: UTF8.self)
        guard text == "ok" else {
            throw ServeConfigError(text.hasPrefix("error ") ? String(text.dropFirst(6)) : "the daemon gave no answer")
        }
    }
}
