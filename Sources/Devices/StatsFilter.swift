import Core
import Glibc
import Synchronization

/// `stats(file=...)`: counts the operations that pass through it, their bytes, errors and
/// latency, per operation, and writes a report to `file` when the device is closed.
///
/// ```swift
/// let disk = try DeviceRegistry.open("stats | memory(size=1G)") as! StatsFilter
/// ...
/// print(disk.snapshot().report())
/// ```
///
/// Counters are atomics, so several threads may submit at once without a lock; requests are
/// timed from submit to completion through a ``BlockCompletionRelay`` (no allocation per request).
public final class StatsFilter: BlockFilter, @unchecked Sendable {
    public override var name: String { "stats" }
    /// Where `close` writes the report, if anywhere.
    public let reportPath: String?

    private let counters = (0..<5).map { _ in Counters() }
    private let started = BlockCompletionRelay.nanoseconds()
    private var relay: BlockCompletionRelay!

    public init(next: any BlockDevice, reportPath: String? = nil) {
        self.reportPath = reportPath
        super.init(next: next)
        relay = BlockCompletionRelay { [counters] request, result in
            counters[Int(request.operation.rawValue)].record(bytes: request.length,
                                                             nanoseconds: BlockCompletionRelay.nanoseconds() - request.submitted,
                                                             failed: result != .success)
            return result
        }
    }

    // MARK: Counting

    /// The counters of one operation. Atomics cannot live in an array, so the latency buckets
    /// are named fields.
    private final class Counters: Sendable {
        let count = Atomic<UInt64>(0), bytes = Atomic<UInt64>(0), errors = Atomic<UInt64>(0)
        let totalNanoseconds = Atomic<UInt64>(0), minNanoseconds = Atomic<UInt64>(.max), maxNanoseconds = Atomic<UInt64>(0)
        let under10us = Atomic<UInt64>(0), under100us = Atomic<UInt64>(0), under1ms = Atomic<UInt64>(0)
        let under10ms = Atomic<UInt64>(0), under100ms = Atomic<UInt64>(0), slower = Atomic<UInt64>(0)

        var buckets: [UInt64] {
            [under10us.load(ordering: .relaxed), under100us.load(ordering: .relaxed), under1ms.load(ordering: .relaxed),
             under10ms.load(ordering: .relaxed), under100ms.load(ordering: .relaxed), slower.load(ordering: .relaxed)]
        }

        func record(bytes: UInt64, nanoseconds ns: UInt64, failed: Bool) {
            count.wrappingAdd(1, ordering: .relaxed)
            self.bytes.wrappingAdd(bytes, ordering: .relaxed)
            if failed { errors.wrappingAdd(1, ordering: .relaxed) }
            totalNanoseconds.wrappingAdd(ns, ordering: .relaxed)
            var low = minNanoseconds.load(ordering: .relaxed)
            while ns < low, !minNanoseconds.weakCompareExchange(expected: low, desired: ns, ordering: .relaxed).exchanged {
                low = minNanoseconds.load(ordering: .relaxed)
            }
            var high = maxNanoseconds.load(ordering: .relaxed)
            while ns > high, !maxNanoseconds.weakCompareExchange(expected: high, desired: ns, ordering: .relaxed).exchanged {
                high = maxNanoseconds.load(ordering: .relaxed)
            }
            switch ns {
            case ..<10_000: under10us.wrappingAdd(1, ordering: .relaxed)
            case ..<100_000: under100us.wrappingAdd(1, ordering: .relaxed)
            case ..<1_000_000: under1ms.wrappingAdd(1, ordering: .relaxed)
            case ..<10_000_000: under10ms.wrappingAdd(1, ordering: .relaxed)
            case ..<100_000_000: under100ms.wrappingAdd(1, ordering: .relaxed)
            default: slower.wrappingAdd(1, ordering: .relaxed)
            }
        }
    }

    // MARK: Operations

    public override func submit(_ request: BlockRequest, completion: BlockCompletion) {
        relay.submit(request, to: next, completion: completion)
    }

