import ArgumentParser
import BlockTap
import Core
import Devices
import Foundation
import Glibc

/// The main job on the embedded default: an emulated hypervisor, the block tap serving a
/// device stack, and a local guest whose blkfront writes, reads back, flushes and discards.
struct Demo: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Run the block tap end to end on the local emulated hypervisor (no Xen needed).")

    @Option(help: "The device stack to serve, e.g. \"stats | memory(size=64M)\" (see `softdev devices`).")
    var device = "stats | memory(size=64M)"
    @Option(help: "Directory for the hypervisor's sockets (xenstored.sock works with XENSTORED_PATH=... xenstore-ls).")
    var directory = "/tmp/softdev-demo"
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
        let service = BlockTapService.makeHost(hypervisor: backend, log: { print("backend: \($0)") }) { _, _ in opened }
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
        if hold > 0 { print("holding for \(hold) s"); sleep(UInt32(hold)) }
        try front.close()
        // The service closes the stack when it unplugs the disk (at stop); the counts are final now.
        if let stats = opened as? StatsFilter { print(stats.snapshot().report()) }
        print("demo: ok")
    }
}
