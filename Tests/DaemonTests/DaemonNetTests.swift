import Core
import Daemon
import Devices
import Foundation
import NetTap
import XCTest
import XenStore

/// The daemon's network class on the local hypervisor it embeds: `[[nic]]` tables attached when
/// their guests appear, two guests talking through a switch, `softdev list`'s view of a vif,
/// the config's checks, and links between endpoints with no guest.
final class DaemonNetTests: LocalDaemonTestCase {
    /// Waits for the daemon to attach vif 0 to `guest`; returns its frontend path.
    func configuredVif(_ guest: LocalHypervisor) throws -> String {
        let fe = "/local/domain/\(guest.domainID)/device/vif/0"
        let end = monotonicSeconds() + 10
        while (try? guest.store.read(fe + "/backend", transaction: .none)) == nil {
            guard monotonicSeconds() < end else { throw TimedOut(what: "vif 0 of domain \(guest.domainID)") }
            usleep(10_000)
        }
        return fe
    }

    func testConfiguredNicsOfTwoGuestsTalkThroughASwitch() throws {
        let config = try ServeConfig.parse("""
            [netif]
            max-queues = 2
            [[nic]]
            domain = "a"
            vdev = "0"
            device = "stats | switch(name=lan)"
            mac = "00:16:3e:aa:00:01"
            [[nic]]
            domain = "b"
            vdev = "vif0"
            device = "switch(name=lan)"
            """)
        let d = try startDaemon(config)
        let address = LocalHypervisorAddress(directory: directory)
        let a = try LocalHypervisor.createGuest(address, name: "a", pages: 2048)
        defer { a.destroy() }
        let b = try LocalHypervisor.createGuest(address, name: "b", pages: 2048)
        defer { b.destroy() }
        var options = LocalNetFrontend.Options()
        options.queues = 2
        let fa = try LocalNetFrontend(hypervisor: a, frontendPath: try configuredVif(a), options: options)
        let fb = try LocalNetFrontend(hypervisor: b, frontendPath: try configuredVif(b))
        XCTAssertEqual(fa.queues.count, 2)
        XCTAssertEqual(try a.store.readString("/local/domain/\(a.domainID)/device/vif/0/mac"), "00:16:3e:aa:00:01")

        // a to b: flooded (b's address is not learnt yet); b to a: forwarded (a's is now).
        let macA = MACAddress("00:16:3e:aa:00:01")!, macB = NetTapService.defaultMAC(guest: b.domainID, vif: 0)
        let toB = EthernetFrame(macB.octets + macA.octets + [0x88, 0xb5] + [UInt8](repeating: 7, count: 100))
        XCTAssertTrue(fa.send(toB))
        XCTAssertEqual(try fb.receive().map { $0.bytes }, [toB.bytes])
        let toA = EthernetFrame(macA.octets + macB.octets + [0x88, 0xb5] + [UInt8](repeating: 9, count: 1400))
        XCTAssertTrue(fb.send(toA))
        XCTAssertEqual(try fa.receive(queue: 0).map { $0.bytes }, [toA.bytes])

        // softdev list: both vifs, Connected, with what they negotiated and their counters.
        var listed: [AttachedDevice] = []
        let end = monotonicSeconds() + 5
        repeat {
            listed = AttachedDevice.all(store: d.hypervisor.store, backendDomain: 0).filter { $0.deviceClass == "net" }
            if listed.count == 2, listed.allSatisfy({ $0.negotiated.contains("rx-frames=1") }) { break }
            usleep(50_000)
        } while monotonicSeconds() < end
        XCTAssertEqual(listed.map { $0.domainName }, ["a", "b"])
        XCTAssertTrue(listed.allSatisfy { $0.backendState == .connected && $0.frontendState == .connected }, "\(listed)")
        XCTAssertTrue(listed[0].negotiated.hasPrefix("2 queues, sg,tso4,tso6,split"), listed[0].negotiated)
        XCTAssertTrue(listed[0].negotiated.contains("tx-frames=1 tx-bytes=114 tx-dropped=0 rx-frames=1 rx-bytes=1414"), listed[0].negotiated)
        XCTAssertEqual(listed[0].spec, "stats | switch(name=lan)")
        try fa.close(); try fb.close()
    }

