import Core
import Foundation
@testable import NBDExport
import NBDWire
import XCTest

/// The protocol's edges, driven byte by byte: options that are wrong, requests that are
/// wrong, clients that misbehave or vanish.
final class NBDProtocolTests: XCTestCase {
    func testListenAddressesParseAndExplainMistakes() throws {
        XCTAssertEqual(try NBDListenAddress.parse("unix:/run/x.sock"), .unix(path: "/run/x.sock"))
        XCTAssertEqual(try NBDListenAddress.parse("tcp:127.0.0.1:10809"), .tcp(host: "127.0.0.1", port: 10809))
        XCTAssertEqual(try NBDListenAddress.parse("tcp:[::1]:4000"), .tcp(host: "::1", port: 4000))
        XCTAssertEqual(try NBDListenAddress.parse("tcp:localhost"), .tcp(host: "localhost", port: 10809))
        XCTAssertEqual(try NBDListenAddress.parse("/tmp/a.sock"), .unix(path: "/tmp/a.sock"))
        for bad in ["", "unix:", "tcp:", "tcp:host:99999", "tcp:host:http", "tcp:::1:80", "udp:1.2.3.4:5",
                    "unix:/" + String(repeating: "x", count: 120)] {
            XCTAssertThrowsError(try NBDListenAddress.parse(bad), bad) { error in
                XCTAssertTrue("\(error)".contains("invalid NBD address"), "\(error)")
            }
        }
    }

    func testHeadersAreLaidOutAsTheProtocolSays() {
        // doc/proto.md: big-endian, magic first; the bytes are spelt out here, not derived.
        func bytes(_ size: Int, _ store: (UnsafeMutableRawPointer) -> Void) -> [UInt8] {
            var b = [UInt8](repeating: 0xAA, count: size)
            b.withUnsafeMutableBytes { store($0.baseAddress!) }
            return b
        }
        let request = NBDRequestHeader(flags: 1, type: NBD.Command.write.rawValue, cookie: 0x0102_0304_0506_0708, offset: 0x1000, length: 512)
        let requestBytes = bytes(NBDRequestHeader.size) { request.store(to: $0) }
        XCTAssertEqual(requestBytes, [0x25, 0x60, 0x95, 0x13, 0, 1, 0, 1, 1, 2, 3, 4, 5, 6, 7, 8,
                                      0, 0, 0, 0, 0, 0, 0x10, 0, 0, 0, 2, 0])
        XCTAssertEqual(requestBytes.withUnsafeBytes { NBDRequestHeader(loading: $0.baseAddress!) }, request)
        var garbage = requestBytes
        garbage[0] = 0
        XCTAssertNil(garbage.withUnsafeBytes { NBDRequestHeader(loading: $0.baseAddress!) }, "a wrong magic is no request")

        XCTAssertEqual(bytes(NBDSimpleReplyHeader.size) { NBDSimpleReplyHeader(error: NBD.EIO, cookie: 9).store(to: $0) },
                       [0x67, 0x44, 0x66, 0x98, 0, 0, 0, 5, 0, 0, 0, 0, 0, 0, 0, 9])
        let chunk = NBDStructuredReplyHeader(flags: NBD.replyFlagDone, type: NBD.replyTypeOffsetData, cookie: 9, length: 8 + 512)
        XCTAssertEqual(bytes(NBDStructuredReplyHeader.size) { chunk.store(to: $0) },
                       [0x66, 0x8e, 0x33, 0xef, 0, 1, 0, 1, 0, 0, 0, 0, 0, 0, 0, 9, 0, 0, 2, 8])
    }

    func testTCPListenerServesQemuImg() throws {
        let server = NBDServer(listen: try .parse("tcp:127.0.0.1:0"), exports: [NBDExport(name: "t", device: SparseTestDevice(size: 3 << 20))])
        try server.start()
        defer { server.stop() }
        let port = try XCTUnwrap(server.boundPort)
        let r = try runTool(.qemuImg, ["info", "--output=json", "nbd://127.0.0.1:\(port)/t"])
        XCTAssertSucceeded(r, "qemu-img info over TCP")
        XCTAssertTrue(r.stdout.contains("\"virtual-size\": 3145728"), r.stdout)
    }

