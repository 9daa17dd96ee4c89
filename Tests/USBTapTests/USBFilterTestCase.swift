import CXen
import Core
import Devices
import Foundation
import TestPeers
import USBTap
import XCTest

/// What the USB filters' tests through the real tap share: a lab, a stack plugged and
/// enumerated, Bulk-Only exchanges.
class USBFilterTestCase: XCTestCase {
    var lab: USBLab!
    override func setUpWithError() throws { lab = try USBLab() }
    override func tearDown() { lab.shutdown() }

    /// `stack` plugged into port 1 of a guest's controller and enumerated at address 2.
    func connected(_ stack: any USBDevice) throws -> (LocalUSBFrontend, configuration: [UInt8]) {
        lab.register(stack, as: "stack")
        let (guest, paths) = try lab.guestWithController(plugged: [1: "stack"])
        let front = try LocalUSBFrontend(hypervisor: guest, frontendPath: paths.frontendPath)
        try front.waitForPort(1)
        let (_, configuration) = try front.enumerate(port: 1, address: 2)
        return (front, configuration)
    }

    /// A Bulk-Only exchange: CBW, data (OUT or IN), CSW.
    struct BulkOnly {
        let front: LocalUSBFrontend
        var tag: UInt32 = 0x100
        struct Exchange { var cbw: LocalUSBFrontend.Result; var data: LocalUSBFrontend.Result?; var csw: LocalUSBFrontend.Result }

        mutating func run(_ cdb: [UInt8], out: [UInt8] = [], inLength: Int = 0) throws -> Exchange {
            tag += 1
            let length = UInt32(out.isEmpty ? inLength : out.count)
            var cbw: [UInt8] = [0x55, 0x53, 0x42, 0x43] + withUnsafeBytes(of: tag.littleEndian, Array.init)
                + withUnsafeBytes(of: length.littleEndian, Array.init) + [inLength > 0 ? 0x80 : 0, 0, UInt8(cdb.count)]
            cbw += cdb + [UInt8](repeating: 0, count: 16 - cdb.count)
            let c = try front.transfer(port: 1, device: 2, endpoint: 2, type: .bulk, isIn: false, data: cbw)
            var data: LocalUSBFrontend.Result?
            if !out.isEmpty { data = try front.transfer(port: 1, device: 2, endpoint: 2, type: .bulk, isIn: false, data: out) }
            if inLength > 0 { data = try front.transfer(port: 1, device: 2, endpoint: 1, type: .bulk, isIn: true, length: inLength) }
            let csw = try front.transfer(port: 1, device: 2, endpoint: 1, type: .bulk, isIn: true, length: 13)
            return Exchange(cbw: c, data: data, csw: csw)
        }

        /// (tag, residue, status) of a CSW.
        static func csw(_ r: LocalUSBFrontend.Result) -> (UInt32, UInt32, UInt8)? {
            let b = r.data
            guard b.count == 13, b[0..<4] == [0x55, 0x53, 0x42, 0x53] else { return nil }
            return (UInt32(b[4]) | UInt32(b[5]) << 8 | UInt32(b[6]) << 16 | UInt32(b[7]) << 24,
                    UInt32(b[8]) | UInt32(b[9]) << 8 | UInt32(b[10]) << 16 | UInt32(b[11]) << 24, b[12])
        }
    }

    static func read10(_ lba: UInt32, _ blocks: UInt16) -> [UInt8] {
        [0x28, 0, UInt8(lba >> 24), UInt8(lba >> 16 & 0xff), UInt8(lba >> 8 & 0xff), UInt8(lba & 0xff), 0, UInt8(blocks >> 8), UInt8(blocks & 0xff), 0]
    }
    static func write10(_ lba: UInt32, _ blocks: UInt16) -> [UInt8] { var c = read10(lba, blocks); c[0] = 0x2A; return c }

    func makeTemporaryDirectory() -> String {
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("softdev-usbfilter-\(getpid())-\(UInt32.random(in: 0...UInt32.max))").path
        try? FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        addTeardownBlock { try? FileManager.default.removeItem(atPath: dir) }
        return dir
    }
}
