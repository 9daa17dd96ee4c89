import XCTest
@testable import XenStore

/// The store's behaviour through the wire protocol: what xenstored does, a client sees.
final class XenStoreStoreTests: XCTestCase {
    func testReadWriteMkdirDirectoryRemoveRoundTrip() throws {
        let server = try makeServer(self)
        let xs = try XenStoreSocketClient(socketPath: server.socketPath!)
        try xs.write("/vm/1/name", "guest")
        XCTAssertEqual(try xs.readString("/vm/1/name"), "guest")
        XCTAssertEqual(try xs.read("/vm/1", transaction: .none), [], "implicitly created parents are empty")
        try xs.write("/vm/1/blob", [0, 1, 2, 0, 255], transaction: .none)
        XCTAssertEqual(try xs.read("/vm/1/blob", transaction: .none), [0, 1, 2, 0, 255], "values are bytes, NULs included")
        try xs.mkdir("/vm/1/device", transaction: .none)
        try xs.mkdir("/vm/1/device", transaction: .none)   // existing: fine
        XCTAssertEqual(try xs.directory("/vm/1", transaction: .none), ["name", "blob", "device"], "children in creation order")
        try xs.remove("/vm/1", transaction: .none)
        XCTAssertNil(try xs.readString("/vm/1/name"))
        XCTAssertEqual(try xs.directory("/vm", transaction: .none), [])
        try xs.remove("/vm/1", transaction: .none)   // gone, parent exists: fine, as in cxenstored
        XCTAssertThrowsError(try xs.remove("/nope/x", transaction: .none)) { XCTAssertEqual($0 as? XenStoreError, .noEntry("/nope/x")) }
        XCTAssertThrowsError(try xs.read("/vm/1", transaction: .none)) { XCTAssertEqual($0 as? XenStoreError, .noEntry("/vm/1")) }
        XCTAssertEqual(try xs.domainPath(7), "/local/domain/7")
    }

    func testMalformedPathsAndLimits() throws {
        let server = try makeServer(self)
        let xs = try XenStoreSocketClient(socketPath: server.socketPath!)
        for bad in ["/a//b", "/a/", "/a b", "/a/\u{e9}", "@foo"] {
            XCTAssertThrowsError(try xs.write(bad, "x"), bad) { XCTAssertEqual($0 as? XenStoreError, .invalid(bad)) }
        }
        XCTAssertThrowsError(try xs.remove("/", transaction: .none)) { XCTAssertEqual($0 as? XenStoreError, .invalid("/")) }
        let long = "/" + String(repeating: "a", count: XenStoreLimits.absolutePathMax)
        XCTAssertThrowsError(try xs.mkdir(long, transaction: .none)) { XCTAssertEqual($0 as? XenStoreError, .invalid(long)) }
        let big = [UInt8](repeating: 65, count: XenStoreLimits.payloadMax)
        XCTAssertThrowsError(try xs.write("/big", big, transaction: .none), "path + value exceed the payload limit")
        try xs.write("/big", Array(big.prefix(XenStoreLimits.payloadMax - 5)), transaction: .none)
        XCTAssertEqual(try xs.read("/big", transaction: .none).count, XenStoreLimits.payloadMax - 5)
    }

    func testLongDirectoryIsFetchedInParts() throws {
        let server = try makeServer(self)
        let xs = try XenStoreSocketClient(socketPath: server.socketPath!)
        let names = (0..<400).map { "child-with-a-long-name-\($0)" }   // ~11 KB of names
        try xs.transaction { tx throws(XenStoreError) in
            for n in names { try xs.mkdir("/many/\(n)", transaction: tx) }
        }
        XCTAssertEqual(try xs.directory("/many", transaction: .none), names)
    }

    /// Domain 0's client and a connection acting for `domain`, which owns `path` (made by dom0).
    private func guest(_ domain: UInt16, owning path: String) throws -> (dom0: XenStoreSocketClient, guest: XenStoreSocketClient) {
        let server = try makeServer(self)
        let dom0 = try XenStoreSocketClient(socketPath: server.socketPath!)
        try dom0.mkdir(path, transaction: .none)
        try dom0.setPermissions(path, [.init(domain: domain, access: .none)], transaction: .none)
        return (dom0, try server.connect(as: domain))
    }

