import Core
import Devices
import Foundation
import Glibc
import NetTap
import TestPeers
import XCTest

/// A vif over a real TAP interface: the vif's ring thread reads the TAP itself, and only while
/// the guest has buffers, so frames the guest has no room for wait in the kernel's queue
/// (QEMU's tap backend does the same) instead of being read and dropped.
final class NetifTapTests: XCTestCase {
    var lab: NetLab!
    override func setUpWithError() throws {
        guard getuid() == 0 else { print("skipping: TAP tests need root"); throw XCTSkip("TAP tests need root") }
        guard access("/dev/net/tun", R_OK | W_OK) == 0 else {
            print("skipping: /dev/net/tun is missing (modprobe tun)"); throw XCTSkip("/dev/net/tun is missing (modprobe tun)")
        }
        lab = try NetLab()
    }
    override func tearDown() { lab?.shutdown() }

    let tag = String(getpid() % 100_000)

    /// A guest with a vif over `tap(name=...)`, the TAP moved into a namespace of its own with
    /// 10.78.0.1/24 and a permanent neighbour 10.78.0.2 at the guest's MAC (no ARP needed):
    /// `ping` in the namespace sends echo requests straight to the guest.
    func withGuestOnTAP(rxBuffers: Int, _ body: (LocalNetFrontend, TapDevice, NetifBackend, _ ping: (Int) throws -> Void) throws -> Void) throws {
        let ip = try Peers.program("ip", package: "iproute2")
        let ping = try Peers.program("ping", package: "iputils-ping")
        let (ns, name) = ("sdvtns\(tag)", "sdvt\(tag)")
        _ = try Peers.run(ip, ["netns", "add", ns])
        defer { _ = try? Peers.run(ip, ["netns", "del", ns]) }
        let tap = try TapDevice(name: name)
        let (guest, paths) = try lab.guestWithVif(tap)
        var options = LocalNetFrontend.Options()
        options.rxBuffers = rxBuffers
        let front = try LocalNetFrontend(hypervisor: guest, frontendPath: paths.frontendPath, options: options)
        defer { try? front.close() }
        let mac = NetTapService.defaultMAC(guest: guest.domainID, vif: 0)
        for command in [["link", "set", name, "netns", ns], ["-n", ns, "addr", "add", "10.78.0.1/24", "dev", name],
                        ["-n", ns, "link", "set", name, "up"],
                        ["-n", ns, "neigh", "replace", "10.78.0.2", "lladdr", "\(mac)", "dev", name, "nud", "permanent"]] {
            let (status, output) = try Peers.run(ip, command)
            XCTAssertEqual(status, 0, "ip \(command.joined(separator: " ")): \(output)")
        }
        let backend = try XCTUnwrap(lab.host.inspect { $0[paths.backendPath]?.driver as? NetifBackend })
        try body(front, tap, backend) { count in
            // Echo requests nobody answers: -c sends that many, -W bounds the wait for replies.
            _ = try Peers.run(ip, ["netns", "exec", ns, ping, "-c", "\(count)", "-i", "0.002", "-W", "1", "-s", "56", "10.78.0.2"], errors: false)
        }
    }

    /// Echo requests from 10.78.0.1 to 10.78.0.2 among `frames`.
    func echoRequests(_ frames: [EthernetFrame]) -> Int {
        frames.filter { f in
            f.count == 98 && f[12] == 0x08 && f[13] == 0x00 && f[23] == 1 && f[34] == 8
                && f.bytes[26..<30] == [10, 78, 0, 1] && f.bytes[30..<34] == [10, 78, 0, 2]
        }.count
    }

    /// What the guest receives until `count` echo requests are among it (or nothing comes for 5 s).
    func receive(_ front: LocalNetFrontend, echoRequests count: Int) throws -> [EthernetFrame] {
        var got: [EthernetFrame] = []
        while echoRequests(got) < count {
            let more = try front.receive(atLeast: 1, timeoutMilliseconds: 5000)
            if more.isEmpty { break }
            got += more
        }
        return got
    }

    func testFramesSentOutOfTheTAPReachTheGuest() throws {
        try withGuestOnTAP(rxBuffers: 256) { front, tap, backend, ping in
            try ping(20)
            let got = try receive(front, echoRequests: 20)
            XCTAssertEqual(echoRequests(got), 20, "every echo request, whole")
            XCTAssertEqual(backend.counters.rxDropped, 0)
            XCTAssertEqual(tap.counts.toGuest.frames, UInt64(got.count), "the TAP counts what it read, all of it delivered")
        }
    }

    func testFramesWaitInTheKernelWhileTheGuestHasNoBuffers() throws {
        try withGuestOnTAP(rxBuffers: 0) { front, tap, backend, ping in
            try ping(100)
            usleep(300_000)
            // Nothing read: the frames wait in the TAP's queue (500 frames deep), not in ours.
            XCTAssertEqual(tap.counts.toGuest.frames, 0, "read while the guest had no buffers")
            XCTAssertEqual(backend.counters.rxDropped, 0)
            XCTAssertEqual(front.postRxBuffers(256), 256)
            let got = try receive(front, echoRequests: 100)
            XCTAssertEqual(echoRequests(got), 100, "all of them once the guest posted buffers")
            XCTAssertEqual(backend.counters.rxDropped, 0)
        }
    }
}
