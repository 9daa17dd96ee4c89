import CXen
@testable import Core
import Foundation
import XCTest
import XenStore

/// The local hypervisor as a backend meets it: grants (map, permissions, copy, revocation),
/// event channels, and a guest's death, each through the broker's sockets and shared memory.
final class LocalHypervisorTests: XCTestCase {
    var server: LocalHypervisorServer!
    var address: LocalHypervisorAddress!
    var backend: LocalHypervisor!

    override func setUpWithError() throws {
        address = LocalHypervisorAddress(directory: FileManager.default.temporaryDirectory
            .appendingPathComponent("softdev-core-\(getpid())-\(UInt32.random(in: 0...UInt32.max))").path)
        server = try LocalHypervisorServer(address: address)
        try server.start()
        backend = try LocalHypervisor.connectBackend(address)
    }

    override func tearDown() {
        backend?.destroy()
        server?.stop()
        try? FileManager.default.removeItem(atPath: address.directory)
    }

    private func guestPages(_ name: String) throws -> (LocalHypervisor, LocalGuestPages) {
        let guest = try LocalHypervisor.createGuest(address, name: name, pages: 1024)
        return (guest, try XCTUnwrap(guest.pages))
    }

    func testMappedPagesAreTheGuestsPagesBothWays() throws {
        let (guest, pages) = try guestPages("g")
        let frame = try pages.allocate(pages: 2)
        let refs = [try pages.grant(frame: frame, to: 0, readOnly: false), try pages.grant(frame: frame + 1, to: 0, readOnly: false)]
        memcpy(pages.pointer(frame + 1), "hello from the guest", 20)
        let m = try backend.grants.mapContiguous(domain: guest.domainID, refs: refs, writable: true)
        let base = try XCTUnwrap(m.base)
        XCTAssertEqual(String(decoding: UnsafeRawBufferPointer(start: base + 4096, count: 20), as: UTF8.self), "hello from the guest")
        memcpy(base, "hello from the backend", 22)
        XCTAssertEqual(String(decoding: UnsafeRawBufferPointer(start: pages.pointer(frame), count: 22), as: UTF8.self), "hello from the backend")
        // Mapped writable: the guest cannot revoke until the backend unmaps.
        XCTAssertThrowsError(try pages.endAccess(refs[0]))
        backend.grants.unmap(m, refs: refs)
        XCTAssertNoThrow(try pages.endAccess(refs[0]))
        XCTAssertNoThrow(try pages.endAccess(refs[1]))
    }

    func testBadReferencesAreErrorsAndNothingStaysMapped() throws {
        let (guest, pages) = try guestPages("g")
        let frame = try pages.allocate(pages: 3)
        let good = try pages.grant(frame: frame, to: 0, readOnly: false)
        let readOnly = try pages.grant(frame: frame + 1, to: 0, readOnly: true)
        let foreign = try pages.grant(frame: frame + 2, to: 7, readOnly: false)
        let d = guest.domainID
        XCTAssertThrowsError(try backend.grants.mapContiguous(domain: d, refs: [good, readOnly], writable: true)) {
            XCTAssertEqual($0 as? GrantError, .permissionDenied(domain: d, ref: readOnly))
        }
        XCTAssertThrowsError(try backend.grants.mapContiguous(domain: d, refs: [good, foreign], writable: false)) {
            XCTAssertEqual($0 as? GrantError, .permissionDenied(domain: d, ref: foreign))
        }
        XCTAssertThrowsError(try backend.grants.mapContiguous(domain: d, refs: [good, 3000], writable: false)) {
            XCTAssertEqual($0 as? GrantError, .badReference(domain: d, ref: 3000))
        }
        XCTAssertThrowsError(try backend.grants.mapContiguous(domain: d, refs: [GrantRef.max], writable: false)) {
            XCTAssertEqual($0 as? GrantError, .badReference(domain: d, ref: GrantRef.max))
        }
        XCTAssertThrowsError(try backend.grants.mapContiguous(domain: 999, refs: [good], writable: false)) {
            XCTAssertEqual($0 as? GrantError, .noSuchDomain(999))
        }
        // Every failed map left `good` unpinned: the guest may revoke it at once.
        XCTAssertNoThrow(try pages.endAccess(good))
        // A revoked reference cannot be mapped.
        XCTAssertThrowsError(try backend.grants.mapContiguous(domain: d, refs: [good], writable: false))
        // Read-only grants map read-only.
        let (page, m) = try backend.grants.mapPage(domain: d, ref: readOnly, writable: false)
        XCTAssertEqual(page.load(as: UInt8.self), 0)
        backend.grants.unmapPage(m, ref: readOnly)
    }