    func testRelativePathsAreUnderTheDomainHome() throws {
        let (dom0, guest) = try guest(3, owning: "/local/domain/3")
        try guest.write("device/vbd/768/state", "1")
        XCTAssertEqual(try dom0.readString("/local/domain/3/device/vbd/768/state"), "1")
        XCTAssertEqual(try dom0.permissions("/local/domain/3/device/vbd/768/state", transaction: .none),
                       [.init(domain: 3, access: .none)])
    }

    func testAGuestOwnsAtMostTheEntryQuotaOfNodes() throws {
        let (dom0, guest) = try guest(3, owning: "/local/domain/3/data")
        // `data` itself is one of its nodes.
        for i in 1..<XenStoreWorkspace.entryQuota { try guest.write("data/\(i)", "x") }
        XCTAssertThrowsError(try guest.write("data/more", "x")) { XCTAssertEqual($0 as? XenStoreError, .other("ENOSPC")) }
        XCTAssertThrowsError(try guest.mkdir("data/a/b", transaction: .none)) { XCTAssertEqual($0 as? XenStoreError, .other("ENOSPC")) }
        try guest.write("data/1", "rewriting is no new node")
        try guest.remove("data/1", transaction: .none)
        try guest.write("data/more", "a removed node makes room")
        try dom0.write("/local/domain/3/data/dom0s", "domain 0 has no quota")
    }

    func testPermissions() throws {
        let server = try makeServer(self)
        let dom0 = try XenStoreSocketClient(socketPath: server.socketPath!)
        let dom5 = try server.connect(as: 5)
        try dom0.write("/secret", "s")
        XCTAssertEqual(try dom0.permissions("/secret", transaction: .none), [.init(domain: 0, access: .none)],
                       "new nodes inherit the root's n0")
        XCTAssertThrowsError(try dom5.read("/secret", transaction: .none)) {
            XCTAssertEqual($0 as? XenStoreError, .permissionDenied("/secret"))
        }
        try dom0.setPermissions("/secret", [.init(domain: 0, access: .none), .init(domain: 5, access: .read)], transaction: .none)
        XCTAssertEqual(try dom5.readString("/secret"), "s")
        XCTAssertThrowsError(try dom5.write("/secret", "mine")) { XCTAssertEqual($0 as? XenStoreError, .permissionDenied("/secret")) }
        XCTAssertThrowsError(try dom5.write("/secret/child", "x"), "creating needs write on the closest ancestor") {
            XCTAssertEqual($0 as? XenStoreError, .permissionDenied("/secret/child"))
        }
        XCTAssertThrowsError(try dom5.setPermissions("/secret", [.init(domain: 5, access: .both)], transaction: .none))
        try dom0.write("/secret", "still dom0's")   // domain 0 bypasses every check
        XCTAssertEqual(try dom0.readString("/secret"), "still dom0's")

        // A domain with write access creates nodes it owns; it may not give them away.
        try dom0.mkdir("/shared", transaction: .none)
        try dom0.setPermissions("/shared", [.init(domain: 0, access: .none), .init(domain: 5, access: .both)], transaction: .none)
        try dom5.write("/shared/mine", "x")
        XCTAssertEqual(try dom0.permissions("/shared/mine", transaction: .none),
                       [.init(domain: 5, access: .none), .init(domain: 5, access: .both)])
        XCTAssertThrowsError(try dom5.setPermissions("/shared/mine", [.init(domain: 0, access: .none)], transaction: .none)) {
            XCTAssertEqual($0 as? XenStoreError, .other("EPERM"))
        }
        try dom5.setPermissions("/shared/mine", [.init(domain: 5, access: .read)], transaction: .none)
        XCTAssertThrowsError(try dom5.isDomainIntroduced(5), "privileged request") {
            XCTAssertEqual($0 as? XenStoreError, .permissionDenied("domain 5"))
        }
    }

