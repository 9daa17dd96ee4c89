import BlockTap
import Core
import CoreMetrics
import Devices
import Foundation
import Glibc
import Logging
import NBDExport
import Observability
import USBTap
import XenStore

/// `softdev serve`: one xenbus host serving every device class's backend (``DeviceClass/all``)
/// for every guest, the configured devices attached whenever their guest runs, and the
/// configured NBD exports.
///
/// Attach and detach happen through xenstore (`softdev attach`, `softdev detach` or any
/// toolstack), so the daemon picks them up while it runs; a guest that shuts down, crashes or is
/// destroyed loses its devices through `@releaseDomain`.
///
/// It logs through swift-log (``DaemonLog``) and, with `[metrics] listen`, keeps swift-metrics
/// series for every stack it serves and answers Prometheus on `GET /metrics`.
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
    private var links: [NetLink] = []
    private var control: ControlSocket?
    /// Where `softdev type` and other control requests reach the daemon (nil: not listening).
    public let controlPath: String?
    public let logger: Logger
    /// Core's and the taps' plain-string messages, through `logger` (``DaemonLog/messages(to:)``).
    private let coreLog: @Sendable (String) -> Void
    /// The series of every served stack and of each class; nil when metrics are off.
    public let metrics: MetricsRegistry?
    private var endpoint: MetricsEndpoint?
    /// Per class: devices served, and those Connected (set at each scrape).
    private var classGauges: [(deviceClass: DeviceClass, attached: Gauge, connected: Gauge)] = []
    private static let introduceToken = "daemon:introduce"

    /// Connects to the hypervisor `choice` names (for the local kind, becomes it if none runs).
    /// Takes the one-daemon lock for that hypervisor first.
    public convenience init(config: ServeConfig, choice: HypervisorChoice, logger: Logger) throws {
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
        self.init(config: config, hypervisor: hypervisor, embedded: embedded, lock: lock, logger: logger,
                  controlPath: ServeLock.controlPath(for: choice))
    }

    /// The same, with each log line (at the config's level) given to `log`.
    public convenience init(config: ServeConfig, choice: HypervisorChoice, log: @escaping @Sendable (String) -> Void) throws {
        try self.init(config: config, choice: choice, logger: DaemonLog.logger(level: config.logLevel, output: log))
    }

    public init(config: ServeConfig, hypervisor: any Hypervisor, embedded: LocalHypervisorServer? = nil, lock: ServeLock? = nil,
                logger: Logger, controlPath: String? = nil) {
        self.config = config; self.hypervisor = hypervisor; self.embedded = embedded; self.lock = lock; self.logger = logger
        self.controlPath = controlPath
        coreLog = DaemonLog.messages(to: logger)
        metrics = config.metricsListen == nil ? nil : MetricsRegistry()
        host = XenbusBackendHost(hypervisor: hypervisor, log: coreLog)
        for deviceClass in DeviceClass.all { host.register(deviceClass.backend(config, coreLog, metrics)) }
        // The ids filters' alerts: to the log, and counted by action.
        let alertCounters = metrics.map { m in
            (alert: Counter(label: MetricsRegistry.idsAlerts, dimensions: [("action", "alert")], factory: m),
             deny: Counter(label: MetricsRegistry.idsAlerts, dimensions: [("action", "deny")], factory: m))
        }
        IDSFilter.setAlertHandler { [logger] alert in
            logger.warning("ids \(alert.action): \(alert.rule): \(alert.path ?? "-"): \(alert.detail)")
            if alert.action == "deny" { alertCounters?.deny.increment() } else { alertCounters?.alert.increment() }
        }
    }

    /// Opens the NBD exports' devices, starts every server, and attaches the configured devices
    /// of the guests that run now (and, through a watch, of those that start later).
    public func start() throws {
        do {
            try startMetrics()
            try startNBD()
            try startLinks()
            try startControl()
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
        logger.notice("""
            serving on \(hypervisor.kind) as domain \(hypervisor.domainID): backends \
            \(DeviceClass.all.map { host.root($0.backendType) }.joined(separator: ", "))\
            \(nbdServers.isEmpty ? "" : "; NBD " + nbdServers.map { "\($0.address)" }.joined(separator: ", "))\
            \(links.isEmpty ? "" : "; \(links.count) network link\(links.count == 1 ? "" : "s")")\
            \(endpoint.map { "; metrics http://\(config.metricsListen!.host):\($0.boundPort ?? 0)/metrics" } ?? "")
            """)
    }

    /// Stops serving: every device is unplugged (its guest sees the backend close), NBD clients
    /// are disconnected, devices closed, and an embedded local hypervisor stops last.
    public func stop() {
        // First: a scrape reads the host's devices on its dispatcher, which stops below.
        endpoint?.stop()
        endpoint = nil
        if serviceStarted {
            if !config.attachments.isEmpty { host.dispatcher.unwatch("@introduceDomain", token: Self.introduceToken) }
            host.stop()
            serviceStarted = false
        }
        for server in nbdServers { server.stop() }
        nbdServers.removeAll()
        for device in exportDevices { device.close() }
        exportDevices.removeAll()
        for link in links { link.close() }
        links.removeAll()
        control?.stop()
        control = nil
        for g in classGauges { g.attached.destroy(); g.connected.destroy() }
        classGauges.removeAll()
        embedded?.stop()
    }

    /// The Prometheus endpoint and the per-class gauges, when `[metrics] listen` is set.
    private func startMetrics() throws {
        guard let metrics, let listen = config.metricsListen else { return }
        classGauges = DeviceClass.all.map { c in
            (c, Gauge(label: MetricsRegistry.devicesAttached, dimensions: [("class", c.name)], factory: metrics),
             Gauge(label: MetricsRegistry.frontendsConnected, dimensions: [("class", c.name)], factory: metrics))
        }
        let endpoint = MetricsEndpoint(host: listen.host, port: listen.port, metrics: metrics) { [weak self] in self?.refreshClassGauges() }
        do { try endpoint.start() } catch { throw ServeConfigError("metrics: \(error)") }
        self.endpoint = endpoint
    }

    /// The endpoint, started (for tests: its bound port).
    public var metricsEndpoint: MetricsEndpoint? { endpoint }

    /// Counts each class's devices and those whose backend is Connected, at scrape time (on the
    /// host's dispatcher thread, which owns the devices' states).
    private func refreshClassGauges() {
        let host = host
        let roots = classGauges.map { host.root($0.deviceClass.backendType) + "/" }
        let counts = host.inspect { devices in
            roots.map { root in
                let mine = devices.filter { $0.key.hasPrefix(root) }.values
                return (mine.count, mine.filter { $0.state == .connected }.count)
            }
        }
        for (g, (attached, connected)) in zip(classGauges, counts) {
            g.attached.record(attached)
            g.connected.record(connected)
        }
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
            // Measured under the export's name, like a disk under its backend path.
            let served = metrics.map { BlockMetricsFilter(next: device, metrics: $0, device: e.name, transport: "nbd") } ?? device
            exportDevices.append(served)
            exports.append(NBDExport(name: e.name, device: served, readOnly: e.readOnly, description: e.description))
        }
        for text in config.nbdListen.isEmpty ? [Self.defaultNBDSocket] : config.nbdListen {
            let address = try NBDListenAddress.parse(text)
            if text == Self.defaultNBDSocket { mkdir("/run/softdev", 0o755) }
            let server = NBDServer(listen: address, exports: exports, pollMicroseconds: config.pollMicroseconds)
            try server.start()
            nbdServers.append(server)
        }
    }

    /// Opens the network links (`[[link]]`, `--link`): frames flow between their endpoints
    /// from now until `stop`.
    private func startLinks() throws {
        for spec in config.links {
            do { links.append(try NetLink(spec: spec)) } catch { throw ServeConfigError("link '\(spec)': \(error)") }
            logger.info("link: \(spec)")
        }
    }

    /// The control socket: `type DOMID PORT BASE64` types into the keyboard on a guest's USB
    /// port; `snapshot BASE64LOG BASE64NAME` marks a timetravel disk this daemon serves.
    private func startControl() throws {
        guard let controlPath else { return }
        let host = host, me = hypervisor.domainID
        let control = try ControlSocket(path: controlPath) { words in
            if words.first == "snapshot" {
                guard words.count == 3, let log = Data(base64Encoded: words[1]).flatMap({ String(data: $0, encoding: .utf8) }),
                      let name = Data(base64Encoded: words[2]).flatMap({ String(data: $0, encoding: .utf8) }) else {
                    throw ServeConfigError("expected: snapshot BASE64LOG BASE64NAME")
                }
                do throws(BlockError) { try TimeTravel.snapshot(log: log, name: name) } catch { throw ServeConfigError(error.message) }
                return
            }
            guard words.count == 4, words[0] == "type", let domain = DomainID(words[1]), let port = Int(words[2]),
                  let data = Data(base64Encoded: words[3]), let text = String(data: data, encoding: .utf8) else {
                throw ServeConfigError("expected: type DOMID PORT BASE64TEXT")
            }
            let path = "/local/domain/\(me)/backend/\(DeviceClass.usb.backendType)/\(domain)/0"
            let device = host.inspect { ($0[path]?.driver as? UsbifBackend)?.device(onPort: port) }
            guard var device else { throw ServeConfigError("domain \(domain) has no USB device on port \(port)") }
            while !(device is USBKeyboard), let filter = device as? USBFilter { device = filter.next }
            guard let keyboard = device as? USBKeyboard else { throw ServeConfigError("the device on port \(port) of domain \(domain) is not a keyboard") }
            try keyboard.type(text)
        }
        try control.start()
        self.control = control
    }

    /// The open links (for tests: their endpoints' counters).
    public var openLinks: [NetLink] { links }

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
                                       spec: a.device, readOnly: a.readOnly, settings: a.settings)
                logger.info("attached \(a.vdev.name) to domain \(guest) (\(a.domain)): \(a.device)",
                            metadata: ["class": "\(deviceClass.name)", "device": "\(paths.backendPath)"])
            } catch {
                logger.error("cannot attach \(a.vdev.name) to domain \(guest) (\(a.domain)): \(error)",
                             metadata: ["class": "\(deviceClass.name)", "device": "\(paths.backendPath)"])
            }
        }
    }
}
