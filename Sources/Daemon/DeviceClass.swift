import Core
import Glibc
import Devices
import Observability
import XenStore

/// One class of soft devices as the daemon, its config file and the CLI see it: the names, the
/// xenbus directories, the config tables and how its backend is built. `softdev serve`,
/// `attach`, `detach`, `list` and `devices` iterate ``all``, so that a new class (network, USB)
/// is one entry there, written in a file of its own (see `DeviceClass+Block.swift`).
public struct DeviceClass: Sendable {
    /// The class as users write it: `softdev attach DOMAIN block ...`.
    public let id: SoftDeviceClass
    public var name: String { id.name }
    /// What one device of the class is called in messages ("disk") and several ("disks").
    public let noun: String
    public let plural: String
    /// The guest's xenbus directory (`vbd`) and ours (`softdev-vbd`, which no kernel backend claims).
    public let frontendType: String
    public let backendType: String
    /// The config file's table of backend options (`[blkif]`) and array of devices (`[[disk]]`).
    public let optionsTable: String
    public let devicesTable: String
    /// How a guest names a device, for help texts: "xvda, xvdb, ... (or a xenbus device number)".
    public let nameHelp: String
    /// The guest's name for a device (`xvdb`) and its xenbus device id; throws for a bad name.
    public let parseName: @Sendable (String) throws -> XenbusDeviceName
    /// Reads the options table into the config (its keys checked by `finish`).
    let readOptions: @Sendable (inout ConfigTable, inout ServeConfig) throws -> Void
    /// The backend type the daemon registers with its xenbus host, over the config's options;
    /// it opens each device's stack with the registry and, when metrics are on, puts the class's
    /// measuring filter on top, labelled with the device's backend path.
    let backend: @Sendable (_ config: ServeConfig, _ log: @escaping @Sendable (String) -> Void, _ metrics: MetricsRegistry?) -> XenbusBackendType
    /// Settings of one device besides its name and stack (a vif's `mac`), by key, with their
    /// help: config tables and `softdev attach` options accept these for this class alone.
    public let settings: [(key: String, help: String)]
    /// The frontend's and the backend's nodes for one device (besides those the toolstack
    /// writes for every device: state, backend, frontend, online, ...); throws for a bad setting.
    let nodes: @Sendable (_ name: XenbusDeviceName, _ spec: String, _ readOnly: Bool, _ settings: [String: String],
                          _ guest: DomainID) throws -> (frontend: [String: String], backend: [String: String])
    /// What the frontend chose once connected, in a few words for `softdev list` (from the
    /// frontend's nodes read with `frontend`, the backend's with `backend`, e.g. its counters);
    /// "-" before it connected.
    let negotiated: @Sendable (_ frontend: (String) -> String?, _ backend: (String) -> String?) -> String
    /// For a class whose devices share one xenbus device (USB: ports of one controller), what
    /// attaching and detaching one does instead of creating and removing the xenbus device.
    let plugInto: (@Sendable (_ store: any XenStoreClient, _ paths: XenbusDevicePaths, _ name: XenbusDeviceName, _ spec: String,
                              _ settings: [String: String], _ guest: DomainID) throws -> Void)?
    let unplugFrom: (@Sendable (_ store: any XenStoreClient, _ paths: XenbusDevicePaths, _ name: XenbusDeviceName) throws -> Void)?
    /// `softdev guest`: connects the class's Swift frontend to the device at `frontendPath` of
    /// a local guest (nil: the class has none yet).
    public let localFrontend: (@Sendable (_ guest: LocalHypervisor, _ frontendPath: String, _ options: LocalGuestOptions) throws
                                -> any LocalGuestDevice)?
    /// For a class of ports, how the daemon answered for one port, from the backend's nodes
    /// (read with `backend`, relative to its directory); nil: not yet.
    var portOutcome: (@Sendable (_ backend: (String) -> String?, _ name: XenbusDeviceName) -> AttachOutcome?)? = nil

    /// Every class the daemon serves.
    public static let all: [DeviceClass] = [.block, .net, .usb]

    /// The class named `name`, or an error that lists them.
    public static func named(_ name: String) throws -> DeviceClass {
        guard let c = all.first(where: { $0.name == name }) else {
            throw ServeConfigError("unknown device type '\(name)': use \(all.map(\.name).joined(separator: " or "))")
        }
        return c
    }

    /// Where a device of this class lives in xenstore.
    public func paths(guest: DomainID, backendDomain: DomainID, _ device: XenbusDeviceName) -> XenbusDevicePaths {
        XenbusDevicePaths(frontendDomain: guest, backendDomain: backendDomain, frontendType: frontendType,
                          backendType: backendType, deviceID: device.deviceID)
    }

    /// Checks `spec` (syntax, names, parameters) as a stack of this class, without opening it.
    public func check(_ spec: String) throws {
        try DeviceRegistry.check(spec, of: id)
    }