    func testOnePageMappedTooManyTimesIsRefusedNotOverflowed() throws {
        let (guest, pages) = try guestPages("g")
        let ref = try pages.grant(frame: try pages.allocate(pages: 1), to: 0, readOnly: false)
        // A guest may name one page in every segment of every request: 65535 pins are allowed,
        // the next is refused (Xen: "Risk of counter overflow") and nothing is left pinned.
        let refs = [GrantRef](repeating: ref, count: 65535)
        let pagesOut = UnsafeMutableBufferPointer<UnsafeMutableRawPointer>.allocate(capacity: refs.count)
        defer { pagesOut.deallocate() }
        let held = try refs.withUnsafeBufferPointer {
            try backend.grants.mapBatch(domain: guest.domainID, refs: $0, writable: true, pages: pagesOut)
        }
        XCTAssertThrowsError(try backend.grants.mapPage(domain: guest.domainID, ref: ref, writable: true)) {
            XCTAssertEqual($0 as? GrantError, .tooManyMappings(domain: guest.domainID, ref: ref))
        }
        let (_, reader) = try backend.grants.mapPage(domain: guest.domainID, ref: ref, writable: false)
        backend.grants.unmapPage(reader, ref: ref)
        backend.grants.unmap(held, refs: refs)
        XCTAssertNoThrow(try pages.endAccess(ref), "every pin was released")
    }

    func testGrantCopyFailsOnlyTheBadSegment() throws {
        let (guest, pages) = try guestPages("g")
        let frame = try pages.allocate(pages: 2)
        let writable = try pages.grant(frame: frame, to: 0, readOnly: false)
        let readOnly = try pages.grant(frame: frame + 1, to: 0, readOnly: true)
        memset(pages.pointer(frame + 1) + 100, 0x5A, 50)
        let local = UnsafeMutableRawPointer.allocate(byteCount: 4096, alignment: 16)
        defer { local.deallocate() }
        memset(local, 0xC3, 4096)
        var segments = [
            GrantCopySegment(direction: .toGuest, domain: guest.domainID, ref: writable, offset: 10, length: 30, local: local),
            GrantCopySegment(direction: .fromGuest, domain: guest.domainID, ref: readOnly, offset: 100, length: 50, local: local + 1000),
            GrantCopySegment(direction: .toGuest, domain: guest.domainID, ref: readOnly, offset: 0, length: 8, local: local),
            GrantCopySegment(direction: .toGuest, domain: guest.domainID, ref: writable, offset: 4090, length: 10, local: local),
        ]
        segments.withUnsafeMutableBufferPointer { backend.grants.copy($0) }
        XCTAssertNil(segments[0].error)
        XCTAssertNil(segments[1].error)
        XCTAssertEqual(segments[2].error, .permissionDenied(domain: guest.domainID, ref: readOnly))
        XCTAssertNotNil(segments[3].error, "a copy past the page's end")
        XCTAssertTrue((10..<40).allSatisfy { pages.pointer(frame).load(fromByteOffset: $0, as: UInt8.self) == 0xC3 })
        XCTAssertEqual(pages.pointer(frame).load(fromByteOffset: 40, as: UInt8.self), 0)
        XCTAssertTrue((1000..<1050).allSatisfy { local.load(fromByteOffset: $0, as: UInt8.self) == 0x5A })
        XCTAssertEqual(pages.pointer(frame + 1).load(as: UInt8.self), 0, "the read-only page was not written")
        XCTAssertNoThrow(try pages.endAccess(writable), "copies leave no pins")
    }