    func testWatchesFireOnRegistrationChildWritesAndRemoval() throws {
        let server = try makeServer(self)
        let watcher = try XenStoreSocketClient(socketPath: server.socketPath!)
        let writer = try XenStoreSocketClient(socketPath: server.socketPath!)
        try watcher.watch("/backend", token: "tok")
        XCTAssertEqual(nextEvent(watcher), XenStoreWatchEvent(path: "/backend", token: "tok"), "fires once on registration")
        try writer.write("/backend/vbd/1/state", "4")
        XCTAssertEqual(nextEvent(watcher), XenStoreWatchEvent(path: "/backend/vbd/1/state", token: "tok"))
        try writer.write("/elsewhere", "x")
        try writer.remove("/backend/vbd", transaction: .none)
        let events = drainEvents(watcher)
        XCTAssertEqual(events.first, XenStoreWatchEvent(path: "/backend/vbd", token: "tok"), "removal fires for the removed node")
        XCTAssertEqual(Set(events.map(\.path)), ["/backend/vbd", "/backend/vbd/1", "/backend/vbd/1/state"])

        // A watch below a removed node fires with the watched path.
        try watcher.watch("/backend/vif/0", token: "deep")
        XCTAssertEqual(nextEvent(watcher)?.path, "/backend/vif/0")
        try writer.write("/backend/vif/0/mac", "00:16:3e:00:00:01")
        XCTAssertEqual(drainEvents(watcher), [.init(path: "/backend/vif/0/mac", token: "tok"), .init(path: "/backend/vif/0/mac", token: "deep")],
                       "every matching watch fires, in registration order")
        try writer.remove("/backend", transaction: .none)
        XCTAssertTrue(drainEvents(watcher).contains(XenStoreWatchEvent(path: "/backend/vif/0", token: "deep")))

        try watcher.unwatch("/backend", token: "tok")
        try watcher.unwatch("/backend/vif/0", token: "deep")
        try writer.write("/backend/x", "1")
        XCTAssertEqual(drainEvents(watcher), [], "no events after unwatch")
        XCTAssertThrowsError(try watcher.unwatch("/backend", token: "tok")) { XCTAssertEqual($0 as? XenStoreError, .noEntry("/backend")) }
    }

    func testWatchEventsRespectReadPermission() throws {
        let server = try makeServer(self)
        let dom0 = try XenStoreSocketClient(socketPath: server.socketPath!)
        let dom5 = try server.connect(as: 5)
        try dom5.watch("/private", token: "t")
        XCTAssertEqual(nextEvent(dom5)?.path, "/private")
        try dom0.write("/private/key", "hidden")
        XCTAssertEqual(drainEvents(dom5), [], "a domain does not see changes to nodes it cannot read")
    }

    func testTransactions() throws {
        let server = try makeServer(self)
        let a = try XenStoreSocketClient(socketPath: server.socketPath!)
        let b = try XenStoreSocketClient(socketPath: server.socketPath!)
        try a.write("/counter", "0")

        let tx = try a.startTransaction()
        try a.write("/counter", "1", transaction: tx)
        try a.write("/tx/new", "n", transaction: tx)
        XCTAssertEqual(try a.readString("/counter", transaction: tx), "1", "a transaction sees its own writes")
        XCTAssertEqual(try b.readString("/counter"), "0", "others do not until commit")
        XCTAssertNil(try b.readString("/tx/new"))
        try a.endTransaction(tx, commit: true)
        XCTAssertEqual(try b.readString("/counter"), "1")
        XCTAssertEqual(try b.readString("/tx/new"), "n")

        let aborted = try a.startTransaction()
        try a.write("/counter", "99", transaction: aborted)
        try a.endTransaction(aborted, commit: false)
        XCTAssertEqual(try b.readString("/counter"), "1", "abort leaves no trace")

        let conflicting = try a.startTransaction()
        XCTAssertEqual(try a.readString("/counter", transaction: conflicting), "1")
        try b.write("/counter", "2")
        try a.write("/counter", "from-a", transaction: conflicting)
        XCTAssertThrowsError(try a.endTransaction(conflicting, commit: true)) { XCTAssertEqual($0 as? XenStoreError, .again) }
        XCTAssertEqual(try b.readString("/counter"), "2", "a conflicting commit changes nothing")
        XCTAssertThrowsError(try a.endTransaction(conflicting, commit: true), "ended transactions are gone") {
            XCTAssertEqual($0 as? XenStoreError, .noEntry("transaction \(conflicting.id)"))
        }

        // transaction{} retries: the first attempt conflicts with b's write, the second commits.
        var attempts = 0
        try a.transaction { tx throws(XenStoreError) in
            attempts += 1
            let v = try a.readInt("/counter", transaction: tx) ?? 0
            if attempts == 1 { try b.write("/counter", "10") }
            try a.write("/counter", String(v + 1), transaction: tx)
        }
        XCTAssertEqual(attempts, 2)
        XCTAssertEqual(try b.readString("/counter"), "11")
    }