    func testUnixSocketIsOwnerOnly() throws {
        let f = try ServerFixture([NBDExport(name: "d", device: SparseTestDevice(size: 1 << 20))])
        defer { f.stop() }
        var st = stat()
        XCTAssertEqual(stat(f.socketPath, &st), 0)
        XCTAssertEqual(st.st_mode & 0o777, 0o600)
    }

    func testBadOptionsGetErrorRepliesAndTheConnectionGoesOn() throws {
        let f = try ServerFixture([NBDExport(name: "d", device: SparseTestDevice(size: 1 << 20))])
        defer { f.stop() }
        let c = try RawNBDClient(socketPath: f.socketPath)
        XCTAssertEqual(c.greet(), NBD.flagFixedNewstyle | NBD.flagNoZeroes)
        XCTAssertEqual(c.option(99, []).last?.0, NBD.repErrUnsup)
        XCTAssertEqual(c.option(NBD.Option.list.rawValue, [1, 2, 3]).last?.0, NBD.repErrInvalid)
        XCTAssertEqual(c.option(NBD.Option.structuredReply.rawValue, [0]).last?.0, NBD.repErrInvalid)
        // A name length that runs past the option's data.
        XCTAssertEqual(c.option(NBD.Option.go.rawValue, [0, 0, 1, 0, 65]).last?.0, NBD.repErrInvalid)
        XCTAssertEqual(c.option(NBD.Option.info.rawValue, RawNBDClient.goPayload("nope")).last?.0, NBD.repErrUnknown)
        // Meta contexts need structured replies first.
        XCTAssertEqual(c.option(NBD.Option.setMetaContext.rawValue, [0, 0, 0, 0, 0, 0, 0, 0]).last?.0, NBD.repErrInvalid)
        let go = c.option(NBD.Option.go.rawValue, RawNBDClient.goPayload("d"))
        XCTAssertEqual(go.last?.0, NBD.repAck)
        let sizes = go.first { $0.0 == NBD.repInfo && RawNBDClient.be($0.1, 0, 2) == UInt64(NBD.infoBlockSize) }!.1
        XCTAssertEqual([RawNBDClient.be(sizes, 2, 4), RawNBDClient.be(sizes, 6, 4), RawNBDClient.be(sizes, 10, 4)], [1, 4096, 32 << 20])
        c.request(NBD.Command.read.rawValue, cookie: 7, offset: 0, length: 512)
        XCTAssertEqual(c.simpleReply(dataLength: 512)?.error, 0)
    }

    func testEnforcedBlockSizeRefusesUnalignedRequestsFromClientsThatAgreed() throws {
        let f = try ServerFixture([NBDExport(name: "d", device: SparseTestDevice(size: 1 << 20), enforceDeviceBlockSize: true)])
        defer { f.stop() }
        let c = try RawNBDClient(socketPath: f.socketPath)
        XCTAssertNotNil(c.greet())
        var go = NBDMessage()
        go.append(UInt32(1)); go.append("d"); go.append(UInt16(1)); go.append(NBD.infoBlockSize)
        let replies = c.option(NBD.Option.go.rawValue, go.bytes)
        XCTAssertEqual(replies.last?.0, NBD.repAck)
        let sizes = replies.first { $0.0 == NBD.repInfo && RawNBDClient.be($0.1, 0, 2) == UInt64(NBD.infoBlockSize) }!.1
        XCTAssertEqual(RawNBDClient.be(sizes, 2, 4), 512)
        c.request(NBD.Command.read.rawValue, cookie: 1, offset: 1, length: 512)
        XCTAssertEqual(c.simpleReply()?.error, NBD.EINVAL)
        c.request(NBD.Command.write.rawValue, cookie: 2, offset: 0, length: 100, payload: [UInt8](repeating: 1, count: 100))
        XCTAssertEqual(c.simpleReply()?.error, NBD.EINVAL)
        c.request(NBD.Command.read.rawValue, cookie: 3, offset: 512, length: 512)
        XCTAssertEqual(c.simpleReply(dataLength: 512)?.error, 0)
    }