    func testEventChannelsSignalBothWays() throws {
        let (guest, _) = try guestPages("g")
        let frontEnd = try guest.events.allocateUnbound(remote: 0)
        let backEnd = try backend.events.bindInterdomain(remote: guest.domainID, remotePort: frontEnd.localPort)
        XCTAssertFalse(backEnd.wait(timeoutMilliseconds: 0), "nothing pending yet")
        frontEnd.notify(); frontEnd.notify()
        XCTAssertTrue(backEnd.wait(timeoutMilliseconds: 1000))
        XCTAssertFalse(backEnd.consume(), "two notifications are one pending event")
        backEnd.notify()
        XCTAssertTrue(frontEnd.wait(timeoutMilliseconds: 1000))
        XCTAssertThrowsError(try backend.events.bindInterdomain(remote: guest.domainID, remotePort: frontEnd.localPort),
                             "a port binds once")
        XCTAssertThrowsError(try backend.events.bindInterdomain(remote: guest.domainID, remotePort: 4242))
        XCTAssertThrowsError(try backend.events.bindInterdomain(remote: 999, remotePort: 1))
        backEnd.close()
        frontEnd.notify()                        // goes nowhere, harms nothing
        frontEnd.close()
    }

    /// A backend process that dies (its control connection goes) leaves its ports; the guest's
    /// ports are unbound again, as Xen's evtchn_close leaves them, so a backend started again
    /// binds them and notifications flow both ways on the guest's unchanged channel.
    func testABackendThatDiesLeavesTheGuestsPortToBindAgain() throws {
        let (guest, _) = try guestPages("g")
        let frontEnd = try guest.events.allocateUnbound(remote: 0)
        let first = try LocalHypervisor.connectBackend(address)
        let old = try first.events.bindInterdomain(remote: guest.domainID, remotePort: frontEnd.localPort)
        XCTAssertThrowsError(try backend.events.bindInterdomain(remote: guest.domainID, remotePort: frontEnd.localPort),
                             "bound to the first backend")
        frontEnd.notify()
        first.destroy()          // killed: nothing closed its ports
        _ = old
        var again: (any EventChannel)?
        let deadline = monotonicSeconds() + 5
        while again == nil && monotonicSeconds() < deadline {
            again = try? backend.events.bindInterdomain(remote: guest.domainID, remotePort: frontEnd.localPort)
            if again == nil { usleep(5_000) }   // the broker notices the death on its own thread
        }
        let channel = try XCTUnwrap(again, "the port could be bound again")
        channel.consume()        // what the dead backend left unread
        frontEnd.notify()
        XCTAssertTrue(channel.wait(timeoutMilliseconds: 1000), "the guest's notification reaches the new backend")
        channel.notify()
        XCTAssertTrue(frontEnd.wait(timeoutMilliseconds: 1000), "and the new backend's reaches the guest")
    }

    func testAGuestCannotReachAnotherGuestsMemoryOnlyDomain0MapsGrants() throws {
        let (a, aPages) = try guestPages("a")
        let (b, _) = try guestPages("b")
        let frame = try aPages.allocate(pages: 2)
        memcpy(aPages.pointer(frame), "secret of a", 11)
        let toDom0 = try aPages.grant(frame: frame, to: 0, readOnly: true)
        let toB = try aPages.grant(frame: frame + 1, to: b.domainID, readOnly: false)
        let refused = GrantError.system(
            operation: "domain \(b.domainID) mapping grants of domain \(a.domainID) (on the local hypervisor only domain 0 maps grants)",
            errno: EPERM)

        // Guest B asks for A's memory: whole (what a grant map would be built on), through a
        // grant made to dom0, through a grant copy, even through a grant made to B itself.
        XCTAssertThrowsError(try b.openMemory(a.domainID)) { XCTAssertEqual($0 as? GrantError, refused) }
        XCTAssertThrowsError(try b.grants.mapPage(domain: a.domainID, ref: toDom0, writable: false)) {
            XCTAssertEqual($0 as? GrantError, refused)
        }
        XCTAssertThrowsError(try b.grants.mapPage(domain: a.domainID, ref: toB, writable: true)) {
            XCTAssertEqual($0 as? GrantError, refused)
        }
        let local = UnsafeMutableRawPointer.allocate(byteCount: 4096, alignment: 16)
        defer { local.deallocate() }
        var copy = [GrantCopySegment(direction: .fromGuest, domain: a.domainID, ref: toDom0, offset: 0, length: 11, local: local)]
        copy.withUnsafeMutableBufferPointer { b.grants.copy($0) }
        XCTAssertEqual(copy[0].error, refused)
        XCTAssertEqual((b.grants as? LocalGrantTable)?.domainsHeld, [], "B holds none of A's memory")

        // Domain 0 may, and then each grant's own rules hold: only what was granted to it, and a
        // read-only grant maps read-only.
        let (page, m) = try backend.grants.mapPage(domain: a.domainID, ref: toDom0, writable: false)
        XCTAssertEqual(String(decoding: UnsafeRawBufferPointer(start: page, count: 11), as: UTF8.self), "secret of a")
        backend.grants.unmapPage(m, ref: toDom0)
        XCTAssertThrowsError(try backend.grants.mapPage(domain: a.domainID, ref: toDom0, writable: true)) {
            XCTAssertEqual($0 as? GrantError, .permissionDenied(domain: a.domainID, ref: toDom0))
        }
        XCTAssertThrowsError(try backend.grants.mapPage(domain: a.domainID, ref: toB, writable: false)) {
            XCTAssertEqual($0 as? GrantError, .permissionDenied(domain: a.domainID, ref: toB))
        }
    }

