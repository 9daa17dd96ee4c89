import Core
import Devices
import Foundation
import Glibc
import TestPeers
import XCTest

/// TAP devices and `NetLink`, for real: two network namespaces, one TAP interface in each,
/// joined by a link; ping, a filter that drops ICMP, and iperf3 TCP with the offloads on.
final class NetLinkTests: XCTestCase {
    @discardableResult
    func sh(_ arguments: [String], check: Bool = true) throws -> (status: Int32, output: String) {
        let (status, output) = try Peers.run(arguments[0], Array(arguments.dropFirst()))
        if check { XCTAssertEqual(status, 0, "\(arguments.joined(separator: " ")): \(output)") }
        return (status, output)
    }

    /// Root and /dev/net/tun, or the test is skipped saying why.
    func requireTAP() throws {
        guard getuid() == 0 else { print("skipping: TAP tests need root"); throw XCTSkip("TAP tests need root") }
        guard access("/dev/net/tun", R_OK | W_OK) == 0 else {
            print("skipping: /dev/net/tun is missing (modprobe tun)"); throw XCTSkip("/dev/net/tun is missing (modprobe tun)")
        }
    }

    /// Names unique to this process, so parallel runs do not collide.
    let tag = String(getpid() % 100_000)

    /// Opens `spec` (two TAPs named by `names`), moves each TAP into its own namespace with
    /// 10.77.0.1/24 and 10.77.0.2/24, runs `body`, and removes everything however it ends.
    func withLinkedNamespaces(_ spec: (String, String) -> String, _ body: (NetLink, _ nsA: String, _ nsB: String) throws -> Void) throws {
        try requireTAP()
        let ip = try Peers.program("ip", package: "iproute2")
        let (nsA, nsB, tapA, tapB) = ("sdnsA\(tag)", "sdnsB\(tag)", "sdA\(tag)", "sdB\(tag)")
        try sh([ip, "netns", "add", nsA]); try sh([ip, "netns", "add", nsB])
        defer { for ns in [nsA, nsB] { _ = try? sh([ip, "netns", "del", ns], check: false) } }
        let link = try NetLink(spec: spec(tapA, tapB))
        defer { link.close() }
        for (ns, tap, address) in [(nsA, tapA, "10.77.0.1/24"), (nsB, tapB, "10.77.0.2/24")] {
            try sh([ip, "link", "set", tap, "netns", ns])
            try sh([ip, "-n", ns, "addr", "add", address, "dev", tap])
            try sh([ip, "-n", ns, "link", "set", tap, "up"])
            try sh([ip, "-n", ns, "link", "set", "lo", "up"])
        }
        try body(link, nsA, nsB)
    }

    func testPingAcrossTwoTAPs() throws {
        try withLinkedNamespaces({ "tap(name=\($0)) | tap(name=\($1))" }) { link, nsA, _ in
            let ip = try Peers.program("ip", package: "iproute2")
            _ = try Peers.program("ping", package: "iputils-ping")
            let (status, output) = try sh([ip, "netns", "exec", nsA, "ping", "-c", "3", "-W", "2", "10.77.0.2"])
            XCTAssertEqual(status, 0, output)
            XCTAssertTrue(output.contains("3 received"), output)
            let a = try XCTUnwrap(link.first as? TapDevice), b = try XCTUnwrap(link.stack as? TapDevice)
            XCTAssertGreaterThanOrEqual(a.counts.toGuest.frames, 4, "ARP and three echo requests read from A")
            XCTAssertGreaterThanOrEqual(b.counts.fromGuest.frames, 4, "and written to B")
            XCTAssertGreaterThanOrEqual(a.counts.fromGuest.frames, 4, "the replies written to A")
        }
    }

    func testFilterDropsPingsButPassesARP() throws {
        try withLinkedNamespaces({ "tap(name=\($0)) | filter(expr=\"not icmp\") | tap(name=\($1))" }) { link, nsA, _ in
            let ip = try Peers.program("ip", package: "iproute2")
            _ = try Peers.program("ping", package: "iputils-ping")
            let (status, output) = try sh([ip, "netns", "exec", nsA, "ping", "-c", "3", "-W", "1", "10.77.0.2"], check: false)
            XCTAssertNotEqual(status, 0, output)
            XCTAssertTrue(output.contains("0 received"), output)
            let filter = try XCTUnwrap(link.stack as? PacketFilter)
            XCTAssertGreaterThanOrEqual(filter.counts.fromGuest.drops, 3, "the echo requests")
            XCTAssertGreaterThanOrEqual(filter.counts.fromGuest.frames, 1, "the ARP request passed")
            XCTAssertGreaterThanOrEqual(filter.counts.toGuest.frames, 1, "and the ARP reply")
            let neighbour = try sh([ip, "-n", nsA, "neigh", "show", "10.77.0.2"]).output
            XCTAssertTrue(neighbour.contains("lladdr"), "A resolved B over ARP: \(neighbour)")
        }
    }

