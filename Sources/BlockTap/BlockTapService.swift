import Core
import XenStore

/// The block tap as a service: every `softdev-vbd` device the toolstack creates for any guest
/// gets a ``BlkifBackend`` over the device stack its `params` node names.
public enum BlockTapService {
    /// The backend directory SoftDev's block backend owns (no kernel backend claims it).
    public static let backendType = "softdev-vbd"
    /// The guest's directory: Linux's xen-blkfront binds `device/vbd/N`.
    public static let frontendType = "vbd"

    /// The `softdev-vbd` backend type: each device gets a ``BlkifBackend`` over the stack its
    /// `params` node names, opened with `open(spec, readOnly)` (readOnly: the toolstack attached
    /// it with mode "r"); the backend owns the stack and closes it when the disk is unplugged.
    public static func backend(options: BlkifBackendOptions = BlkifBackendOptions(), log: @escaping @Sendable (String) -> Void = { _ in },
                               open: @escaping @Sendable (_ spec: String, _ readOnly: Bool) throws -> any BlockDevice) -> XenbusBackendType {
        XenbusBackendType(name: backendType) { hypervisor, path in
            guard let spec = try hypervisor.store.readString(path + "/params"), !spec.isEmpty else {
                throw BlkifConnectError("\(path)/params is missing: it names the device stack to serve")
            }
            let readOnly = try hypervisor.store.readString(path + "/mode") == "r"
            return BlkifBackend(device: try open(spec, readOnly), options: options, log: log)
        }
    }

    /// A host serving the block backend alone (the demo, the bench, tests); the daemon
    /// registers ``backend(options:log:open:)`` beside the other classes instead.
    public static func makeHost(hypervisor: any Hypervisor, options: BlkifBackendOptions = BlkifBackendOptions(),
                                teardownTimeout: Double = 5, log: @escaping @Sendable (String) -> Void = { _ in },
                                open: @escaping @Sendable (_ spec: String, _ readOnly: Bool) throws -> any BlockDevice) -> XenbusBackendHost {
        let host = XenbusBackendHost(hypervisor: hypervisor, teardownTimeout: teardownTimeout, log: log)
        host.register(backend(options: options, log: log, open: open))
        return host
    }

    /// Creates the frontend and backend nodes of a disk for `guest` (what `softdev attach` does).
    @discardableResult
    public static func attach(store: any XenStoreClient, guest: DomainID, backendDomain: DomainID = 0, disk: VirtualDisk,
                              spec: String, readOnly: Bool = false) throws -> XenbusDevicePaths {
        let paths = XenbusDevicePaths(frontendDomain: guest, backendDomain: backendDomain, frontendType: frontendType,
                                      backendType: backendType, deviceID: disk.deviceID)
        let (frontend, backend) = nodes(disk.xenbusName, spec: spec, readOnly: readOnly)
        try XenbusToolstack.attach(store, paths, frontend: frontend, backend: backend)
        return paths
    }

    /// A disk's own nodes, as libxl writes them for `xl block-attach` (besides the ones every
    /// device has); `params` holds the device stack.
    public static func nodes(_ disk: XenbusDeviceName, spec: String, readOnly: Bool) -> (frontend: [String: String], backend: [String: String]) {
        (["virtual-device": "\(disk.deviceID)", "device-type": "disk"],
         ["params": spec, "mode": readOnly ? "r" : "w", "dev": disk.name, "type": "softdev",
          "removable": "0", "bootable": "1", "device-type": "disk"])
    }
}
