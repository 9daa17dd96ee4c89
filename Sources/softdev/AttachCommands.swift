import ArgumentParser
import BlockTap
import Core
import Daemon
import Devices
import XenStore

/// `softdev attach DOMAIN block VDEV SPEC`: what `xl block-attach` does, for softdev's backend.
struct Attach: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Give a guest a soft device (the daemon, `softdev serve`, serves it).",
        discussion: """
            Writes the frontend and backend xenstore nodes in one transaction, with the permissions libxl uses \
            (the guest may read its backend's nodes, never write them), under /local/domain/<me>/backend/softdev-vbd, \
            which no kernel backend claims. The spec is checked here and opened by the daemon. With `xl create -p`, \
            attach, then `xl unpause`, the guest has the disk at boot.
            Example: softdev attach guest1 block xvdb 'stats | file(path=/srv/guest1.img)'
            """)

    @OptionGroup var hypervisorOptions: HypervisorOptions

    @Argument(help: "The guest: its name or domain id.")
    var domain: String
    @Argument(help: "The kind of device: block.")
    var type: String
    @Argument(help: "The guest's name for the disk: xvda, xvdb, ... (or a xenbus device number).")
    var vdev: String
    @Argument(help: "The device stack, e.g. \"file(path=/srv/disk.img)\" (see `softdev devices`).")
    var spec: String

    @Flag(help: "Attach read-only: the guest sees a read-only disk and every write fails.")
    var readonly = false

    func run() throws {
        guard type == "block" else { throw ValidationError("unknown device type '\(type)': softdev attaches block devices (block)") }
        let disk = try VirtualDisk(vdev)
        try DeviceRegistry.check(spec)
        let store = try hypervisorOptions.choice().openStore()
        let guest = try XenbusToolstack.resolveDomain(store, domain)
        let me = try XenHypervisor.ownDomainID(store)
        let paths: XenbusDevicePaths
        do {
            paths = try BlockTapService.attach(store: store, guest: guest, backendDomain: me, disk: disk, spec: spec, readOnly: readonly)
        } catch XenStoreError.exists(let path) {
            throw ValidationError("domain \(guest) already has a disk \(disk.name) (\(path) exists): detach it first or pick another name")
        }
        print("attached \(disk.name) to domain \(guest): \(paths.backendPath)")
    }
}

/// `softdev detach DOMAIN VDEV`.
struct Detach: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Take a soft device away from a guest.",
        discussion: """
            Sets the backend offline; the daemon asks the guest's frontend to close and, once it has, removes its nodes. \
            If the guest does not let go within --timeout seconds (a mounted file system), the nodes are removed anyway, \
            as `xl block-detach` does.
            """)

    @OptionGroup var hypervisorOptions: HypervisorOptions
    @Argument(help: "The guest: its name or domain id.")
    var domain: String
    @Argument(help: "The disk: xvda, xvdb, ... (or a xenbus device number).")
    var vdev: String
    @Option(help: "Seconds to wait for the guest to let go.")
    var timeout: Double = 10

    func run() throws {
        let disk = try VirtualDisk(vdev)
        let store = try hypervisorOptions.choice().openStore()
        let guest = try XenbusToolstack.resolveDomain(store, domain)
        let paths = XenbusDevicePaths(frontendDomain: guest, backendDomain: try XenHypervisor.ownDomainID(store), frontendType: "vbd",
                                      backendType: BlockTapService.backendType, deviceID: disk.deviceID)
        let outcome: XenbusToolstack.DetachOutcome
        do { outcome = try XenbusToolstack.detach(store, paths, timeoutSeconds: timeout) } catch XenStoreError.noEntry {
            throw ValidationError("domain \(guest) has no softdev disk \(disk.name) (see `softdev list`)")
        }
        switch outcome {
        case .closed: print("detached \(disk.name) from domain \(guest)")
        case .forced: print("detached \(disk.name) from domain \(guest): the backend did not close it within \(timeout) s (the guest still uses the disk, or no `softdev serve` is running); its nodes were removed anyway")
        }
    }
}

/// `softdev list`.
struct List: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "List the soft disks attached to guests, their state and what their frontends negotiated.")
    @OptionGroup var hypervisorOptions: HypervisorOptions

    func run() throws {
        let store = try hypervisorOptions.choice().openStore()
        let disks = AttachedDisk.all(store: store, backendDomain: try XenHypervisor.ownDomainID(store))
        guard !disks.isEmpty else { print("no soft disks attached"); return }
        var rows = [["DOMAIN", "VDEV", "STATE", "FRONTEND", "NEGOTIATED", "DEVICE"]]
        for d in disks {
            let who = d.domainName.map { "\(d.domain) (\($0))" } ?? "\(d.domain)"
            rows.append([who, d.vdev + (d.readOnly ? " (ro)" : ""), "\(d.backendState)", "\(d.frontendState)", d.negotiatedSummary,
                         d.spec + (d.error.map { "  error: \($0)" } ?? "")])
        }
        let widths = (0..<rows[0].count).map { c in rows.map { $0[c].count }.max()! }
        for row in rows {
            var cells: [String] = []
            for (c, cell) in row.enumerated() {
                cells.append(c == row.count - 1 ? cell : cell + String(repeating: " ", count: widths[c] - cell.count))
            }
            print(cells.joined(separator: "  "))
        }
    }
}
