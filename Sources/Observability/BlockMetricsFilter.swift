import Core
import CoreMetrics
import Synchronization

/// What the daemon puts at the top of every block stack it serves (a guest's disk, an NBD
/// export) when metrics are on: per operation, the requests, bytes, errors and latency, and the
/// requests in flight, as swift-metrics series labelled with the device's class, name (the
/// backend path of a disk, the name of an export) and transport. Closing the stack removes them.
///
/// ```swift
/// let disk = BlockMetricsFilter(next: try DeviceRegistry.open("memory(size=1G)"), metrics: registry,
///                               device: "/local/domain/0/backend/softdev-vbd/3/51712", transport: "blkif")
/// ```
///
/// The hot path stays cheap: the counters are atomics in the Prometheus backend, the request
/// goes down through a ``BlockCompletionRelay`` (no allocation per request), and the only lock is
/// the latency histogram's, held for a bucket walk.
public final class BlockMetricsFilter: BlockFilter, @unchecked Sendable {
    /// The device below's: the daemon adds this filter, not the user's spec, so messages that
    /// name the device ("device memory 8388608 bytes") stay as they were.
    public override var name: String { next.name }

    /// One operation's series. A class: a completion takes one reference to it, not four.
    private final class Series: Sendable {
        let requests: Counter, bytes: Counter, errors: Counter, duration: Timer

        init(_ labels: [(String, String)], _ metrics: MetricsRegistry) {
            requests = Counter(label: MetricsRegistry.requests, dimensions: labels, factory: metrics)
            bytes = Counter(label: MetricsRegistry.bytes, dimensions: labels, factory: metrics)
            errors = Counter(label: MetricsRegistry.errors, dimensions: labels, factory: metrics)
            duration = Timer(label: MetricsRegistry.duration, dimensions: labels, factory: metrics)
        }

        func destroy() {
            requests.destroy(); bytes.destroy(); errors.destroy(); duration.destroy()
        }
    }

    /// Indexed by `BlockOperation.rawValue`.
    private let series: [Series]
    private let inFlight: Meter
    private let closed = Atomic<Bool>(false)
    private var relay: BlockCompletionRelay!

    public init(next: any BlockDevice, metrics: MetricsRegistry, device: String, transport: String) {
        let labels = [("class", SoftDeviceClass.block.name), ("device", device), ("transport", transport)]
        // In raw-value order, so that an operation finds its series by index.
        series = [BlockOperation.read, .write, .flush, .discard, .writeZeroes].map {
            Series(labels + [("operation", $0.description)], metrics)
        }
        inFlight = Meter(label: MetricsRegistry.inFlight, dimensions: labels, factory: metrics)
        super.init(next: next)
        relay = BlockCompletionRelay { [series, inFlight] request, result in
            let s = series[Int(request.operation.rawValue)]
            s.duration.recordNanoseconds(Int64(BlockCompletionRelay.nanoseconds() - request.submitted))
            s.requests.increment()
            s.bytes.increment(by: request.length)
            if result != .success { s.errors.increment() }
            inFlight.decrement()
            return result
        }
    }

    public override func submit(_ request: BlockRequest, completion: BlockCompletion) {
        inFlight.increment()
        relay.submit(request, to: next, completion: completion)
    }

    /// Closes the stack below, then removes this device's series from the scrape.
    public override func close() {
        guard !closed.exchange(true, ordering: .relaxed) else { return }
        next.close()
        for s in series { s.destroy() }
        inFlight.destroy()
    }
}
