import CXen
import Core
import Glibc
import Synchronization
import XenStore

/// Options of the blkif backend: what it offers the frontend.
public struct BlkifBackendOptions: Sendable {
    /// multi-queue-max-queues: rings (and ring threads) a frontend may open.
    public var maxQueues = 4
    /// max-ring-page-order: a ring of up to 2^order pages (order 4: 512 requests).
    public var maxRingPageOrder = Blkif.maxRingPageOrder
    /// feature-max-indirect-segments: the most segments an indirect request may carry (at most
    /// Blkif.maxIndirectSegments, which the slots are sized for); 0 refuses indirect requests.
    public var maxIndirectSegments = Blkif.maxIndirectSegments
    /// Persistent grants kept mapped per ring (Linux blkback's xen_blkif_max_pgrants); 0 turns
    /// feature-persistent off.
    public var persistentGrantsPerRing = 1056
    /// How long an idle ring thread watches the ring for the next request before it sleeps on
    /// the event channel, in microseconds (`AdaptivePoller`); 0 never polls.
    public var pollMicroseconds = AdaptivePoller.defaultMicroseconds
    /// Where each ring's private state is kept (``RingRecoveryRecord``), so that a daemon
    /// killed and started again resumes its guests' rings: a directory under /run (the daemon
    /// uses /run/softdev/rings on Xen, `<local-dir>/rings` on the local hypervisor). nil keeps
    /// none: a restarted daemon then closes the disks it finds Connected.
    public var ringStateDirectory: String?
    public init() {}

    /// The indirect segment limit both advertised and enforced.
    var effectiveMaxIndirectSegments: Int { min(max(0, maxIndirectSegments), Blkif.maxIndirectSegments) }
}

/// The blkif backend (Linux's xen-blkback, QEMU's xen-block): offers the features, reads the
/// frontend's rings at connect, and serves each ring with a ``BlkifQueue``. The device under it
/// never sees rings or grants, only ``BlockRequest``s.
public final class BlkifBackend: XenbusBackendDriver, @unchecked Sendable {
    public let device: any BlockDevice
    public let options: BlkifBackendOptions
    private var queues: [BlkifQueue] = []
    /// The earlier connections' counters; the connected queues' are added at disconnect.
    private let totals = Mutex(BlkifStatistics())
    /// What the frontend asked for at the last connect, for `softdev list` and the lab report.
    public private(set) var negotiated: Negotiated?
    private let log: (String) -> Void

    public struct Negotiated: Sendable, CustomStringConvertible {
        public var queues: Int
        public var ringPageOrder: Int
        public var persistentGrants: Bool
        public var description: String {
            "queues=\(queues) ring-page-order=\(ringPageOrder) persistent-grants=\(persistentGrants ? 1 : 0)"
        }
    }

    public init(device: any BlockDevice, options: BlkifBackendOptions = BlkifBackendOptions(), log: @escaping (String) -> Void = { _ in }) {
        self.device = device; self.options = options; self.log = log
    }
    /// The threads this vbd's devices block on (shared by its rings, started as needed).
    private let workers = BlockWorkers(limit: BlkifBackend.workerThreads, purpose: "a vbd's block workers")
    /// At most this many of a vbd's requests block at once (a buffered file's reads that miss
    /// the page cache, a store's lookups), as many as QEMU's and nbdkit's defaults keep busy.
    public static let workerThreads = 16

    public func advertise(_ dev: XenbusBackendDevice) throws {
        let caps = device.capabilities
        let be = dev.backendPath
        try dev.store.transaction { (tx) throws(XenStoreError) in
            func put(_ k: String, _ v: String) throws(XenStoreError) { try dev.store.write(be + "/" + k, v, transaction: tx) }
            try put("feature-flush-cache", "1")
            try put("feature-discard", caps.contains(.discard) ? "1" : "0")
            if caps.contains(.discard) {
                try put("discard-granularity", "\(device.geometry.physicalBlockSize)")
                try put("discard-alignment", "0")
                try put("discard-secure", "0")
            }
            try put("feature-persistent", options.persistentGrantsPerRing > 0 ? "1" : "0")
            try put("feature-max-indirect-segments", "\(options.effectiveMaxIndirectSegments)")
            try put("max-ring-page-order", "\(options.maxRingPageOrder)")
            try put("multi-queue-max-queues", "\(options.maxQueues)")
        }
    }

