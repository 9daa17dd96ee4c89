import Core
import Devices
import Foundation
import XCTest

/// The example filter of the README's section for device authors, as guests and clients see it.
final class FUAFilterTests: XCTestCase {
    /// Records the FUA flag of each write and whether flushes arrive.
    final class Recorder: SynchronousBlockDevice, @unchecked Sendable {
        let name = "recorder"
        let geometry = BlockGeometry(size: 1 << 20)
        let capabilities: BlockCapabilities
        let lock = NSLock()
        var writes: [Bool] = [], flushes = 0
        init(capabilities: BlockCapabilities = [.write, .flush, .fua]) { self.capabilities = capabilities }
        func read(into buffers: IOBuffers, at offset: UInt64) throws(BlockError) { buffers.zero() }
        func write(from buffers: IOBuffers, at offset: UInt64, fua: Bool) throws(BlockError) { lock.withLock { writes.append(fua) } }
        func flush() throws(BlockError) { lock.withLock { flushes += 1 } }
    }

    private func exercise(_ stack: any BlockDevice) throws {
        let buffer = TestBuffer(count: 4096)
        try withExtendedLifetime(buffer) {
            try stack.sync.write(from: buffer.buffers, at: 0, fua: false)
            try stack.sync.write(from: buffer.buffers, at: 4096, fua: true)
        }
        try stack.sync.flush()
    }

    func testModes() throws {
        for (mode, writes, flushes, advertised) in [("none", [false, false], 1, false), ("force", [true, true], 0, true),
                                                    ("pass", [false, true], 1, true)] {
            let below = Recorder()
            let stack = FUAFilter(next: below, mode: FUAFilter.Mode(rawValue: mode)!)
            try exercise(stack)
            XCTAssertEqual(below.writes, writes, "fuamode=\(mode): the writes' FUA flags below")
            XCTAssertEqual(below.flushes, flushes, "fuamode=\(mode): flushes below")
            XCTAssertEqual(stack.capabilities.contains(.fua), advertised, "fuamode=\(mode): FUA advertised")
        }
    }

    func testWrongSpecsAreRefusedWithTheirReason() {
        XCTAssertThrowsError(try DeviceRegistry.open("fua(fuamode=sometimes) | memory(size=1M)")) { error in
            XCTAssertTrue("\(error)".contains("fuamode"), "\(error)")
        }
        XCTAssertThrowsError(try DeviceRegistry.open("fua(fuamode=force) | fua(fuamode=none) | memory(size=1M)")) { error in
            XCTAssertTrue("\(error)".contains("needs a device below that makes a write durable by itself"), "\(error)")
        }
        XCTAssertNoThrow(try DeviceRegistry.open("fua(fuamode=force) | memory(size=1M)"))
    }
}
