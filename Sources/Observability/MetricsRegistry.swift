import CoreMetrics
import Prometheus
import Synchronization

/// The daemon's metrics: a swift-metrics factory over one Prometheus registry, whose text is what
/// `GET /metrics` answers.
///
/// Code records through swift-metrics' types (`Counter`, `Timer`, `Meter`, `Gauge`) made with
/// `factory: registry`, as Swift servers do; this factory adds what the plain
/// `PrometheusMetricsFactory` cannot: a `# HELP` line for every SoftDev metric (promtool's lint
/// wants one, and an operator reading the scrape does too), latency buckets sized for storage
/// (10 µs to 1 s, not an HTTP server's 5 ms to 10 s), and counted handles, so that a series two
/// stacks share (a device re-attached at the same path while its old stack still closes) is
/// removed when the last of them is destroyed, not the first.
///
/// ```swift
/// let metrics = MetricsRegistry()
/// let reads = Counter(label: MetricsRegistry.requests, dimensions: [("class", "block"), ...], factory: metrics)
/// reads.increment()
/// print(metrics.text())
/// ```
public final class MetricsRegistry: MetricsFactory, Sendable {
    // The names, in one place with their help, as Prometheus' conventions want them: base units
    // (seconds, bytes), `_total` on counters.
    public static let requests = "softdev_requests_total"
    public static let bytes = "softdev_request_bytes_total"
    public static let errors = "softdev_request_errors_total"
    public static let duration = "softdev_request_duration_seconds"
    public static let inFlight = "softdev_requests_in_flight"
    public static let devicesAttached = "softdev_devices_attached"
    public static let frontendsConnected = "softdev_frontends_connected"
    public static let frames = "softdev_frames_total"
    public static let frameBytes = "softdev_frame_bytes_total"
    public static let idsAlerts = "softdev_ids_alerts_total"

    public static let help: [String: String] = [
        requests: "Requests the device stack completed, by operation, counted at completion.",
        bytes: "Bytes the completed requests read or wrote (0 for flush; the range for discard and write-zeroes).",
        errors: "Completed requests whose result was an error (included in softdev_requests_total).",
        duration: "Time from submit to completion at the top of the device stack, in seconds.",
        inFlight: "Requests submitted to the device stack and not completed yet: the nearest measure of ring "
            + "occupancy the daemon has (blkif requests taken off the ring and not answered, NBD requests read and not answered).",
        devicesAttached: "Devices of the class the daemon's xenbus host serves, in any xenbus state.",
        frontendsConnected: "Devices of the class whose backend is Connected to its guest's frontend.",
        frames: "Frames through the top of a network stack, by direction (from-guest, to-guest).",
        frameBytes: "Bytes of the frames through the top of a network stack, by direction.",
        idsAlerts: "Alerts of the ids filters, by action (alert, or deny: the write was refused).",
    ]

    /// Latency buckets: 10 µs (a memory device's request) to 1 s (a stuck remote disk); 1-2-5
    /// steps so that a percentile read off them is within a factor of 2.5.
    public static let durationBuckets: [Duration] = [
        .microseconds(10), .microseconds(20), .microseconds(50), .microseconds(100), .microseconds(200), .microseconds(500),
        .milliseconds(1), .milliseconds(2), .milliseconds(5), .milliseconds(10), .milliseconds(20), .milliseconds(50),
        .milliseconds(100), .milliseconds(200), .milliseconds(500), .seconds(1),
    ]

    public let prometheus: PrometheusCollectorRegistry
    /// How many live swift-metrics handles share each Prometheus series (the registry hands out
    /// the same series for the same name and labels).
    private let uses = Mutex<[ObjectIdentifier: Int]>([:])

    public init(prometheus: PrometheusCollectorRegistry = PrometheusCollectorRegistry()) {
        self.prometheus = prometheus
    }

    /// The registry in Prometheus' text format (version 0.0.4).
    public func text() -> [UInt8] { prometheus.emitToBuffer() }

    /// The name with its help text (none for a metric that is not SoftDev's own).
    private func described(_ name: String) -> MetricNameDescriptor {
        MetricNameDescriptor(metricName: name, unitName: "", helpText: Self.help[name] ?? "")
    }

    private func retain<Handler: AnyObject>(_ handler: Handler) -> Handler {
        uses.withLock { $0[ObjectIdentifier(handler), default: 0] += 1 }
        return handler
    }

    /// True when `handler` was the last use of its series: the caller unregisters it.
    private func release(_ handler: AnyObject) -> Bool {
        uses.withLock { uses in
            let id = ObjectIdentifier(handler)
            guard let n = uses[id] else { return false }
            if n > 1 { uses[id] = n - 1; return false }
            uses.removeValue(forKey: id)
            return true
        }
    }

    // MARK: MetricsFactory

    public func makeCounter(label: String, dimensions: [(String, String)]) -> any CounterHandler {
        retain(prometheus.makeCounter(descriptor: described(label), labels: dimensions))
    }

    public func makeFloatingPointCounter(label: String, dimensions: [(String, String)]) -> any FloatingPointCounterHandler {
        retain(prometheus.makeCounter(descriptor: described(label), labels: dimensions))
    }

    public func makeRecorder(label: String, dimensions: [(String, String)], aggregate: Bool) -> any RecorderHandler {
        guard aggregate else { return retain(prometheus.makeGauge(descriptor: described(label), labels: dimensions)) }
        return retain(prometheus.makeValueHistogram(descriptor: described(label), labels: dimensions,
                                                    buckets: [0.001, 0.01, 0.1, 1, 10, 100, 1000]))
    }

    public func makeMeter(label: String, dimensions: [(String, String)]) -> any MeterHandler {
        retain(prometheus.makeGauge(descriptor: described(label), labels: dimensions))
    }

    public func makeTimer(label: String, dimensions: [(String, String)]) -> any TimerHandler {
        retain(prometheus.makeDurationHistogram(descriptor: described(label), labels: dimensions, buckets: Self.durationBuckets))
    }

    public func destroyCounter(_ handler: any CounterHandler) {
        if let c = handler as? Prometheus.Counter, release(c) { prometheus.unregisterCounter(c) }
    }

    public func destroyFloatingPointCounter(_ handler: any FloatingPointCounterHandler) {
        if let c = handler as? Prometheus.Counter, release(c) { prometheus.unregisterCounter(c) }
    }

    public func destroyRecorder(_ handler: any RecorderHandler) {
        if let g = handler as? Prometheus.Gauge, release(g) { prometheus.unregisterGauge(g) }
        if let h = handler as? ValueHistogram, release(h) { prometheus.unregisterValueHistogram(h) }
    }

    public func destroyMeter(_ handler: any MeterHandler) {
        if let g = handler as? Prometheus.Gauge, release(g) { prometheus.unregisterGauge(g) }
    }

    public func destroyTimer(_ handler: any TimerHandler) {
        if let h = handler as? DurationHistogram, release(h) { prometheus.unregisterDurationHistogram(h) }
    }
}