    public func connect(_ dev: XenbusBackendDevice) throws {
        try connect(dev, resuming: false)
    }

    /// The frontend stayed Connected while the daemon before this one was killed: the same
    /// rings, picked up from their records (a ring without one, or whose record does not fit
    /// the shared ring, is not written to: the device closes).
    public func resume(_ dev: XenbusBackendDevice) throws {
        guard options.ringStateDirectory != nil else {
            throw BlkifConnectError("no ring state directory: the rings' state was not kept, so they cannot be resumed")
        }
        try connect(dev, resuming: true)
    }

    private func connect(_ dev: XenbusBackendDevice, resuming: Bool) throws {
        let store = dev.store
        let fe = dev.frontendPath
        if let proto = try store.readString(fe + "/protocol"), !proto.isEmpty, proto != "x86_64-abi" {
            throw BlkifConnectError("frontend protocol \(proto) is not supported (only x86_64-abi)")
        }
        // The guest writes these: compare them as read, before any conversion could trap.
        let requestedQueues = try store.readInt(fe + "/multi-queue-num-queues") ?? 1
        guard requestedQueues >= 1, requestedQueues <= UInt64(options.maxQueues) else {
            throw BlkifConnectError("frontend asked for \(requestedQueues) queues; at most \(options.maxQueues)")
        }
        let queueCount = Int(requestedQueues)
        let requestedOrder = try store.readInt(fe + "/ring-page-order") ?? 0
        guard requestedOrder <= UInt64(options.maxRingPageOrder) else {
            throw BlkifConnectError("frontend ring-page-order \(requestedOrder) is above max-ring-page-order \(options.maxRingPageOrder)")
        }
        let order = Int(requestedOrder)
        let offered = try store.readInt(fe + "/feature-persistent") ?? 0
        let persistent = options.persistentGrantsPerRing > 0 && offered == 1
        var opened: [BlkifQueue] = []
        do {
            for q in 0..<queueCount {
                let dir = queueCount == 1 ? fe : fe + "/queue-\(q)"
                opened.append(try openQueue(dev, index: q, directory: dir, order: order, persistent: persistent, resuming: resuming))
            }
        } catch {
            opened.forEach { $0.stop() }   // never started: releases at once
            throw error
        }
        let g = device.geometry
        try store.transaction { (tx) throws(XenStoreError) in
            func put(_ k: String, _ v: String) throws(XenStoreError) { try store.write(dev.backendPath + "/" + k, v, transaction: tx) }
            try put("sectors", "\(g.sectors)")
            try put("info", "\(device.capabilities.contains(.write) ? 0 : Blkif.vdiskReadOnly)")
            try put("sector-size", "\(g.logicalBlockSize)")
            try put("physical-sector-size", "\(g.physicalBlockSize)")
        }
        do {
            for q in opened { try q.start() }
        } catch {
            opened.forEach { $0.stop() }
            throw BlkifConnectError("\(error)")
        }
        queues = opened
        dev.reportStatistics(every: 2) { [weak self] in
            guard let self else { return "" }
            return totals.withLock { $0 }.adding(opened).description
        }
        let chosen = Negotiated(queues: queueCount, ringPageOrder: order, persistentGrants: persistent)
        negotiated = chosen
        log("\(dev.backendPath): \(resuming ? "resumed" : "connected") to domain \(dev.frontendDomain): \(chosen), device \(device.name) \(g.size) bytes")
    }