    func testIperf3TCPWithOffloads() throws {
        let iperf3 = try Peers.program("iperf3", package: "iperf3")
        try withLinkedNamespaces({ "tap(name=\($0)) | tap(name=\($1))" }) { link, nsA, nsB in
            let ip = try Peers.program("ip", package: "iproute2")
            let a = try XCTUnwrap(link.first as? TapDevice), b = try XCTUnwrap(link.stack as? TapDevice)
            XCTAssertEqual(a.kernelOffloads, 7, "CSUM|TSO4|TSO6: the other TAP takes them all")
            XCTAssertEqual(b.kernelOffloads, 7)
            let server = Process()
            server.executableURL = URL(fileURLWithPath: ip)
            server.arguments = ["netns", "exec", nsB, iperf3, "-s", "-1", "-p", "5201"]
            server.standardOutput = FileHandle.nullDevice
            server.standardError = FileHandle.nullDevice
            try server.run()
            defer { if server.isRunning { server.terminate() }; server.waitUntilExit() }
            // The server may still be starting (a loaded machine): the client tries again while
            // it cannot connect, for up to 10 s.
            var output = ""
            for _ in 0..<100 {
                usleep(100_000)
                output = try sh([ip, "netns", "exec", nsA, iperf3, "-c", "10.77.0.2", "-p", "5201", "-t", "3", "-J"], check: false).output
                if !output.contains("unable to connect") { break }
            }
            let json = try XCTUnwrap(try JSONSerialization.jsonObject(with: Data(output.utf8)) as? [String: Any], output)
            XCTAssertNil(json["error"], "\(json["error"] ?? "")")
            let end = try XCTUnwrap(json["end"] as? [String: Any])
            let received = try XCTUnwrap((end["sum_received"] as? [String: Any])?["bytes"] as? NSNumber)
            XCTAssertGreaterThan(received.int64Value, 0)
            XCTAssertGreaterThan(a.counts.toGuest.bytes / max(a.counts.toGuest.frames, 1), 1514,
                                 "the kernel hands A segments larger than the MTU (TSO), and B takes them")
            print("iperf3 across the link: \(received.int64Value) bytes; A read \(a.counts.toGuest), B wrote \(b.counts.fromGuest)")
        }
    }

    func testTAPOpensMultiQueueAndRefusesBadNames() throws {
        XCTAssertThrowsError(try DeviceRegistry.open("tap(name=abcdefghijklmnopq)", of: .net)) {
            XCTAssertTrue("\($0)".contains("shorter name"), "\($0)")
        }
        try requireTAP()
        let ip = try Peers.program("ip", package: "iproute2")
        let name = "sdmq\(tag)"
        let tap = try XCTUnwrap(try DeviceRegistry.open("tap(name=\(name), queues=2)", of: .net) as? TapDevice)
        XCTAssertEqual(tap.queues, 2)
        let details = try sh([ip, "-d", "link", "show", name]).output
        XCTAssertTrue(details.contains("UP") && details.contains("multi_queue") && details.contains("vnet_hdr on"), details)
        let up = CollectingReceiver()
        tap.connect(up, accepting: [.checksum])
        XCTAssertEqual(tap.kernelOffloads, 1, "TSO only with large frames")
        tap.fromGuest(NetTestFrames.arp())
        var second = NetTestFrames.arp(); second.queue = 3
        tap.fromGuest(second)
        XCTAssertEqual(tap.counts.fromGuest.frames, 2)
        tap.close()
        XCTAssertNotEqual(try sh([ip, "link", "show", name], check: false).status, 0, "the interface goes with the device")
    }

    /// Frames longer than the copy limit are read straight into a frame's bytes, which the
    /// reader reuses only when nobody kept the last one: a receiver that keeps every frame
    /// gets each with its own bytes.
    func testLargeFramesAReceiverKeepsAreNotOverwritten() throws {
        try requireTAP()
        let ip = try Peers.program("ip", package: "iproute2")
        let name = "sdbig\(tag)"
        let tap = try XCTUnwrap(try DeviceRegistry.open("tap(name=\(name))", of: .net) as? TapDevice)
        defer { tap.close() }
        try sh([ip, "link", "set", name, "mtu", "9000"])
        let up = CollectingReceiver()
        tap.connect(up, accepting: .all)
        // Frames sent on a packet socket bound to the interface go out through the TAP: to its reader.
        let socket = Glibc.socket(AF_PACKET, Int32(SOCK_RAW.rawValue), 0)
        XCTAssertGreaterThanOrEqual(socket, 0)
        defer { Glibc.close(socket) }
        // struct sockaddr_ll (linux/if_packet.h, not in Glibc's module): family, protocol,
        // ifindex, hatype, pkttype, halen, addr[8].
        var address = [UInt8](repeating: 0, count: 20)
        withUnsafeBytes(of: UInt16(AF_PACKET)) { address.replaceSubrange(0..<2, with: $0) }
        withUnsafeBytes(of: Int32(if_nametoindex(name))) { address.replaceSubrange(4..<8, with: $0) }
        address[11] = 6
        let sizes = [3000, 5000, 4000]
        for (i, size) in sizes.enumerated() {
            var frame = [UInt8](repeating: UInt8(0x40 + i), count: size)
            frame.replaceSubrange(0..<14, with: [0x02, 0, 0, 0, 0, 1, 0x02, 0, 0, 0, 0, 2, 0x88, 0xb5])
            let sent = address.withUnsafeBytes {
                sendto(socket, frame, frame.count, 0, $0.baseAddress!.assumingMemoryBound(to: sockaddr.self), socklen_t($0.count))
            }
            XCTAssertEqual(sent, size, String(cString: strerror(errno)))
        }
        var waited = 0
        while up.received.filter({ $0.count > 2048 }).count < sizes.count && waited < 200 { usleep(10_000); waited += 1 }
        let big = up.received.filter { $0.count > 2048 }
        XCTAssertEqual(big.map(\.count), sizes)
        for (i, frame) in big.enumerated() {
            XCTAssertTrue(frame.bytes[14...].allSatisfy { $0 == UInt8(0x40 + i) }, "frame \(i) kept its own bytes")
        }
    }

