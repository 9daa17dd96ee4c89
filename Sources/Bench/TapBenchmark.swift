import CReference
import Core
import Devices
import Foundation
import Glibc
import Synchronization

/// The TAP path of `softdev bench --net`: two network namespaces, 10.88.0.1/24 in one (a) and
/// 10.88.0.2/24 in the other (b), joined three ways, side by side in one run:
///
/// - SoftDev: a ``NetLink`` of `tap(name=…) | tap(name=…)` opened in this process, each TAP moved
///   into its namespace (the descriptors stay valid), the offloads on as the link negotiates
///   them (checksum, TSO4, TSO6 both ways);
/// - the Linux bridge over two veth pairs, in a third namespace: the kernel's own path, the
///   upper bound;
/// - the C forwarder (tap_forwarder.c): two TAPs opened with the same flags and the same
///   `TUNSETOFFLOAD` bits, one thread per direction doing read() and write() with a 64 KiB+
///   buffer: the yardstick ("vs C").
///
/// Each path has its own pair of namespaces (and an `iperf3 -s` in b) for the whole run; the
/// rows are `iperf3` runs from a: TCP a→b, TCP b→a (`-R`), one stream, and UDP with 64-byte
/// datagrams at full speed (`-u -l 64 -b 0`), whose rate is the packets b received. The paths
/// take turns row by row, in order then reversed. Namespaces, interfaces and servers are
/// removed however the run ends: returning, throwing, or SIGINT/SIGTERM/SIGHUP/SIGPIPE.
public struct TapBenchmark {
    public enum Path: String, CaseIterable, Sendable, CustomStringConvertible {
        case softdev = "softdev tap|tap"
        case bridge = "linux bridge"
        case reference = "C forwarder"
        public var description: String { rawValue }
        var short: String {
            switch self {
            case .softdev: return "s"
            case .bridge: return "k"
            case .reference: return "c"
            }
        }
    }

    public enum Workload: String, CaseIterable, Sendable, CustomStringConvertible {
        case tcpForward = "tcp a->b"
        case tcpReverse = "tcp b->a"
        case udp64 = "udp 64 B a->b"
        public var description: String { rawValue }
        public var isUDP: Bool { self == .udp64 }
        /// The workload's name in `--workloads` (beside the ring rows' tx-64, rx-gso, ...).
        public var key: String {
            switch self {
            case .tcpForward: "tap-tcp-ab"
            case .tcpReverse: "tap-tcp-ba"
            case .udp64: "tap-udp-64"
            }
        }
        /// Some of `list`'s comma-separated keys ("all": every workload); unknown keys are refused.
        public static func select(_ list: String) throws -> [Workload] { try selectWorkloads(list, from: allCases, key: \.key) }
    }

    /// How long one turn of `iperf3` runs: whole seconds (`-t`), or an amount of data (`-n`
    /// bytes for TCP, `-k` datagrams of 64 bytes for UDP) for a quick check.
    public enum Amount: Sendable, Equatable {
        case seconds(Int)
        case bytes(Int)
    }

    public struct Result: Sendable {
        /// Bytes and packets the receiving side got, over `seconds`.
        public var bytes: Double
        public var packets: Double
        public var seconds: Double
        public var gigabitsPerSecond: Double { seconds > 0 ? bytes * 8 / seconds / 1e9 : 0 }
        public var packetsPerSecond: Double { seconds > 0 ? packets / seconds : 0 }
        mutating func add(_ other: Result) { bytes += other.bytes; packets += other.packets; seconds += other.seconds }
    }

    public struct Row: Sendable {
        public var workload: Workload
        public var path: Path
        public var result: Result
        /// The rate over the C forwarder's on the same workload (nil without a C row).
        public var ratioToReference: Double?
        /// Gbit/s for TCP, packets/s for UDP.
        public var rate: Double { workload.isUDP ? result.packetsPerSecond : result.gigabitsPerSecond }
    }

    /// The `TUN_F_*` bits both TAP paths run with: checksum, TSO4, TSO6 (what a tap|tap link
    /// negotiates).
    public static let offloads: UInt32 = 0x07

    public var paths: [Path]
    public var workloads: [Workload]
    /// Per turn.
    public var amount: Amount
    /// Turns per row, every second one in reverse order.
    public var rounds = 2

    public init(paths: [Path] = Path.allCases, workloads: [Workload] = Workload.allCases, amount: Amount = .seconds(2)) {
        self.paths = paths; self.workloads = workloads; self.amount = amount
    }

