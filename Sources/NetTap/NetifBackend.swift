import CXen
import Core
import Glibc
import Synchronization
import XenStore

/// Options of the netif backend: what it offers the frontend.
public struct NetifBackendOptions: Sendable {
    /// multi-queue-max-queues: queue pairs (and ring threads) a frontend may open (netback:
    /// min(8, CPUs)).
    public var maxQueues = min(8, max(1, Int(sysconf(Int32(_SC_NPROCESSORS_ONLN)))))
    /// How long an idle ring thread watches its rings before it sleeps, in microseconds.
    public var pollMicroseconds = AdaptivePoller.defaultMicroseconds
    /// The most bytes of frames per queue waiting for the guest to post buffers; beyond it,
    /// frames to the guest are dropped and counted (netback bounds its rx queue the same way).
    public var backlogBytes = 1 << 20
    public init() {}
}

/// The netif backend (Linux's xen-netback, QEMU's xen_nic): offers netback's features, reads the
/// frontend's rings at connect and serves each queue with a ``NetifQueue``; it is also the
/// receiver at the top of the vif's device stack, handing frames for the guest to its queues.
/// The device stack never sees rings or grants, only ``EthernetFrame``s.
public final class NetifBackend: XenbusBackendDriver, NetFrameReceiver, @unchecked Sendable {
    public let device: any NetDevice
    public let options: NetifBackendOptions
    private let log: @Sendable (String) -> Void
    /// The queues of the current connection, read by any thread that hands a frame up.
    private let queues = Mutex<[NetifQueue]>([])
    /// Frames for the guest while it is not connected, dropped.
    private let droppedDisconnected = Atomic<UInt64>(0)
    /// The connected queues' counters, added to the earlier connections' at disconnect.
    private let totals = Mutex(NetifCounters())
    public private(set) var negotiated: Negotiated?

    /// What the frontend chose at the last connect.
    public struct Negotiated: Sendable, CustomStringConvertible {
        public var queues: Int
        public var splitEventChannels: Bool
        public var offloads: NetOffloads
        public var description: String {
            "queues=\(queues) split-event-channels=\(splitEventChannels ? 1 : 0) offloads=\(offloads)"
        }
    }

    public init(device: any NetDevice, options: NetifBackendOptions = NetifBackendOptions(),
                log: @escaping @Sendable (String) -> Void = { _ in }) {
        self.device = device; self.options = options; self.log = log
    }

    /// Frames and bytes both ways since the vif was created, and drops.
    public var counters: NetifCounters {
        var c = totals.withLock { $0 }
        queues.withLock { qs in for q in qs { c.add(q) } }
        c.rxDropped += droppedDisconnected.load(ordering: .relaxed)
        return c
    }

    public func advertise(_ dev: XenbusBackendDevice) throws {
        let be = dev.backendPath
        try dev.store.transaction { (tx) throws(XenStoreError) in
            func put(_ k: String, _ v: String) throws(XenStoreError) { try dev.store.write(be + "/" + k, v, transaction: tx) }
            // netfront refuses a backend without rx-copy; the rest is what kernel netback offers.
            try put("feature-rx-copy", "1")
            try put("feature-rx-flip", "0")
            try put("feature-sg", "1")
            try put("feature-gso-tcpv4", "1")
            try put("feature-gso-tcpv6", "1")
            try put("feature-ipv6-csum-offload", "1")
            try put("feature-split-event-channels", "1")
            try put("multi-queue-max-queues", "\(max(1, options.maxQueues))")
        }
    }

