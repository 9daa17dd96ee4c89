import BlockTap
import Core
import Devices
import Foundation
import Logging
import NetTap
import TOMLKit

/// What `softdev serve --config FILE` reads: the hypervisor to use, each device class's backend
/// options (`[blkif]`) and devices to give guests by name (`[[disk]]`), and the NBD exports. Every key is checked: a typo is an
/// error with the key's place, never silently ignored.
///
/// ```toml
/// hypervisor = "auto"                 # auto | xen | local
/// local-directory = "/run/softdev/local"
/// poll-us = 50                        # idle rings and NBD connections poll this long before sleeping; 0: never
/// log-level = "info"                  # trace | debug | info | notice | warning | error | critical
///
/// [blkif]
/// max-queues = 4
/// max-ring-page-order = 4
/// max-indirect-segments = 256
/// persistent-grants = 1056            # per ring; 0 turns feature-persistent off
///
/// [[disk]]                            # attached whenever a domain of this name runs
/// domain = "guest1"
/// vdev = "xvdb"
/// device = "stats | file(path=/srv/guest1.img)"
/// readonly = false
///
/// [usbif]
/// rules = "/etc/softdev/usb-rules.conf"   # USBGuard rules every host(...) USB device must pass
///
/// [[usb]]
/// domain = "guest1"
/// vdev = "1"                          # the port of the guest's controller
/// device = "host(id=0781:5567)"
///
/// [nbd]
/// listen = ["unix:/run/softdev/nbd.sock"]
///
/// [[export]]
/// name = "scratch"
/// device = "memory(size=1G)"
/// readonly = false
/// description = "scratch space"
///
/// [[link]]                            # two endpoints joined by a network stack, no guest needed
/// device = "tap(name=a) | pcap(file=/tmp/ab.pcap) | tap(name=b)"
///
/// [metrics]                           # off unless listen is given
/// listen = "127.0.0.1:9464"           # Prometheus scrapes http://127.0.0.1:9464/metrics
/// ```
public struct ServeConfig: Sendable {
    /// A device the daemon attaches to a guest, found by name, whenever that guest runs.
    public struct Attachment: Sendable, Equatable {
        /// The device class's name (`block`).
        public var deviceClass: String
        public var domain: String
        public var vdev: XenbusDeviceName
        public var device: String
        public var readOnly: Bool
        /// The class's own settings (a vif's `mac`).
        public var settings: [String: String]
        public init(deviceClass: String, domain: String, vdev: XenbusDeviceName, device: String, readOnly: Bool = false,
                    settings: [String: String] = [:]) {
            self.deviceClass = deviceClass; self.domain = domain; self.vdev = vdev; self.device = device; self.readOnly = readOnly
            self.settings = settings
        }
        /// A disk.
        public init(domain: String, vdev: VirtualDisk, device: String, readOnly: Bool = false) {
            self.init(deviceClass: DeviceClass.block.name, domain: domain, vdev: vdev.xenbusName, device: device, readOnly: readOnly)
        }
    }

    /// A device stack served over NBD under a name.
    public struct Export: Sendable, Equatable {
        public var name: String
        public var device: String
        public var readOnly: Bool
        public var description: String
        public init(name: String, device: String, readOnly: Bool = false, description: String = "") {
            self.name = name; self.device = device; self.readOnly = readOnly; self.description = description
        }
    }