    private func openQueue(_ dev: XenbusBackendDevice, index: Int, directory: String, order: Int, persistent: Bool,
                           resuming: Bool) throws -> BlkifQueue {
        let store = dev.store
        var refs: [GrantRef] = []
        let single = try store.readString(directory + "/ring-ref")
        if order == 0 && single != nil {
            refs = [GrantRef(try readNumber(store, directory + "/ring-ref"))]
        } else {
            for i in 0..<(1 << order) { refs.append(GrantRef(try readNumber(store, directory + "/ring-ref\(i)"))) }
        }
        let port = EventPort(try readNumber(store, directory + "/event-channel"))
        let hv = dev.hypervisor
        // The record first: resuming without one touches nothing of the guest's.
        var record: RingRecoveryRecord?
        var recovered: RingRecoveryRecord.Recovered?
        if let stateDirectory = options.ringStateDirectory {
            let entries = SharedRingLayout.entries(bytes: (1 << order) * xenPageSize, entrySize: BlkifRing.entrySize)
            let name = "\(dev.frontendDomain)-\(dev.backendPath.split(separator: "/").last ?? "")-\(index).ring"
            do {
                record = try RingRecoveryRecord(path: stateDirectory + "/" + name,
                                                identity: .init(frontendDomain: dev.frontendDomain, ringRefs: refs, eventPort: port),
                                                slots: Int(entries), requestSize: MemoryLayout<BlkifRequestBytes>.size, resume: resuming)
            } catch {
                throw BlkifConnectError("queue \(index): \(error)")
            }
            if resuming, let found = record?.recover() {
                recovered = found
                log("\(dev.backendPath): queue \(index): resuming at request \(found.requestConsumer), response \(found.responseProducer); "
                    + "\(found.pending.count) request\(found.pending.count == 1 ? "" : "s") the killed daemon left unanswered served again")
            }
        }
        let mapping = try hv.grants.mapContiguous(domain: dev.frontendDomain, refs: refs, writable: true)
        let channel: any EventChannel
        do { channel = try hv.events.bindInterdomain(remote: dev.frontendDomain, remotePort: port) }
        catch { hv.grants.unmap(mapping, refs: refs); throw error }
        return try BlkifQueue(index: index, ringMapping: mapping, ringRefs: refs, channel: channel, device: device, grants: hv.grants,
                          domain: dev.frontendDomain, persistentGrants: persistent ? options.persistentGrantsPerRing : 0,
                          maxIndirectSegments: options.effectiveMaxIndirectSegments, poller: AdaptivePoller(microseconds: options.pollMicroseconds),
                          workers: workers, record: record, resume: recovered) { [weak dev] why in
            guard let dev else { return }
            // Per xenbus rules the device fails alone; the state machine runs on the dispatcher.
            dev.failAsync("queue \(index): \(why)")
        }
    }

    private func readNumber(_ store: any XenStoreClient, _ path: String) throws -> UInt64 {
        guard let v = try store.readInt(path) else { throw BlkifConnectError("\(path) is missing") }
        guard v <= UInt64(UInt32.max) else { throw BlkifConnectError("\(path) = \(v) is out of range") }
        return v
    }

    /// The device stack was opened for this disk alone (BlockTapService): close it, so files
    /// are closed and filters such as `stats(file=...)` write their reports.
    public func unplugged(_ dev: XenbusBackendDevice) {
        device.close()
        workers.stop()
    }

    public func disconnect(_ dev: XenbusBackendDevice) {
        guard !queues.isEmpty else { return }
        // Every queue stops taking requests at once; then this (teardown) thread waits until
        // each has ended, however long its device takes: the xenbus host bounds how long the
        // guest waits and reports a stuck device, while the stack is closed (`unplugged`) only
        // once nothing is in flight. Each ring thread keeps the guest's pages mapped until
        // its last request completes.
        queues.forEach { $0.requestStop() }
        for q in queues { _ = q.stop(timeout: .infinity) }
        let connection = BlkifStatistics().adding(queues)
        let stopped = queues
        queues = []
        dev.endStatistics { totals.withLock { t in t = t.adding(stopped); return t }.description }
        log("\(dev.backendPath): disconnected (\(connection.requests) requests served, \(connection.failed) failed)")
    }
}

/// A vbd's requests answered and failed, and its rings' events: what its `statistics` node
/// holds ("requests=12 failed=0 events=3 spurious-events=0"), over every connection so far.
public struct BlkifStatistics: Sendable, Equatable, CustomStringConvertible {
    public var requests: UInt64 = 0, failed: UInt64 = 0
    public var events = RingEventStatistics()
    public init() {}
    public var description: String { "requests=\(requests) failed=\(failed) \(events)" }
    func adding(_ queues: [BlkifQueue]) -> Self {
        var s = self
        for q in queues {
            s.requests += q.requestsServed.load(ordering: .relaxed)
            s.failed += q.requestsFailed.load(ordering: .relaxed)
            s.events = s.events + q.eventStatistics
        }
        return s
    }
}

public struct BlkifConnectError: Error, CustomStringConvertible {
    public let description: String
    public init(_ d: String) { description = d }
}