    public func connect(_ dev: XenbusBackendDevice) throws {
        let store = dev.store
        let fe = dev.frontendPath
        // The guest writes these: compared as read, before any conversion could trap.
        let requested = try store.readInt(fe + "/multi-queue-num-queues") ?? 1
        guard requested >= 1, requested <= UInt64(max(1, options.maxQueues)) else {
            throw NetifConnectError("frontend asked for \(requested) queues; at most \(options.maxQueues)")
        }
        guard try store.readInt(fe + "/request-rx-copy") == 1 else {
            throw NetifConnectError("frontend did not request rx-copy (request-rx-copy=1): the only receive mode there is")
        }
        func flag(_ key: String) throws -> Bool { try store.readInt(fe + "/" + key) == 1 }
        var features = NetifQueueFeatures()
        features.scatterGather = try flag("feature-sg")
        features.gsoTCPv4 = try flag("feature-gso-tcpv4")
        features.gsoTCPv6 = try flag("feature-gso-tcpv6")
        features.backlogBytes = max(Netif.maxFrameSize, options.backlogBytes)
        let queueCount = Int(requested)
        // A device whose frames wait in kernel queues (a TAP's) is read by the ring threads,
        // its queue j by the vif's queue j % queueCount, while the guest has buffers.
        let sources = device.handOverReading() ?? []
        var opened: [NetifQueue] = []
        var split = false
        do {
            for q in 0..<queueCount {
                let dir = queueCount == 1 ? fe : fe + "/queue-\(q)"
                let read = sources.enumerated().filter { $0.offset % queueCount == q }.map { (fd: $0.element, queue: $0.offset) }
                let (queue, isSplit) = try openQueue(dev, index: q, directory: dir, features: features, sources: read)
                opened.append(queue)
                split = isSplit
            }
        } catch {
            opened.forEach { $0.stop() }
            throw error
        }
        let offloads = features.offloads
        // The device is connected before the ring threads start (they may read it at once),
        // and the queues are in place before it is (it may hand frames up at once).
        queues.withLock { $0 = opened }
        device.connect(self, accepting: offloads)
        do {
            for q in opened { try q.start() }
        } catch {
            queues.withLock { $0 = [] }
            opened.forEach { $0.stop() }
            throw NetifConnectError("\(error)")
        }
        dev.reportStatistics(every: 2) { [weak self] in self?.counters.description ?? "" }
        let chosen = Negotiated(queues: queueCount, splitEventChannels: split, offloads: offloads)
        negotiated = chosen
        log("\(dev.backendPath): connected to domain \(dev.frontendDomain): \(chosen), device \(device.name)")
    }

    private func openQueue(_ dev: XenbusBackendDevice, index: Int, directory: String,
                           features: NetifQueueFeatures, sources: [(fd: Int32, queue: Int)]) throws -> (NetifQueue, Bool) {
        let store = dev.store
        let txRef = GrantRef(try readNumber(store, directory + "/tx-ring-ref"))
        let rxRef = GrantRef(try readNumber(store, directory + "/rx-ring-ref"))
        // Split event channels first, as netback tries them.
        let txPort = try store.readInt(directory + "/event-channel-tx")
        let rxPort = try store.readInt(directory + "/event-channel-rx")
        let split = txPort != nil && rxPort != nil
        let singlePort: UInt64? = split ? nil : try readNumber(store, directory + "/event-channel")
        for p in [txPort, rxPort, singlePort] {
            if let p, p > UInt64(UInt32.max) { throw NetifConnectError("\(directory): event channel \(p) is out of range") }
        }
        let hv = dev.hypervisor
        let domain = dev.frontendDomain
        let txMapping = try hv.grants.mapContiguous(domain: domain, refs: [txRef], writable: true)
        let rxMapping: GrantMapping
        do { rxMapping = try hv.grants.mapContiguous(domain: domain, refs: [rxRef], writable: true) }
        catch { hv.grants.unmap(txMapping, refs: [txRef]); throw error }
        var txChannel: (any EventChannel)?, rxChannel: (any EventChannel)?
        do {
            txChannel = try hv.events.bindInterdomain(remote: domain, remotePort: EventPort(split ? txPort! : singlePort!))
            if split { rxChannel = try hv.events.bindInterdomain(remote: domain, remotePort: EventPort(rxPort!)) }
        } catch {
            txChannel?.close()
            hv.grants.unmap(txMapping, refs: [txRef]); hv.grants.unmap(rxMapping, refs: [rxRef])
            throw error
        }
        let queue = try NetifQueue(index: index, tx: txMapping, txRef: txRef, rx: rxMapping, rxRef: rxRef,
                                   txChannel: txChannel!, rxChannel: rxChannel, device: device, grants: hv.grants,
                                   domain: domain, features: features, sources: sources,
                                   poller: AdaptivePoller(microseconds: options.pollMicroseconds)) {
            [weak dev] why in
            // Netback's xenvif_fatal_tx_err: this vif alone stops, until the frontend reconnects.
            dev?.failAsync("queue \(index): \(why)")
        }
        return (queue, split)
    }

    private func readNumber(_ store: any XenStoreClient, _ path: String) throws -> UInt64 {
        guard let v = try store.readInt(path) else { throw NetifConnectError("\(path) is missing") }
        guard v <= UInt64(UInt32.max) else { throw NetifConnectError("\(path) = \(v) is out of range") }
        return v
    }

    /// A frame coming up the stack, for the guest: to the queue it names (a multi-queue TAP's
    /// flow), any thread. A TCP segment the guest did not negotiate GSO for is cut here, on
    /// the sender's thread, into the segments it would have had on a wire.
    public func toGuest(_ frame: EthernetFrame) { toGuest(frame, repeating: 1) }