    /// Why the TAP path cannot be measured here (nil: it can): root, /dev/net/tun, ip, iperf3.
    public static func unavailableReason() -> String? {
        if getuid() != 0 { return "the TAP path needs root (network namespaces, TAP interfaces)" }
        if access("/dev/net/tun", R_OK | W_OK) != 0 { return "/dev/net/tun is missing (modprobe tun)" }
        if tool("ip") == nil { return "ip is not installed (apt-get install iproute2)" }
        if tool("iperf3") == nil { return "iperf3 is not installed (apt-get install iperf3)" }
        return nil
    }

    static func tool(_ name: String) -> String? {
        ["/usr/bin", "/usr/sbin", "/bin", "/sbin", "/usr/local/bin"].lazy.map { "\($0)/\(name)" }.first { access($0, X_OK) == 0 }
    }

    public func run(progress: (Row) -> Void = { _ in }) throws -> [Row] {
        if let reason = Self.unavailableReason() { throw HarnessFailure(reason) }
        let lab = try TapBenchLab()
        // Removed at the end, and by `softdev bench`'s trap when it is interrupted.
        let leftovers = BenchLeftovers()
        leftovers.onCleanUp { lab.cleanUp() }
        defer { leftovers.cleanUp() }
        for path in paths { try lab.setUp(path) }

        var rows: [Row] = []
        for workload in workloads {
            var totals = [Path: Result]()
            for round in 0..<max(1, rounds) {
                for path in round % 2 == 0 ? paths : paths.reversed() {
                    let r = try lab.iperf(path, workload, amount)
                    totals[path, default: Result(bytes: 0, packets: 0, seconds: 0)].add(r)
                }
            }
            func rate(_ r: Result) -> Double { workload.isUDP ? r.packetsPerSecond : r.gigabitsPerSecond }
            let reference = totals[.reference].map(rate)
            for path in paths {
                let result = totals[path]!
                let row = Row(workload: workload, path: path, result: result,
                              ratioToReference: reference.flatMap { $0 > 0 ? rate(result) / $0 : nil })
                rows.append(row)
                progress(row)
            }
        }
        return rows
    }

    /// The rows as a table: workload, path, rate (Gbit/s or kpps), ratio to the C forwarder.
    public static func table(_ rows: [Row]) -> String {
        BenchmarkTable.render(["workload", "path", "rate", "vs C"], rows.map { row in
            [row.workload.rawValue, row.path.rawValue,
             row.workload.isUDP ? String(format: "%.1f kpps", row.rate / 1000) : String(format: "%.2f Gbit/s", row.rate),
             row.ratioToReference.map { String(format: "%.2f", $0) } ?? "-"]
        }, widths: [14, 16, 13, 6])
    }
}

/// The namespaces, interfaces, links and `iperf3` servers of one TAP bench run, and their
/// removal (idempotent; from the run's `defer` or the signal trap's thread).
final class TapBenchLab: @unchecked Sendable {
    let ip: String
    let iperf3: String
    let tag = String(getpid())
    let port = 5201

    private struct State {
        var namespaces: [String] = []
        var servers: [Process] = []
        var clients: [ObjectIdentifier: Process] = [:]
        var links: [NetLink] = []
        var forwarders: [OpaquePointer] = []
        var cleaned = false
    }
    private let state = Mutex(State())

    init() throws {
        guard let ip = TapBenchmark.tool("ip"), let iperf3 = TapBenchmark.tool("iperf3") else { throw HarnessFailure("ip or iperf3 is missing") }
        self.ip = ip; self.iperf3 = iperf3
        removeStaleNamespaces()
    }

    /// Namespaces of earlier runs that could not clean up (killed with SIGKILL): those of a
    /// process that is gone, with the `iperf3` servers still in them. Best effort.
    private func removeStaleNamespaces() {
        guard let list = try? sh([ip, "netns", "list"]) else { return }
        for line in list.split(separator: "\n") {
            let name = String(line.split(separator: " ").first ?? "")
            guard name.hasPrefix("sdtb"), let dash = name.firstIndex(of: "-"),
                  let pid = Int32(name[name.index(name.startIndex, offsetBy: 4)..<dash]),
                  Self.isGone(pid) else { continue }
            for p in ((try? sh([ip, "netns", "pids", name])) ?? "").split(separator: "\n").compactMap({ Int32($0) }) { kill(p, SIGKILL) }
            _ = try? sh([ip, "netns", "del", name])
        }
    }

