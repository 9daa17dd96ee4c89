import ArgumentParser
import Core
import Daemon
import Foundation
import Glibc

/// `softdev guest`: a guest of the local hypervisor in its own process, with its class's Swift
/// frontend (a blkfront for a disk) for each device attached to it.
struct Guest: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Run a guest on the local emulated hypervisor: its Swift frontends connect to the devices attached to it.",
        discussion: """
            Creates a guest domain named NAME on the local hypervisor at --local-dir (run `softdev serve --hypervisor local` \
            first), waits for --disks devices to be attached to it (by the daemon's config or `softdev attach NAME block ...`), \
            connects its class's Swift frontend to each (a blkfront to a disk, as Linux's xen-blkfront would), and with \
            --check does the class's round trip (a disk: writes, reads back and compares a pattern if it is writable; a \
            network card: sends an ARP request and sees the backend take it). A network card gets the Swift netfront. It \
            then stays up for --hold seconds (or until SIGTERM/SIGINT); a device the backend closes (`softdev detach`) is \
            let go at once. When this process ends, the guest is destroyed.
            """)

    @Argument(help: "The guest's name.")
    var name: String
    @Option(help: ArgumentHelp("The local hypervisor's directory. Default: $SOFTDEV_LOCAL_HYPERVISOR or /run/softdev/local.", valueName: "dir"))
    var localDir: String?
    @Option(help: "Devices (disks and network cards together) to wait for before connecting.")
    var disks = 1
    @Option(help: "Seconds to wait for them.")
    var wait: Double = 30
    @Flag(help: "Check each device: write, read back and compare a pattern on each writable disk; send a frame on each network card.")
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
        // The devices attached to the guest, of every class that has a Swift frontend.
        let classes = DeviceClass.all.filter { $0.localFrontend != nil }
        let attached = { () -> [(DeviceClass, String)] in
            classes.flatMap { c in
                let home = "/local/domain/\(guest.domainID)/device/\(c.frontendType)"
                return ((try? guest.store.directory(home, transaction: .none)) ?? []).sorted().map { (c, home + "/" + $0) }
            }
        }
        let deadline = monotonicSeconds() + wait
        var found: [(DeviceClass, String)] = []
        while true {
            found = attached()
            if found.count >= disks { break }
            if signals.pending { return }
            guard monotonicSeconds() < deadline else {
                throw ValidationError("guest \(name): \(found.count) of \(disks) devices attached after \(wait) s (attach with `softdev attach \(name) block xvda SPEC`)")
            }
            usleep(20_000)
        }
        var options = LocalGuestOptions()
        options.ringPageOrder = ringOrder
        options.queues = queues
        var devices: [any LocalGuestDevice] = []
        for (deviceClass, path) in found {
            let device = try deviceClass.localFrontend!(guest, path, options)
            print("\(device.name): connected, \(device.summary)")
            if check, let done = try device.check() { print("\(device.name): check ok (\(done))") }
            devices.append(device)
        }

        // Stay up; let go of a device whose backend closes, as Linux's frontends do when it is
        // not in use.
        let end = hold < 0 ? Double.infinity : monotonicSeconds() + hold
        while monotonicSeconds() < end {
            if signals.pending { break }
            for (i, device) in devices.enumerated().reversed() {
                if XenbusDeviceState.read(guest.store, device.backendPath + "/state") != .connected {
                    try? device.close(timeoutSeconds: 5)
                    print("\(device.name): the backend closed it (detached)")
                    devices.remove(at: i)
                }
            }
            usleep(50_000)
        }
        for device in devices {
            try device.close(timeoutSeconds: 10)
            print("\(device.name): closed")
        }
    }
}