    /// Closes the device below, then writes the report if `file=` was given.
    public override func close() {
        next.close()
        guard let reportPath else { return }
        let text = snapshot().report()
        guard let file = fopen(reportPath, "w") else {
            fputs("stats(file=\(reportPath)): cannot write the report: \(String(cString: strerror(errno)))\n", stderr)
            return
        }
        fputs(text, file)
        fclose(file)
    }

    /// The counters now.
    public func snapshot() -> StatsSnapshot {
        let operations = [BlockOperation.read, .write, .flush, .discard, .writeZeroes].map { operation in
            let c = counters[Int(operation.rawValue)]
            let count = c.count.load(ordering: .relaxed)
            let minimum = c.minNanoseconds.load(ordering: .relaxed)
            return StatsSnapshot.Operation(
                operation: operation, count: count, bytes: c.bytes.load(ordering: .relaxed), errors: c.errors.load(ordering: .relaxed),
                totalNanoseconds: c.totalNanoseconds.load(ordering: .relaxed), minNanoseconds: minimum == .max ? 0 : minimum,
                maxNanoseconds: c.maxNanoseconds.load(ordering: .relaxed), latencyBuckets: c.buckets)
        }
        return StatsSnapshot(seconds: Double(BlockCompletionRelay.nanoseconds() - started) / 1e9, operations: operations)
    }
}

/// What a `StatsFilter` has counted, per operation.
public struct StatsSnapshot: Sendable, Equatable {
    public struct Operation: Sendable, Equatable {
        public var operation: BlockOperation
        public var count: UInt64
        public var bytes: UInt64
        public var errors: UInt64
        /// Total, fastest and slowest latency of the timed requests.
        public var totalNanoseconds: UInt64
        public var minNanoseconds: UInt64
        public var maxNanoseconds: UInt64
        /// Requests per latency range, as in `StatsSnapshot.latencyBucketNames`.
        public var latencyBuckets: [UInt64]
        public var timedCount: UInt64 { latencyBuckets.reduce(0, +) }
        public var averageNanoseconds: UInt64 { timedCount == 0 ? 0 : totalNanoseconds / timedCount }
    }

    public static let latencyBucketNames = ["<10us", "<100us", "<1ms", "<10ms", "<100ms", ">=100ms"]

    /// Since the filter was opened.
    public var seconds: Double
    public var operations: [Operation]

    public subscript(_ operation: BlockOperation) -> Operation {
        operations.first { $0.operation == operation }!
    }

    /// A text table, one row per operation that happened.
    public func report() -> String {
        func column(_ text: String, _ width: Int) -> String { String(repeating: " ", count: max(0, width - text.count)) + text }
        func micro(_ ns: UInt64) -> String { String(ns / 1000) }
        let headings = ["operation", "count", "bytes", "errors", "min us", "avg us", "max us"] + Self.latencyBucketNames
        var lines = [headings.enumerated().map { column($0.element, $0.offset == 0 ? 12 : 9) }.joined(separator: " ")]
        for op in operations where op.count > 0 {
            let cells = [op.operation.description, String(op.count), String(op.bytes), String(op.errors),
                         micro(op.minNanoseconds), micro(op.averageNanoseconds), micro(op.maxNanoseconds)]
                + op.latencyBuckets.map(String.init)
            lines.append(cells.enumerated().map { column($0.element, $0.offset == 0 ? 12 : 9) }.joined(separator: " "))
        }
        let elapsed = (seconds * 10).rounded() / 10
        return "stats over \(elapsed) s\n" + lines.joined(separator: "\n") + "\n"
    }
}

extension StatsFilter {
    public static let descriptor = DeviceDescriptor(
        name: "stats", kind: .filter,
        summary: "Counts operations, bytes, errors and latency of the device below it.",
        parameters: [
            DeviceParameter("file", "Write the report to this file when the device is closed."),
        ],
        open: { parameters, next throws(DeviceSpecError) in
            StatsFilter(next: next!, reportPath: parameters.string("file"))
        })
}