    public var hypervisor: HypervisorKind?
    public var localDirectory: String?
    /// How long an idle ring thread or NBD connection polls for the next request before it
    /// sleeps, in microseconds (0: never), for every class; each class's backend options get it.
    public var pollMicroseconds = AdaptivePoller.defaultMicroseconds {
        didSet { blkif.pollMicroseconds = pollMicroseconds; netif.pollMicroseconds = pollMicroseconds }
    }
    /// Where the rings' records are kept so that a restarted daemon resumes them (nil: none
    /// kept); the daemon sets `<run directory>/rings` (``ServeLock/runDirectory(for:)``).
    public var ringStateDirectory: String?
    /// `[blkif]`: what the block backend offers.
    public var blkif = BlkifBackendOptions()
    /// `[netif]`: what the network backend offers.
    public var netif = NetifBackendOptions()
    /// `[usbif] rules`: the USBGuard rules a host USB device (`host(...)`) must pass before a
    /// guest gets it (nil: no policy, every host device named in a spec is served).
    public var usbPolicy: USBPolicy?
    /// Every class's configured devices (`[[disk]]`, ...), in the file's order.
    public var attachments: [Attachment] = []
    /// `[[link]]` and `--link`: network stacks joining two endpoints without a guest
    /// (`tap(name=a) | filter(expr="tcp") | tap(name=b)`), the network tap's export.
    public var links: [String] = []
    public var nbdListen: [String] = []
    public var exports: [Export] = []
    /// `log-level`: the least severe messages the daemon writes (nil: info).
    public var logLevel: Logger.Level?
    /// `[metrics] listen`: where the Prometheus endpoint listens; nil: no metrics are kept.
    public var metricsListen: MetricsListenAddress?

    /// The configured disks (the block class's attachments).
    public var disks: [Attachment] {
        get { attachments.filter { $0.deviceClass == DeviceClass.block.name } }
        set { attachments = attachments.filter { $0.deviceClass != DeviceClass.block.name } + newValue }
    }

    public init() {}

    /// Reads and checks the file at `path`.
    public static func load(path: String) throws -> ServeConfig {
        guard let data = FileManager.default.contents(atPath: path) else {
            throw ServeConfigError("\(path): cannot read the config file (\(String(cString: strerror(errno))))")
        }
        guard let text = String(data: data, encoding: .utf8) else { throw ServeConfigError("\(path): not UTF-8 text") }
        return try parse(text, file: path)
    }

    /// Parses TOML `text`; `file` names it in errors.
    public static func parse(_ text: String, file: String = "config") throws -> ServeConfig {
        let table: TOMLTable
        do { table = try TOMLTable(string: text) } catch let error as TOMLParseError {
            throw ServeConfigError("\(file):\(error.source.begin.line):\(error.source.begin.column): \(error.description)")
        }
        var config = ServeConfig()
        var reader = ConfigTable(table: table, place: file)
        if let kind = try reader.string("hypervisor") {
            guard let k = HypervisorKind(rawValue: kind) else {
                throw ServeConfigError("\(file): hypervisor = \"\(kind)\": use one of \(HypervisorKind.allCases.map(\.rawValue).joined(separator: ", "))")
            }
            config.hypervisor = k
        }
        config.localDirectory = try reader.string("local-directory")
        if let level = try reader.string("log-level") { config.logLevel = try parseLogLevel(level, place: "\(file): log-level") }
        config.pollMicroseconds = try reader.int("poll-us", in: AdaptivePoller.microsecondRange) ?? config.pollMicroseconds
        for deviceClass in DeviceClass.all {
            if var options = try reader.table(deviceClass.optionsTable) {
                try deviceClass.readOptions(&options, &config)
                try options.finish()
            }
            for var entry in try reader.tables(deviceClass.devicesTable) {
                let vdevText = try entry.required("vdev")
                let vdev: XenbusDeviceName
                do { vdev = try deviceClass.parseName(vdevText) } catch { throw ServeConfigError("\(entry.place): \(error)") }
                var settings: [String: String] = [:]
                for (key, _) in deviceClass.settings { settings[key] = try entry.string(key) }
                let a = Attachment(deviceClass: deviceClass.name, domain: try entry.required("domain"), vdev: vdev,
                                   device: try entry.spec("device", of: deviceClass), readOnly: try entry.bool("readonly") ?? false,
                                   settings: settings)
                do { _ = try deviceClass.nodes(vdev, a.device, a.readOnly, settings, 1) }
                catch { throw ServeConfigError("\(entry.place): \(error)") }
                if config.attachments.contains(where: { $0.deviceClass == a.deviceClass && $0.domain == a.domain && $0.vdev.deviceID == a.vdev.deviceID }) {
                    throw ServeConfigError("\(entry.place): domain \(a.domain) has \(a.vdev.name) twice")
                }
                config.attachments.append(a)
                try entry.finish()
            }
        }
        if var nbd = try reader.table("nbd") {
            config.nbdListen = try nbd.strings("listen") ?? []
            try nbd.finish()
        }
        if var metrics = try reader.table("metrics") {
            if let listen = try metrics.string("listen") {
                config.metricsListen = try MetricsListenAddress.parse(listen, place: "\(metrics.place): listen")
            }
            try metrics.finish()
        }
        for var link in try reader.tables("link") {
            let spec = try link.required("device")
            do { try NetLink.check(spec) } catch { throw ServeConfigError("\(link.place): device: \(error)") }
            config.links.append(spec)
            try link.finish()
        }
        for var export in try reader.tables("export") {
            let e = Export(name: try export.required("name"), device: try export.spec("device"),
                           readOnly: try export.bool("readonly") ?? false, description: try export.string("description") ?? "")
            if config.exports.contains(where: { $0.name == e.name }) {
                throw ServeConfigError("\(export.place): export name '\(e.name)' is used twice")
            }
            config.exports.append(e)
            try export.finish()
        }
        try reader.finish()
        return config
    }
}

