import Core
import XenStore

/// One soft device attached to a guest, of any class, as xenstore shows it: what `softdev list`
/// prints and the lab reads.
public struct AttachedDevice: Sendable, Equatable {
    /// The device class's name (`block`).
    public var deviceClass: String
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
    /// What the frontend chose, in the class's words ("ring order 4, 1 queue, persistent on"),
    /// or "-" before it connected.
    public var negotiated: String
    /// The frontend's nodes, for a closer look (e.g. `feature-persistent`).
    public var frontendNodes: [String: String]

    /// Every device under `backendDomain`'s backend directories, by class, domain and device.
    public static func all(store: any XenStoreClient, backendDomain: DomainID) -> [AttachedDevice] {
        var devices: [AttachedDevice] = []
        let read = { (path: String) in (try? store.readString(path)).flatMap { $0 } }
        for deviceClass in DeviceClass.all {
            let root = "/local/domain/\(backendDomain)/backend/\(deviceClass.backendType)"
            for guest in ((try? store.directory(root, transaction: .none)) ?? []).compactMap({ DomainID($0) }).sorted() {
                let ids = ((try? store.directory("\(root)/\(guest)", transaction: .none)) ?? []).compactMap { UInt32($0) }.sorted()
                for id in ids {
                    let be = "\(root)/\(guest)/\(id)"
                    let fe = read(be + "/frontend") ?? "/local/domain/\(guest)/device/\(deviceClass.frontendType)/\(id)"
                    var nodes: [String: String] = [:]
                    for key in (try? store.directory(fe, transaction: .none)) ?? [] { nodes[key] = read(fe + "/" + key) }
                    devices.append(AttachedDevice(
                        deviceClass: deviceClass.name, domain: guest, domainName: read("/local/domain/\(guest)/name"), deviceID: id,
                        vdev: read(be + "/dev") ?? "\(id)", spec: read(be + "/params") ?? "", readOnly: read(be + "/mode") == "r",
                        backendState: XenbusDeviceState.read(store, be + "/state"), frontendState: XenbusDeviceState.read(store, fe + "/state"),
                        error: read(be + "/error"), negotiated: deviceClass.negotiated({ nodes[$0] ?? ($0.contains("/") ? read(fe + "/" + $0) : nil) },
                                                                                { read(be + "/" + $0) }), frontendNodes: nodes))
                }
            }
        }
        return devices
    }
}
