import Glibc
import Synchronization
import CXen

/// Watch events waiting to be taken. `fileDescriptor` (an eventfd) is readable while the queue
/// is not empty, so a thread can poll it beside other descriptors.
public final class XenStoreWatchQueue: @unchecked Sendable {
    private let events = Mutex<[XenStoreWatchEvent]>([])
    public let fileDescriptor: Int32

    public init() throws(XenStoreError) {
        fileDescriptor = try XenStorePOSIX.eventFD()
    }
    deinit { Glibc.close(fileDescriptor) }

    /// Adds an event (called by the client's reader).
    public func push(_ event: XenStoreWatchEvent) {
        events.withLock { $0.append(event) }
        var one: UInt64 = 1
        _ = Glibc.write(fileDescriptor, &one, 8)
    }

    /// Takes the oldest event, waiting up to `timeoutMilliseconds` (-1: forever, 0: no wait).
    public func next(timeoutMilliseconds: Int32) -> XenStoreWatchEvent? {
        while true {
            if let e = takeIfAny() { return e }
            var p = pollfd(fd: fileDescriptor, events: Int16(POLLIN), revents: 0)
            let r = poll(&p, 1, timeoutMilliseconds)
            if r == 0 { return takeIfAny() }
            if r < 0 && errno != EINTR { return nil }
        }
    }

    /// Takes the oldest event if there is one.
    public func takeIfAny() -> XenStoreWatchEvent? {
        events.withLock { q -> XenStoreWatchEvent? in
            if q.isEmpty {
                var v: UInt64 = 0
                _ = Glibc.read(fileDescriptor, &v, 8)   // drain: nothing left
                return nil
            }
            return q.removeFirst()
        }
    }
}
