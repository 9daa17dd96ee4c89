import Foundation

/// One fio job run to its end, for the benchmarks that measure a peer with fio: the NBD export
/// and nbdkit through fio's nbd engine, and the file itself through fio's libaio engine.
public enum FioJob {
    /// What fio's JSON report says of the job's one direction (read or write), ramp excluded.
    public struct Report: Sendable {
        public var requests: UInt64 = 0
        public var bytes: UInt64 = 0
        public var seconds: Double = 0
        public var iops: Double { seconds > 0 ? Double(requests) / seconds : 0 }
        public var megabytesPerSecond: Double { seconds > 0 ? Double(bytes) / seconds / 1e6 : 0 }

        /// Adds another job of the same workload on the same server (a second half).
        public mutating func add(_ other: Report) {
            requests += other.requests; bytes += other.bytes; seconds += other.seconds
        }
    }

    /// Runs `workload` with the engine's arguments (e.g. `--ioengine=nbd`, `--uri=...`) over the
    /// first `size` bytes, measuring for `runtimeMilliseconds` after `rampMilliseconds`.
    public static func run(engine: [String], workload w: BenchmarkWorkload, size: UInt64, runtimeMilliseconds: Int,
                           rampMilliseconds: Int) throws -> Report {
        let fio = try NBDBenchmark.tool("fio", package: "fio")
        let args = ["--name=bench"] + engine + ["--rw=\(w.fioPattern)", "--bs=\(w.blockSize)", "--iodepth=\(w.queueDepth)",
                    "--size=\(size)", "--runtime=\(runtimeMilliseconds)ms", "--time_based", "--ramp_time=\(rampMilliseconds)ms",
                    "--output-format=json"]
        let (status, out, err) = try NBDBenchmark.execute(fio, args)
        guard status == 0 else { throw HarnessFailure("fio \(w.name) (\(engine.joined(separator: " "))) failed: \(err)") }
        // fio may print notices before the JSON document.
        guard let start = out.firstIndex(of: "{"),
              let json = try? JSONSerialization.jsonObject(with: Data(out[start...].utf8)) as? [String: Any],
              let job = (json["jobs"] as? [[String: Any]])?.first else {
            throw HarnessFailure("fio printed no JSON report: \(out.prefix(200))")
        }
        let stats = job[w.write ? "write" : "read"] as? [String: Any] ?? [:]
        func number(_ key: String) -> Double { (stats[key] as? NSNumber)?.doubleValue ?? 0 }
        if number("total_ios") == 0 || (stats["io_bytes"] as? NSNumber) == nil {
            throw HarnessFailure("fio \(w.name) (\(engine.joined(separator: " "))) completed no \(w.write ? "write" : "read")")
        }
        // fio's own "iops" is the same ratio; the counts let two halves add up exactly.
        return Report(requests: UInt64(number("total_ios")), bytes: UInt64(number("io_bytes")), seconds: number("runtime") / 1000)
    }

    /// Writes `size` bytes once, sequentially in 1 MiB requests (to give a device data of a
    /// kind before it is measured; `data` says which, e.g. fio's buffer options).
    public static func fill(engine: [String], size: UInt64, data: [String]) throws {
        let fio = try NBDBenchmark.tool("fio", package: "fio")
        let (status, _, err) = try NBDBenchmark.execute(fio, ["--name=fill"] + engine + data + ["--rw=write", "--bs=1M", "--iodepth=4", "--size=\(size)"])
        guard status == 0 else { throw HarnessFailure("fio fill (\(engine.joined(separator: " "))) failed: \(err)") }
    }
}
