import Glibc
import XCTest
@testable import XenStore

/// A client that breaks the protocol must not take the server or other clients down.
final class XenStoreRobustnessTests: XCTestCase {
    /// A raw connection to the server's socket.
    private func rawConnection(_ server: XenStoreServer) throws -> Int32 {
        var address = try XCTUnwrap(XenStorePOSIX.unixAddress(server.socketPath!))
        let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0)
        XCTAssertEqual(XenStorePOSIX.withSockaddr(&address) { connect(fd, $0, $1) }, 0)
        var timeout = timeval(tv_sec: 5, tv_usec: 0)
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &timeout, socklen_t(MemoryLayout<timeval>.size))
        addTeardownBlock { close(fd) }
        return fd
    }

    /// Reads one reply message, or nil if the server closed the connection.
    private func readMessage(_ fd: Int32) -> XenStoreMessage? {
        var buffer: [UInt8] = []
        var chunk = [UInt8](repeating: 0, count: 8192)
        while true {
            if let h = XenStoreMessage.decodeHeader(buffer), buffer.count >= 16 + Int(h.length) {
                return XenStoreMessage(type: h.type, requestID: h.requestID, transactionID: h.transactionID,
                                       payload: Array(buffer[16..<(16 + Int(h.length))]))
            }
            let n = chunk.withUnsafeMutableBytes { read(fd, $0.baseAddress!, $0.count) }
            if n <= 0 { return nil }
            buffer += chunk[..<n]
        }
    }

    func testGarbageGetsAnErrorReplyAndOthersKeepWorking() throws {
        let server = try makeServer(self)
        let good = try XenStoreSocketClient(socketPath: server.socketPath!)
        let fd = try rawConnection(server)
        // An unknown message type with a small payload: a well-framed request the server cannot do.
        let garbage = XenStoreMessage(type: 0xdead, requestID: 77, payload: Array("junk".utf8)).encoded()
        XCTAssertTrue(XenStorePOSIX.writeAll(fd, garbage))
        let reply = try XCTUnwrap(readMessage(fd))
        XCTAssertEqual(reply.type, XenStoreMessageType.error)
        XCTAssertEqual(reply.requestID, 77)
        XCTAssertEqual(reply.strings, ["ENOSYS"])
        // A read whose path lacks its NUL: EINVAL, connection still usable.
        XCTAssertTrue(XenStorePOSIX.writeAll(fd, XenStoreMessage(type: XenStoreMessageType.read, requestID: 78, payload: Array("/x".utf8)).encoded()))
        XCTAssertEqual(readMessage(fd)?.strings, ["EINVAL"])
        XCTAssertTrue(XenStorePOSIX.writeAll(fd, XenStoreMessage(type: XenStoreMessageType.transactionEnd, requestID: 79, transactionID: 12345, strings: ["T"]).encoded()))
        XCTAssertEqual(readMessage(fd)?.strings, ["ENOENT"], "unknown transaction")
        try good.write("/still", "working")
        XCTAssertEqual(try good.readString("/still"), "working")
    }

    func testOversizedLengthDropsOnlyThatClient() throws {
        let server = try makeServer(self)
        let good = try XenStoreSocketClient(socketPath: server.socketPath!)
        let fd = try rawConnection(server)
        var header = XenStoreMessage(type: XenStoreMessageType.write, requestID: 1, payload: []).encoded()
        header.replaceSubrange(12..<16, with: [0xff, 0xff, 0xff, 0x7f])   // len = 2 GiB
        XCTAssertTrue(XenStorePOSIX.writeAll(fd, header + Array(repeating: 0x41, count: 1000)))
        XCTAssertNil(readMessage(fd), "the server hangs up on a client that claims more than XENSTORE_PAYLOAD_MAX")
        try good.write("/alive", "yes")
        XCTAssertEqual(try good.readString("/alive"), "yes")
    }

    func testAFailedPollStopsTheServerWithAnErrorNotATrap() throws {
        // poll fails with EINVAL when it is given more descriptors than RLIMIT_NOFILE: the
        // server's three (its wake-up, the listener, one client) against a limit of two.
        let server = XenStoreServer(socketPath: nil)
        try server.start()
        defer { server.stop() }
        let client = try server.connect(as: 0)
        try client.write("/before", "1")
        var saved = rlimit()
        XCTAssertEqual(getrlimit(__rlimit_resource_t(RLIMIT_NOFILE.rawValue), &saved), 0)
        var low = saved
        low.rlim_cur = 2
        XCTAssertEqual(setrlimit(__rlimit_resource_t(RLIMIT_NOFILE.rawValue), &low), 0)
        server.introduceDomain(9)   // wakes the poll loop
        for _ in 0..<500 where server.failure == nil { usleep(10_000) }
        XCTAssertEqual(setrlimit(__rlimit_resource_t(RLIMIT_NOFILE.rawValue), &saved), 0)

        XCTAssertEqual(server.failure, "xenstore server: poll: Invalid argument")
        XCTAssertEqual(server.connectionCount, 0, "every connection closed")
        XCTAssertThrowsError(try client.readString("/before")) { error in
            guard case .disconnected = error as? XenStoreError else { return XCTFail("\(error)") }
        }
        XCTAssertThrowsError(try server.connect(as: 0).readString("/before"), "a later connection is closed at once")
    }

    func testRandomBytesNeverCrashTheServer() throws {
        let server = try makeServer(self)
        var generator = SystemRandomNumberGenerator()
        for _ in 0..<20 {
            let fd = try rawConnection(server)
            let bytes = (0..<Int.random(in: 1...300, using: &generator)).map { _ in UInt8.random(in: 0...255, using: &generator) }
            _ = XenStorePOSIX.writeAll(fd, bytes)
            close(fd)
        }
        let good = try XenStoreSocketClient(socketPath: server.socketPath!)
        try good.write("/survived", "1")
        XCTAssertEqual(try good.readString("/survived"), "1")
    }

    func testClientRejectsOversizedRequestsLocally() throws {
        let server = try makeServer(self)
        let xs = try XenStoreSocketClient(socketPath: server.socketPath!)
        let tooBig = [UInt8](repeating: 1, count: XenStoreLimits.payloadMax + 1)
        XCTAssertThrowsError(try xs.write("/x", tooBig, transaction: .none)) {
            guard case .invalid = $0 as? XenStoreError else { return XCTFail("\($0)") }
        }
        try xs.write("/x", "fine")
    }
}
