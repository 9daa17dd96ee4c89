import BlockTap
import Core
import XCTest

/// The ring thread's poll before it sleeps (`BlkifBackendOptions.pollMicroseconds`).
final class BlkifPollingTests: XCTestCase {
    func lab(pollMicroseconds: Int) throws -> LocalLab {
        var options = BlkifBackendOptions()
        options.pollMicroseconds = pollMicroseconds
        let lab = try LocalLab(options: options)
        addTeardownBlock { lab.shutdown() }
        return lab
    }

    func block(_ i: Int) -> [UInt8] { (0..<4096).map { UInt8(truncatingIfNeeded: $0 &* 13 &+ i) } }

    /// While the ring thread polls it leaves req_event behind, so a frontend at queue depth 1
    /// finds that the backend needs no notification: after the first request, none is sent.
    func testAPollingBackendTakesRequestsWithoutNotifications() throws {
        let lab = try lab(pollMicroseconds: 1_000_000)
        let disk = TestDisk(size: 4 << 20)
        let (guest, paths) = try lab.guestWithDisk(disk)
        let front = try LocalBlockFrontend(hypervisor: guest, frontendPath: paths.frontendPath)
        defer { try? front.close() }
        for i in 0..<50 { try front.write(sector: UInt64(i * 8), block(i)) }
        for i in 0..<50 { XCTAssertEqual(try front.read(sector: UInt64(i * 8), count: 4096), block(i), "block \(i)") }
        // The first request woke the thread; a few more may have met it between a poll's end
        // and its next turn (a 1 s window makes that rare), never one per request.
        XCTAssertLessThan(front.queues[0].notifications, 10, "of 100 requests")
    }

    /// A frontend that pauses longer than the window: each poll misses, the thread asks for a
    /// notification before it sleeps, and every request is still served (none is left on the
    /// ring with a sleeping backend), with polling off, short and long.
    func testPausesLongerThanTheWindowLoseNoRequest() throws {
        for window in [0, 200, 100_000] {
            let lab = try lab(pollMicroseconds: window)
            let disk = TestDisk(size: 4 << 20)
            let (guest, paths) = try lab.guestWithDisk(disk)
            let front = try LocalBlockFrontend(hypervisor: guest, frontendPath: paths.frontendPath)
            for i in 0..<30 {
                try front.write(sector: UInt64(i * 8), block(i + window))
                if i % 3 == 0 { usleep(2000) }
                XCTAssertEqual(try front.read(sector: UInt64(i * 8), count: 4096), block(i + window), "window \(window) µs, block \(i)")
            }
            if window == 0 { XCTAssertGreaterThanOrEqual(front.queues[0].notifications, 30, "a backend that never polls is notified") }
            try front.close()
        }
    }
}
