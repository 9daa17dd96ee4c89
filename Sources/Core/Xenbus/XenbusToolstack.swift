import XenStore

/// Where a paravirtual device's nodes live: the frontend's directory in the guest's home and
/// the backend's directory in the backend domain's home. SoftDev's backends use backend types
/// of their own (`softdev-vbd`) so that no kernel backend (blkback claims `vbd`) takes them.
public struct XenbusDevicePaths: Sendable, Equatable {
    public var frontendDomain: UInt16
    public var backendDomain: UInt16
    /// The frontend's device class, as the guest's driver looks for it: "vbd", "vif", "vusb".
    public var frontendType: String
    /// The backend's directory name: "softdev-vbd".
    public var backendType: String
    public var deviceID: UInt32

    public init(frontendDomain: UInt16, backendDomain: UInt16 = 0, frontendType: String, backendType: String, deviceID: UInt32) {
        self.frontendDomain = frontendDomain; self.backendDomain = backendDomain
        self.frontendType = frontendType; self.backendType = backendType; self.deviceID = deviceID
    }
    public var frontendPath: String { "/local/domain/\(frontendDomain)/device/\(frontendType)/\(deviceID)" }
    public var backendPath: String { "/local/domain/\(backendDomain)/backend/\(backendType)/\(frontendDomain)/\(deviceID)" }
}

/// The toolstack's part of the handshake (what libxl does for `xl block-attach`): create both
/// directories in one transaction, with the permissions that let each end read the other's
/// nodes and write only its own.
public enum XenbusToolstack {
    public static func attach(_ store: any XenStoreClient, _ paths: XenbusDevicePaths,
                              frontend: [String: String], backend: [String: String]) throws(XenStoreError) {
        let fe = paths.frontendPath, be = paths.backendPath
        // The guest owns its frontend directory; the backend domain may read it.
        let fePerms = [XenStorePermission(domain: paths.frontendDomain, access: .none),
                       XenStorePermission(domain: paths.backendDomain, access: .read)]
        // The backend domain owns its directory; the guest may read it, never write it.
        let bePerms = [XenStorePermission(domain: paths.backendDomain, access: .none),
                       XenStorePermission(domain: paths.frontendDomain, access: .read)]
        try store.transaction { (tx) throws(XenStoreError) in
            if (try? store.read(be + "/state", transaction: tx)) != nil {
                throw XenStoreError.exists(be)
            }
            try store.mkdir(fe, transaction: tx)
            try store.setPermissions(fe, fePerms, transaction: tx)
            try store.mkdir(be, transaction: tx)
            try store.setPermissions(be, bePerms, transaction: tx)
            var f = frontend
            f["backend"] = be; f["backend-id"] = "\(paths.backendDomain)"; f["state"] = "1"
            var b = backend
            b["frontend"] = fe; b["frontend-id"] = "\(paths.frontendDomain)"; b["online"] = "1"; b["state"] = "1"
            for (k, v) in f.sorted(by: { $0.key < $1.key }) {
                try store.write(fe + "/" + k, v, transaction: tx)
                try store.setPermissions(fe + "/" + k, fePerms, transaction: tx)
            }
            for (k, v) in b.sorted(by: { $0.key < $1.key }) {
                try store.write(be + "/" + k, v, transaction: tx)
                try store.setPermissions(be + "/" + k, bePerms, transaction: tx)
            }
        }
    }

    /// Removes both directories (after the backend has closed, or to force it).
    public static func remove(_ store: any XenStoreClient, _ paths: XenbusDevicePaths) throws(XenStoreError) {
        try store.transaction { (tx) throws(XenStoreError) in
            do throws(XenStoreError) { try store.remove(paths.backendPath, transaction: tx) } catch .noEntry {}
            do throws(XenStoreError) { try store.remove(paths.frontendPath, transaction: tx) } catch .noEntry {}
        }
    }
}
