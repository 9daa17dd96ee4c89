import ArgumentParser
import Core
import Daemon
import Devices
import XenStore

/// The device classes, for help texts: "block".
private let classNames = DeviceClass.all.map(\.name).joined(separator: ", ")

/// `softdev attach DOMAIN CLASS VDEV SPEC`: what `xl block-attach` does, for softdev's backends.
struct Attach: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Give a guest a soft device (the daemon, `softdev serve`, serves it).",
        discussion: """
            Writes the frontend and backend xenstore nodes in one transaction, with the permissions libxl uses \
            (the guest may read its backend's nodes, never write them), under /local/domain/<me>/backend/softdev-<type> \
            (\(DeviceClass.all.map { "\($0.name): \($0.backendType)" }.joined(separator: ", "))), which no kernel backend claims. \
            The spec is checked here and opened by the daemon. When a daemon (`softdev serve`) runs, attach waits up to \
            --wait seconds for it to open the stack: a stack it refuses (a file that cannot be opened, a USB device a policy \
            blocks or that another program holds) is taken away again and attach fails with the daemon's reason; with no \
            daemon running, the device waits for one. With `xl create -p`, attach, then `xl unpause`, the guest has the device \
            at boot.
            Examples:
              softdev attach guest1 block xvdb 'stats | file(path=/srv/guest1.img)'
              softdev attach guest1 net 0 'pcap(file=/tmp/g1.pcap) | tap(name=sd-g1)' --mac 00:16:3e:00:00:01
              softdev attach guest1 usb 1 'storage(device="file(path=/srv/stick.img)")' --ports 4
            """)

    @OptionGroup var hypervisorOptions: HypervisorOptions

    @Argument(help: "The guest: its name or domain id.")
    var domain: String
    @Argument(help: ArgumentHelp("The class of device: \(classNames).", valueName: "class"))
    var type: String
    @Argument(help: ArgumentHelp("The guest's name for the device: \(DeviceClass.all.map { "for \($0.plural) \($0.nameHelp)" }.joined(separator: "; ")).",
                                 valueName: "vdev"))
    var vdev: String
    @Argument(help: "The device stack, e.g. \"file(path=/srv/disk.img)\" (see `softdev devices`).")
    var spec: String

    @Flag(help: "Attach read-only (block): the guest sees a read-only disk and every write fails.")
    var readonly = false
    @Option(help: ArgumentHelp("The guest's MAC address (net), e.g. 00:16:3e:01:02:03. Default: 00:16:3e, then from the domain and vif numbers.",
                               valueName: "mac"))
    var mac: String?
    @Option(help: ArgumentHelp("Ports of the guest's USB controller (usb), 1 to 31, when this device creates it. Default: 8.", valueName: "n"))
    var ports: Int?
    @Option(name: .customLong("usb-version"), help: ArgumentHelp("USB version of the guest's controller (usb), 1 or 2, when this device creates it. Default: 2.", valueName: "v"))
    var usbVersion: Int?
    @Option(help: ArgumentHelp("Seconds to wait for the running daemon to serve or refuse the device (0: do not wait).", valueName: "seconds"))
    var wait: Double = 30

    func run() throws {
        let deviceClass: DeviceClass
        do { deviceClass = try DeviceClass.named(type) } catch { throw ValidationError("\(error)") }
        let name = try deviceClass.parseName(vdev)
        try deviceClass.check(spec)
        if readonly && deviceClass.name != DeviceClass.block.name { throw ValidationError("--readonly is for disks (block)") }
        var settings: [String: String] = [:]
        if let mac { settings["mac"] = mac }
        if let ports { settings["ports"] = "\(ports)" }
        if let usbVersion { settings["usb-version"] = "\(usbVersion)" }
        for key in settings.keys where !deviceClass.settings.contains(where: { $0.key == key }) {
            throw ValidationError("--\(key == "usb-version" ? "usb-version" : key) is not for \(deviceClass.plural)")
        }
        let store = try hypervisorOptions.choice().openStore()
        let guest = try XenbusToolstack.resolveDomain(store, domain)
        let me = try XenHypervisor.ownDomainID(store)
        guard wait >= 0 else { throw ValidationError("--wait \(wait): use 0 or more seconds") }
        let daemon = ServeLock.isHeld(at: ServeLock.path(for: try hypervisorOptions.choice()))
        let paths: XenbusDevicePaths
        let served: String?
        do {
            if daemon && wait > 0 {
                (paths, served) = try deviceClass.attachServed(store: store, guest: guest, backendDomain: me, name, spec: spec,
                                                               readOnly: readonly, settings: settings, timeoutSeconds: wait)
            } else {
                paths = try deviceClass.attach(store: store, guest: guest, backendDomain: me, name, spec: spec, readOnly: readonly,
                                               settings: settings)
                served = nil
            }
        } catch XenStoreError.exists(let path) {
            throw ValidationError("domain \(guest) already has a \(deviceClass.noun) \(name.name) (\(path) exists): detach it first or pick another name")
        }
        let attached = "attached \(name.name) to domain \(guest): \(paths.backendPath)"
        if let served {
            print(attached + (served.isEmpty ? "" : " (\(served))"))
        } else if !daemon {
            print(attached + " (no softdev serve runs here: it opens the device when it starts)")
        } else if wait == 0 {
            print(attached)
        } else {
            print(attached)
            throw ServeConfigError("softdev serve has not opened it within \(wait) s (see its log): it stays attached; "
                                  + "`softdev list` shows how it stands, `softdev detach` takes it away")
        }
    }
}