    func testAGuestCannotMakeTheBackendsNotifyOrConsumeBlock() throws {
        let (guest, _) = try guestPages("hostile")
        let frontEnd = try guest.events.allocateUnbound(remote: 0)
        let backEnd = try backend.events.bindInterdomain(remote: guest.domainID, remotePort: frontEnd.localPort)
        // What a hostile guest can do with the descriptor it holds: make it blocking, push an
        // eventfd's counter to its largest value (so that one more write would wait for a read
        // that never comes), fill the backend's side with notifications, and never read.
        let fd = frontEnd.fileDescriptor
        XCTAssertEqual(fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) & ~O_NONBLOCK), 0)
        var most: UInt64 = 0xffff_ffff_ffff_fffe
        _ = write(fd, &most, 8)
        var flood = [UInt8](repeating: 1, count: 4096)
        while send(fd, &flood, flood.count, Int32(MSG_DONTWAIT)) > 0 {}

        // The backend's ring thread: notify far more often than anything can hold, take and
        // clear what is pending, and wait. Each must return, whatever the guest did.
        let backendThread = try PosixThread("backend ring thread") {
            for _ in 0..<100_000 { backEnd.notify() }
            while backEnd.consume() {}
            XCTAssertFalse(backEnd.consume(), "nothing pending once drained")
            XCTAssertFalse(backEnd.wait(timeoutMilliseconds: 0))
        }
        XCTAssertTrue(backendThread.join(timeout: 5), "the backend's notify or consume blocked")

        // And the channel still works both ways once the guest behaves.
        frontEnd.notify()
        XCTAssertTrue(backEnd.wait(timeoutMilliseconds: 1000))
    }

    /// A raw connection to the broker as a new guest, for what LocalHypervisor never sends.
    private func rawGuest() throws -> Int32 {
        let (s, e) = LocalControlSocket.open(address.controlSocket) { connect($0, $1, $2) }
        XCTAssertGreaterThanOrEqual(s, 0, "connect: errno \(e)")
        addTeardownBlock { close(s) }
        XCTAssertTrue(LocalControlMessage(.createDomain, a: 16, name: "raw").send(on: s))
        let (reply, fds) = try XCTUnwrap(LocalControlMessage.receive(on: s, maxFDs: 1))
        XCTAssertEqual(reply.status, 0)
        fds.forEach { close($0) }
        return s
    }

    func testAGuestThatReadsNoRepliesIsDroppedAndTheBrokerServesTheOthers() throws {
        let raw = try rawGuest()
        XCTAssertEqual(fcntl(raw, F_SETFL, fcntl(raw, F_GETFL) | O_NONBLOCK), 0)
        var dropped = false
        for _ in 0..<5000 where !dropped {
            if LocalControlMessage(.closePort, a: 1).send(on: raw) { continue }
            if errno == EAGAIN { usleep(1000) } else { dropped = true }
        }
        XCTAssertTrue(dropped, "the broker hung up on a guest that reads none of its replies")

        let address = self.address!, backend = self.backend!
        let others = try PosixThread("another guest and the backend") {
            do {
                let guest = try LocalHypervisor.createGuest(address, name: "polite", pages: 16)
                let front = try guest.events.allocateUnbound(remote: 0)
                _ = try backend.events.bindInterdomain(remote: guest.domainID, remotePort: front.localPort)
            } catch {
                XCTFail("\(error)")
            }
        }
        XCTAssertTrue(others.join(timeout: 5), "the broker still serves the others")
    }

    func testAGuestHasAtMost64PortsAndMakes4StoreConnectionsDomain0IsNotBound() throws {
        let (guest, _) = try guestPages("greedy")
        var ports = try (0..<LocalHypervisorServer.guestPortLimit).map { _ in try guest.events.allocateUnbound(remote: 0) }
        XCTAssertThrowsError(try guest.events.allocateUnbound(remote: 0)) {
            XCTAssertEqual($0 as? EventChannelError, .system(operation: "event channel", errno: ENOSPC))
        }
        ports.removeLast().close()
        XCTAssertNoThrow(try guest.events.allocateUnbound(remote: 0), "a closed port makes room")
        XCTAssertNoThrow(try (0...LocalHypervisorServer.guestPortLimit).map { _ in try backend.events.allocateUnbound(remote: guest.domainID) })

        let raw = try rawGuest()
        for i in 0...LocalHypervisorServer.guestStoreConnectionLimit {
            XCTAssertTrue(LocalControlMessage(.connectStore).send(on: raw))
            let (reply, fds) = try XCTUnwrap(LocalControlMessage.receive(on: raw, maxFDs: 1))
            fds.forEach { close($0) }
            XCTAssertEqual(reply.status, i < LocalHypervisorServer.guestStoreConnectionLimit ? 0 : EDQUOT, "connection \(i + 1)")
        }
    }

    func testAGuestsDeathRemovesItsHomeAndFiresReleaseDomain() throws {
        let (guest, pages) = try guestPages("doomed")
        let id = guest.domainID
        XCTAssertEqual(try backend.store.readString("/local/domain/\(id)/name"), "doomed")
        try backend.store.watch("@releaseDomain", token: "t")
        _ = backend.store.watchEvents.next(timeoutMilliseconds: 1000)   // the watch fires once when set
        let ref = try pages.grant(frame: try pages.allocate(pages: 1), to: 0, readOnly: false)
        let (_, m) = try backend.grants.mapPage(domain: id, ref: ref, writable: true)
        guest.destroy()
        var released = false
        for _ in 0..<100 where !released {
            if let e = backend.store.watchEvents.next(timeoutMilliseconds: 100), e.path == "@releaseDomain" { released = true }
        }
        XCTAssertTrue(released)
        XCTAssertNil(try backend.store.readString("/local/domain/\(id)"))
        XCTAssertFalse(server.domains.contains(id))
        // What a service does on @releaseDomain: the mapping it still holds stays valid memory
        // until it unmaps (the guest's pages are let go only then); new maps are refused.
        let table = try XCTUnwrap(backend.grants as? LocalGrantTable)
        XCTAssertTrue(table.domainsHeld.contains(id))
        backend.grants.domainDestroyed(id)
        m.base!.storeBytes(of: 1, as: UInt8.self)
        XCTAssertTrue(table.domainsHeld.contains(id), "still mapped: the memory must stay")
        XCTAssertThrowsError(try backend.grants.mapPage(domain: id, ref: ref, writable: false)) {
            XCTAssertEqual($0 as? GrantError, .noSuchDomain(id))
        }
        backend.grants.unmapPage(m, ref: ref)
        XCTAssertFalse(table.domainsHeld.contains(id), "the last unmap lets the dead guest's memory go")
        XCTAssertThrowsError(try backend.grants.mapPage(domain: id, ref: ref, writable: false)) {
            XCTAssertEqual($0 as? GrantError, .noSuchDomain(id))
        }
    }
}