    /// A run of copies of one frame (the generator's), queued as one entry on the queue it names.
    public func toGuest(_ frame: EthernetFrame, repeating count: Int) {
        guard count > 0 else { return }
        let queue: NetifQueue? = queues.withLock { qs in qs.isEmpty ? nil : qs[frame.queue % qs.count] }
        guard let queue else {
            droppedDisconnected.wrappingAdd(UInt64(count), ordering: .relaxed)
            return
        }
        if queue.guestOffloads.mustSegment(frame) {
            // Cut copy by copy, as many as the backlog could hold; the rest are dropped there.
            let cut = min(count, queue.backlogLimit / max(1, frame.count) + 1)
            queue.counters.rxDropped.wrappingAdd(UInt64(count - cut), ordering: .relaxed)
            return toGuest([EthernetFrame](repeating: frame, count: cut))
        }
        queue.enqueue(frame, repeating: count)
    }

    /// Frames for the guest, each queue's taken with one lock.
    public func toGuest(_ frames: [EthernetFrame]) {
        let qs = queues.withLock { $0 }
        guard !qs.isEmpty else {
            droppedDisconnected.add(UInt64(frames.count), ordering: .relaxed)
            return
        }
        let offloads = qs[0].guestOffloads
        if frames.contains(where: offloads.mustSegment) { return toGuest(segmenting: frames, for: offloads, qs) }
        if qs.count == 1 { return qs[0].enqueue(frames) }
        for (i, q) in qs.enumerated() { q.enqueue(frames.lazy.filter { $0.queue % qs.count == i }) }
    }

    /// `frames` with the TCP segments the guest cannot take cut (``GSOSegmenter``); one that
    /// cannot be cut is dropped and counted on its queue.
    private func toGuest(segmenting frames: [EthernetFrame], for offloads: NetOffloads, _ qs: [NetifQueue]) {
        var cut: [EthernetFrame] = []
        for frame in frames {
            guard offloads.mustSegment(frame) else { cut.append(frame); continue }
            do throws(GSOSegmenter.Refusal) {
                cut += try GSOSegmenter.segment(frame, for: offloads)
            } catch {
                qs[frame.queue % qs.count].counters.rxDropped.add(1, ordering: .relaxed)
            }
        }
        toGuest(cut)
    }

    public func disconnect(_ dev: XenbusBackendDevice) {
        let stopping = queues.withLock { qs in defer { qs = [] }; return qs }
        guard !stopping.isEmpty else { return }
        stopping.forEach { $0.requestStop() }
        for q in stopping { _ = q.stop(timeout: .infinity) }
        var c = NetifCounters()
        dev.endStatistics {
            c = totals.withLock { t in
                for q in stopping { t.add(q) }
                return t
            }
            return c.description
        }
        log("\(dev.backendPath): disconnected (from the guest \(c.txFrames) frames, \(c.txDropped) dropped; "
            + "to the guest \(c.rxFrames) frames, \(c.rxDropped) dropped)")
    }

    /// The device stack was opened for this vif alone: close it (a TAP goes, a capture is closed).
    public func unplugged(_ dev: XenbusBackendDevice) {
        device.close()
    }
}

/// A vif's frames and bytes in both directions, and the frames dropped.
public struct NetifCounters: Sendable, Equatable, CustomStringConvertible {
    /// From the guest (its tx ring).
    public var txFrames: UInt64 = 0, txBytes: UInt64 = 0, txDropped: UInt64 = 0
    /// To the guest (its rx ring).
    public var rxFrames: UInt64 = 0, rxBytes: UInt64 = 0, rxDropped: UInt64 = 0
    /// The queues' event channels: events taken, and the spurious ones (XSA-332).
    public var events = RingEventStatistics()
    public init() {}
    /// As the `statistics` node holds them: "tx-frames=3 tx-bytes=180 tx-dropped=0 rx-frames=...
    /// events=2 spurious-events=0".
    public var description: String {
        "tx-frames=\(txFrames) tx-bytes=\(txBytes) tx-dropped=\(txDropped) rx-frames=\(rxFrames) rx-bytes=\(rxBytes) rx-dropped=\(rxDropped)"
            + " \(events)"
    }
    mutating func add(_ q: NetifQueue) {
        events = events + q.eventStatistics
        let c = q.counters
        txFrames += c.txFrames.load(ordering: .relaxed); txBytes += c.txBytes.load(ordering: .relaxed)
        txDropped += c.txDropped.load(ordering: .relaxed)
        rxFrames += c.rxFrames.load(ordering: .relaxed); rxBytes += c.rxBytes.load(ordering: .relaxed)
        rxDropped += c.rxDropped.load(ordering: .relaxed)
    }
}

public struct NetifConnectError: Error, CustomStringConvertible {
    public let description: String
    public init(_ d: String) { description = d }
}
