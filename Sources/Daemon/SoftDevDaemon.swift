import BlockTap
import Core
import Devices
import Glibc
import NBDExport
import XenStore

/// `softdev serve`: one xenbus host serving every device class's backend (``DeviceClass/all``)
/// for every guest, the configured devices attached whenever their guest runs, and the
/// configured NBD exports.
///
/// Attach and detach happen through xenstore (`softdev attach`, `softdev detach` or any
/// toolstack), so the daemon picks them up while it runs; a guest that shuts down, crashes or is
/// destroyed loses its devices through `@releaseDomain`.
public final class SoftDevDaemon: @unchecked Sendable {
    /// Where NBD exports listen when the config names none.
    public static let defaultNBDSocket = "unix:/run/softdev/nbd.sock"

    public let config: ServeConfig
    public let hypervisor: any Hypervisor
    public let host: XenbusBackendHost
    private let embedded: LocalHypervisorServer?
    private let lock: ServeLock?
    /// Configured devices attached so far, as "domid/backend type/device id": each once per
    /// guest, so that a device the admin detached stays detached until its guest is born again.
    private var configuredAttached = Set<String>()
    private var nbdServers: [NBDServer] = []
    private var serviceStarted = false
    private var exportDevices: [any BlockDevice] = []
    private let log: @Sendable (String) -> Void
    private static let introduceToken = "daemon:introduce"

    /// Connects to the hypervisor `choice` names (for the local kind, becomes it if none runs).
    /// Takes the one-daemon lock for that hypervisor first.
    public convenience init(config: ServeConfig, choice: HypervisorChoice, log: @escaping @Sendable (String) -> Void) throws {
        let lock = try ServeLock(path: ServeLock.path(for: choice))
        var config = config
        if config.ringStateDirectory == nil {
            let rings = ServeLock.runDirectory(for: choice) + "/rings"
            guard mkdir(rings, 0o700) == 0 || errno == EEXIST else {
                throw ServeConfigError("cannot create \(rings) for the rings' records: \(String(cString: strerror(errno)))")
            }
            config.ringStateDirectory = rings
        }
        let (hypervisor, embedded) = try choice.openBackend()
        self.init(config: config, hypervisor: hypervisor, embedded: embedded, lock: lock, log: log)
    }

    public init(config: ServeConfig, hypervisor: any Hypervisor, embedded: LocalHypervisorServer? = nil, lock: ServeLock? = nil,
                log: @escaping @Sendable (String) -> Void) {
        self.config = config; self.hypervisor = hypervisor; self.embedded = embedded; self.lock = lock; self.log = log
        host = XenbusBackendHost(hypervisor: hypervisor, log: log)
        for deviceClass in DeviceClass.all { host.register(deviceClass.backend(config, log)) }
    }

    /// Opens the NBD exports' devices, starts every server, and attaches the configured devices
    /// of the guests that run now (and, through a watch, of those that start later).
    public func start() throws {
        do {
            try startNBD()
            // Set first: if start throws half-way, stop() must still stop the dispatcher.
            serviceStarted = true
            try host.start()
            if !config.attachments.isEmpty {
                try host.dispatcher.watch("@introduceDomain", token: Self.introduceToken) { [weak self] _ in
                    self?.attachConfiguredDevices()
                }
                host.dispatcher.async { [weak self] in self?.attachConfiguredDevices() }
            }
        } catch {
            stop()
            throw error
        }
        log("serving on \(hypervisor.kind) as domain \(hypervisor.domainID): backends "
            + DeviceClass.all.map { host.root($0.backendType) }.joined(separator: ", ")
            + (nbdServers.isEmpty ? "" : "; NBD " + nbdServers.map { "\($0.address)" }.joined(separator: ", ")))
    }

    /// Stops serving: every device is unplugged (its guest sees the backend close), NBD clients
    /// are disconnected, devices closed, and an embedded local hypervisor stops last.
    public func stop() {
        if serviceStarted {
            if !config.attachments.isEmpty { host.dispatcher.unwatch("@introduceDomain", token: Self.introduceToken) }
            host.stop()
            serviceStarted = false
        }
        for server in nbdServers { server.stop() }
        nbdServers.removeAll()
        for device in exportDevices { device.close() }
        exportDevices.removeAll()
        embedded?.stop()
    }

    private func startNBD() throws {
        guard !config.exports.isEmpty else {
            if !config.nbdListen.isEmpty { throw ServeConfigError("NBD listen addresses are given but no export: add [[export]] or --export NAME=SPEC") }
            return
        }
        var exports: [NBDExport] = []
        for e in config.exports {
            let device: any BlockDevice
            do { device = try DeviceRegistry.open(e.device) } catch {
                throw ServeConfigError("export '\(e.name)': \(error)")
            }
            exportDevices.append(device)
            exports.append(NBDExport(name: e.name, device: device, readOnly: e.readOnly, description: e.description))
        }
        for text in config.nbdListen.isEmpty ? [Self.defaultNBDSocket] : config.nbdListen {
            let address = try NBDListenAddress.parse(text)
            if text == Self.defaultNBDSocket { mkdir("/run/softdev", 0o755) }
            let server = NBDServer(listen: address, exports: exports, pollMicroseconds: config.pollMicroseconds)
            try server.start()
            nbdServers.append(server)
        }
    }

    /// The NBD servers, started (for tests: their bound TCP ports).
    public var nbdListeners: [NBDServer] { nbdServers }

    /// Attaches each configured device whose guest runs and does not have it yet. Runs on the
    /// dispatcher thread (at start and on every @introduceDomain).
    private func attachConfiguredDevices() {
        let store = hypervisor.store
        let running = Set(((try? store.directory("/local/domain", transaction: .none)) ?? []))
        configuredAttached = configuredAttached.filter { running.contains(String($0.prefix { $0 != "/" })) }
        for a in config.attachments {
            guard let deviceClass = try? DeviceClass.named(a.deviceClass),
                  let guest = try? XenbusToolstack.resolveDomain(store, a.domain) else { continue }
            let paths = deviceClass.paths(guest: guest, backendDomain: hypervisor.domainID, a.vdev)
            guard configuredAttached.insert("\(guest)/\(deviceClass.backendType)/\(a.vdev.deviceID)").inserted,
                  (try? store.read(paths.frontendPath, transaction: .none)) == nil else { continue }
            do {
                try deviceClass.attach(store: store, guest: guest, backendDomain: hypervisor.domainID, a.vdev,
                                       spec: a.device, readOnly: a.readOnly)
                log("attached \(a.vdev.name) to domain \(guest) (\(a.domain)): \(a.device)")
            } catch {
                log("cannot attach \(a.vdev.name) to domain \(guest) (\(a.domain)): \(error)")
            }
        }
    }
}
