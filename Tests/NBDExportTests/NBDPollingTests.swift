import Core
@testable import NBDExport
import NBDWire
import XCTest

final class NBDPollingTests: XCTestCase {
    /// A client that thinks between requests (so every poll misses) and one that does not, with
    /// polling on and off: every reply is right either way.
    func testClientsThatPauseAreServedWithAndWithoutPolling() throws {
        for window in [0, 50, 5000] {
            let f = try ServerFixture([NBDExport(name: "d", device: SparseTestDevice(size: 1 << 20))], pollMicroseconds: window)
            defer { f.stop() }
            let c = try RawNBDClient(socketPath: f.socketPath)
            XCTAssertNotNil(c.go("d"))
            for i in 0..<40 {
                let block = [UInt8](repeating: UInt8(i + 1), count: 4096)
                c.request(NBD.Command.write.rawValue, cookie: UInt64(2 * i), offset: UInt64(i) * 4096, length: 4096, payload: block)
                XCTAssertEqual(c.simpleReply()?.error, 0)
                if i % 4 == 0 { usleep(2000) }
                c.request(NBD.Command.read.rawValue, cookie: UInt64(2 * i + 1), offset: UInt64(i) * 4096, length: 4096)
                let r = c.simpleReply(dataLength: 4096)
                XCTAssertEqual(r?.cookie, UInt64(2 * i + 1))
                XCTAssertEqual(r?.data, block, "window \(window) µs, block \(i)")
            }
        }
    }
}
