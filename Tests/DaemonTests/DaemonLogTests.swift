import Daemon
import Logging
import Observability
import Synchronization
import XCTest

/// The daemon's lines: time, level, message, metadata; Core's device path moved into metadata.
final class DaemonLogTests: XCTestCase {
    /// The lines a logger at `level` writes while `body` runs.
    private func lines(at level: Logger.Level, _ body: (Logger) -> Void) -> [String] {
        let written = Mutex<[String]>([])
        body(DaemonLog.logger(level: level) { line in written.withLock { $0.append(line) } })
        return written.withLock { $0 }
    }

    func testCoreMessagesAboutADeviceCarryItsPathAsMetadata() {
        let written = lines(at: .info) { logger in
            let core = DaemonLog.messages(to: logger)
            core("/local/domain/0/backend/softdev-vbd/3/51712: cannot start: the device stack failed")
            core("/local/domain/0/backend/softdev-vbd/3/51712: connected to domain 3: queues=1")
            core("/local/domain/0/backend/softdev-vbd/3/51712: InitWait -> Connected")
        }
        XCTAssertEqual(written.count, 2, "\(written)")   // the state step is debug
        let line = written[0]
        XCTAssertTrue(line.range(of: #"^softdev \d\d:\d\d:\d\d\.\d\d\d error cannot start: "#, options: .regularExpression) != nil, line)
        XCTAssertTrue(line.hasSuffix(" class=block device=/local/domain/0/backend/softdev-vbd/3/51712 domain=3"), line)
        XCTAssertFalse(line.contains("51712: cannot"), line)
        XCTAssertTrue(written[1].contains(" info connected to domain 3: queues=1 class=block"), written[1])
    }

    func testTheLevelFiltersAndMetadataWithSpacesIsQuoted() {
        let written = lines(at: .debug) { logger in
            logger.trace("not written")
            logger.debug("a step")
            logger.notice("serving", metadata: ["spec": "stats | memory(size=1G)", "empty": ""])
        }
        XCTAssertEqual(written.count, 2, "\(written)")
        XCTAssertTrue(written[0].hasSuffix(" debug a step"), written[0])
        XCTAssertTrue(written[1].hasSuffix(#" notice serving empty="" spec="stats | memory(size=1G)""#), written[1])
    }
}
