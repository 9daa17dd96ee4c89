import BlockTap
import Core
import XenStore

/// One `softdev-vbd` disk as xenstore shows it: what `softdev list` prints and the lab reads.
public struct AttachedDisk: Sendable, Equatable {
    public var domain: DomainID
    public var domainName: String?
    public var deviceID: UInt32
    /// The guest's name for it (the backend's `dev` node), e.g. xvdb.
    public var vdev: String
    public var spec: String
    public var readOnly: Bool
    public var backendState: XenbusDeviceState
    public var frontendState: XenbusDeviceState
    /// The backend's `error` node: why the device could not start or failed.
    public var error: String?
    /// What the frontend chose, from its nodes (nil before it connected).
    public var ringPageOrder: Int?
    public var queues: Int?
    public var persistentGrants: Bool?
    /// What the backend offered.
    public var maxIndirectSegments: Int?

    /// Every disk under `backendDomain`'s softdev-vbd directory, by domain then device.
    public static func all(store: any XenStoreClient, backendDomain: DomainID) -> [AttachedDisk] {
        let root = "/local/domain/\(backendDomain)/backend/\(BlockTapService.backendType)"
        var disks: [AttachedDisk] = []
        let read = { (path: String) in (try? store.readString(path)).flatMap { $0 } }
        let state = { (path: String) in XenbusDeviceState.read(store, path) }
        for guest in ((try? store.directory(root, transaction: .none)) ?? []).compactMap({ DomainID($0) }).sorted() {
            let devices = ((try? store.directory("\(root)/\(guest)", transaction: .none)) ?? []).compactMap { UInt32($0) }.sorted()
            for id in devices {
                let be = "\(root)/\(guest)/\(id)"
                let fe = read(be + "/frontend") ?? "/local/domain/\(guest)/device/vbd/\(id)"
                let feState = state(fe + "/state")
                let connected = feState == .connected || feState == .initialised
                disks.append(AttachedDisk(
                    domain: guest, domainName: read("/local/domain/\(guest)/name"), deviceID: id,
                    vdev: read(be + "/dev") ?? "\(id)", spec: read(be + "/params") ?? "", readOnly: read(be + "/mode") == "r",
                    backendState: state(be + "/state"), frontendState: feState, error: read(be + "/error"),
                    ringPageOrder: connected ? Int(read(fe + "/ring-page-order") ?? "0") : nil,
                    queues: connected ? Int(read(fe + "/multi-queue-num-queues") ?? "1") : nil,
                    persistentGrants: connected ? read(fe + "/feature-persistent") == "1" : nil,
                    maxIndirectSegments: Int(read(be + "/feature-max-indirect-segments") ?? "")))
            }
        }
        return disks
    }

    /// "order 4, 2 queues, persistent" or "-" before the frontend connected.
    public var negotiatedSummary: String {
        guard let order = ringPageOrder, let queues, let persistentGrants else { return "-" }
        return "ring order \(order), \(queues) queue\(queues == 1 ? "" : "s"), persistent \(persistentGrants ? "on" : "off")"
    }
}
