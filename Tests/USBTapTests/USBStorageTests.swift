import Core
import Devices
import Foundation
import Glibc
import USBTap
import XCTest

/// A Bulk-Only Transport host over the Swift usbfront, as Linux's usb-storage drives a stick:
/// a CBW, the data in URBs of at most 64 KiB (all in flight at once, as usb_sg_wait puts them),
/// the CSW.
struct BOTHost {
    let front: LocalUSBFrontend
    let port: Int
    let address: UInt8
    var tag: UInt32 = 0x100

    struct Status: Equatable { var tag: UInt32, residue: UInt32, status: UInt8 }

    static func cbw(tag: UInt32, length: Int, isIn: Bool, cdb: [UInt8]) -> [UInt8] {
        var b = [UInt8](repeating: 0, count: 31)
        let fields: [(Int, UInt32)] = [(0, 0x4342_5355), (4, tag), (8, UInt32(length))]
        for (at, v) in fields { for i in 0..<4 { b[at + i] = UInt8(truncatingIfNeeded: v >> (8 * i)) } }
        b[12] = isIn ? 0x80 : 0; b[14] = UInt8(cdb.count)
        for (i, c) in cdb.enumerated() { b[15 + i] = c }
        return b
    }

    func bulkOut(_ data: [UInt8]) throws -> LocalUSBFrontend.Result {
        try front.transfer(port: port, device: address, endpoint: 2, type: .bulk, isIn: false, data: data)
    }
    func putIn(_ length: Int) throws -> UInt16 {
        try front.put(port: port, device: address, endpoint: 1, type: .bulk, isIn: true, length: length)
    }
    func csw(_ id: UInt16) throws -> Status {
        let r = try front.wait(id, isIn: true)
        guard r.status == .ok, r.data.count == 13, r.data.prefix(4) == [0x55, 0x53, 0x42, 0x53] else {
            throw BOTFailure("not a CSW: \(r.status) \(r.data)")
        }
        func le(_ at: Int) -> UInt32 { (0..<4).reduce(0) { $0 | UInt32(r.data[at + $1]) << (8 * $1) } }
        return Status(tag: le(4), residue: le(8), status: r.data[12])
    }

    /// One command: its data IN (`dataIn` bytes) or OUT, split into `chunk`-byte URBs.
    mutating func command(_ cdb: [UInt8], dataIn: Int = 0, dataOut: [UInt8] = [], chunk: Int = 65536) throws -> (data: [UInt8], status: UInt8, residue: UInt32) {
        tag += 1
        let length = dataIn > 0 ? dataIn : dataOut.count
        guard try bulkOut(Self.cbw(tag: tag, length: length, isIn: dataIn > 0, cdb: cdb)).status == .ok else {
            throw BOTFailure("the CBW was refused")
        }
        var data: [UInt8] = []
        if dataIn > 0 {
            let ids = try stride(from: 0, to: dataIn, by: chunk).map { try putIn(min(chunk, dataIn - $0)) }
            for id in ids {
                let r = try front.wait(id, isIn: true)
                guard r.status == .ok else { throw BOTFailure("data IN: \(r.status)") }
                data += r.data
            }
        } else if !dataOut.isEmpty {
            let ids = try stride(from: 0, to: dataOut.count, by: chunk).map {
                try front.put(port: port, device: address, endpoint: 2, type: .bulk, isIn: false,
                              data: Array(dataOut[$0..<min($0 + chunk, dataOut.count)]))
            }
            for id in ids {
                let r = try front.wait(id)
                guard r.status == .ok else { throw BOTFailure("data OUT: \(r.status)") }
            }
        }
        let status = try csw(try putIn(13))
        guard status.tag == tag else { throw BOTFailure("CSW tag \(status.tag), expected \(tag)") }
        return (data, status.status, status.residue)
    }

    /// REQUEST SENSE's key/ASC/ASCQ.
    mutating func sense() throws -> [UInt8] {
        let r = try command([0x03, 0, 0, 0, 18, 0], dataIn: 18)
        return [r.data[2] & 0x0f, r.data[12], r.data[13]]
    }
}

