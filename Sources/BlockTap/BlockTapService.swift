import Core
import XenStore

/// The block tap as a service: every `softdev-vbd` device the toolstack creates for any guest
/// gets a ``BlkifBackend`` over the device stack its `params` node names.
public enum BlockTapService {
    /// The backend directory SoftDev's block backend owns (no kernel backend claims it).
    public static let backendType = "softdev-vbd"

    /// A service that opens each device's stack with `open(spec)`; the backend owns the stack and
    /// closes it when the disk is unplugged.
    public static func make(hypervisor: any Hypervisor, options: BlkifBackendOptions = BlkifBackendOptions(),
                            log: @escaping (String) -> Void = { _ in },
                            open: @escaping (String) throws -> any BlockDevice) -> XenbusBackendService {
        XenbusBackendService(hypervisor: hypervisor, backendType: backendType, log: log) { service, path in
            guard let spec = try service.hypervisor.store.readString(path + "/params"), !spec.isEmpty else {
                throw BlkifConnectError("\(path)/params is missing: it names the device stack to serve")
            }
            var device = try open(spec)
            if try service.hypervisor.store.readString(path + "/mode") == "r", device.capabilities.contains(.write) {
                device = ReadOnlyView(next: device)
            }
            return BlkifBackend(device: device, options: options, log: log)
        }
    }

    /// Creates the frontend and backend nodes of a disk for `guest` (what `softdev attach` does).
    @discardableResult
    public static func attach(store: any XenStoreClient, guest: DomainID, backendDomain: DomainID = 0, disk: VirtualDisk,
                              spec: String, readOnly: Bool = false) throws -> XenbusDevicePaths {
        let paths = XenbusDevicePaths(frontendDomain: guest, backendDomain: backendDomain, frontendType: "vbd",
                                      backendType: backendType, deviceID: disk.deviceID)
        try XenbusToolstack.attach(store, paths,
            frontend: ["virtual-device": "\(disk.deviceID)", "device-type": "disk"],
            backend: ["params": spec, "mode": readOnly ? "r" : "w", "dev": disk.name, "type": "softdev",
                      "removable": "0", "bootable": "1", "device-type": "disk"])
        return paths
    }
}

/// Hides a device's write capabilities (a disk attached with mode "r").
final class ReadOnlyView: BlockFilter, @unchecked Sendable {
    override var name: String { "readonly" }
    override var capabilities: BlockCapabilities { next.capabilities.subtracting([.write, .discard, .writeZeroes]) }
}
