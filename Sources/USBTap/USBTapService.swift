import Core
import XenStore

/// The USB tap as a service: every `softdev-vusb` controller the toolstack creates for a guest
/// gets a ``UsbifBackend`` whose ports plug the USB stacks their `port/N` nodes name.
public enum USBTapService {
    /// The backend directory SoftDev's USB backend owns.
    public static let backendType = "softdev-vusb"
    /// The guest's directory: Linux's xen-hcd binds `device/vusb/N` whatever the backend.
    public static let frontendType = "vusb"

    /// The `softdev-vusb` backend type: each port's stack is opened with `open(spec)` when it
    /// is plugged, and closed when it is unplugged or the controller goes.
    public static func backend(options: UsbifBackendOptions = UsbifBackendOptions(), log: @escaping @Sendable (String) -> Void = { _ in },
                               open: @escaping @Sendable (_ spec: String) throws -> any USBDevice) -> XenbusBackendType {
        XenbusBackendType(name: backendType) { _, _ in UsbifBackend(options: options, log: log, open: open) }
    }

    /// A host serving the USB backend alone (tests, the bench).
    public static func makeHost(hypervisor: any Hypervisor, options: UsbifBackendOptions = UsbifBackendOptions(),
                                teardownTimeout: Double = 5, log: @escaping @Sendable (String) -> Void = { _ in },
                                open: @escaping @Sendable (_ spec: String) throws -> any USBDevice) -> XenbusBackendHost {
        let host = XenbusBackendHost(hypervisor: hypervisor, teardownTimeout: teardownTimeout, log: log)
        host.register(backend(options: options, log: log, open: open))
        return host
    }

    /// A controller's nodes, as libxl writes them for a qusb controller: `num-ports` and
    /// `usb-ver` (xen-hcd reads both at probe), `port/1..N` (a stack, or empty).
    public static func nodes(ports: Int, usbVersion: Int, plugged: [Int: String]) -> (frontend: [String: String], backend: [String: String]) {
        var backend = ["num-ports": "\(ports)", "usb-ver": "\(usbVersion)", "type": "softdev"]
        for p in 1...max(1, ports) { backend["port/\(p)"] = plugged[p] ?? "" }
        return ([:], backend)
    }
}
