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
