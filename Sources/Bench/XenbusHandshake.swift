import Core
import Foundation
import Glibc
import XenStore

/// Lets C notify a local event channel: `ctx` is an unretained `LocalEventChannel`.
public let creferenceNotify: @convention(c) (UnsafeMutableRawPointer?) -> Void = { ctx in
    Unmanaged<LocalEventChannel>.fromOpaque(ctx!).takeUnretainedValue().notify()
}

public struct HarnessFailure: Error, CustomStringConvertible {
    public let description: String
    public init(_ d: String) { description = d }
}

/// Writes `nodes` under `directory` in one transaction (a xenbus handshake step).
public func writeNodes(_ store: any XenStoreClient, _ directory: String, _ nodes: [(String, String)]) throws {
    try store.transaction { (tx) throws(XenStoreError) in
        for (key, value) in nodes { try store.write(directory + "/" + key, value, transaction: tx) }
    }
}

/// Polls `path` (a xenbus state node) until it holds one of `states`; throws on Closing/Closed
/// when those are not wanted, or after `timeoutSeconds`.
public func waitForState(_ store: any XenStoreClient, _ path: String, _ states: Set<XenbusDeviceState>, timeoutSeconds: Double = 10) throws
    -> XenbusDeviceState {
    let (s, reached) = try XenbusDeviceState.poll(store, path, timeoutSeconds: timeoutSeconds) { s in
        if states.contains(s) { return true }
        if (s == .closing || s == .closed) && !states.contains(.closing) && !states.contains(.closed) {
            throw HarnessFailure("\(path) went to \(s)")
        }
        return false
    }
    guard reached else { throw HarnessFailure("\(path) did not reach \(states) (it is \(s))") }
    return s
}
