import CXen
import Glibc
import XenStore

/// Why the Xen hypervisor interface could not be opened.
public enum XenHypervisorError: Error, CustomStringConvertible {
    /// A device node is missing or not usable (not on Xen, not privileged, module not loaded).
    case unavailable(path: String, errno: Int32)
    case system(operation: String, errno: Int32)
    /// xenstore answered but does not say which domain we are.
    case unknownDomain(String)

    public var description: String {
        switch self {
        case let .unavailable(path, e):
            return "Xen is not usable here: \(path): \(String(cString: strerror(e))) (run in dom0 or a driver domain with the xen-gntdev and xen-evtchn modules loaded)"
        case let .system(op, e): return "\(op) failed: \(String(cString: strerror(e)))"
        case let .unknownDomain(why): return "cannot tell which Xen domain this is: \(why)"
        }
    }
}

/// The ``Hypervisor`` of a real Xen, for a backend in dom0 or a driver domain: grants through
/// libxengnttab, event channels through libxenevtchn, and xenstore through xenstored's socket
/// (or /dev/xen/xenbus where there is no xenstored, as in a driver domain).
public final class XenHypervisor: Hypervisor, @unchecked Sendable {
    public let domainID: DomainID
    public let grants: any GrantTable
    public let events: any EventChannels
    public let store: any XenStoreClient
    public var kind: String { "xen" }

    public static let grantDevice = "/dev/xen/gntdev"
    public static let eventChannelDevice = "/dev/xen/evtchn"

    /// Whether this program runs in a Xen domain that can serve devices: the grant device and the
    /// event channel device both open read-write.
    public static var isPresent: Bool {
        usable(grantDevice) == 0 && usable(eventChannelDevice) == 0
    }

    /// 0 if `path` opens read-write, else the errno.
    private static func usable(_ path: String) -> Int32 {
        let fd = Glibc.open(path, O_RDWR | O_CLOEXEC)
        guard fd >= 0 else { return errno }
        Glibc.close(fd)
        return 0
    }

    /// Opens the grant table, event channels and xenstore, and learns our domain id from
    /// xenstore's `domid` node (0 in dom0).
    public static func open() throws -> XenHypervisor {
        // Check the devices first: libxengnttab and libxenevtchn would print their own errors.
        for path in [grantDevice, eventChannelDevice] {
            let e = usable(path)
            if e != 0 { throw XenHypervisorError.unavailable(path: path, errno: e) }
        }
        guard let gnttab = xengnttab_open(nil, 0) else { throw XenHypervisorError.system(operation: "xengnttab_open", errno: errno) }
        let grants = XenGrantTable(handle: gnttab)
        let store = try XenStoreSocketClient.connectToSystemStore()
        do {
            return XenHypervisor(domainID: try ownDomainID(store), grants: grants, events: XenEventChannels(), store: store)
        } catch {
            store.close()
            throw error
        }
    }

    private init(domainID: DomainID, grants: any GrantTable, events: any EventChannels, store: any XenStoreClient) {
        self.domainID = domainID; self.grants = grants; self.events = events; self.store = store
    }

    deinit { (store as? XenStoreSocketClient)?.close() }

    /// The relative path `domid` is our own home's (xen-init-dom0 writes it for dom0, libxl for
    /// other domains). A dom0 whose node is missing is still domain 0.
    public static func ownDomainID(_ store: any XenStoreClient) throws -> DomainID {
        if let id = try store.readInt("domid") {
            guard id < 0x7ff0 else { throw XenHypervisorError.unknownDomain("xenstore domid = \(id)") }
            return DomainID(id)
        }
        if isControlDomain { return 0 }
        throw XenHypervisorError.unknownDomain("xenstore has no domid node for us and this is not dom0")
    }

    /// /proc/xen/capabilities says `control_d` only in dom0.
    private static var isControlDomain: Bool {
        guard let f = fopen("/proc/xen/capabilities", "r") else { return false }
        defer { fclose(f) }
        var line = [CChar](repeating: 0, count: 256)
        return fgets(&line, Int32(line.count), f) != nil && strstr(line, "control_d") != nil
    }
}
