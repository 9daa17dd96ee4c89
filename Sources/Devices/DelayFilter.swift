import Core
import Dispatch
import Glibc

/// `delay(delay-read=2ms, delay-write=10ms, ...)`: holds each request for a while before passing
/// it down, to make a fast device behave like a slow disk or a distant server (nbdkit's delay
/// filter, with its parameter names; `delay=` sets every operation at once).
///
/// A request waits on a timer, not on the submitting thread, so that requests in flight overlap
/// their delays as they would on a real slow device.
///
/// ```swift
/// let slow = try DeviceRegistry.open("delay(delay-read=2ms, delay-write=5ms) | memory(size=1G)")
/// ```
public final class DelayFilter: BlockFilter, @unchecked Sendable {
    public override var name: String { "delay" }
    /// Nanoseconds per operation, indexed by `BlockOperation.rawValue`.
    public let delays: [UInt64]

    public init(next: any BlockDevice, delays: [BlockOperation: UInt64]) {
        self.delays = [BlockOperation.read, .write, .flush, .discard, .writeZeroes].map { delays[$0] ?? 0 }
        super.init(next: next)
    }

    private func delay(_ operation: BlockOperation) -> UInt64 { delays[Int(operation.rawValue)] }

    public override func submit(_ request: BlockRequest, completion: BlockCompletion) {
        let ns = delay(request.operation)
        guard ns > 0 else { return next.submit(request, completion: completion) }
        var later = request
        later.callerMayWait = false   // submitted from a timer thread, which must not wait
        DispatchQueue.global().asyncAfter(deadline: .now() + .nanoseconds(Int(ns))) { [next, later] in
            next.submit(later, completion: completion)
        }
    }
}

extension DelayFilter {
    /// nbdkit's parameter names and the operations they delay.
    private static let names: [(String, BlockOperation)] = [
        ("delay-read", .read), ("delay-write", .write), ("delay-flush", .flush), ("delay-trim", .discard), ("delay-zero", .writeZeroes),
    ]

    public static let descriptor = DeviceDescriptor(
        name: "delay", kind: .filter,
        summary: "Delays each request before passing it down, per operation: a slow disk or a distant server.",
        parameters: [DeviceParameter("delay", "Delay of every operation: seconds (0.5), or NNms, NNus (default 0).")]
            + names.map { DeviceParameter($0.0, "Delay of \($0.1) requests, overriding delay= (default 0).") },
        open: { parameters, next throws(DeviceSpecError) in
            let all = try parameters.duration("delay")
            var delays: [BlockOperation: UInt64] = [:]
            for (key, operation) in names { delays[operation] = try parameters.duration(key) ?? all }
            return DelayFilter(next: next!, delays: delays)
        })
}
