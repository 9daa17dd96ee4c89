import Core
import Glibc
import XenStore

/// Which hypervisor a command talks to.
public enum HypervisorKind: String, CaseIterable, Sendable {
    /// Xen when this program runs in a Xen domain that may map grants (dom0 or a driver
    /// domain), else the local emulated hypervisor.
    case auto
    /// Real Xen: libxengnttab, libxenevtchn and xenstored.
    case xen
    /// The emulated hypervisor of ``LocalHypervisorServer`` (no Xen needed).
    case local
}

/// A hypervisor kind with the local hypervisor's directory: how every command finds its
/// xenstore and, for the daemon, its grant table and event channels.
public struct HypervisorChoice: Sendable {
    public var kind: HypervisorKind
    public var localAddress: LocalHypervisorAddress

    public init(kind: HypervisorKind, localAddress: LocalHypervisorAddress = .default) {
        self.kind = kind; self.localAddress = localAddress
    }

    /// `auto` made concrete: Xen whenever this runs in a Xen domain (its xenbus device or
    /// xenstored's socket is there), even if gntdev is not usable yet, so that a dom0 without
    /// the modules gets the Xen error that says what to load, not a private emulator.
    public var resolved: HypervisorKind {
        guard kind == .auto else { return kind }
        let xenSigns = ["/dev/xen/xenbus", "/proc/xen/capabilities", "/run/xenstored/socket", "/var/run/xenstored/socket"]
        return XenHypervisor.isPresent || xenSigns.contains(where: { access($0, F_OK) == 0 }) ? .xen : .local
    }

    /// The xenstore only (what attach, detach and list need), as a privileged client.
    public func openStore() throws -> any XenStoreClient {
        switch resolved {
        case .xen:
            return try XenStoreSocketClient.connectToSystemStore()
        default:
            guard access(localAddress.storeSocket, F_OK) == 0 else {
                throw HypervisorChoiceError("no local hypervisor at \(localAddress.directory) (start one with `softdev serve --hypervisor local --local-dir \(localAddress.directory)`)")
            }
            return try XenStoreSocketClient(socketPath: localAddress.storeSocket)
        }
    }

    /// A backend's view of the hypervisor (what the daemon needs). For the local kind, the
    /// daemon becomes the hypervisor when none runs at the directory yet: the returned server
    /// must then be kept running and stopped last.
    public func openBackend() throws -> (hypervisor: any Hypervisor, embedded: LocalHypervisorServer?) {
        switch resolved {
        case .xen:
            return (try XenHypervisor.open(), nil)
        default:
            if let existing = try? LocalHypervisor.connectBackend(localAddress) { return (existing, nil) }
            let server = try LocalHypervisorServer(address: localAddress)
            try server.start()
            do {
                return (try LocalHypervisor.connectBackend(localAddress), server)
            } catch {
                server.stop()
                throw error
            }
        }
    }
}

public struct HypervisorChoiceError: Error, CustomStringConvertible, Sendable {
    public let description: String
    public init(_ description: String) { self.description = description }
}
