import Glibc
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

/// A device as its guest names it (`xvdb`, a vif's number) and its xenbus device id.
public struct XenbusDeviceName: Sendable, Equatable, CustomStringConvertible {
    public let name: String
    public let deviceID: UInt32
    public init(name: String, deviceID: UInt32) { self.name = name; self.deviceID = deviceID }
    public var description: String { "\(name) (\(deviceID))" }
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
            // A device of the same number, ours or a kernel backend's, is already there.
            if (try? store.read(be + "/state", transaction: tx)) != nil { throw XenStoreError.exists(be) }
            if (try? store.read(fe, transaction: tx)) != nil { throw XenStoreError.exists(fe) }
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

    /// Removes both directories (after the backend has closed, or to force it), and the
    /// backend's per-guest directory once it is empty (as libxl__xs_path_cleanup does).
    ///
    /// The daemon removes the same backend nodes when the device closes. Xen's xenstored (C,
    /// 4.17) answers EIO rather than EAGAIN when another connection deleted a node this
    /// transaction had already seen ("Can't find child" in the parent), as seen in the Xen lab:
    /// that is a conflict too, so start over, a bounded number of times.
    public static func remove(_ store: any XenStoreClient, _ paths: XenbusDevicePaths) throws(XenStoreError) {
        let perGuest = String(paths.backendPath[..<paths.backendPath.lastIndex(of: "/")!])
        var attempts = 0
        while true {
            do {
                try store.transaction { (tx) throws(XenStoreError) in
                    do throws(XenStoreError) { try store.remove(paths.backendPath, transaction: tx) } catch .noEntry {}
                    do throws(XenStoreError) { try store.remove(paths.frontendPath, transaction: tx) } catch .noEntry {}
                    if (try? store.directory(perGuest, transaction: tx))?.isEmpty == true { try store.remove(perGuest, transaction: tx) }
                }
                return
            } catch .other("EIO") where attempts < 10 {
                attempts += 1
                usleep(50_000)
            }
        }
    }
}

extension XenbusToolstack {
    /// How a detach ended.
    public enum DetachOutcome: Sendable, Equatable {
        /// The backend closed the device (the frontend let go) and the nodes are gone.
        case closed
        /// The backend did not close within the timeout; the nodes were removed anyway, as
        /// `xl block-detach` does after its own timeout.
        case forced
    }

    /// Detaches a device as libxl does: sets the backend's `online` to 0 (a backend then asks
    /// the frontend to close), waits up to `timeoutSeconds` for the backend to reach Closed or
    /// remove its directory, then removes both directories.
    public static func detach(_ store: any XenStoreClient, _ paths: XenbusDevicePaths,
                              timeoutSeconds: Double) throws(XenStoreError) -> DetachOutcome {
        let be = paths.backendPath
        guard (try? store.read(be, transaction: .none)) != nil else { throw XenStoreError.noEntry(be) }
        try store.write(be + "/online", "0")
        // Closed, or its directory already removed by the backend (Unknown).
        let (_, closed) = XenbusDeviceState.poll(store, be + "/state", timeoutSeconds: timeoutSeconds, intervalMicroseconds: 20_000) {
            $0 == .closed || $0 == .unknown
        }
        try remove(store, paths)
        return closed ? .closed : .forced
    }

    /// The domain `nameOrID` names: a number, or the `name` node of a running domain
    /// (`/local/domain/N/name`, which libxl and the local hypervisor write).
    public static func resolveDomain(_ store: any XenStoreClient, _ nameOrID: String) throws -> UInt16 {
        let homes = (try? store.directory("/local/domain", transaction: .none)) ?? []
        if let id = UInt16(nameOrID) {
            guard homes.contains(nameOrID) else { throw XenbusToolstackError("domain \(id) does not exist (running: \(describe(store, homes)))") }
            return id
        }
        for home in homes {
            if (try? store.readString("/local/domain/\(home)/name")).flatMap({ $0 }) == nameOrID, let id = UInt16(home) { return id }
        }
        throw XenbusToolstackError("no domain is named '\(nameOrID)' (running: \(describe(store, homes)))")
    }

    /// "0 (Domain-0), 3 (guest1)": the running domains, for error messages.
    public static func describe(_ store: any XenStoreClient, _ homes: [String]) -> String {
        let list = homes.compactMap { UInt16($0) }.sorted().map { id in
            let name = (try? store.readString("/local/domain/\(id)/name")).flatMap { $0 }
            return name.map { "\(id) (\($0))" } ?? "\(id)"
        }
        return list.isEmpty ? "none" : list.joined(separator: ", ")
    }
}

/// A toolstack operation that cannot be done, with what to do about it.
public struct XenbusToolstackError: Error, CustomStringConvertible, Sendable {
    public let description: String
    public init(_ description: String) { self.description = description }
}
