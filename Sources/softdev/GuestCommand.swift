import ArgumentParser
import BlockTap
import Core
import Foundation
import Glibc

/// `softdev guest`: a guest of the local hypervisor in its own process, with a Swift blkfront
/// for each disk attached to it.
struct Guest: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Run a guest on the local emulated hypervisor: its blkfronts connect to the disks attached to it.",
        discussion: """
            Creates a guest domain named NAME on the local hypervisor at --local-dir (run `softdev serve --hypervisor local` \
            first), waits for --disks disks to be attached to it (by the daemon's config or `softdev attach NAME block ...`), \
            connects a blkfront to each as Linux's xen-blkfront would, and with --check writes, reads back and compares a \
            pattern on each writable disk. It then stays up for --hold seconds (or until SIGTERM/SIGINT); a disk the \
            backend closes (`softdev detach`) is let go at once. When this process ends, the guest is destroyed.
            """)

    @Argument(help: "The guest's name.")
    var name: String
    @Option(help: ArgumentHelp("The local hypervisor's directory. Default: $SOFTDEV_LOCAL_HYPERVISOR or /run/softdev/local.", valueName: "dir"))
    var localDir: String?
    @Option(help: "Disks to wait for before connecting.")
    var disks = 1
    @Option(help: "Seconds to wait for them.")
    var wait: Double = 30
    @Flag(help: "Write, read back and compare a pattern on each writable disk.")
    var check = false
    @Option(parsing: .unconditional, help: "Seconds to stay up after connecting (-1: until SIGTERM or SIGINT).")
    var hold: Double = 0
    @Option(help: "Ring page order to ask for (0-4).")
    var ringOrder = 4
    @Option(help: "Queues to ask for.")
    var queues = 1

    func run() throws {
        setvbuf(stdout, nil, _IOLBF, 0)   // progress lines reach a log file as they happen
        let signals = StopSignals.block()

        guard (1...16).contains(disks) else { throw ValidationError("--disks \(disks): use 1 to 16") }
        let address = localDir.map { LocalHypervisorAddress(directory: $0) } ?? .default
        let guest = try LocalHypervisor.createGuest(address, name: name, pages: 16384 * max(1, disks) + 256)
        defer { guest.destroy() }
        print("guest \(name): domain \(guest.domainID)")
        let home = "/local/domain/\(guest.domainID)/device/\(BlockTapService.frontendType)"
        let deadline = monotonicSeconds() + wait
        var found: [String] = []
        while true {
            found = ((try? guest.store.directory(home, transaction: .none)) ?? []).sorted()
            if found.count >= disks { break }
            if signals.pending { return }
            guard monotonicSeconds() < deadline else {
                throw ValidationError("guest \(name): \(found.count) of \(disks) disks attached after \(wait) s (attach with `softdev attach \(name) block xvda SPEC`)")
            }
            usleep(20_000)
        }
        var options = LocalBlockFrontend.Options()
        options.ringPageOrder = ringOrder
        options.queues = queues
        var fronts: [(String, LocalBlockFrontend)] = []
        for id in found {
            let path = home + "/" + id
            let front = try LocalBlockFrontend(hypervisor: guest, frontendPath: path, options: options)
            let vdev = ((try? guest.store.readString(front.backendPath + "/dev")) ?? nil) ?? id
            let order = ((try? guest.store.readString(path + "/ring-page-order")) ?? nil) ?? "0"
            print("\(vdev): connected, \(front.sectors) sectors of \(front.sectorSize) bytes\(front.readOnly ? ", read-only" : ""), "
                  + "ring order \(order), \(front.queues.count) queue\(front.queues.count == 1 ? "" : "s")")
            if check && !front.readOnly { try verify(front, vdev) }
            fronts.append((vdev, front))
        }

        // Stay up; let go of a disk whose backend closes, as blkfront does when it is not in use.
        let end = hold < 0 ? Double.infinity : monotonicSeconds() + hold
        while monotonicSeconds() < end {
            if signals.pending { break }
            for (i, (vdev, front)) in fronts.enumerated().reversed() {
                if XenbusDeviceState.read(guest.store, front.backendPath + "/state") != .connected {
                    try? front.close(timeoutSeconds: 5)
                    print("\(vdev): the backend closed it (detached)")
                    fronts.remove(at: i)
                }
            }
            usleep(50_000)
        }
        for (vdev, front) in fronts {
            try front.close()
            print("\(vdev): closed")
        }
    }

    /// Writes a pattern at the start, middle and end of the disk and reads it back.
    private func verify(_ front: LocalBlockFrontend, _ vdev: String) throws {
        let bytes = 64 * xenPageSize
        let span = UInt64(bytes / 512)
        guard front.sectors >= span else { throw ValidationError("\(vdev): too small to check (\(front.sectors) sectors)") }
        for (n, sector) in [0, front.sectors / 2 / 8 * 8, (front.sectors - span) / 8 * 8].enumerated() {
            let pattern = (0..<bytes).map { UInt8(truncatingIfNeeded: $0 &* 131 &+ n &* 17 &+ Int(sector)) }
            try front.write(sector: sector, pattern)
            guard try front.read(sector: sector, count: bytes) == pattern else {
                throw ValidationError("\(vdev): read-back mismatch at sector \(sector)")
            }
        }
        print("\(vdev): check ok (256 KiB written and read back at 3 places)")
    }
}
