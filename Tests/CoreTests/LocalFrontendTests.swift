import CXen
import Core
import Foundation
import XCTest
import XenStore

/// The generic local frontend against a backend that the test plays by hand, with the ring of
/// 8-byte words: the handshake, the ring's nodes, the channel, and the one state wait, for any
/// device class. (On LocalHypervisorTests, whose set-up gives the hypervisor and its backend.)
extension LocalHypervisorTests {
    /// A guest with a device of class "vword" attached, whose backend the test plays.
    private func attachWordDevice() throws -> (LocalHypervisor, XenbusDevicePaths) {
        let guest = try LocalHypervisor.createGuest(address, name: "g", pages: 256)
        let paths = XenbusDevicePaths(frontendDomain: guest.domainID, frontendType: "vword", backendType: "test-word", deviceID: 7)
        try XenbusToolstack.attach(backend.store, paths, frontend: [:], backend: [:])
        return (guest, paths)
    }

    private func setBackendState(_ paths: XenbusDevicePaths, _ s: XenbusDeviceState) throws {
        try backend.store.write(paths.backendPath + "/state", "\(s.rawValue)")
    }

    func testALocalFrontendsHandshakeRingAndChannelWithAHandWrittenBackend() throws {
        let (guest, paths) = try attachWordDevice()
        let store = backend.store
        try store.write(paths.backendPath + "/feature-double", "1")
        try setBackendState(paths, .initWait)
        let link = try LocalFrontend(hypervisor: guest, frontendPath: paths.frontendPath, timeoutSeconds: 5)
        XCTAssertEqual(link.backendPath, paths.backendPath)
        XCTAssertEqual(try link.backendNodes(["feature-double", "feature-none"]), ["feature-double": "1"])
        var ring = try link.makeRing(WordRing.self, pageOrder: 0)
        let channel = try link.makeChannel()
        XCTAssertEqual(ring.nodes(name: "word-ring-ref").map(\.0), ["word-ring-ref"])

        // The backend: waits for Initialised, maps the ring its node names, binds the channel,
        // says Connected, then doubles one word.
        let fe = paths.frontendPath, be = paths.backendPath, backend = self.backend!, domain = guest.domainID
        let served = expectation(description: "the backend served a request")
        try PosixThread.detached("test backend") {
            do {
                try XenbusDeviceState.wait(store, fe + "/state", for: [.initialised], timeoutSeconds: 5)
                let ref = GrantRef(try XCTUnwrap(try store.readInt(fe + "/word-ring-ref")))
                let port = EventPort(try XCTUnwrap(try store.readInt(fe + "/event-channel")))
                let mapping = try backend.grants.mapContiguous(domain: domain, refs: [ref], writable: true)
                let ch = try backend.events.bindInterdomain(remote: domain, remotePort: port)
                try store.write(be + "/state", "\(XenbusDeviceState.connected.rawValue)")
                var back = BackRing<WordRing>(shared: mapping.base!, bytes: xenPageSize)
                while back.unconsumedRequests() == 0 { _ = ch.wait(timeoutMilliseconds: 100) }
                back.putResponse(back.takeRequest() * 2)
                if back.pushResponses() { ch.notify() }
                served.fulfill()
            } catch {
                XCTFail("backend: \(error)")
            }
        }
        try link.connect(nodes: ring.nodes(name: "word-ring-ref") + [("event-channel", "\(channel.localPort)")], timeoutSeconds: 5)
        XCTAssertEqual(XenbusDeviceState.read(store, paths.frontendPath + "/state"), .connected)

        ring.ring.putRequest(21)
        if ring.ring.pushRequests() { channel.notify() }
        wait(for: [served], timeout: 5)
        while ring.ring.finalCheckForResponses() == 0 { _ = channel.wait(timeoutMilliseconds: 100) }
        XCTAssertEqual(ring.ring.takeResponse(), 42)
    }

    /// A backend that fails says why in its `error` node; the wait ends at once with it.
    func testAFrontendsWaitEndsAtOnceWhenTheBackendClosesWithAnError() throws {
        let (guest, paths) = try attachWordDevice()
        try setBackendState(paths, .initWait)
        let link = try LocalFrontend(hypervisor: guest, frontendPath: paths.frontendPath, timeoutSeconds: 5)
        try backend.store.write(paths.backendPath + "/error", "no such disk")
        try setBackendState(paths, .closing)
        let start = monotonicSeconds()
        XCTAssertThrowsError(try link.waitForBackend([.connected], timeoutSeconds: 5)) { error in
            guard case let XenbusWaitError.closed(path, state, message) = error else { return XCTFail("\(error)") }
            XCTAssertEqual(path, paths.backendPath + "/state")
            XCTAssertEqual(state, .closing)
            XCTAssertEqual(message, "no such disk")
        }
        XCTAssertLessThan(monotonicSeconds() - start, 1)
        XCTAssertEqual(try link.waitForBackend([.closing, .closed]), .closing, "awaited, Closing is an answer")
    }

    func testAStateWaitTimesOutWithTheLastStateSeen() throws {
        let (_, paths) = try attachWordDevice()
        try setBackendState(paths, .initialising)
        XCTAssertThrowsError(try XenbusDeviceState.wait(backend.store, paths.backendPath + "/state", for: [.connected], timeoutSeconds: 0.05)) { error in
            guard case let XenbusWaitError.timedOut(_, wanted, state) = error else { return XCTFail("\(error)") }
            XCTAssertEqual(wanted, [.connected])
            XCTAssertEqual(state, .initialising)
        }
    }
}