func be32(_ v: UInt32) -> [UInt8] { [UInt8(v >> 24), UInt8(v >> 16 & 0xff), UInt8(v >> 8 & 0xff), UInt8(v & 0xff)] }
func read10(lba: UInt32, blocks: UInt16, write: Bool = false) -> [UInt8] {
    [write ? 0x2A : 0x28, 0] + be32(lba) + [0, UInt8(blocks >> 8), UInt8(blocks & 0xff), 0]
}

/// `storage` through a real usbif round trip: the tap answers enumeration, the stick answers
/// Bulk-Only Transport and SCSI over a memory block stack.
final class USBStorageTests: XCTestCase {
    var lab: USBLab!
    override func setUpWithError() throws { lab = try USBLab() }
    override func tearDown() { lab.shutdown() }

    func plugged(_ spec: String) throws -> (USBStorageDevice, LocalUSBFrontend, BOTHost) {
        let device = try XCTUnwrap(try DeviceRegistry.open(spec, of: .usb) as? USBStorageDevice)
        lab.register(device, as: "stick")
        let (guest, paths) = try lab.guestWithController(plugged: [1: "stick"])
        let front = try LocalUSBFrontend(hypervisor: guest, frontendPath: paths.frontendPath)
        try front.waitForPort(1)
        _ = try front.enumerate(port: 1, address: 5)
        return (device, front, BOTHost(front: front, port: 1, address: 5))
    }

    func testEnumeratesAndAnswersInquiryAndCapacity() throws {
        let device = try XCTUnwrap(try DeviceRegistry.open(#"storage(device="memory(size=8M)", vendor=ACME, product=Stick, serial=ABC123456789)"#,
                                                           of: .usb) as? USBStorageDevice)
        lab.register(device, as: "stick")
        let (guest, paths) = try lab.guestWithController(plugged: [1: "stick"])
        let front = try LocalUSBFrontend(hypervisor: guest, frontendPath: paths.frontendPath)
        try front.waitForPort(1)
        XCTAssertEqual(front.portSpeeds[1], .high)
        let (d, config) = try front.enumerate(port: 1, address: 5)
        XCTAssertEqual(d.count, 18)
        XCTAssertEqual(Array(d[8..<12]), [0x09, 0x12, 0x01, 0x00])
        let interfaces = USBDescriptors.walk(config).filter { $0.type == 4 }.map { Array($0.bytes) }
        XCTAssertEqual(interfaces.count, 1)
        XCTAssertEqual(Array(interfaces[0][4...7]), [2, 0x08, 0x06, 0x50])
        let endpoints = USBDescriptors.walk(config).filter { $0.type == 5 }.map { Array($0.bytes) }
        XCTAssertEqual(endpoints, [[7, 5, 0x81, 2, 0, 2, 0], [7, 5, 0x02, 2, 0, 2, 0]])
        let serial = try front.control(port: 1, device: 5, USBSetup(requestType: 0x80, request: 6, value: 0x0303, index: 0x0409, length: 255))
        XCTAssertEqual(serial.data, [26, 3] + Array("ABC123456789".utf16.flatMap { [UInt8($0 & 0xff), UInt8($0 >> 8)] }))
        // Get Max LUN: one LUN.
        XCTAssertEqual(try front.control(port: 1, device: 5, USBSetup(requestType: 0xA1, request: 0xFE, value: 0, index: 0, length: 1)).data, [0])

        var host = BOTHost(front: front, port: 1, address: 5)
        let inquiry = try host.command([0x12, 0, 0, 0, 36, 0], dataIn: 36)
        XCTAssertEqual(inquiry.status, 0)
        XCTAssertEqual(inquiry.data.count, 36)
        XCTAssertEqual(inquiry.data[0], 0)
        XCTAssertEqual(inquiry.data[1], 0x80, "RMB")
        XCTAssertEqual(String(decoding: inquiry.data[8..<16], as: UTF8.self), "ACME    ")
        XCTAssertEqual(String(decoding: inquiry.data[16..<32], as: UTF8.self), "Stick           ")
        let vpd = try host.command([0x12, 1, 0x80, 0, 64, 0], dataIn: 64)
        XCTAssertEqual(String(decoding: vpd.data[4..<16], as: UTF8.self), "ABC123456789")
        XCTAssertEqual(vpd.residue, 64 - 16)
        XCTAssertEqual(try host.command([0, 0, 0, 0, 0, 0]).status, 0)   // TEST UNIT READY
        let capacity = try host.command([0x25] + [UInt8](repeating: 0, count: 9), dataIn: 8)
        XCTAssertEqual(capacity.data, be32(16383) + be32(512))
        let capacity16 = try host.command([0x9E, 0x10] + [UInt8](repeating: 0, count: 8) + be32(32) + [0, 0], dataIn: 32)
        XCTAssertEqual(Array(capacity16.data.prefix(12)), [0, 0, 0, 0] + be32(16383) + be32(512))
        let formats = try host.command([0x23, 0, 0, 0, 0, 0, 0, 0, 252, 0], dataIn: 252)
        XCTAssertEqual(Array(formats.data.prefix(12)), [0, 0, 0, 8] + be32(16384) + [2, 0, 2, 0])
        XCTAssertEqual(formats.residue, 252 - 12)
        let luns = try host.command([0xA0, 0, 0, 0, 0, 0] + be32(16) + [0, 0], dataIn: 16)
        XCTAssertEqual(luns.data, [0, 0, 0, 8] + [UInt8](repeating: 0, count: 12))
        XCTAssertEqual(try host.command([0x1E, 0, 0, 0, 1, 0]).status, 0)   // PREVENT MEDIUM REMOVAL
        XCTAssertEqual(try host.command([0x1B, 0, 0, 0, 1, 0]).status, 0)   // START STOP UNIT
        XCTAssertEqual(try host.command([0x2F, 0, 0, 0, 0, 0, 0, 0, 8, 0]).status, 0)   // VERIFY(10)
        // A writable memory stack with a cache: not write-protected, WCE set, and SYNCHRONIZE CACHE works.
        let mode = try host.command([0x1A, 0, 0x3F, 0, 192, 0], dataIn: 192)
        XCTAssertEqual(mode.status, 0)
        XCTAssertEqual(mode.data[2] & 0x80, 0)
        let page = Array(mode.data[(4 + Int(mode.data[3]))...])
        XCTAssertEqual(Array(page.prefix(3)), [0x08, 18, 0x04])
        XCTAssertEqual(mode.residue, UInt32(192 - 1 - Int(mode.data[0])))
        XCTAssertEqual(try host.command([0x35, 0, 0, 0, 0, 0, 0, 0, 0, 0]).status, 0)
        try front.close()
    }

