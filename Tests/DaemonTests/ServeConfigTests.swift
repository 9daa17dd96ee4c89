import BlockTap
import Daemon
import Devices
import Foundation
import XCTest

final class ServeConfigTests: XCTestCase {
    func testTheDocumentedExampleParses() throws {
        let config = try ServeConfig.parse("""
            hypervisor = "local"
            local-directory = "/tmp/x"
            poll-us = 0
            [blkif]
            max-queues = 2
            max-ring-page-order = 3
            max-indirect-segments = 64
            persistent-grants = 0
            [[disk]]
            domain = "guest1"
            vdev = "xvdb"
            device = "stats | file(path=/srv/guest1.img)"
            readonly = true
            [[disk]]
            domain = "7"
            vdev = "xvdc"
            device = "memory(size=1G)"
            [nbd]
            listen = ["unix:/run/softdev/nbd.sock", "tcp:127.0.0.1:10809"]
            [[export]]
            name = "scratch"
            device = "memory(size=1G)"
            description = "scratch space"
            """)
        XCTAssertEqual(config.hypervisor, .local)
        XCTAssertEqual(config.localDirectory, "/tmp/x")
        XCTAssertEqual(config.blkif.maxQueues, 2)
        XCTAssertEqual(config.blkif.maxRingPageOrder, 3)
        XCTAssertEqual(config.blkif.maxIndirectSegments, 64)
        XCTAssertEqual(config.blkif.persistentGrantsPerRing, 0)
        XCTAssertEqual(config.disks.count, 2)
        XCTAssertEqual(config.disks[0].vdev.deviceID, 51728)
        XCTAssertTrue(config.disks[0].readOnly)
        XCTAssertEqual(config.disks[1].domain, "7")
        XCTAssertFalse(config.disks[1].readOnly)
        XCTAssertEqual(config.nbdListen, ["unix:/run/softdev/nbd.sock", "tcp:127.0.0.1:10809"])
        XCTAssertEqual(config.pollMicroseconds, 0)
        XCTAssertEqual(config.blkif.pollMicroseconds, 0)
        XCTAssertEqual(config.exports, [.init(name: "scratch", device: "memory(size=1G)", description: "scratch space")])
    }

    func testUSBRulesAreReadAtStartAndAWrongRuleIsRefusedWithItsPlace() throws {
        let rules = FileManager.default.temporaryDirectory.appendingPathComponent("softdev-usb-rules-\(getpid()).conf").path
        defer { try? FileManager.default.removeItem(atPath: rules) }
        try "allow id 0781:5567 via-port \"1-2\"\n".write(toFile: rules, atomically: true, encoding: .utf8)
        let config = try ServeConfig.parse("[usbif]\nrules = \"\(rules)\"\n[[usb]]\ndomain = \"g\"\nvdev = \"1\"\ndevice = \"host(id=0781:5567)\"\n")
        let policy = try XCTUnwrap(config.usbPolicy)
        XCTAssertEqual(policy.evaluate(USBDeviceAttributes(vendorID: 0x0781, productID: 0x5567, viaPort: "1-2")).target, .allow)
        XCTAssertEqual(policy.evaluate(USBDeviceAttributes(vendorID: 0x0781, productID: 0x5567, viaPort: "1-3")).target, .block)
        XCTAssertEqual(config.attachments.map(\.device), ["host(id=0781:5567)"])
        XCTAssertNil(try ServeConfig.parse("").usbPolicy)

        try "allow id 0781:5567\nallow frobnicate\n".write(toFile: rules, atomically: true, encoding: .utf8)
        XCTAssertThrowsError(try ServeConfig.parse("[usbif]\nrules = \"\(rules)\"\n", file: "c.toml")) {
            XCTAssertTrue("\($0)".hasPrefix("c.toml [usbif]: rules: \(rules):2:"), "\($0)")
        }
    }

    func testEmptyConfigKeepsDefaults() throws {
        let config = try ServeConfig.parse("")
        XCTAssertNil(config.hypervisor)
        XCTAssertEqual(config.blkif.maxQueues, BlkifBackendOptions().maxQueues)
        XCTAssertTrue(config.disks.isEmpty && config.exports.isEmpty)
        XCTAssertEqual(config.pollMicroseconds, 50)
    }

