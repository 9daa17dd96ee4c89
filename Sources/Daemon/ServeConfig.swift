import BlockTap
import Core
import Devices
import Foundation
import TOMLKit

/// What `softdev serve --config FILE` reads: the hypervisor to use, the blkif features to offer,
/// the disks to give guests by name, and the NBD exports. Every key is checked: a typo is an
/// error with the key's place, never silently ignored.
///
/// ```toml
/// hypervisor = "auto"                 # auto | xen | local
/// local-directory = "/run/softdev/local"
/// poll-us = 50                        # idle rings and NBD connections poll this long before sleeping; 0: never
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
/// [nbd]
/// listen = ["unix:/run/softdev/nbd.sock"]
///
/// [[export]]
/// name = "scratch"
/// device = "memory(size=1G)"
/// readonly = false
/// description = "scratch space"
/// ```
public struct ServeConfig: Sendable {
    /// A disk the daemon attaches to a guest, found by name, whenever that guest runs.
    public struct Disk: Sendable, Equatable {
        public var domain: String
        public var vdev: VirtualDisk
        public var device: String
        public var readOnly: Bool
        public init(domain: String, vdev: VirtualDisk, device: String, readOnly: Bool = false) {
            self.domain = domain; self.vdev = vdev; self.device = device; self.readOnly = readOnly
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
    public var blkif = BlkifBackendOptions()
    public var disks: [Disk] = []
    public var nbdListen: [String] = []
    /// How long an idle ring thread or NBD connection polls for the next request before it
    /// sleeps, in microseconds (0: never). Also in `blkif.pollMicroseconds`.
    public var pollMicroseconds: Int {
        get { blkif.pollMicroseconds }
        set { blkif.pollMicroseconds = newValue }
    }
    public var exports: [Export] = []

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
        var reader = TableReader(table: table, place: file)
        if let kind = try reader.string("hypervisor") {
            guard let k = HypervisorKind(rawValue: kind) else {
                throw ServeConfigError("\(file): hypervisor = \"\(kind)\": use one of \(HypervisorKind.allCases.map(\.rawValue).joined(separator: ", "))")
            }
            config.hypervisor = k
        }
        config.localDirectory = try reader.string("local-directory")
        config.pollMicroseconds = try reader.int("poll-us", in: AdaptivePoller.microsecondRange) ?? config.pollMicroseconds
        if var blkif = try reader.table("blkif") {
            let o = config.blkif
            config.blkif.maxQueues = try blkif.int("max-queues", in: 1...16) ?? o.maxQueues
            config.blkif.maxRingPageOrder = try blkif.int("max-ring-page-order", in: 0...Blkif.maxRingPageOrder) ?? o.maxRingPageOrder
            config.blkif.maxIndirectSegments = try blkif.int("max-indirect-segments", in: 0...Blkif.maxIndirectSegments) ?? o.maxIndirectSegments
            config.blkif.persistentGrantsPerRing = try blkif.int("persistent-grants", in: 0...65536) ?? o.persistentGrantsPerRing
            try blkif.finish()
        }
        for var disk in try reader.tables("disk") {
            let vdevText = try disk.required("vdev")
            let vdev: VirtualDisk
            do { vdev = try VirtualDisk(vdevText) } catch { throw ServeConfigError("\(disk.place): \(error)") }
            let d = Disk(domain: try disk.required("domain"), vdev: vdev, device: try disk.spec("device"),
                         readOnly: try disk.bool("readonly") ?? false)
            if config.disks.contains(where: { $0.domain == d.domain && $0.vdev.deviceID == d.vdev.deviceID }) {
                throw ServeConfigError("\(disk.place): domain \(d.domain) has \(d.vdev.name) twice")
            }
            config.disks.append(d)
            try disk.finish()
        }
        if var nbd = try reader.table("nbd") {
            config.nbdListen = try nbd.strings("listen") ?? []
            try nbd.finish()
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
private struct TableReader {
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
    mutating func spec(_ key: String) throws -> String {
        let text = try required(key)
        do { try DeviceRegistry.check(text) } catch { throw ServeConfigError("\(place): \(key): \(error)") }
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

    mutating func table(_ key: String) throws -> TableReader? {
        guard let v = value(key) else { return nil }
        guard let t = v.table else { throw wrong(key, "a table ([\(key)])") }
        return TableReader(table: t, place: "\(place) [\(key)]")
    }

    mutating func tables(_ key: String) throws -> [TableReader] {
        guard let v = value(key) else { return [] }
        guard let a = v.array else { throw wrong(key, "an array of tables ([[\(key)]])") }
        return try a.enumerated().map { i, element in
            guard let t = element.table else { throw wrong(key, "an array of tables ([[\(key)]])") }
            return TableReader(table: t, place: "\(place) [[\(key)]] #\(i + 1)")
        }
    }

    func finish() throws {
        let unknown = table.keys.filter { !used.contains($0) }.sorted()
        guard unknown.isEmpty else {
            throw ServeConfigError("\(place): unknown key\(unknown.count > 1 ? "s" : "") \(unknown.joined(separator: ", "))")
        }
    }
}