/// `softdev detach DOMAIN VDEV`.
struct Detach: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Take a soft device away from a guest.",
        discussion: """
            Sets the backend offline; the daemon asks the guest's frontend to close and, once it has, removes its nodes. \
            If the guest does not let go within --timeout seconds (a mounted file system), the nodes are removed anyway, \
            as `xl block-detach` does. The device is found by its name in every class (\(classNames)); --class picks one \
            where a name could be of several.
            """)

    @OptionGroup var hypervisorOptions: HypervisorOptions
    @Argument(help: "The guest: its name or domain id.")
    var domain: String
    @Argument(help: "The device: for a disk xvda, xvdb, ... (or a xenbus device number).")
    var vdev: String
    @Option(name: .customLong("class"), help: ArgumentHelp("The class of device: \(classNames). Default: the one that has it.", valueName: "class"))
    var deviceClass: String?
    @Option(help: "Seconds to wait for the guest to let go.")
    var timeout: Double = 10

    func run() throws {
        let candidates: [DeviceClass]
        do { candidates = try deviceClass.map { [try DeviceClass.named($0)] } ?? DeviceClass.all } catch { throw ValidationError("\(error)") }
        let store = try hypervisorOptions.choice().openStore()
        let guest = try XenbusToolstack.resolveDomain(store, domain)
        let me = try XenHypervisor.ownDomainID(store)
        // The classes whose names accept `vdev` and that have such a device for this guest.
        var found: [(DeviceClass, XenbusDeviceName, XenbusDevicePaths)] = []
        var nameErrors: [String] = []
        for c in candidates {
            do {
                let name = try c.parseName(vdev)
                let paths = c.paths(guest: guest, backendDomain: me, name)
                if (try? store.read(paths.backendPath, transaction: .none)) != nil { found.append((c, name, paths)) }
            } catch {
                nameErrors.append("\(error)")
            }
        }
        if nameErrors.count == candidates.count { throw ValidationError(nameErrors.joined(separator: "; ")) }
        guard found.count <= 1 else {
            throw ValidationError("domain \(guest) has a \(found.map(\.0.noun).joined(separator: " and a ")) named \(vdev): say which with --class")
        }
        guard let (c, name, paths) = found.first else {
            throw ValidationError("domain \(guest) has no softdev \(candidates.map(\.noun).joined(separator: " or ")) \(vdev) (see `softdev list`)")
        }
        // Found above; gone meanwhile (noEntry) only if someone else detached it.
        let outcome = try c.detach(store: store, paths: paths, name, timeoutSeconds: timeout)
        switch outcome {
        case .closed: print("detached \(name.name) from domain \(guest)")
        case .forced: print("detached \(name.name) from domain \(guest): the backend did not close it within \(timeout) s (the guest still uses the \(c.noun), or no `softdev serve` is running); its nodes were removed anyway")
        }
    }
}

/// `softdev list`.
struct List: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "List the soft devices attached to guests (every class), their state and what their frontends negotiated.")
    @OptionGroup var hypervisorOptions: HypervisorOptions

    func run() throws {
        let store = try hypervisorOptions.choice().openStore()
        let devices = AttachedDevice.all(store: store, backendDomain: try XenHypervisor.ownDomainID(store))
        guard !devices.isEmpty else {
            print("no soft devices attached (\(DeviceClass.all.map(\.plural).joined(separator: ", ")))")
            return
        }
        var rows = [["DOMAIN", "CLASS", "VDEV", "STATE", "FRONTEND", "NEGOTIATED", "DEVICE"]]
        for d in devices {
            let who = d.domainName.map { "\(d.domain) (\($0))" } ?? "\(d.domain)"
            rows.append([who, d.deviceClass, d.vdev + (d.readOnly ? " (ro)" : ""), "\(d.backendState)", "\(d.frontendState)", d.negotiated,
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