    func testMistakesAreNamedWithTheirPlace() {
        let cases: [(String, String)] = [
            ("hypervisor = \"kvm\"", "hypervisor = \"kvm\": use one of auto, xen, local"),
            ("hypervisr = \"xen\"", "c.toml: unknown key hypervisr"),
            ("[blkif]\nmax-queues = 0", "c.toml [blkif]: max-queues must be an integer in 1...16"),
            ("[blkif]\nmax-queue = 2", "c.toml [blkif]: unknown key max-queue"),
            ("[[disk]]\ndomain = \"g\"\nvdev = \"sda\"\ndevice = \"null\"", "'sda' is not a virtual disk name"),
            ("[[disk]]\ndomain = \"g\"\nvdev = \"xvda\"", "c.toml [[disk]] #1: device is missing"),
            ("[[disk]]\ndomain = \"g\"\nvdev = \"xvda\"\ndevice = \"flie(path=x)\"", "c.toml [[disk]] #1: device: unknown device 'flie'"),
            ("[[disk]]\ndomain = \"g\"\nvdev = \"xvda\"\ndevice = \"file(pth=x)\"", "file: unknown parameter 'pth'"),
            ("[[disk]]\ndomain = \"g\"\nvdev = \"xvda\"\ndevice = \"null\"\n[[disk]]\ndomain = \"g\"\nvdev = \"xvda\"\ndevice = \"null\"",
             "domain g has xvda twice"),
            ("[[export]]\nname = \"a\"\ndevice = \"null\"\nreadonly = \"yes\"", "readonly must be true or false"),
            ("[nbd]\nlisten = 5", "listen must be a string or a list of strings"),
            ("poll-us = -1", "c.toml: poll-us must be an integer in 0...1000000"),
            ("[nbd]\npoll-us = 5", "c.toml [nbd]: unknown key poll-us"),
            ("[[export]]\nname = \"a\"\ndevice = \"null\"\n[[export]]\nname = \"a\"\ndevice = \"null\"", "export name 'a' is used twice"),
            ("disk = [", "c.toml:1:"),
        ]
        for (text, expected) in cases {
            XCTAssertThrowsError(try ServeConfig.parse(text, file: "c.toml"), text) { error in
                XCTAssertTrue("\(error)".contains(expected), "\(text): got '\(error)', expected '\(expected)'")
            }
        }
    }

    func testLoadReportsAMissingFile() {
        XCTAssertThrowsError(try ServeConfig.load(path: "/nonexistent/softdev.toml")) { error in
            XCTAssertTrue("\(error)".contains("/nonexistent/softdev.toml: cannot read the config file"), "\(error)")
        }
    }

    func testLogLevelAndMetricsAreReadAndOffByDefault() throws {
        let config = try ServeConfig.parse("log-level = \"debug\"\n[metrics]\nlisten = \"127.0.0.1:9464\"")
        XCTAssertEqual(config.logLevel, .debug)
        XCTAssertEqual(config.metricsListen, MetricsListenAddress(host: "127.0.0.1", port: 9464))
        XCTAssertEqual(try ServeConfig.parse("[metrics]\nlisten = \"[::1]:0\"").metricsListen, MetricsListenAddress(host: "::1", port: 0))
        let empty = try ServeConfig.parse("[metrics]")
        XCTAssertNil(empty.metricsListen)
        XCTAssertNil(empty.logLevel)
    }

    func testABadLogLevelOrMetricsAddressIsNamedClearly() {
        let cases: [(String, String)] = [
            ("log-level = \"verbose\"", "c.toml: log-level = \"verbose\": use one of trace, debug, info, notice, warning, error, critical"),
            ("log-level = 3", "c.toml: log-level must be a string"),
            ("[metrics]\nlisten = \"9464\"", "c.toml [metrics]: listen = \"9464\": expected HOST:PORT, e.g. \"127.0.0.1:9464\""),
            ("[metrics]\nlisten = \"127.0.0.1\"", "c.toml [metrics]: listen = \"127.0.0.1\": expected HOST:PORT"),
            ("[metrics]\nlisten = \"127.0.0.1:99999\"", "listen = \"127.0.0.1:99999\": expected HOST:PORT"),
            ("[metrics]\nlisten = \"unix:/run/m.sock\"", "listen = \"unix:/run/m.sock\": expected HOST:PORT"),
            ("[metrics]\nlisten = \"::1:9464\"", "listen = \"::1:9464\": expected HOST:PORT"),
            ("[metrics]\nlisten = 9464", "c.toml [metrics]: listen must be a string"),
            ("[metrics]\nport = 9464", "c.toml [metrics]: unknown key port"),
        ]
        for (text, expected) in cases {
            XCTAssertThrowsError(try ServeConfig.parse(text, file: "c.toml"), text) { error in
                XCTAssertTrue("\(error)".contains(expected), "\(text): got '\(error)', expected '\(expected)'")
            }
        }
    }
}
