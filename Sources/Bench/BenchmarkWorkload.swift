import Foundation

/// One workload of `softdev bench`, the same on every transport (the local blkfront, fio's nbd
/// engine, fio's libaio engine on the file): a workload has one name in every table and in
/// `--workloads`, so that rows of the blkif and NBD tables can be read side by side.
///
/// ```swift
/// let picked = try BenchmarkWorkload.select("4k-randwrite-qd1,1m-write")
/// ```
public struct BenchmarkWorkload: Sendable, Equatable {
    public var name: String
    /// Bytes per request (a multiple of 4096; at most 1 MiB through blkif).
    public var blockSize: Int
    public var queueDepth: Int
    /// Random offsets (else sequential, wrapping at the end of the device).
    public var random: Bool
    /// WRITEs (else READs).
    public var write: Bool

    public init(name: String, blockSize: Int, queueDepth: Int, random: Bool, write: Bool = false) {
        self.name = name; self.blockSize = blockSize; self.queueDepth = queueDepth; self.random = random; self.write = write
    }

    /// fio's `rw` for this workload: randread, randwrite, read or write.
    public var fioPattern: String { (random ? "rand" : "") + (write ? "write" : "read") }

    /// What users do: 4 KiB random reads at queue depth 1, 32 and 256, 4 KiB random writes at
    /// 1 and 32, 1 MiB sequential reads and writes. The 1 MiB ones run at queue depth 4 on every
    /// transport: through blkif, 4 requests of 256 pages (plus their indirect pages) are the
    /// most that stay within the backend's 1056 persistent grants, so no row measures transient
    /// grant mapping instead of the data path.
    public static let standard: [BenchmarkWorkload] = [
        BenchmarkWorkload(name: "4k-randread-qd1", blockSize: 4096, queueDepth: 1, random: true),
        BenchmarkWorkload(name: "4k-randread-qd32", blockSize: 4096, queueDepth: 32, random: true),
        BenchmarkWorkload(name: "4k-randread-qd256", blockSize: 4096, queueDepth: 256, random: true),
        BenchmarkWorkload(name: "4k-randwrite-qd1", blockSize: 4096, queueDepth: 1, random: true, write: true),
        BenchmarkWorkload(name: "4k-randwrite-qd32", blockSize: 4096, queueDepth: 32, random: true, write: true),
        BenchmarkWorkload(name: "1m-read", blockSize: 1 << 20, queueDepth: 4, random: false),
        BenchmarkWorkload(name: "1m-write", blockSize: 1 << 20, queueDepth: 4, random: false, write: true),
    ]

    /// The names `--workloads` took when only reads were measured; they still select the same reads.
    public static let aliases = ["4k-qd1": "4k-randread-qd1", "4k-qd32": "4k-randread-qd32", "4k-qd256": "4k-randread-qd256", "1m": "1m-read"]

    /// The standard workloads named in `list` (comma-separated names or aliases, or "all"), in
    /// the standard order whatever the order of the list.
    public static func select(_ list: String) throws -> [BenchmarkWorkload] {
        try selectWorkloads(list, from: standard, key: \.name, aliases: aliases)
    }
}

/// The workloads of `all` named in `list` (comma-separated keys or aliases, or "all"), in the
/// order of `all` whatever the order of the list: `--workloads` of every bench table.
func selectWorkloads<W>(_ list: String, from all: [W], key: (W) -> String, aliases: [String: String] = [:]) throws -> [W] {
    let names = list.split(separator: ",").map { String($0).trimmingCharacters(in: .whitespaces) }.filter { !$0.isEmpty }
    if names == ["all"] { return all }
    let wanted = Set(names.map { aliases[$0] ?? $0 })
    let unknown = wanted.subtracting(all.map(key))
    guard !wanted.isEmpty, unknown.isEmpty else {
        throw HarnessFailure("--workloads \(list): use all or some of \(all.map(key).joined(separator: ", "))"
                             + " (\(unknown.sorted().joined(separator: ", ")) unknown)")
    }
    return all.filter { wanted.contains(key($0)) }
}
