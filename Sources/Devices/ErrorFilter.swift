import Core
import Glibc
import Synchronization

/// `error(error=EIO, error-rate=10%, ...)`: fails requests on purpose, to test what is above
/// (nbdkit's error filter, with its parameter names). A request fails with the configured error
/// with the configured probability; the error, the rate and a trigger file can be set for all
/// operations and overridden per operation (`error-pwrite-rate=100%`); `error-offset` and
/// `error-range` limit the failures to requests that touch a byte range.
///
/// The random numbers come from a seeded generator (`error-seed`), so a run that found a bug
/// can be repeated: the same seed and the same sequence of requests fail the same requests.
///
/// ```swift
/// // Every write to the first MiB fails with ENOSPC; nothing else fails.
/// let disk = try DeviceRegistry.open("error(error=ENOSPC, error-pwrite-rate=1, error-range=1M) | memory(size=64M)")
/// ```
public final class ErrorFilter: BlockFilter, @unchecked Sendable {
    /// The operations as nbdkit's error filter names them.
    public enum Operation: String, CaseIterable, Sendable {
        case pread, pwrite, trim, zero, flush, extents
    }

    /// When and how one operation fails.
    public struct Rule: Sendable {
        /// The errno it fails with: EIO, ENOSPC, EPERM, EINVAL, ENOMEM, ESHUTDOWN or EROFS.
        public var error: Int32 = EIO
        /// The probability, from 0 (never) to 1 (always).
        public var rate: Double = 0
        /// If set, the rule applies only while this file exists (inject errors from outside).
        public var triggerFile: String?
        public init(error: Int32 = EIO, rate: Double = 0, triggerFile: String? = nil) {
            self.error = error; self.rate = rate; self.triggerFile = triggerFile
        }
    }

    public static let errorNames: [(String, Int32)] = [
        ("EIO", EIO), ("ENOSPC", ENOSPC), ("EPERM", EPERM), ("EINVAL", EINVAL), ("ENOMEM", ENOMEM),
        ("ESHUTDOWN", ESHUTDOWN), ("EROFS", EROFS),
    ]

    public override var name: String { "error" }
    public let rules: [Operation: Rule]
    /// Only requests that overlap `[range.lowerBound, range.upperBound)` fail (flush always may).
    public let range: Range<UInt64>
    /// SplitMix64: one atomic add per draw, so threads never wait for each other.
    private let random: Atomic<UInt64>

    public init(next: any BlockDevice, rules: [Operation: Rule], range: Range<UInt64> = 0..<UInt64.max, seed: UInt64) {
        self.rules = rules; self.range = range
        random = Atomic(seed)
        super.init(next: next)
    }

    private func draw() -> Double {
        var z = random.wrappingAdd(0x9E37_79B9_7F4A_7C15, ordering: .relaxed).newValue
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        z ^= z >> 31
        return Double(z >> 11) / Double(1 << 53)
    }

    /// The error to fail this request with, or nil to pass it down.
    private func injected(_ operation: Operation, offset: UInt64, length: UInt64) -> BlockError? {
        guard let rule = rules[operation], rule.rate > 0 else { return nil }
        if operation != .flush && !(offset < range.upperBound && offset + max(length, 1) > range.lowerBound) { return nil }
        if let file = rule.triggerFile, access(file, F_OK) != 0 { return nil }
        guard rule.rate >= 1 || draw() < rule.rate else { return nil }
        let name = Self.errorNames.first { $0.1 == rule.error }?.0 ?? "errno \(rule.error)"
        return BlockError.system("error: injected \(name) on \(operation) at \(offset)+\(length)", errno: rule.error)
    }

    private static func operation(_ op: BlockOperation) -> Operation {
        switch op {
        case .read: return .pread
        case .write: return .pwrite
        case .discard: return .trim
        case .writeZeroes: return .zero
        case .flush: return .flush
        }
    }

    public override func submit(_ request: BlockRequest, completion: BlockCompletion) {
        if let error = injected(Self.operation(request.operation), offset: request.offset, length: request.length) {
            return completion.complete(.failure(error))
        }
        next.submit(request, completion: completion)
    }

    public override func extents(at offset: UInt64, length: UInt64) throws(BlockError) -> [BlockExtent] {
        if let error = injected(.extents, offset: offset, length: length) { throw error }
        return try next.extents(at: offset, length: length)
    }
}

extension ErrorFilter {
    private static var parameters: [DeviceParameter] {
        let errors = errorNames.map(\.0).joined(separator: ", ")
        var list = [
            DeviceParameter("error", "The error to inject: \(errors) (default EIO)."),
            DeviceParameter("error-rate", "How often requests fail: 0.1, 10% or 1:10 (default 0, never)."),
            DeviceParameter("error-file", "Inject errors only while this file exists."),
            DeviceParameter("error-seed", "Seed of the random numbers, to repeat a run (default: from the clock)."),
            DeviceParameter("error-offset", "Fail only requests that touch bytes from here on (default 0)."),
            DeviceParameter("error-range", "... and before error-offset + error-range (default: to the end)."),
        ]
        for op in Operation.allCases {
            list.append(DeviceParameter("error-\(op)", "error, for \(op) requests only."))
            list.append(DeviceParameter("error-\(op)-rate", "error-rate, for \(op) requests only."))
            list.append(DeviceParameter("error-\(op)-file", "error-file, for \(op) requests only."))
        }
        return list
    }

    private static func errno(_ parameters: DeviceParameters, _ key: String) throws(DeviceSpecError) -> Int32? {
        guard let value = parameters.string(key) else { return nil }
        guard let found = errorNames.first(where: { $0.0 == value.uppercased() }) else {
            throw DeviceSpecError("error: \(key) '\(value)' is not one of \(errorNames.map(\.0).joined(separator: ", "))")
        }
        return found.1
    }

    public static let descriptor = DeviceDescriptor(
        name: "error", kind: .filter,
        summary: "Injects errors by rate, operation and byte range, with a seed to repeat a run (nbdkit's error filter).",
        parameters: parameters,
        open: { parameters, next throws(DeviceSpecError) in
            let general = Rule(error: try errno(parameters, "error") ?? EIO, rate: try parameters.rate("error-rate") ?? 0,
                               triggerFile: parameters.string("error-file"))
            var rules: [Operation: Rule] = [:]
            for op in Operation.allCases {
                rules[op] = Rule(error: try errno(parameters, "error-\(op)") ?? general.error,
                                 rate: try parameters.rate("error-\(op)-rate") ?? general.rate,
                                 triggerFile: parameters.string("error-\(op)-file") ?? general.triggerFile)
            }
            let start = try parameters.offset("error-offset", multipleOf: 1) ?? 0
            let length = try parameters.size("error-range", multipleOf: 1)
            let (end, overflow) = start.addingReportingOverflow(length ?? 0)
            let seed = try parameters.integer("error-seed", in: UInt64.min...UInt64.max)
            var now = timespec()
            clock_gettime(CLOCK_REALTIME, &now)
            return ErrorFilter(next: next!, rules: rules, range: start..<(length == nil || overflow ? .max : end),
                               seed: seed ?? UInt64(now.tv_nsec) &* 1_000_003 &+ UInt64(now.tv_sec))
        })
}