    /// A guest with GSO sends a 20 000-byte TCPv6 segment through a switch to a guest whose
    /// netfront negotiated no GSO: the second guest gets it cut into MSS-sized segments (the
    /// switch used to drop it), in order, each with its checksum partial for netfront.
    func testALargeSegmentThroughASwitchReachesAGuestWithoutGSOCut() throws {
        var config = ServeConfig()
        config.attachments = ["a", "b"].map {
            .init(deviceClass: "net", domain: $0, vdev: XenbusDeviceName(name: "0", deviceID: 0), device: "switch(name=gso-lan)")
        }
        _ = try startDaemon(config)
        let address = LocalHypervisorAddress(directory: directory)
        let a = try LocalHypervisor.createGuest(address, name: "a", pages: 2048)
        defer { a.destroy() }
        let b = try LocalHypervisor.createGuest(address, name: "b", pages: 2048)
        defer { b.destroy() }
        let fa = try LocalNetFrontend(hypervisor: a, frontendPath: try configuredVif(a))
        var plain = LocalNetFrontend.Options()
        plain.gso = false
        let fb = try LocalNetFrontend(hypervisor: b, frontendPath: try configuredVif(b), options: plain)

        let macA = NetTapService.defaultMAC(guest: a.domainID, vif: 0), macB = NetTapService.defaultMAC(guest: b.domainID, vif: 0)
        let payload = (0..<20_000).map { UInt8(truncatingIfNeeded: $0 &* 11 &+ 3) }
        let tcp: [UInt8] = [0x04, 0xd2, 0x16, 0x2e, 0, 0, 0x10, 0, 0, 0, 0, 1, 0x50, 0x19, 0xff, 0xff, 0, 0, 0, 0]
        let ip: [UInt8] = [0x60, 0, 0, 0, UInt8((20 + payload.count) >> 8), UInt8((20 + payload.count) & 0xff), 6, 64]
            + [0xfd, 0] + [UInt8](repeating: 0, count: 13) + [1] + [0xfd, 0] + [UInt8](repeating: 0, count: 13) + [2]
        var large = EthernetFrame(macB.octets + macA.octets + [0x86, 0xdd] + ip + tcp + payload)
        FrameChecksum.preparePartial(&large, headers: try XCTUnwrap(FrameHeaders(large)))
        large.offload.segmentation = .init(kind: .tcpv6, size: 1440)
        XCTAssertTrue(fa.send(large))

        let segments = try fb.receive(atLeast: 14)
        XCTAssertEqual(segments.map(\.count), [Int](repeating: 74 + 1440, count: 13) + [74 + 20_000 - 13 * 1440])
        var got: [UInt8] = []
        for (i, s) in segments.enumerated() {
            let bytes = s.bytes
            XCTAssertEqual(s.offload.checksum, .partial(start: 54, offset: 16))
            XCTAssertEqual(Int(bytes[18]) << 8 | Int(bytes[19]), s.count - 54, "IPv6 payload length")
            XCTAssertEqual(Int(bytes[58]) << 24 | Int(bytes[59]) << 16 | Int(bytes[60]) << 8 | Int(bytes[61]), 0x1000 + i * 1440)
            XCTAssertEqual(bytes[54 + 13], i == 13 ? 0x19 : 0x10, "FIN and PSH on the last segment only")
            got += bytes[74...]
        }
        XCTAssertEqual(got, payload)
        try fa.close(); try fb.close()
    }

    func testNicConfigErrorsNameTheirPlace() {
        func error(_ text: String) -> String {
            do { _ = try ServeConfig.parse(text, file: "c.toml"); return "" } catch { return "\(error)" }
        }
        XCTAssertEqual(error("[[nic]]\ndomain = \"a\"\nvdev = \"0\"\ndevice = \"null\"\nmac = \"01:00:5e:00:00:01\"\n"),
                       "c.toml [[nic]] #1: mac = 01:00:5e:00:00:01: give a unicast address such as 00:16:3e:01:02:03")
        XCTAssertTrue(error("[[nic]]\ndomain = \"a\"\nvdev = \"xvda\"\ndevice = \"null\"\n").contains("'xvda' is not a vif number"))
        XCTAssertTrue(error("[[nic]]\ndomain = \"a\"\nvdev = \"0\"\ndevice = \"memory(size=1M)\"\n")
            .contains("memory is a block device, not a net device"))
        XCTAssertTrue(error("[[disk]]\ndomain = \"a\"\nvdev = \"xvda\"\ndevice = \"null(size=1M)\"\nmac = \"00:16:3e:00:00:01\"\n")
            .contains("mac"))
        XCTAssertTrue(error("[netif]\nmax-queues = 99\n").contains("max-queues"))
        XCTAssertTrue(error("[[link]]\ndevice = \"null\"\n").contains("a link joins two endpoints"))
        XCTAssertTrue(error("[[link]]\ndevice = \"stats | null\"\n").contains("stats is a filter: a link starts with an endpoint"))
    }

    func testALinkJoinsTwoEndpointsWithoutAGuest() throws {
        // A guest's vif on a switch; the switch linked to a null sink through stats: the
        // guest's frames reach the sink through the link, counted by its stats.
        var config = ServeConfig()
        config.links = ["switch(name=uplink) | stats | null"]
        config.attachments = [.init(deviceClass: "net", domain: "g", vdev: XenbusDeviceName(name: "0", deviceID: 0), device: "switch(name=uplink)")]
        let d = try startDaemon(config)
        XCTAssertEqual(d.openLinks.count, 1)
        let g = try LocalHypervisor.createGuest(LocalHypervisorAddress(directory: directory), name: "g", pages: 2048)
        defer { g.destroy() }
        let f = try LocalNetFrontend(hypervisor: g, frontendPath: try configuredVif(g))
        for _ in 0..<3 { XCTAssertTrue(f.send(EthernetFrame([UInt8](repeating: 0xff, count: 6) + [UInt8](repeating: 2, count: 54)))) }
        XCTAssertTrue(f.waitForTx())
        let stats = try XCTUnwrap(d.openLinks.first?.stack as? NetStatsFilter)
        let end = monotonicSeconds() + 5
        while stats.counters.fromGuest.frames < 3 && monotonicSeconds() < end { usleep(10_000) }
        XCTAssertEqual(stats.counters.fromGuest.frames, 3)
        try f.close()
    }
}