    func testTransactionFiresWatchesOnlyOnCommit() throws {
        let server = try makeServer(self)
        let xs = try XenStoreSocketClient(socketPath: server.socketPath!)
        let watcher = try XenStoreSocketClient(socketPath: server.socketPath!)
        try watcher.watch("/t", token: "w")
        _ = nextEvent(watcher)
        let tx = try xs.startTransaction()
        try xs.write("/t/a", "1", transaction: tx)
        XCTAssertEqual(drainEvents(watcher), [])
        try xs.endTransaction(tx, commit: true)
        XCTAssertEqual(nextEvent(watcher), XenStoreWatchEvent(path: "/t/a", token: "w"))
    }

    func testIntroduceAndReleaseDomainFireSpecialWatches() throws {
        let server = try makeServer(self)
        let dom0 = try XenStoreSocketClient(socketPath: server.socketPath!)
        try dom0.watch("@introduceDomain", token: "in")
        try dom0.watch("@releaseDomain", token: "out")
        XCTAssertEqual(Set(drainEvents(dom0)), [.init(path: "@introduceDomain", token: "in"), .init(path: "@releaseDomain", token: "out")])
        XCTAssertFalse(try dom0.isDomainIntroduced(9))
        let guest = try server.connect(as: 9)
        server.introduceDomain(9)
        XCTAssertEqual(nextEvent(dom0), XenStoreWatchEvent(path: "@introduceDomain", token: "in"))
        XCTAssertTrue(try dom0.isDomainIntroduced(9))
        try server.releaseDomain(9)
        XCTAssertEqual(nextEvent(dom0), XenStoreWatchEvent(path: "@releaseDomain", token: "out"))
        XCTAssertFalse(try dom0.isDomainIntroduced(9))
        XCTAssertThrowsError(try guest.readString("/"), "a released domain's connection is closed") {
            guard case .disconnected = $0 as? XenStoreError else { return XCTFail("\($0)") }
        }
    }

    func testConcurrentCallersShareOneConnection() throws {
        let server = try makeServer(self)
        let xs = try XenStoreSocketClient(socketPath: server.socketPath!)
        DispatchQueue.concurrentPerform(iterations: 8) { i in
            for j in 0..<50 {
                do {
                    try xs.write("/c/\(i)/\(j)", "\(i)-\(j)")
                    let back = try xs.readString("/c/\(i)/\(j)")
                    XCTAssertEqual(back, "\(i)-\(j)")
                } catch {
                    XCTFail("\(error)")
                }
            }
        }
        XCTAssertEqual(try xs.directory("/c", transaction: .none).count, 8)
    }

    func testClosedServerGivesDisconnectedNotAHang() throws {
        let server = try makeServer(self)
        let xs = try XenStoreSocketClient(socketPath: server.socketPath!, replyTimeout: 5)
        try xs.write("/x", "1")
        server.stop()
        XCTAssertThrowsError(try xs.readString("/x")) {
            guard case .disconnected = $0 as? XenStoreError else { return XCTFail("\($0)") }
        }
    }
}