    func testStructuredRepliesCarryDataErrorsAndBlockStatus() throws {
        let device = SparseTestDevice(size: 1 << 20)
        let f = try ServerFixture([NBDExport(name: "d", device: device)])
        defer { f.stop() }
        let c = try RawNBDClient(socketPath: f.socketPath)
        XCTAssertNotNil(c.greet())
        XCTAssertEqual(c.option(NBD.Option.structuredReply.rawValue, []).last?.0, NBD.repAck)
        var meta = NBDMessage()
        meta.append(UInt32(1)); meta.append("d"); meta.append(UInt32(1))
        meta.append(UInt32(NBD.baseAllocation.utf8.count)); meta.append(NBD.baseAllocation)
        let set = c.option(NBD.Option.setMetaContext.rawValue, meta.bytes)
        XCTAssertEqual(set.map(\.0), [NBD.repMetaContext, NBD.repAck])
        XCTAssertEqual(c.option(NBD.Option.go.rawValue, RawNBDClient.goPayload("d")).last?.0, NBD.repAck)

        c.request(NBD.Command.write.rawValue, cookie: 1, offset: 65536, length: 512, payload: [UInt8](repeating: 7, count: 512))
        XCTAssertEqual(c.simpleReply()?.error, 0)
        // A read: one OFFSET_DATA chunk with DONE, the offset, then the data.
        c.request(NBD.Command.read.rawValue, cookie: 2, offset: 65536, length: 4)
        let data = c.receive(32)!
        XCTAssertEqual(RawNBDClient.be(data, 0, 4), UInt64(NBD.structuredReplyMagic))
        XCTAssertEqual(RawNBDClient.be(data, 4, 4), UInt64(NBD.replyFlagDone) << 16 | UInt64(NBD.replyTypeOffsetData))
        XCTAssertEqual(RawNBDClient.be(data, 8, 8), 2)
        XCTAssertEqual(RawNBDClient.be(data, 16, 4), 12)
        XCTAssertEqual(RawNBDClient.be(data, 20, 8), 65536)
        XCTAssertEqual(Array(data[28...]), [7, 7, 7, 7])
        // A failed read: an ERROR chunk with the errno and a message.
        c.request(NBD.Command.read.rawValue, cookie: 3, offset: 1 << 20, length: 4)
        let error = c.receive(26)!
        XCTAssertEqual(RawNBDClient.be(error, 6, 2), UInt64(NBD.replyTypeError))
        XCTAssertEqual(RawNBDClient.be(error, 20, 4), UInt64(NBD.EINVAL))
        _ = c.receive(Int(RawNBDClient.be(error, 24, 2)))
        // Block status with REQ_ONE: one descriptor, the hole before the written chunk.
        c.request(NBD.Command.blockStatus.rawValue, flags: NBD.cmdFlagReqOne, cookie: 4, offset: 0, length: 1 << 20)
        let status = c.receive(32)!
        XCTAssertEqual(RawNBDClient.be(status, 6, 2), UInt64(NBD.replyTypeBlockStatus))
        XCTAssertEqual(RawNBDClient.be(status, 16, 4), 12)
        XCTAssertEqual(RawNBDClient.be(status, 20, 4), UInt64(NBD.baseAllocationID))
        XCTAssertEqual(RawNBDClient.be(status, 24, 4), 65536)
        XCTAssertEqual(RawNBDClient.be(status, 28, 4), UInt64(NBD.stateHole | NBD.stateZero))
    }