    /// Creates the frontend and backend nodes of one device for `guest`, in one transaction
    /// with libxl's permissions (what `softdev attach` does; the daemon then serves it).
    @discardableResult
    public func attach(store: any XenStoreClient, guest: DomainID, backendDomain: DomainID, _ device: XenbusDeviceName,
                       spec: String, readOnly: Bool = false, settings: [String: String] = [:]) throws -> XenbusDevicePaths {
        for key in settings.keys where !self.settings.contains(where: { $0.key == key }) {
            let known = self.settings.isEmpty ? "none" : self.settings.map(\.key).joined(separator: ", ")
            throw ServeConfigError("\(key) is not a setting of \(plural) (theirs: \(known))")
        }
        let paths = paths(guest: guest, backendDomain: backendDomain, device)
        if let plugInto, (try? store.read(paths.backendPath, transaction: .none)) != nil {
            try plugInto(store, paths, device, spec, settings, guest)
            return paths
        }
        let (frontend, backend) = try nodes(device, spec, readOnly, settings, guest)
        try XenbusToolstack.attach(store, paths, frontend: frontend, backend: backend)
        return paths
    }

    /// What the daemon made of an attached device.
    public enum AttachOutcome: Equatable, Sendable {
        /// Served: the stack is open (a USB port: its device, e.g. "46f4:0001 high speed").
        case served(String)
        /// Refused, with the daemon's reason.
        case refused(String)
    }

    /// How the daemon answered for `device` at `paths`, or nil while it has not: one reading for
    /// every class. The backend publishes a failure as xenbus_dev_error does, in the device's
    /// `error` node (for a port, `port-error/N`), and a device it serves leaves Initialising
    /// (InitWait once its stack is open; a port's device is named in `port-device/N`).
    public func outcome(store: any XenStoreClient, paths: XenbusDevicePaths, _ device: XenbusDeviceName) -> AttachOutcome? {
        let be = paths.backendPath
        let read = { (key: String) in (try? store.readString(be + "/" + key)).flatMap { $0 } }
        guard (try? store.read(be, transaction: .none)) != nil else {
            return .refused("its nodes are gone (the guest went away, or someone detached it meanwhile)")
        }
        // A port's own answer first: a controller that failed earlier may still serve others.
        if let portOutcome, let answer = portOutcome(read, device) { return answer }
        if let error = read("error"), !error.isEmpty { return .refused(error) }
        if portOutcome != nil { return nil }
        let state = XenbusDeviceState.read(store, be + "/state")
        return [.initWait, .initialised, .connected].contains(state) ? .served("") : nil
    }

    /// Polls ``outcome(store:paths:_:)`` until the daemon answers or `timeoutSeconds` pass (nil).
    public func awaitOutcome(store: any XenStoreClient, paths: XenbusDevicePaths, _ device: XenbusDeviceName,
                             timeoutSeconds: Double) -> AttachOutcome? {
        let end = monotonicSeconds() + timeoutSeconds
        while true {
            if let outcome = outcome(store: store, paths: paths, device) { return outcome }
            guard monotonicSeconds() < end else { return nil }
            usleep(20_000)
        }
    }

    /// `softdev attach` with a daemon serving: attaches `device`, then waits up to
    /// `timeoutSeconds` for the daemon to serve it or refuse it. A refused device is taken away
    /// again (its nodes removed; a port of a controller that was there already emptied), so the
    /// same attach can be made again once its cause is fixed, and the daemon's reason is thrown.
    /// Returns the paths and what is served, or nil if the daemon did not answer in time (the
    /// device stays attached).
    public func attachServed(store: any XenStoreClient, guest: DomainID, backendDomain: DomainID, _ device: XenbusDeviceName,
                             spec: String, readOnly: Bool = false, settings: [String: String] = [:],
                             timeoutSeconds: Double) throws -> (paths: XenbusDevicePaths, served: String?) {
        let controllerExisted = plugInto != nil
            && (try? store.read(self.paths(guest: guest, backendDomain: backendDomain, device).backendPath, transaction: .none)) != nil
        let paths = try attach(store: store, guest: guest, backendDomain: backendDomain, device, spec: spec, readOnly: readOnly, settings: settings)
        switch awaitOutcome(store: store, paths: paths, device, timeoutSeconds: timeoutSeconds) {
        case .served(let what): return (paths, what)
        case nil: return (paths, nil)
        case .refused(let why):
            if let unplugFrom, controllerExisted {
                do { try unplugFrom(store, paths, device) } catch XenStoreError.noEntry {}
            } else {
                try XenbusToolstack.remove(store, paths)
            }
            throw ServeConfigError("softdev serve refused \(noun) \(device.name) of domain \(guest): \(why). "
                                   + "Nothing is attached: fix the cause and attach again")
        }
    }

    /// Takes one device away from `guest` (what `softdev detach` does): the xenbus device's
    /// close handshake, or for a class of ports, the port emptied.
    public func detach(store: any XenStoreClient, paths: XenbusDevicePaths, _ device: XenbusDeviceName,
                       timeoutSeconds: Double) throws -> XenbusToolstack.DetachOutcome {
        if let unplugFrom {
            try unplugFrom(store, paths, device)
            return .closed
        }
        return try XenbusToolstack.detach(store, paths, timeoutSeconds: timeoutSeconds)
    }
}