    func testLinkErrors() {
        XCTAssertThrowsError(try NetLink(spec: "null")) { XCTAssertTrue("\($0)".contains("two endpoints"), "\($0)") }
        XCTAssertThrowsError(try NetLink(spec: "stats | null")) { XCTAssertTrue("\($0)".contains("starts with an endpoint"), "\($0)") }
        XCTAssertThrowsError(try NetLink(spec: "null | bogus")) { XCTAssertTrue("\($0)".contains("unknown device"), "\($0)") }
    }

    func testLinkBetweenSwitchPortsCarriesFrames() throws {
        let link = try NetLink(spec: "switch(name=linked\(tag)) | stats | null")
        let other = EthernetSwitch.port(of: "linked\(tag)")
        defer { other.close(); link.close() }
        other.connect(CollectingReceiver(), accepting: .all)
        other.fromGuest(NetTestFrames.arp())
        XCTAssertEqual((link.stack as? NetStatsFilter)?.counters.fromGuest.frames, 1)
    }

    /// Waits (up to 20 s) until `value` reaches `target`; returns what it last read.
    func waitFor(_ target: UInt64, _ value: () -> UInt64?) -> UInt64? {
        var last = value()
        for _ in 0..<2000 where last != target {
            usleep(10_000)
            last = value()
        }
        return last
    }

    func testAGeneratorAtEitherEndOfALinkSendsItsCountAndStops() throws {
        // First: its frames go down the stack.
        let down = try NetLink(spec: "generator(size=100, count=1000) | stats | null")
        let stats = try XCTUnwrap(down.stack as? NetStatsFilter)
        XCTAssertEqual(waitFor(1000) { stats.counters.fromGuest.frames }, 1000)
        XCTAssertEqual(stats.counters.fromGuest.bytes, 100_000)
        down.close()
        XCTAssertEqual(stats.counters.fromGuest.frames, 1000, "not one frame past the count")
        XCTAssertEqual(stats.counters.toGuest.frames, 0)

        // Last: up the stack, to the first endpoint.
        let up = try NetLink(spec: "null | stats | generator(size=1514, count=300)")
        let upStats = try XCTUnwrap(up.stack as? NetStatsFilter)
        let sink = try XCTUnwrap(up.first as? NetNullDevice)
        XCTAssertEqual(waitFor(300) { sink.counts.fromGuest.frames }, 300)
        up.close()
        XCTAssertEqual(upStats.counters.toGuest.frames, 300)
        XCTAssertEqual(sink.counts.fromGuest.bytes, 300 * 1514)
    }

    /// A paced generator at either end: its own thread sends, the link asks it for nothing.
    func testAPacedGeneratorAtEitherEndOfALinkSendsItsCount() throws {
        let down = try NetLink(spec: "generator(size=100, count=500, rate=50k) | stats | null")
        let stats = try XCTUnwrap(down.stack as? NetStatsFilter)
        XCTAssertEqual(waitFor(500) { stats.counters.fromGuest.frames }, 500)
        down.close()
        XCTAssertEqual(stats.counters.fromGuest.frames, 500)
        let up = try NetLink(spec: "null | stats | generator(size=100, count=200, rate=50k)")
        let sink = try XCTUnwrap(up.first as? NetNullDevice)
        XCTAssertEqual(waitFor(200) { sink.counts.fromGuest.frames }, 200)
        up.close()
    }

    func testAGeneratorWithNoEndStopsWhenTheLinkCloses() throws {
        let link = try NetLink(spec: "generator(size=64) | stats | null")
        let stats = try XCTUnwrap(link.stack as? NetStatsFilter)
        for _ in 0..<2000 where stats.counters.fromGuest.frames < 10_000 { usleep(10_000) }
        XCTAssertGreaterThanOrEqual(stats.counters.fromGuest.frames, 10_000, "frames keep coming with no count")
        link.close()
        let after = stats.counters.fromGuest.frames
        usleep(50_000)
        XCTAssertEqual(stats.counters.fromGuest.frames, after, "the link's thread stopped at close")
    }
}
