import XenStore

/// A Xen domain's id. The backend runs in domain 0 (or a driver domain); guests are 1, 2, ...
public typealias DomainID = UInt16
/// A grant reference: an index into the granting domain's grant table.
public typealias GrantRef = UInt32
/// An event channel port, local to the domain that holds it.
public typealias EventPort = UInt32

/// The size of a page as the Xen ABI uses it (grants, rings, segments): 4 KiB on x86.
public let xenPageSize = 4096

/// The three services a paravirtual backend needs from a hypervisor: the grant table (to reach
/// the guest's pages), event channels (to signal), and xenstore (to set up).
///
/// Two implementations exist: ``LocalHypervisor`` emulates Xen in user space across processes
/// (shared memory, socket pairs for event channels, a xenstore server on a Unix socket), and the
/// Xen implementation uses libxengnttab, libxenevtchn and xenstored. Backends are written
/// against this protocol and never know which one they run on.
public protocol Hypervisor: AnyObject, Sendable {
    /// The domain this program runs in (0 for a backend in dom0).
    var domainID: DomainID { get }
    var grants: any GrantTable { get }
    var events: any EventChannels { get }
    var store: any XenStoreClient { get }
    /// A short name for logs and errors: "local" or "xen".
    var kind: String { get }
}
