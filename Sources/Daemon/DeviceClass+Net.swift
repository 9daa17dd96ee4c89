import Core
import Devices
import NetTap
import Observability

extension DeviceClass {
    /// Network cards: Linux's xen-netfront (`vif`) served by the netif backend over a network
    /// stack (a TAP, a switch, filters).
    public static let net = DeviceClass(
        id: .net, noun: "network card", plural: "network cards",
        frontendType: NetTapService.frontendType, backendType: NetTapService.backendType,
        optionsTable: "netif", devicesTable: "nic",
        nameHelp: "0, 1, ... (the vif's number; the guest calls it eth0, eth1, ...)",
        parseName: { text in
            let digits = text.hasPrefix("vif") ? String(text.dropFirst(3)) : text
            guard let n = UInt32(digits), n < 1000 else {
                throw ServeConfigError("'\(text)' is not a vif number: use 0, 1, ... (the guest's eth0, eth1, ...)")
            }
            return XenbusDeviceName(name: "\(n)", deviceID: n)
        },
        readOptions: { table, config in
            let o = config.netif
            config.netif.maxQueues = try table.int("max-queues", in: 1...16) ?? o.maxQueues
            config.netif.backlogBytes = try table.int("rx-backlog-kib", in: 64...(1 << 20)).map { $0 << 10 } ?? o.backlogBytes
        },
        backend: { config, log, metrics in
            var options = config.netif
            options.pollMicroseconds = config.pollMicroseconds
            let open: @Sendable (String) throws -> any NetDevice = { spec in
                guard let device = try DeviceRegistry.open(spec, of: .net) as? any NetDevice else {
                    throw ServeConfigError("'\(spec)' is not a network device stack")
                }
                return device
            }
            guard let metrics else { return NetTapService.backend(options: options, log: log, open: open) }
            // Labelled with the vif's backend path, as disks are.
            return XenbusBackendType(name: NetTapService.backendType) { [options] hypervisor, path in
                try NetTapService.backend(options: options, log: log) { spec in
                    NetMetricsFilter(next: try open(spec), metrics: metrics, device: path, transport: "netif")
                }.makeDriver(hypervisor, path)
            }
        },
        settings: [("mac", "the guest's MAC address, e.g. 00:16:3e:01:02:03 (default: 00:16:3e, then from the domain and vif numbers)")],
        nodes: { name, spec, _, settings, guest in
            var mac = NetTapService.defaultMAC(guest: guest, vif: name.deviceID)
            if let text = settings["mac"] {
                guard let m = MACAddress(text), !m.isMulticast else {
                    throw ServeConfigError("mac = \(text): give a unicast address such as 00:16:3e:01:02:03")
                }
                mac = m
            }
            return NetTapService.nodes(name, spec: spec, mac: mac)
        },
        negotiated: { frontend, backend in
            guard let state = frontend("state").flatMap(UInt32.init), state == XenbusDeviceState.connected.rawValue else { return "-" }
            let queues = Int(frontend("multi-queue-num-queues") ?? "1") ?? 1
            var features: [String] = []
            if frontend("feature-sg") == "1" { features.append("sg") }
            if frontend("feature-gso-tcpv4") == "1" { features.append("tso4") }
            if frontend("feature-gso-tcpv6") == "1" { features.append("tso6") }
            if frontend(queues == 1 ? "event-channel-tx" : "queue-0/event-channel-tx") != nil { features.append("split") }
            var text = "\(queues) queue\(queues == 1 ? "" : "s"), \(features.isEmpty ? "no offloads" : features.joined(separator: ","))"
            if let stats = backend("statistics") { text += ", " + stats }
            return text
        },
        plugInto: nil, unplugFrom: nil,
        localFrontend: { guest, path, options in try LocalGuestNic(guest: guest, frontendPath: path, options: options) })
}
