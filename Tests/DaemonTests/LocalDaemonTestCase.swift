import Core
import Daemon
import Foundation
import XCTest

/// A test of `softdev serve` on the local hypervisor it embeds, in a scratch directory of its
/// own: `startDaemon` starts one (stopped and removed after the test).
class LocalDaemonTestCase: XCTestCase {
    var directory = ""
    var daemon: SoftDevDaemon?

    override func setUp() {
        directory = FileManager.default.temporaryDirectory
            .appendingPathComponent("softdev-daemon-\(getpid())-\(UInt32.random(in: 0...UInt32.max))").path
    }

    override func tearDown() {
        daemon?.stop()
        try? FileManager.default.removeItem(atPath: directory)
    }

    var choice: HypervisorChoice { HypervisorChoice(kind: .local, localAddress: LocalHypervisorAddress(directory: directory)) }

    func startDaemon(_ config: ServeConfig) throws -> SoftDevDaemon {
        let d = try SoftDevDaemon(config: config, choice: choice, log: { if getenv("SOFTDEV_TEST_LOG") != nil { print($0) } })
        try d.start()
        daemon = d
        return d
    }
}
