import Core
import Devices
import Glibc
import XCTest

/// The `null`, `stats` and `filter` network devices, and the registry's per-class names.
final class NetFilterTests: XCTestCase {
    func testNullTakesAndCountsEverything() throws {
        let null = try XCTUnwrap(try DeviceRegistry.open("null", of: .net) as? NetNullDevice)
        null.fromGuest(NetTestFrames.arp())
        null.fromGuest(NetTestFrames.tcp4(port: 80))
        XCTAssertEqual(null.counts.fromGuest, NetTraffic(frames: 2, bytes: 42 + 74))
        XCTAssertEqual(null.counts.toGuest, NetTraffic())
        null.close()
    }

    func testStatsIsLookedUpPerClass() throws {
        XCTAssertTrue(try DeviceRegistry.open("stats | null", of: .net) is NetStatsFilter)
        XCTAssertTrue(try DeviceRegistry.open("stats | null(size=1M)") is StatsFilter)
        XCTAssertThrowsError(try DeviceRegistry.open("stats | tap(name=x)")) { error in
            XCTAssertTrue("\(error)".contains("not a block device"), "\(error)")
        }
    }

    func testStatsCountsBothWaysAndWritesOneLine() throws {
        let report = makeTemporaryDirectory(self) + "/net-stats.txt"
        let end = CollectingEndpoint()
        let stats = NetStatsFilter(next: end, reportPath: report)
        let up = CollectingReceiver()
        stats.connect(up, accepting: .all)
        stats.fromGuest(NetTestFrames.tcp4(port: 80, payload: 100))
        stats.fromGuest(NetTestFrames.arp())
        end.send(NetTestFrames.udp6())
        XCTAssertEqual(stats.counters.fromGuest, NetTraffic(frames: 2, bytes: 154 + 42))
        XCTAssertEqual(stats.counters.toGuest, NetTraffic(frames: 1, bytes: 74))
        XCTAssertEqual(end.received.count, 2)
        XCTAssertEqual(up.received.count, 1)
        stats.close()
        XCTAssertTrue(end.closed)
        let text = try String(contentsOfFile: report, encoding: .utf8)
        XCTAssertEqual(text.split(separator: "\n").count, 1, text)
        XCTAssertTrue(text.contains("from guest: 2 frames, 196 bytes, 0 dropped; to guest: 1 frames, 74 bytes"), text)
    }

    /// ARP, TCP to 22 and 80, IPv6 UDP.
    let frames = [NetTestFrames.arp(), NetTestFrames.tcp4(port: 22), NetTestFrames.tcp4(port: 80), NetTestFrames.udp6()]

    func passed(_ expression: String) throws -> [Bool] {
        let end = CollectingEndpoint()
        let filter = try PacketFilter(next: end, expression: expression)
        let passed = frames.map { filter.matches($0) }
        for frame in frames { filter.fromGuest(frame) }
        XCTAssertEqual(end.received.count, passed.filter { $0 }.count)
        XCTAssertEqual(filter.counts.fromGuest.drops, UInt64(passed.filter { !$0 }.count))
        return passed
    }

    func testFilterMatchesTcpdumpExpressions() throws {
        XCTAssertEqual(try passed("not port 22"), [true, false, true, true])
        XCTAssertEqual(try passed("tcp"), [false, true, true, false])
        XCTAssertEqual(try passed("arp"), [true, false, false, false])
        XCTAssertEqual(try passed("ip6 and udp"), [false, false, false, true])
        XCTAssertEqual(try passed("tcp dst port 80"), [false, false, true, false])
    }

    func testFilterDirection() throws {
        let end = CollectingEndpoint()
        let filter = try XCTUnwrap(try PacketFilter(next: end, expression: "arp", direction: .toGuest))
        let up = CollectingReceiver()
        filter.connect(up, accepting: .all)
        filter.fromGuest(NetTestFrames.tcp4(port: 80))
        end.send(NetTestFrames.tcp4(port: 80))
        end.send(NetTestFrames.arp())
        XCTAssertEqual(end.received.count, 1, "from the guest nothing is filtered")
        XCTAssertEqual(up.received.map(\.count), [42])
        XCTAssertEqual(filter.counts.toGuest, NetTraffic(frames: 1, bytes: 42, drops: 1))
    }

    func testBadExpressionIsRefusedWithLibpcapsMessage() {
        XCTAssertThrowsError(try DeviceRegistry.open("filter(expr=\"port nonsense and\") | null", of: .net)) { error in
            let text = "\(error)"
            XCTAssertTrue(text.hasPrefix("filter(expr="), text)
            XCTAssertTrue(text.contains("syntax error") || text.contains("unknown port"), text)
        }
        XCTAssertThrowsError(try DeviceRegistry.open("filter(expr=tcp, direction=sideways) | null", of: .net))
    }
}
