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

/// A harness that plays a backend's part of the handshake (the C reference backends): its
/// `connect()` blocks until the frontend has written its nodes, and the frontend's set-up
/// blocks until the backend is Connected, so one of them runs on its own thread.
public protocol BackendHarness: AnyObject, Sendable {
    func connect() throws
    /// Why the last `connectInBackground` failed.
    var connectError: Error? { get set }
}

extension BackendHarness {
    /// `connect()` on its own thread; `done` runs after it, with `connectError` set if it failed.
    public func connectInBackground(done: @escaping @Sendable () -> Void) {
        Thread.detachNewThread {
            do { try self.connect() } catch { self.connectError = error }
            done()
        }
    }
}

/// The bench's emulated hypervisor: its server in a scratch directory, and the backend
/// domain's connection to it. `stop()` stops the server and removes the directory.
final class BenchHypervisor {
    let directory: String
    let address: LocalHypervisorAddress
    let server: LocalHypervisorServer
    let backend: LocalHypervisor

    init(name: String) throws {
        directory = FileManager.default.temporaryDirectory.appendingPathComponent("\(name)-\(getpid())").path
        address = LocalHypervisorAddress(directory: directory)
        server = try LocalHypervisorServer(address: address)
        try server.start()
        do { backend = try LocalHypervisor.connectBackend(address) } catch {
            server.stop()
            try? FileManager.default.removeItem(atPath: directory)
            throw error
        }
    }

    func stop() {
        server.stop()
        try? FileManager.default.removeItem(atPath: directory)
    }
}