    /// Whether process `pid` has ended (a zombie nobody reaped yet counts as ended).
    private static func isGone(_ pid: Int32) -> Bool {
        if kill(pid, 0) != 0 { return errno == ESRCH }
        guard let stat = try? String(contentsOfFile: "/proc/\(pid)/stat", encoding: .utf8),
              let close = stat.lastIndex(of: ")") else { return false }
        return stat[stat.index(after: close)...].trimmingCharacters(in: .whitespaces).hasPrefix("Z")
    }

    func namespace(_ path: TapBenchmark.Path, _ side: String) -> String { "sdtb\(tag)-\(path.short)\(side)" }
    /// Interface names: at most 15 characters ("tb" + pid (7) + path + side).
    func interface(_ path: TapBenchmark.Path, _ side: String) -> String { "tb\(tag)\(path.short)\(side)" }

    @discardableResult
    func sh(_ arguments: [String]) throws -> String {
        let p = Process()
        p.executableURL = URL(fileURLWithPath: arguments[0])
        p.arguments = Array(arguments.dropFirst())
        let out = Pipe()
        p.standardOutput = out
        p.standardError = out
        let id = ObjectIdentifier(p)
        try state.withLock { s in
            guard !s.cleaned else { throw HarnessFailure("interrupted") }
            try p.run()
            s.clients[id] = p
        }
        let data = out.fileHandleForReading.readDataToEndOfFile()
        p.waitUntilExit()
        state.withLock { _ = $0.clients.removeValue(forKey: id) }
        let output = String(decoding: data, as: UTF8.self)
        guard p.terminationStatus == 0 else {
            throw HarnessFailure("\(arguments.joined(separator: " ")): exit \(p.terminationStatus): \(output.trimmingCharacters(in: .whitespacesAndNewlines))")
        }
        return output
    }

    private func addNamespace(_ name: String) throws {
        _ = try? sh([ip, "netns", "del", name])   // left over from a killed run with this pid
        try sh([ip, "netns", "add", name])
        state.withLock { $0.namespaces.append(name) }
        try sh([ip, "-n", name, "link", "set", "lo", "up"])
    }

    /// Puts `interface` (in this namespace) into `path`'s namespace on `side` with its address.
    private func place(_ interface: String, _ path: TapBenchmark.Path, _ side: String, address: String, move: Bool) throws {
        let ns = namespace(path, side)
        if move { try sh([ip, "link", "set", interface, "netns", ns]) }
        try sh([ip, "-n", ns, "addr", "add", address, "dev", interface])
        try sh([ip, "-n", ns, "link", "set", interface, "up"])
    }

    /// Creates `path`'s namespaces and joins them, then starts its `iperf3` server in b.
    func setUp(_ path: TapBenchmark.Path) throws {
        try addNamespace(namespace(path, "a"))
        try addNamespace(namespace(path, "b"))
        let (a, b) = (interface(path, "a"), interface(path, "b"))
        switch path {
        case .softdev:
            let link = try NetLink(spec: "tap(name=\(a)) | tap(name=\(b))")
            state.withLock { $0.links.append(link) }
            for case let tap as TapDevice in [link.first, link.stack] where tap.kernelOffloads != TapBenchmark.offloads {
                throw HarnessFailure("tap(name=\(tap.interfaceName)) runs with offloads \(tap.kernelOffloads), not \(TapBenchmark.offloads)")
            }
            try place(a, path, "a", address: "10.88.0.1/24", move: true)
            try place(b, path, "b", address: "10.88.0.2/24", move: true)
        case .reference:
            var error = [CChar](repeating: 0, count: 256)
            guard let forwarder = cref_tap_forwarder_start(a, b, TapBenchmark.offloads, &error, UInt(error.count)) else {
                throw HarnessFailure("C forwarder: \(String(cString: error))")
            }
            state.withLock { $0.forwarders.append(forwarder) }
            try place(a, path, "a", address: "10.88.0.1/24", move: true)
            try place(b, path, "b", address: "10.88.0.2/24", move: true)
        case .bridge:
            let bridge = namespace(path, "br")
            try addNamespace(bridge)
            try sh([ip, "-n", bridge, "link", "add", "br0", "type", "bridge"])
            try sh([ip, "-n", bridge, "link", "set", "br0", "up"])
            for side in ["a", "b"] {
                let peer = interface(path, side.uppercased())
                try sh([ip, "link", "add", interface(path, side), "netns", namespace(path, side), "type", "veth", "peer", "name", peer, "netns", bridge])
                try sh([ip, "-n", bridge, "link", "set", peer, "master", "br0"])
                try sh([ip, "-n", bridge, "link", "set", peer, "up"])
            }
            try place(a, path, "a", address: "10.88.0.1/24", move: false)
            try place(b, path, "b", address: "10.88.0.2/24", move: false)
        }
        let server = Process()
        server.executableURL = URL(fileURLWithPath: ip)
        server.arguments = ["netns", "exec", namespace(path, "b"), iperf3, "-s", "-p", "\(port)"]
        server.standardOutput = FileHandle.nullDevice
        server.standardError = FileHandle.nullDevice
        try state.withLock { s in
            guard !s.cleaned else { throw HarnessFailure("interrupted") }
            try server.run()
            s.servers.append(server)
        }
    }

