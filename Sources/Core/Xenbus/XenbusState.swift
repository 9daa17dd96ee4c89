import Glibc
import XenStore

/// xenbus device states (io/xenbus.h), written by each end to its `state` node.
public enum XenbusDeviceState: UInt32, Sendable, CustomStringConvertible {
    case unknown = 0, initialising = 1, initWait = 2, initialised = 3, connected = 4
    case closing = 5, closed = 6, reconfiguring = 7, reconfigured = 8

    public var description: String {
        ["Unknown", "Initialising", "InitWait", "Initialised", "Connected", "Closing", "Closed",
         "Reconfiguring", "Reconfigured"][Int(rawValue)]
    }
}

extension XenbusDeviceState {
    /// The state in the node at `path`: Unknown when the node is missing or holds garbage
    /// (either end may be a guest).
    public static func read(_ store: any XenStoreClient, _ path: String) -> XenbusDeviceState {
        guard let v = (try? store.readInt(path)) ?? nil, v <= 8 else { return .unknown }
        return XenbusDeviceState(rawValue: UInt32(v)) ?? .unknown
    }

    /// Reads the node at `path` every `intervalMicroseconds` until `done` accepts its state or
    /// `timeoutSeconds` pass; returns the last state read and whether `done` accepted it.
    public static func poll(_ store: any XenStoreClient, _ path: String, timeoutSeconds: Double, intervalMicroseconds: UInt32 = 2000,
                            until done: (XenbusDeviceState) throws -> Bool) rethrows -> (state: XenbusDeviceState, reached: Bool) {
        let deadline = monotonicSeconds() + timeoutSeconds
        while true {
            let s = read(store, path)
            if try done(s) { return (s, true) }
            if monotonicSeconds() >= deadline { return (s, false) }
            usleep(intervalMicroseconds)
        }
    }
}