    func testTransmissionFlagsAdvertiseOnlyWhatTheDeviceCan() throws {
        let f = try ServerFixture([
            NBDExport(name: "plain", device: SparseTestDevice(size: 1 << 20, capabilities: [.write])),
            NBDExport(name: "full", device: SparseTestDevice(size: 1 << 20, capabilities: .all)),
            NBDExport(name: "ro", device: SparseTestDevice(size: 1 << 20, capabilities: .all), readOnly: true),
        ])
        defer { f.stop() }
        let optional = NBD.tflagReadOnly | NBD.tflagSendFlush | NBD.tflagSendFUA | NBD.tflagSendTrim | NBD.tflagSendWriteZeroes | NBD.tflagCanMultiConn
        XCTAssertEqual(try RawNBDClient(socketPath: f.socketPath).go("plain")! & optional, NBD.tflagSendWriteZeroes)
        XCTAssertEqual(try RawNBDClient(socketPath: f.socketPath).go("full")! & optional, optional & ~NBD.tflagReadOnly)
        XCTAssertEqual(try RawNBDClient(socketPath: f.socketPath).go("ro")! & optional, NBD.tflagReadOnly | NBD.tflagCanMultiConn)
    }

    func testReadOnlyExportRefusesWritesWithEPERM() throws {
        let device = SparseTestDevice(size: 1 << 20)
        let f = try ServerFixture([NBDExport(name: "ro", device: device, readOnly: true)])
        defer { f.stop() }
        let c = try RawNBDClient(socketPath: f.socketPath)
        XCTAssertNotNil(c.go("ro"))
        c.request(NBD.Command.write.rawValue, cookie: 1, offset: 0, length: 4096, payload: [UInt8](repeating: 0xee, count: 4096))
        XCTAssertEqual(c.simpleReply()?.error, NBD.EPERM)
        c.request(NBD.Command.writeZeroes.rawValue, cookie: 2, offset: 0, length: 4096)
        XCTAssertEqual(c.simpleReply()?.error, NBD.EPERM)
        c.request(NBD.Command.trim.rawValue, cookie: 3, offset: 0, length: 4096)
        XCTAssertEqual(c.simpleReply()?.error, NBD.EPERM)
        c.request(NBD.Command.read.rawValue, cookie: 4, offset: 0, length: 4096)
        XCTAssertEqual(c.simpleReply(dataLength: 4096)?.data, [UInt8](repeating: 0, count: 4096))
    }

    func testBadRequestsGetErrorsAndTheStreamStaysInStep() throws {
        let f = try ServerFixture([NBDExport(name: "d", device: SparseTestDevice(size: 1 << 20))])
        defer { f.stop() }
        let c = try RawNBDClient(socketPath: f.socketPath)
        XCTAssertNotNil(c.go("d"))
        c.request(NBD.Command.read.rawValue, cookie: 1, offset: (1 << 20) - 511, length: 512)
        XCTAssertEqual(c.simpleReply()?.error, NBD.EINVAL)
        c.request(NBD.Command.read.rawValue, cookie: 2, offset: UInt64.max - 10, length: 512)
        XCTAssertEqual(c.simpleReply()?.error, NBD.EINVAL)
        c.request(NBD.Command.write.rawValue, cookie: 3, offset: 1 << 20, length: 1, payload: [1])
        XCTAssertEqual(c.simpleReply()?.error, NBD.ENOSPC)
        c.request(NBD.Command.read.rawValue, cookie: 4, offset: 0, length: (32 << 20) + 1)
        XCTAssertEqual(c.simpleReply()?.error, NBD.EOVERFLOW)
        // An oversized write's payload is swallowed, so the next request is read correctly.
        let big = (32 << 20) + 512
        c.request(NBD.Command.write.rawValue, cookie: 5, offset: 0, length: UInt32(big), payload: [UInt8](repeating: 9, count: big))
        XCTAssertEqual(c.simpleReply()?.error, NBD.EINVAL)
        c.request(77, cookie: 6, offset: 0, length: 0)
        XCTAssertEqual(c.simpleReply()?.error, NBD.EINVAL)
        c.request(NBD.Command.blockStatus.rawValue, cookie: 7, offset: 0, length: 512)
        XCTAssertEqual(c.simpleReply()?.error, NBD.EINVAL, "block status without base:allocation")
        c.request(NBD.Command.write.rawValue, cookie: 8, offset: 3, length: 5, payload: [1, 2, 3, 4, 5])
        XCTAssertEqual(c.simpleReply()?.cookie, 8)
        c.request(NBD.Command.read.rawValue, cookie: 9, offset: 0, length: 10)
        let r = c.simpleReply(dataLength: 10)
        XCTAssertEqual(r?.cookie, 9)
        XCTAssertEqual(r?.data, [0, 0, 0, 1, 2, 3, 4, 5, 0, 0])
    }