    /// 120 KiB (Linux's max_sectors) written in a 64 KiB and a 56 KiB URB, with the CSW's IN URB
    /// waiting before the data comes, then read back in two IN URBs: the same bytes, and the
    /// same as the block stack holds. The stack delays each request, so completions come from
    /// another thread after `submit` returned.
    func testWriteAndReadBack120KiBInSeveralURBs() throws {
        let (device, front, host) = try plugged(#"storage(device="delay(delay=5ms) | memory(size=8M)")"#)
        var bot = host
        let data = (0..<(120 * 1024)).map { UInt8(truncatingIfNeeded: $0 &* 31 &+ $0 >> 9) }
        bot.tag += 1
        XCTAssertEqual(try bot.bulkOut(BOTHost.cbw(tag: bot.tag, length: data.count, isIn: false, cdb: read10(lba: 100, blocks: 240, write: true))).status, .ok)
        let cswID = try bot.putIn(13)
        XCTAssertThrowsError(try front.wait(cswID, isIn: true, timeoutSeconds: 0.2), "the CSW waits for the data")
        for chunk in [data[0..<65536], data[65536...]] {
            let r = try bot.bulkOut(Array(chunk))
            XCTAssertEqual(r.status, .ok)
            XCTAssertEqual(r.actualLength, chunk.count)
        }
        XCTAssertEqual(try bot.csw(cswID), BOTHost.Status(tag: bot.tag, residue: 0, status: 0))
        // What the stack holds.
        var held = [UInt8](repeating: 0, count: data.count)
        try held.withUnsafeMutableBytes { raw in
            var v = iovec(iov_base: raw.baseAddress, iov_len: raw.count)
            try withUnsafeMutablePointer(to: &v) { try device.disk.sync.read(into: IOBuffers($0, count: 1), at: 100 * 512) }
        }
        XCTAssertEqual(held, data)
        // Read back: both IN URBs wait for the delayed read, then get 64 and 56 KiB.
        let back = try bot.command(read10(lba: 100, blocks: 240), dataIn: data.count)
        XCTAssertEqual(back.status, 0)
        XCTAssertEqual(back.residue, 0)
        XCTAssertEqual(back.data.count, data.count)
        XCTAssertTrue(back.data == data)
        // READ(16) of the last block but one, in 512-byte URBs.
        let tail = try bot.command([0x88, 0] + [0, 0, 0, 0] + be32(100 + 238) + be32(2) + [0, 0], dataIn: 1024, chunk: 512)
        XCTAssertTrue(tail.data == Array(data.suffix(1024)))
        try front.close()
    }

    func testReadOnlyStickIsWriteProtected() throws {
        let (device, front, host) = try plugged(#"storage(device="memory(size=8M)", readonly=true)"#)
        var bot = host
        XCTAssertTrue(device.isWriteProtected)
        let mode = try bot.command([0x1A, 0, 0x3F, 0, 192, 0], dataIn: 192)
        XCTAssertEqual(mode.data[2] & 0x80, 0x80)
        let mode10 = try bot.command([0x5A, 0, 0x3F, 0, 0, 0, 0, 0, 192, 0], dataIn: 192)
        XCTAssertEqual(mode10.data[3] & 0x80, 0x80)
        // The write's data is taken and dropped; the command fails with DATA PROTECT.
        let write = try bot.command(read10(lba: 0, blocks: 8, write: true), dataOut: [UInt8](repeating: 0xAA, count: 4096))
        XCTAssertEqual(write.status, 1)
        XCTAssertEqual(write.residue, 4096)
        XCTAssertEqual(try bot.sense(), [0x07, 0x27, 0x00])
        // REQUEST SENSE cleared it; reads still work.
        XCTAssertEqual(try bot.sense(), [0, 0, 0])
        let read = try bot.command(read10(lba: 0, blocks: 8), dataIn: 4096)
        XCTAssertEqual(read.status, 0)
        XCTAssertEqual(read.data, [UInt8](repeating: 0, count: 4096))
        try front.close()
    }

    func testUnknownOpcodeAndOutOfRangeGetTheirSense() throws {
        let (_, front, host) = try plugged(#"storage(device="memory(size=8M)")"#)
        var bot = host
        XCTAssertEqual(try bot.command([0xC8, 0, 0, 0, 0, 0]).status, 1)
        XCTAssertEqual(try bot.sense(), [0x05, 0x20, 0x00])
        let beyond = try bot.command(read10(lba: 16380, blocks: 8), dataIn: 4096)
        XCTAssertEqual(beyond.status, 1)
        XCTAssertEqual(beyond.residue, 4096)
        XCTAssertEqual(try bot.sense(), [0x05, 0x21, 0x00])
        XCTAssertEqual(try bot.command(read10(lba: 16384, blocks: 1, write: true), dataOut: [UInt8](repeating: 1, count: 512)).status, 1)
        XCTAssertEqual(try bot.sense(), [0x05, 0x21, 0x00])
        // A READ the host gave too little room for is a phase error.
        XCTAssertEqual(try bot.command(read10(lba: 0, blocks: 8), dataIn: 512).status, 2)
        try front.close()
    }

    func testBadCBWStallsBothEndpointsUntilResetRecovery() throws {
        let (_, front, host) = try plugged(#"storage(device="memory(size=8M)")"#)
        var bot = host
        var bad = BOTHost.cbw(tag: 1, length: 0, isIn: false, cdb: [0, 0, 0, 0, 0, 0])
        bad[0] = 0x42
        XCTAssertEqual(try bot.bulkOut(bad).status, .stall)
        // Both endpoints stay stalled, even for a good CBW and after CLEAR_FEATURE(HALT) alone.
        XCTAssertEqual(try bot.bulkOut(BOTHost.cbw(tag: 2, length: 0, isIn: false, cdb: [0, 0, 0, 0, 0, 0])).status, .stall)
        XCTAssertEqual(try front.wait(try bot.putIn(13), isIn: true).status, .stall)
        func clearHalt(_ endpoint: UInt16) throws -> USBStatus {
            try front.control(port: 1, device: 5, USBSetup(requestType: 0x02, request: 1, value: 0, index: endpoint, length: 0)).status
        }
        // GET_STATUS(ENDPOINT) reports the stick's own halts (Linux's usb_clear_halt path reads it).
        func halted(_ endpoint: UInt16) throws -> [UInt8] {
            try front.control(port: 1, device: 5, USBSetup(requestType: 0x82, request: 0, value: 0, index: endpoint, length: 2)).data
        }
        XCTAssertEqual(try halted(0x81), [1, 0])
        XCTAssertEqual(try halted(0x02), [1, 0])
        XCTAssertEqual(try clearHalt(0x02), .ok)
        XCTAssertEqual(try halted(0x02), [1, 0], "the halt stays until the reset recovery")
        XCTAssertEqual(try bot.bulkOut(Array(bad.prefix(30))).status, .stall)
        // Reset recovery: Bulk-Only Mass Storage Reset, then clear both halts.
        XCTAssertEqual(try front.control(port: 1, device: 5, USBSetup(requestType: 0x21, request: 0xFF, value: 0, index: 0, length: 0)).status, .ok)
        XCTAssertEqual(try clearHalt(0x81), .ok)
        XCTAssertEqual(try clearHalt(0x02), .ok)
        XCTAssertEqual(try halted(0x81), [0, 0])
        XCTAssertEqual(try halted(0x02), [0, 0])
        XCTAssertEqual(try bot.command([0, 0, 0, 0, 0, 0]).status, 0)
        XCTAssertEqual(try bot.command([0x12, 0, 0, 0, 36, 0], dataIn: 36).data.count, 36)
        try front.close()
    }

    /// A port reset while a read is with the (slow) stack: the waiting IN URB is cancelled, the
    /// late completion is dropped, the next commands work; unplugging closes the block stack.
    func testResetDuringAReadAndUnplugClosesTheStack() throws {
        let disk = ClosingDisk(next: try DeviceRegistry.open("delay(delay=100ms) | memory(size=1M)"))
        let device = USBStorageDevice(disk: disk)
        lab.register(device, as: "stick")
        let (guest, paths) = try lab.guestWithController(plugged: [1: "stick"])
        let front = try LocalUSBFrontend(hypervisor: guest, frontendPath: paths.frontendPath)
        try front.waitForPort(1)
        _ = try front.enumerate(port: 1, address: 5)
        var bot = BOTHost(front: front, port: 1, address: 5)
        XCTAssertEqual(try bot.bulkOut(BOTHost.cbw(tag: 9, length: 4096, isIn: true, cdb: read10(lba: 0, blocks: 8))).status, .ok)
        let waiting = try bot.putIn(4096)
        _ = try front.enumerate(port: 1, address: 6)
        XCTAssertEqual(try front.wait(waiting, isIn: true).status, .cancelled)
        bot = BOTHost(front: front, port: 1, address: 6)
        XCTAssertEqual(try bot.command([0, 0, 0, 0, 0, 0]).status, 0)
        let pattern = [UInt8](repeating: 0x5A, count: 1024)
        XCTAssertEqual(try bot.command(read10(lba: 2, blocks: 2, write: true), dataOut: pattern).status, 0)
        XCTAssertEqual(try bot.command(read10(lba: 2, blocks: 2), dataIn: 1024).data, pattern)
        XCTAssertFalse(disk.closed)
        try lab.unplug(1, of: paths, front: front)
        XCTAssertTrue(eventually { disk.closed })
        try front.close()
    }

    func testStorageSpecErrors() {
        XCTAssertThrowsError(try DeviceRegistry.open("storage", of: .usb))
        XCTAssertThrowsError(try DeviceRegistry.open(#"storage(device="nosuch(size=1M)")"#, of: .usb))
        XCTAssertThrowsError(try DeviceRegistry.open(#"storage(device="memory(size=1M)", readonly=maybe)"#, of: .usb))
        XCTAssertNoThrow(try DeviceRegistry.check(#"storage(device="memory(size=1M)")"#, of: .usb))
    }
}

struct BOTFailure: Error, CustomStringConvertible {
    let description: String
    init(_ d: String) { description = d }
}

/// A block filter that records its close.
final class ClosingDisk: BlockFilter, @unchecked Sendable {
    private let flag = NSLock()
    private var isClosed = false
    var closed: Bool { flag.lock(); defer { flag.unlock() }; return isClosed }
    override func close() { flag.lock(); isClosed = true; flag.unlock(); super.close() }
}
