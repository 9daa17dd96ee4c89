import CXen
import Glibc

/// One end of an emulated event channel: our end of a Unix stream socket pair whose other end
/// the peer domain holds. A byte sent is a notification; the bytes waiting play the pending
/// bit, and reading them is "clear pending"; the port is masked while its holder leaves the
/// descriptor out of its poll set.
///
/// Why a socket pair and not an eventfd: the two holders of an eventfd share one open file
/// description (SCM_RIGHTS passes the description, and an eventfd cannot be reopened through
/// /proc), so a guest could clear O_NONBLOCK on it, or push its counter to the maximum, and make
/// the backend's notify or consume block for ever. Each end of a socket pair is a description
/// of its own, held only by its domain (and the broker), and send and recv with MSG_DONTWAIT
/// never block whatever flags a peer sets; MSG_NOSIGNAL makes a vanished peer an error, not a
/// SIGPIPE.
public final class LocalEventChannel: EventChannel, @unchecked Sendable {
    public let localPort: EventPort
    public let fileDescriptor: Int32
    private let onClose: (EventPort) -> Void
    private var closed = false

    init(port: EventPort, socket: Int32, onClose: @escaping (EventPort) -> Void) {
        localPort = port; fileDescriptor = socket; self.onClose = onClose
        // Waiting is done with poll; a C peer of the tests (the reference frontend and backend)
        // then read()s, which must not block either.
        _ = fcntl(socket, F_SETFL, fcntl(socket, F_GETFL) | O_NONBLOCK)
    }
    deinit { close() }

    public func notify() {
        var one: UInt8 = 1
        // EAGAIN: the peer has not read what is there already, so it is notified already.
        _ = send(fileDescriptor, &one, 1, Int32(MSG_DONTWAIT) | Int32(MSG_NOSIGNAL))
    }

    @discardableResult public func takePending() -> Bool {
        // One read, of at most a small buffer: bounded however much a peer sends. Bytes left
        // over make the next poll return at once, the spurious wake-up a peer notifying in a
        // loop causes anyway (and the ring loop's back-off answers).
        withUnsafeTemporaryAllocation(byteCount: 512, alignment: 8) { buffer in
            recv(fileDescriptor, buffer.baseAddress, buffer.count, Int32(MSG_DONTWAIT)) > 0
        }
    }

    /// Nothing to do here: the emulation's mask is the holder's poll set. A masked port is a
    /// descriptor left out of it (``RingServiceLoop`` does so), and what the peer sends
    /// meanwhile waits in the socket, pending, and is seen at the first poll after this.
    public func unmask() {}

    public func wait(timeoutMilliseconds: Int32) -> Bool {
        var p = pollfd(fd: fileDescriptor, events: Int16(POLLIN), revents: 0)
        while true {
            let r = poll(&p, 1, timeoutMilliseconds)
            if r < 0 && errno == EINTR { continue }
            return r > 0 && consume()
        }
    }

    public func close() {
        guard !closed else { return }
        closed = true
        Glibc.close(fileDescriptor)
        onClose(localPort)
    }
}