    func testGarbageDropsThatClientAloneWhileAnotherCompletesIO() throws {
        let f = try ServerFixture([NBDExport(name: "d", device: SparseTestDevice(size: 1 << 20))])
        defer { f.stop() }
        let good = try RawNBDClient(socketPath: f.socketPath)
        XCTAssertNotNil(good.go("d"))
        let bad = try RawNBDClient(socketPath: f.socketPath)
        XCTAssertNotNil(bad.go("d"))
        bad.send(Array("GET / HTTP/1.1\r\nHost: example.com\r\nAccept: */*\r\n\r\n".utf8))
        XCTAssertTrue(bad.isClosedByServer())
        // Garbage in the handshake too.
        let early = try RawNBDClient(socketPath: f.socketPath)
        _ = early.receive(18)
        early.send([UInt8](repeating: 0xff, count: 64))
        XCTAssertTrue(early.isClosedByServer())

        let pattern = (0..<4096).map { UInt8(truncatingIfNeeded: $0 * 7) }
        good.request(NBD.Command.write.rawValue, cookie: 1, offset: 8192, length: 4096, payload: pattern)
        XCTAssertEqual(good.simpleReply()?.error, 0)
        good.request(NBD.Command.read.rawValue, cookie: 2, offset: 8192, length: 4096)
        XCTAssertEqual(good.simpleReply(dataLength: 4096)?.data, pattern)
    }

    func testClientVanishingMidRequestLosesNoAcknowledgedWrite() throws {
        // Completions arrive 20 ms later on other threads, so requests are in flight at close.
        let device = SparseTestDevice(size: 4 << 20, asyncDelay: 20_000)
        let f = try ServerFixture([NBDExport(name: "d", device: device)])
        defer { f.stop() }
        let acknowledged = [UInt8](repeating: 0xa5, count: 65536)
        do {
            let c = try RawNBDClient(socketPath: f.socketPath)
            XCTAssertNotNil(c.go("d"))
            c.request(NBD.Command.write.rawValue, cookie: 1, offset: 0, length: 65536, payload: acknowledged)
            XCTAssertEqual(c.simpleReply()?.error, 0)
            for i in 0..<64 {
                c.request(NBD.Command.write.rawValue, cookie: UInt64(2 + i), offset: UInt64(1 << 20) + UInt64(i) * 65536, length: 65536,
                          payload: [UInt8](repeating: UInt8(i), count: 65536))
                c.request(NBD.Command.read.rawValue, cookie: UInt64(100 + i), offset: 0, length: 65536)
            }
            // The client goes away without reading a single reply.
        }
        let other = try RawNBDClient(socketPath: f.socketPath)
        XCTAssertNotNil(other.go("d"))
        other.request(NBD.Command.read.rawValue, cookie: 1, offset: 0, length: 65536)
        XCTAssertEqual(other.simpleReply(dataLength: 65536)?.data, acknowledged)
        // The vanished client's connection ends once its requests have completed.
        for _ in 0..<200 where f.server.clientCount > 1 { usleep(10_000) }
        XCTAssertEqual(f.server.clientCount, 1)
    }
}
