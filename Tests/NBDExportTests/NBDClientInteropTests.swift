import Core
import Foundation
@testable import NBDExport
import XCTest

/// The export as real clients see it: qemu-img, qemu-io, nbdinfo, nbdcopy.
final class NBDClientInteropTests: XCTestCase {
    func testQemuImgInfoReportsTheDeviceSize() throws {
        let f = try ServerFixture([NBDExport(name: "disk", device: SparseTestDevice(size: 64 << 20))])
        defer { f.stop() }
        let r = try runTool(.qemuImg, ["info", "--output=json", f.uri("disk")])
        XCTAssertSucceeded(r, "qemu-img info")
        XCTAssertTrue(r.stdout.contains("\"virtual-size\": 67108864"), r.stdout)
    }

    func testQemuIOUnalignedWriteReadsBack() throws {
        let f = try ServerFixture([NBDExport(name: "disk", device: SparseTestDevice(size: 16 << 20))])
        defer { f.stop() }
        let r = try runTool(.qemuIO, ["-f", "raw", "-c", "write -P 0xab 1 1000", "-c", "read -P 0xab 1 1000",
                                  "-c", "read -P 0 0 1", "-c", "read -P 0 1001 23", f.uri("disk")])
        XCTAssertSucceeded(r, "qemu-io")
        XCTAssertFalse(r.stdout.contains("Pattern verification failed"), r.stdout)
        XCTAssertTrue(r.stdout.contains("wrote 1000/1000 bytes at offset 1"), r.stdout)
        XCTAssertTrue(r.stdout.contains("read 1000/1000 bytes at offset 1"), r.stdout)
    }

    func testQemuImgConvertToAndFromRawCompareEqual() throws {
        let f = try ServerFixture([NBDExport(name: "disk", device: SparseTestDevice(size: 32 << 20))])
        defer { f.stop() }
        let source = f.path("source.raw"), back = f.path("back.raw")
        try writePatternFile(source, size: 32 << 20)
        XCTAssertSucceeded(try runTool(.qemuImg, ["convert", "-n", "-f", "raw", "-O", "raw", source, f.uri("disk")]), "convert to NBD")
        XCTAssertSucceeded(try runTool(.qemuImg, ["compare", "-f", "raw", "-F", "raw", source, f.uri("disk")]), "compare")
        XCTAssertSucceeded(try runTool(.qemuImg, ["convert", "-f", "raw", "-O", "raw", f.uri("disk"), back]), "convert from NBD")
        XCTAssertEqual(FileManager.default.contents(atPath: back), FileManager.default.contents(atPath: source))
    }

    func testNbdinfoListsBothExportsWithDescriptions() throws {
        let f = try ServerFixture([
            NBDExport(name: "alpha", device: SparseTestDevice(size: 1 << 20), description: "first disk"),
            NBDExport(name: "beta", device: SparseTestDevice(size: 2 << 20), readOnly: true, description: "second disk"),
        ])
        defer { f.stop() }
        let r = try runTool(.nbdinfo, ["--list", "--json", f.uri()])
        XCTAssertSucceeded(r, "nbdinfo --list")
        let json = try JSONSerialization.jsonObject(with: Data(r.stdout.utf8)) as! [String: Any]
        let exports = json["exports"] as! [[String: Any]]
        XCTAssertEqual(exports.map { $0["export-name"] as? String }, ["alpha", "beta"])
        XCTAssertEqual(exports.map { $0["description"] as? String }, ["first disk", "second disk"])
        XCTAssertEqual(exports.map { $0["export-size"] as? Int }, [1 << 20, 2 << 20])
        XCTAssertEqual(exports.map { $0["is_read_only"] as? Bool }, [false, true])
    }

    func testNbdinfoMapShowsHolesAndDataWhereTheyAre() throws {
        let device = SparseTestDevice(size: 8 << 20)
        // Data at [1 MiB, 1 MiB + 64 KiB) and [4 MiB, 5 MiB); holes elsewhere.
        let data = UnsafeMutableRawPointer.allocate(byteCount: 1 << 20, alignment: 4096)
        defer { data.deallocate() }
        memset(data, 0x5a, 1 << 20)
        var v = iovec(iov_base: data, iov_len: 64 << 10)
        try device.write(from: IOBuffers(&v, count: 1), at: 1 << 20, fua: false)
        v.iov_len = 1 << 20
        try device.write(from: IOBuffers(&v, count: 1), at: 4 << 20, fua: false)
        let f = try ServerFixture([NBDExport(name: "sparse", device: device)])
        defer { f.stop() }
        let r = try runTool(.nbdinfo, ["--map", "--json", f.uri("sparse")])
        XCTAssertSucceeded(r, "nbdinfo --map")
        let map = try JSONSerialization.jsonObject(with: Data(r.stdout.utf8)) as! [[String: Any]]
        let got = map.map { [$0["offset"] as! Int, $0["length"] as! Int, $0["type"] as! Int] }
        // nbdinfo's types: 0 data, 3 hole and zero.
        let mib = 1 << 20, k64 = 64 << 10
        let expected: [[Int]] = [[0, mib, 3], [mib, k64, 0], [mib + k64, 3 * mib - k64, 3], [4 * mib, mib, 0], [5 * mib, 3 * mib, 3]]
        XCTAssertEqual(got, expected)
    }

    func testNbdcopyBothWaysIsByteIdentical() throws {
        let f = try ServerFixture([NBDExport(name: "disk", device: SparseTestDevice(size: 24 << 20, asyncDelay: 50))])
        defer { f.stop() }
        let source = f.path("source.raw"), back = f.path("back.raw")
        try writePatternFile(source, size: 24 << 20, seed: 9)
        XCTAssertSucceeded(try runTool(.nbdcopy, [source, f.uri("disk")]), "nbdcopy to NBD")
        XCTAssertSucceeded(try runTool(.nbdcopy, [f.uri("disk"), back]), "nbdcopy from NBD")
        XCTAssertEqual(FileManager.default.contents(atPath: back), FileManager.default.contents(atPath: source))
    }
}