public struct ServeConfigError: Error, CustomStringConvertible, Sendable {
    public let description: String
    public init(_ description: String) { self.description = description }
}

/// Reads typed keys from one TOML table and, at `finish`, rejects the keys nobody asked for.
struct ConfigTable {
    let table: TOMLTable
    let place: String
    private var used: Set<String> = []

    init(table: TOMLTable, place: String) { self.table = table; self.place = place }

    private mutating func value(_ key: String) -> TOMLValueConvertible? {
        used.insert(key)
        return table[key]
    }

    private func wrong(_ key: String, _ expected: String) -> ServeConfigError {
        ServeConfigError("\(place): \(key) must be \(expected)")
    }

    mutating func string(_ key: String) throws -> String? {
        guard let v = value(key) else { return nil }
        guard let s = v.string else { throw wrong(key, "a string") }
        return s
    }

    mutating func required(_ key: String) throws -> String {
        guard let s = try string(key) else { throw ServeConfigError("\(place): \(key) is missing") }
        guard !s.isEmpty else { throw wrong(key, "a non-empty string") }
        return s
    }

    /// A device spec: parsed and its device names checked now, opened later.
    mutating func spec(_ key: String, of deviceClass: DeviceClass = .block) throws -> String {
        let text = try required(key)
        do { try deviceClass.check(text) } catch { throw ServeConfigError("\(place): \(key): \(error)") }
        return text
    }

    mutating func bool(_ key: String) throws -> Bool? {
        guard let v = value(key) else { return nil }
        guard let b = v.bool else { throw wrong(key, "true or false") }
        return b
    }

    mutating func int(_ key: String, in range: ClosedRange<Int>) throws -> Int? {
        guard let v = value(key) else { return nil }
        guard let i = v.int, range.contains(i) else { throw wrong(key, "an integer in \(range.lowerBound)...\(range.upperBound)") }
        return i
    }

    mutating func strings(_ key: String) throws -> [String]? {
        guard let v = value(key) else { return nil }
        if let s = v.string { return [s] }
        guard let a = v.array, let list = Optional(a.compactMap(\.string)), list.count == a.count else {
            throw wrong(key, "a string or a list of strings")
        }
        return list
    }

    mutating func table(_ key: String) throws -> ConfigTable? {
        guard let v = value(key) else { return nil }
        guard let t = v.table else { throw wrong(key, "a table ([\(key)])") }
        return ConfigTable(table: t, place: "\(place) [\(key)]")
    }

    mutating func tables(_ key: String) throws -> [ConfigTable] {
        guard let v = value(key) else { return [] }
        guard let a = v.array else { throw wrong(key, "an array of tables ([[\(key)]])") }
        return try a.enumerated().map { i, element in
            guard let t = element.table else { throw wrong(key, "an array of tables ([[\(key)]])") }
            return ConfigTable(table: t, place: "\(place) [[\(key)]] #\(i + 1)")
        }
    }

    func finish() throws {
        let unknown = table.keys.filter { !used.contains($0) }.sorted()
        guard unknown.isEmpty else {
            throw ServeConfigError("\(place): unknown key\(unknown.count > 1 ? "s" : "") \(unknown.joined(separator: ", "))")
        }
    }
}