    /// One `iperf3` client run from a through `path`: what b (or a, for b→a) received.
    func iperf(_ path: TapBenchmark.Path, _ workload: TapBenchmark.Workload, _ amount: TapBenchmark.Amount) throws -> TapBenchmark.Result {
        var arguments = [ip, "netns", "exec", namespace(path, "a"), iperf3, "-c", "10.88.0.2", "-p", "\(port)", "-J"]
        switch amount {
        case let .seconds(s): arguments += ["-t", "\(max(1, s))"]
        case let .bytes(n): arguments += workload.isUDP ? ["-k", "\(max(1, n / 64))"] : ["-n", "\(n)"]
        }
        switch workload {
        case .tcpForward: break
        case .tcpReverse: arguments.append("-R")
        case .udp64: arguments += ["-u", "-l", "64", "-b", "0"]
        }
        // The server may still be starting (the first turn), or finishing the previous test.
        var attempt = 0
        while true {
            let output: String
            do { output = try sh(arguments) } catch {
                let text = "\(error)"
                attempt += 1
                if attempt < 30, text.contains("unable to connect") || text.contains("server is busy") || text.contains("Connection refused") {
                    usleep(100_000); continue
                }
                throw HarnessFailure("\(path), \(workload): \(text)")
            }
            return try Self.parse(output, udp: workload.isUDP, what: "\(path), \(workload)")
        }
    }

    static func parse(_ output: String, udp: Bool, what: String) throws -> TapBenchmark.Result {
        guard let json = try? JSONSerialization.jsonObject(with: Data(output.utf8)) as? [String: Any] else {
            throw HarnessFailure("\(what): iperf3 printed no JSON: \(output.prefix(300))")
        }
        if let error = json["error"] { throw HarnessFailure("\(what): iperf3: \(error)") }
        guard let end = json["end"] as? [String: Any], let received = end["sum_received"] as? [String: Any],
              let bytes = (received["bytes"] as? NSNumber)?.doubleValue, let seconds = (received["seconds"] as? NSNumber)?.doubleValue else {
            throw HarnessFailure("\(what): no end.sum_received in iperf3's JSON")
        }
        var packets = bytes / (udp ? 64 : 1500)
        if udp, let sent = (received["packets"] as? NSNumber)?.doubleValue, let lost = (received["lost_packets"] as? NSNumber)?.doubleValue {
            packets = max(0, sent - lost)
        }
        return .init(bytes: bytes, packets: packets, seconds: seconds)
    }

    /// Stops the servers and any client, closes the link and the C forwarder (their TAPs go with
    /// their descriptors), deletes the namespaces (the veth pairs and the bridge go with them).
    func cleanUp() {
        let s = state.withLock { s -> State? in
            guard !s.cleaned else { return nil }
            s.cleaned = true
            return s
        }
        guard let s else { return }
        for p in s.servers + Array(s.clients.values) where p.isRunning { kill(p.processIdentifier, SIGKILL) }
        for p in s.servers { p.waitUntilExit() }
        for link in s.links { link.close() }
        for f in s.forwarders { cref_tap_forwarder_stop(f, nil) }
        for ns in s.namespaces.reversed() {
            let p = Process()
            p.executableURL = URL(fileURLWithPath: ip)
            p.arguments = ["netns", "del", ns]
            p.standardOutput = FileHandle.nullDevice
            p.standardError = FileHandle.nullDevice
            if (try? p.run()) != nil { p.waitUntilExit() }
        }
    }
}
