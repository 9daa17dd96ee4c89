import ArgumentParser
import BlockTap
import Core
import Devices
import Daemon
import Foundation
import Glibc
import NetTap
import XenStore

/// The main job on the embedded default: an emulated hypervisor, the block and network taps
/// serving device stacks, a local guest whose blkfront writes, reads back, flushes and discards,
/// and whose netfront sends a ping to a second guest through a switch and gets the reply.
struct Demo: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Run the block and network taps end to end on the local emulated hypervisor (no Xen needed).")

    @Option(help: "The device stack to serve, e.g. \"stats | memory(size=64M)\" (see `softdev devices`).")
    var device = "stats | memory(size=64M)"
    @Option(help: "Directory for the hypervisor's sockets (xenstored.sock works with XENSTORED_PATH=... xenstore-ls).")
    var directory = "/tmp/softdev-demo"
    @Option(help: "The network stack of the guest's vif, joined by a second guest's vif on switch(name=demo).")
    var nic = "stats | switch(name=demo)"
    @Option(help: "Seconds to keep serving after the workload, so xenstore-ls can look.")
    var hold = 0
    @Option(help: "Ring page order the guest asks for (0-4).")
    var ringOrder = 4

    func run() throws {
        let address = LocalHypervisorAddress(directory: directory)
        let server = try LocalHypervisorServer(address: address)
        try server.start()
        defer { server.stop() }
        print("local hypervisor: \(address.directory) (XENSTORED_PATH=\(address.storeSocket) xenstore-ls)")
        let backend = try LocalHypervisor.connectBackend(address)
        let opened = try DeviceRegistry.open(device)
        try DeviceRegistry.check(nic, of: .net)
        let log: @Sendable (String) -> Void = { print("backend: \($0)") }
        let service = XenbusBackendHost(hypervisor: backend, log: log)
        service.register(BlockTapService.backend(log: log) { _, _ in opened })
        service.register(NetTapService.backend(log: log) { spec in try DeviceRegistry.open(spec, of: .net) as! any NetDevice })
        try service.start()
        defer { service.stop() }
        let guest = try LocalHypervisor.createGuest(address, name: "demo-guest", pages: 16384)
        let paths = try BlockTapService.attach(store: backend.store, guest: guest.domainID, disk: VirtualDisk("xvda"), spec: device)
        var options = LocalBlockFrontend.Options()
        options.ringPageOrder = ringOrder
        let front = try LocalBlockFrontend(hypervisor: guest, frontendPath: paths.frontendPath, options: options)
        print("guest \(guest.domainID): xvda connected, \(front.sectors) sectors, features \(front.backendFeatures)")
        var pattern = [UInt8](repeating: 0, count: 256 * 4096)
        for i in pattern.indices { pattern[i] = UInt8(truncatingIfNeeded: i &* 131 &+ 7) }
        let sector = front.sectors / 2
        try front.write(sector: sector, pattern)
        guard try front.read(sector: sector, count: pattern.count) == pattern else {
            throw ValidationError("read-back mismatch at sector \(sector)")
        }
        print("wrote and read back 1 MiB (256 segments, indirect) at sector \(sector): identical")
        print("flush: status \(try front.control(operation: Blkif.opFlushDiskCache))")
        if front.backendFeatures["feature-discard"] == "1" {
            print("discard: status \(try front.control(operation: Blkif.opDiscard, sector: sector, sectors: 8))")
        }
        try pingThroughSwitch(address: address, store: backend.store, guest: guest)
        if hold > 0 { print("holding for \(hold) s"); sleep(UInt32(hold)) }
        try front.close()
        // The service closes the stack when it unplugs the disk (at stop); the counts are final now.
        if let stats = opened as? StatsFilter { print(stats.snapshot().report()) }
        print("demo: ok")
    }

    /// The guest's netfront pings a second guest on the same switch, whose netfront answers.
    private func pingThroughSwitch(address: LocalHypervisorAddress, store: any XenStoreClient, guest: LocalHypervisor) throws {
        let peer = try LocalHypervisor.createGuest(address, name: "demo-peer", pages: 2048)
        defer { peer.destroy() }
        var fronts: [LocalNetFrontend] = []
        for (g, spec) in [(guest, nic), (peer, "switch(name=demo)")] {
            let vif = XenbusDeviceName(name: "0", deviceID: 0)
            let paths = try DeviceClass.net.attach(store: store, guest: g.domainID, backendDomain: 0, vif, spec: spec)
            fronts.append(try LocalNetFrontend(hypervisor: g, frontendPath: paths.frontendPath))
        }
        let (me, other) = (NetTapService.defaultMAC(guest: guest.domainID, vif: 0), NetTapService.defaultMAC(guest: peer.domainID, vif: 0))
        print("guest \(guest.domainID): vif 0 (\(me)) connected over '\(nic)'; guest \(peer.domainID): vif 0 (\(other)) on switch(name=demo)")
        let payload = (0..<56).map { UInt8(truncatingIfNeeded: $0 &* 7) }
        // Until the switch has learnt the peer, the request is flooded; either way it arrives.
        fronts[0].send(DemoFrames.icmpEcho(from: me, to: other, type: 8, payload: payload))
        guard let request = try fronts[1].receive().first, request.count == 98 else { throw ValidationError("the ping did not reach the peer") }
        fronts[1].send(DemoFrames.icmpEcho(from: other, to: me, type: 0, payload: payload, swapping: true))
        guard let reply = try fronts[0].receive().first, Array(reply.bytes.suffix(56)) == payload else {
            throw ValidationError("no ping reply came back")
        }
        print("ping: a 98-byte ICMP echo request went through the switch to the peer and its reply came back, payload identical")
        for f in fronts { try f.close() }
    }
}

/// The frames of the demo's ping.
enum DemoFrames {
    /// An Ethernet + IPv4 + ICMP echo frame (`type` 8 request, 0 reply) with its checksums,
    /// 10.0.0.1 to 10.0.0.2 (reversed when `swapping`).
    static func icmpEcho(from: MACAddress, to: MACAddress, type: UInt8, payload: [UInt8], swapping: Bool = false) -> EthernetFrame {
        var ip: [UInt8] = [0x45, 0, 0, UInt8(28 + payload.count), 0, 1, 0x40, 0, 64, 1, 0, 0]
        ip += swapping ? [10, 0, 0, 2, 10, 0, 0, 1] : [10, 0, 0, 1, 10, 0, 0, 2]
        let ipSum = ~FrameChecksum.fold(ip.withUnsafeBytes { FrameChecksum.sum($0) })
        ip[10] = UInt8(ipSum >> 8); ip[11] = UInt8(ipSum & 0xff)
        var icmp: [UInt8] = [type, 0, 0, 0, 0x12, 0x34, 0, 1] + payload
        let icmpSum = ~FrameChecksum.fold(icmp.withUnsafeBytes { FrameChecksum.sum($0) })
        icmp[2] = UInt8(icmpSum >> 8); icmp[3] = UInt8(icmpSum & 0xff)
        return EthernetFrame(to.octets + from.octets + [0x08, 0x00] + ip + icmp)
    }
}
