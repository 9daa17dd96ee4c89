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

/// Why ``XenbusDeviceState/wait(_:_:for:timeoutSeconds:)`` gave up.
public enum XenbusWaitError: Error, CustomStringConvertible {
    /// The other end went to Closing or Closed, which was not awaited; `error` is what it wrote
    /// in the `error` node beside its `state` (xenbus_dev_fatal's report), if anything.
    case closed(path: String, state: XenbusDeviceState, error: String?)
    /// The time ran out; `state` is the last one read.
    case timedOut(path: String, wanted: Set<XenbusDeviceState>, state: XenbusDeviceState)
    public var description: String {
        switch self {
        case let .closed(path, s, error): return "\(path) went to \(s) (\(error ?? "no error given"))"
        case let .timedOut(path, wanted, s):
            return "\(path) did not reach \(wanted.sorted { $0.rawValue < $1.rawValue }.map(\.description).joined(separator: " or ")) (it is \(s))"
        }
    }
}

extension XenbusDeviceState {
    /// Waits until the state node at `path` holds one of `states`, for either end of a handshake
    /// (a frontend waiting for its backend, a harness playing the backend); returns the state
    /// reached. Closing or Closed, unless awaited, ends the wait at once with the peer's `error`
    /// node, since a device that closes will not come back by itself.
    @discardableResult
    public static func wait(_ store: any XenStoreClient, _ path: String, for states: Set<XenbusDeviceState>,
                            timeoutSeconds: Double = 10) throws(XenbusWaitError) -> XenbusDeviceState {
        let closingAwaited = states.contains(.closing) || states.contains(.closed)
        let (s, reached) = poll(store, path, timeoutSeconds: timeoutSeconds) { s in
            states.contains(s) || (!closingAwaited && (s == .closing || s == .closed))
        }
        if reached && states.contains(s) { return s }
        if reached {
            let directory = path.hasSuffix("/state") ? String(path.dropLast("/state".count)) : path
            throw .closed(path: path, state: s, error: (try? store.readString(directory + "/error")) ?? nil)
        }
        throw .timedOut(path: path, wanted: states, state: s)
    }
}
