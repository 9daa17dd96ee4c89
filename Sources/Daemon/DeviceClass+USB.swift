import Core
import Devices
import USBTap
import XenStore

extension DeviceClass {
    /// USB devices: Linux's xen-hcd (`vusb`) sees a virtual host controller served by the usbif
    /// backend; each of its ports plugs a USB stack (a soft stick, a keyboard, a host device).
    /// One controller per guest (device 0), created with the first device attached.
    public static let usb = DeviceClass(
        id: .usb, noun: "USB device", plural: "USB devices",
        frontendType: USBTapService.frontendType, backendType: USBTapService.backendType,
        optionsTable: "usbif", devicesTable: "usb",
        nameHelp: "the port, 1 to 31 (the controller has 8 unless `ports` says otherwise)",
        parseName: { text in
            guard let port = Int(text.hasPrefix("port") ? String(text.dropFirst(4)) : text), (1...Usbif.maxPorts).contains(port) else {
                throw ServeConfigError("'\(text)' is not a USB port: use 1 to \(Usbif.maxPorts)")
            }
            return XenbusDeviceName(name: "\(port)", deviceID: 0)
        },
        readOptions: { table, config in
            if let path = try table.string("rules") {
                // Read now: a wrong rule stops the daemon at start, with its line and column.
                do { config.usbPolicy = try USBPolicy(contentsOf: path) } catch { throw ServeConfigError("\(table.place): rules: \(error)") }
            }
        },
        backend: { config, log, _ in
            var options = UsbifBackendOptions()
            options.pollMicroseconds = config.pollMicroseconds
            return USBTapService.backend(options: options, log: log) { spec in
                guard let device = try DeviceRegistry.open(spec, of: .usb) as? any USBDevice else {
                    throw ServeConfigError("'\(spec)' is not a USB device stack")
                }
                // Judged before the backend claims it (USBDevice.claim): a refused host device stays dom0's.
                try config.usbPolicy?.admit(device)
                return device
            }
        },
        settings: [("ports", "ports of the guest's controller, 1 to 31 (default 8); only when the first device creates it"),
                   ("usb-version", "the controller's USB version, 1 or 2 (default 2); only when the first device creates it")],
        nodes: { name, spec, _, settings, _ in
            let ports = try settings["ports"].map { text -> Int in
                guard let n = Int(text), (1...Usbif.maxPorts).contains(n) else { throw ServeConfigError("ports = \(text): use 1 to \(Usbif.maxPorts)") }
                return n
            } ?? 8
            let version = try settings["usb-version"].map { text -> Int in
                guard text == "1" || text == "2" else { throw ServeConfigError("usb-version = \(text): use 1 or 2 (xen-hcd has no USB 3)") }
                return Int(text)!
            } ?? 2
            let port = Int(name.name)!
            guard port <= ports else { throw ServeConfigError("port \(port) is beyond the controller's \(ports) ports") }
            return USBTapService.nodes(ports: ports, usbVersion: version, plugged: [port: spec])
        },
        negotiated: { frontend, backend in
            guard let state = frontend("state").flatMap(UInt32.init), state == XenbusDeviceState.connected.rawValue else { return "-" }
            let ports = Int(backend("num-ports") ?? "") ?? 0
            let plugged = (1...max(1, ports)).compactMap { p -> String? in
                guard let spec = backend("port/\(p)"), !spec.isEmpty else { return nil }
                return "port \(p): \(spec)"
            }
            var text = "USB \(backend("usb-ver") ?? "2").0, \(ports) ports"
            if let stats = backend("statistics") { text += ", " + stats }
            return text + (plugged.isEmpty ? "" : "; " + plugged.joined(separator: "; "))
        },
        plugInto: { store, paths, name, spec, settings, _ in
            // The controller exists: plug into its port, if that is free.
            let port = name.name
            guard let ports = try store.readInt(paths.backendPath + "/num-ports"), let p = UInt64(port), p <= ports else {
                throw ServeConfigError("the guest's USB controller has no port \(port)")
            }
            if let current = try store.readString(paths.backendPath + "/port/\(port)"), !current.isEmpty {
                throw XenStoreError.exists(paths.backendPath + "/port/\(port)")
            }
            // Settings that create the controller must agree with the one there.
            let current = ["ports": "\(ports)", "usb-version": try store.readString(paths.backendPath + "/usb-ver") ?? "2"]
            for (key, value) in settings where current[key] != value {
                throw ServeConfigError("the guest's USB controller exists already with \(key) \(current[key] ?? "-"): \(key) \(value) cannot apply now")
            }
            try store.write(paths.backendPath + "/port/\(port)", spec)
        },
        unplugFrom: { store, paths, name in
            guard let current = try store.readString(paths.backendPath + "/port/\(name.name)"), !current.isEmpty else {
                throw XenStoreError.noEntry(paths.backendPath + "/port/\(name.name)")
            }
            try store.write(paths.backendPath + "/port/\(name.name)", "")
        },
        localFrontend: nil,
        portOutcome: { backend, name in
            if let error = backend("port-error/\(name.name)") { return .refused(error) }
            return backend("port-device/\(name.name)").map { .served($0) }
        })
}
