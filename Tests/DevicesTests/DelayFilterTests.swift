import Core
import Devices
import Dispatch
import XCTest

final class DelayFilterTests: XCTestCase {
    private func milliseconds(_ body: () throws -> Void) rethrows -> Double {
        let start = DispatchTime.now()
        try body()
        return Double(DispatchTime.now().uptimeNanoseconds - start.uptimeNanoseconds) / 1e6
    }

    func testDelaysTheChosenOperations() throws {
        let device = try DeviceRegistry.open("delay(delay-read=200ms, delay-write=0) | memory(size=1M)")
        XCTAssertGreaterThanOrEqual(try milliseconds { _ = try device.readBytes(512, at: 0) }, 200)
        let buffers = (0..<4).map { _ in TestBuffer(count: 512) }
        let completions = Completions()
        let elapsed = milliseconds {
            for (i, buffer) in buffers.enumerated() {
                device.submit(device.readRequest(buffer, at: 0), completion: completions.completion(UInt64(i)))
            }
            XCTAssertEqual(completions.wait(for: 4).values.filter { $0 == .success }.count, 4)
        }
        XCTAssertGreaterThanOrEqual(elapsed, 200)
        XCTAssertLessThan(elapsed, 3 * 200, "requests in flight wait together, not one after another")
        XCTAssertLessThan(try milliseconds { try device.writePattern(512, seed: 1, at: 0) }, 200)
    }

    func testDelayAppliesToEveryOperationUnlessOverridden() throws {
        let device = try XCTUnwrap(try DeviceRegistry.open("delay(delay=0.25, delay-flush=1ms) | null(size=1M)") as? DelayFilter)
        XCTAssertEqual(device.delays, [250_000_000, 250_000_000, 1_000_000, 250_000_000, 250_000_000])
        XCTAssertEqual(specError("delay(delay-read=fast) | null(size=1M)"),
                       "delay: delay-read 'fast' is not a duration (use e.g. 2ms, 0.5 or 1s, at most an hour)")
    }
}
