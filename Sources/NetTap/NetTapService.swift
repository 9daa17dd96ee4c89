import Core
import XenStore

/// The network tap as a service: every `softdev-vif` device the toolstack creates for any
/// guest gets a ``NetifBackend`` over the network stack its `params` node names.
public enum NetTapService {
    /// The backend directory SoftDev's network backend owns (kernel netback binds only `vif`).
    public static let backendType = "softdev-vif"
    /// The guest's directory: Linux's xen-netfront binds `device/vif/N`.
    public static let frontendType = "vif"

    /// The `softdev-vif` backend type: each vif gets a ``NetifBackend`` over the stack its
    /// `params` node names, opened with `open(spec)`; the backend owns the stack and closes
    /// it when the vif is unplugged.
    public static func backend(options: NetifBackendOptions = NetifBackendOptions(), log: @escaping @Sendable (String) -> Void = { _ in },
                               open: @escaping @Sendable (_ spec: String) throws -> any NetDevice) -> XenbusBackendType {
        XenbusBackendType(name: backendType) { hypervisor, path in
            guard let spec = try hypervisor.store.readString(path + "/params"), !spec.isEmpty else {
                throw NetifConnectError("\(path)/params is missing: it names the network device stack to serve")
            }
            return NetifBackend(device: try open(spec), options: options, log: log)
        }
    }

    /// A host serving the network backend alone (tests, the bench).
    public static func makeHost(hypervisor: any Hypervisor, options: NetifBackendOptions = NetifBackendOptions(),
                                teardownTimeout: Double = 5, log: @escaping @Sendable (String) -> Void = { _ in },
                                open: @escaping @Sendable (_ spec: String) throws -> any NetDevice) -> XenbusBackendHost {
        let host = XenbusBackendHost(hypervisor: hypervisor, teardownTimeout: teardownTimeout, log: log)
        host.register(backend(options: options, log: log, open: open))
        return host
    }

    /// A vif's own nodes, as libxl writes them for `xl network-attach` (besides the ones every
    /// device has); `params` holds the device stack. `mac` is the guest's address.
    public static func nodes(_ vif: XenbusDeviceName, spec: String, mac: MACAddress) -> (frontend: [String: String], backend: [String: String]) {
        (["handle": "\(vif.deviceID)", "mac": "\(mac)", "trusted": "1"],
         ["params": spec, "handle": "\(vif.deviceID)", "mac": "\(mac)", "type": "softdev", "hotplug-status": "connected"])
    }

    /// A MAC address in Xen's OUI (00:16:3e), derived from the guest and vif numbers so that
    /// each vif gets its own and the same one every time.
    public static func defaultMAC(guest: DomainID, vif: UInt32) -> MACAddress {
        MACAddress(0x00, 0x16, 0x3e, UInt8(truncatingIfNeeded: guest >> 8) & 0x7f, UInt8(truncatingIfNeeded: guest),
                   UInt8(truncatingIfNeeded: vif))
    }
}
