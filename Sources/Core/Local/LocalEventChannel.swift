import CXen
import Glibc

/// One end of an emulated event channel: an eventfd we wait on and the peer's eventfd we signal.
/// The eventfd's counter plays the pending bit; reading it is "clear pending and unmask".
public final class LocalEventChannel: EventChannel, @unchecked Sendable {
    public let localPort: EventPort
    public let fileDescriptor: Int32
    private let sendFD: Int32
    private let onClose: (EventPort) -> Void
    private var closed = false

    init(port: EventPort, receive: Int32, send: Int32, onClose: @escaping (EventPort) -> Void) {
        localPort = port; fileDescriptor = receive; sendFD = send; self.onClose = onClose
        // Waiting is done with poll, so the receiving end must never block a read.
        _ = fcntl(receive, F_SETFL, fcntl(receive, F_GETFL) | O_NONBLOCK)
    }
    deinit { close() }

    public func notify() {
        var one: UInt64 = 1
        _ = Glibc.write(sendFD, &one, 8)
    }

    @discardableResult public func consume() -> Bool {
        var value: UInt64 = 0
        return Glibc.read(fileDescriptor, &value, 8) == 8
    }

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
        Glibc.close(sendFD)
        onClose(localPort)
    }
}
