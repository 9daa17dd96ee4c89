import BlockTap
import Core
import Devices
import Observability

extension DeviceClass {
    /// Disks: Linux's xen-blkfront (`vbd`) served by the blkif backend over a block stack.
    public static let block = DeviceClass(
        id: .block, noun: "disk", plural: "disks",
        frontendType: BlockTapService.frontendType, backendType: BlockTapService.backendType,
        optionsTable: "blkif", devicesTable: "disk",
        nameHelp: "xvda, xvdb, ... (or a xenbus device number)",
        parseName: { try VirtualDisk($0).xenbusName },
        readOptions: { table, config in
            let o = config.blkif
            config.blkif.maxQueues = try table.int("max-queues", in: 1...16) ?? o.maxQueues
            config.blkif.maxRingPageOrder = try table.int("max-ring-page-order", in: 0...Blkif.maxRingPageOrder) ?? o.maxRingPageOrder
            config.blkif.maxIndirectSegments = try table.int("max-indirect-segments", in: 0...Blkif.maxIndirectSegments)
                ?? o.maxIndirectSegments
            config.blkif.persistentGrantsPerRing = try table.int("persistent-grants", in: 0...65536) ?? o.persistentGrantsPerRing
        },
        backend: { config, log, metrics in
            var options = config.blkif
            options.pollMicroseconds = config.pollMicroseconds
            options.ringStateDirectory = config.ringStateDirectory
            guard let metrics else {
                return BlockTapService.backend(options: options, log: log) { spec, readOnly in try DeviceRegistry.open(spec, readOnly: readOnly) }
            }
            // The block tap opens a stack from its spec alone; the metrics label it with the
            // backend path, so each device gets a backend type of its own that knows the path.
            return XenbusBackendType(name: BlockTapService.backendType) { [options] hypervisor, path in
                try BlockTapService.backend(options: options, log: log) { spec, readOnly in
                    BlockMetricsFilter(next: try DeviceRegistry.open(spec, readOnly: readOnly), metrics: metrics, device: path, transport: "blkif")
                }.makeDriver(hypervisor, path)
            }
        },
        settings: [],
        nodes: { name, spec, readOnly, _, _ in BlockTapService.nodes(name, spec: spec, readOnly: readOnly) },
        negotiated: { read, backend in
            guard let state = read("state").flatMap(UInt32.init), state == XenbusDeviceState.connected.rawValue
                    || state == XenbusDeviceState.initialised.rawValue else { return "-" }
            let order = read("ring-page-order") ?? "0"
            let queues = Int(read("multi-queue-num-queues") ?? "1") ?? 1
            let persistent = read("feature-persistent") == "1"
            var text = "ring order \(order), \(queues) queue\(queues == 1 ? "" : "s"), persistent \(persistent ? "on" : "off")"
            if let stats = backend("statistics") { text += ", " + stats }
            return text
        },
        plugInto: nil, unplugFrom: nil,
        localFrontend: { guest, path, options in try LocalGuestDisk(guest: guest, frontendPath: path, options: options) })
}
