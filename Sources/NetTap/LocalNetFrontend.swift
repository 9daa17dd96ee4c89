import CXen
import Core
import Glibc
import XenStore

/// A netfront written in Swift for a guest of the local hypervisor: it does on the wire what
/// Linux's xen-netfront does (one-page tx and rx rings per queue, split or shared event
/// channels, frames in several slots, GSO extras, checksum flags, 256 posted receive buffers
/// per queue), so that the demo, the tests and the benchmark drive the backend as a guest
/// would. The handshake, rings and channels are a ``LocalFrontend``'s.
public final class LocalNetFrontend: @unchecked Sendable {
    public struct Options: Sendable {
        public var queues = 1
        /// Offer scatter-gather and TCP segmentation both ways (netfront always does).
        public var scatterGather = true
        public var gso = true
        /// One event channel per ring (netfront's default when the backend offers it).
        public var splitEventChannels = true
        /// Receive buffers posted per queue at connect (a ring's worth, 256, as netfront; fewer
        /// for a test of a guest that starves the backend).
        public var rxBuffers = 256
        public init() {}
    }

    public let connection: LocalFrontend
    public let options: Options
    public private(set) var backendFeatures: [String: String] = [:]
    @exclusivity(unchecked) public private(set) var queues: [Queue] = []

    /// One tx and rx ring pair with their channels, buffers and bookkeeping. Used by one
    /// thread at a time (the guest's), so its state skips the runtime's exclusivity checks,
    /// which would cost more than the ring work itself in the benchmark's tight loops.
    public final class Queue: @unchecked Sendable {
        @exclusivity(unchecked) public var tx: FrontRing<NetifTxRing>
        @exclusivity(unchecked) public var rx: FrontRing<NetifRxRing>
        public let txChannel: any EventChannel
        public let rxChannel: any EventChannel
        /// Transmit pages: one per id, granted read-only once; id i's data goes in page i.
        public let txPages: UnsafeMutableRawPointer
        public let txRefs: [GrantRef]
        /// Receive pages: one per ring slot (a buffer posted at ring index i has id i % 256).
        public let rxPages: UnsafeMutableRawPointer
        public let rxRefs: [GrantRef]
        @exclusivity(unchecked) var freeTxIDs: [UInt16]
        /// Statuses of the tx responses collected, in order (tests look at them).
        @exclusivity(unchecked) public internal(set) var txStatuses: [Int16] = []
        /// The slots of a frame being received, if its last slot has not come yet.
        @exclusivity(unchecked) var partial: PartialFrame?

        init(tx: FrontRing<NetifTxRing>, rx: FrontRing<NetifRxRing>, txChannel: any EventChannel, rxChannel: any EventChannel,
             txPages: UnsafeMutableRawPointer, txRefs: [GrantRef], rxPages: UnsafeMutableRawPointer, rxRefs: [GrantRef]) {
            self.tx = tx; self.rx = rx; self.txChannel = txChannel; self.rxChannel = rxChannel
            self.txPages = txPages; self.txRefs = txRefs; self.rxPages = rxPages; self.rxRefs = rxRefs
            freeTxIDs = (0..<UInt16(txRefs.count)).reversed()
        }

        /// Forgets the tx statuses collected so far; returns how many were not OKAY (a load
        /// generator's tally, which would otherwise keep every status).
        public func clearTxStatuses() -> Int {
            let failed = txStatuses.reduce(0) { $0 + ($1 == Netif.statusOkay ? 0 : 1) }
            txStatuses.removeAll(keepingCapacity: true)
            return failed
        }

        /// Publishes the tx requests put so far, notifying the backend if it asked.
        public func pushTx() { if tx.pushRequests() { txChannel.notify() } }

        /// Ids free for new tx slots.
        public var freeTxSlots: Int { min(freeTxIDs.count, Int(tx.freeRequests)) }

        /// Puts one raw tx request (hostile tests write any bytes); not pushed.
        public func putRawTx(_ request: netif_tx_request) { tx.putRequest(request) }
        /// Puts an extra-info slot; not pushed.
        public func putRawExtra(_ extra: netif_extra_info) {
            var r = netif_tx_request()
            withUnsafeMutableBytes(of: &r) { $0.storeBytes(of: extra, as: netif_extra_info.self) }
            tx.putRequest(r)
        }
        /// Takes a free tx id with its page (a hostile test fills it), or nil when none is free.
        public func takeTxID() -> (id: UInt16, ref: GrantRef, page: UnsafeMutableRawPointer)? {
            guard let id = freeTxIDs.popLast() else { return nil }
            return (id, txRefs[Int(id)], txPages + Int(id) * xenPageSize)
        }
    }

    /// A frame being received: its first slot's flags, the data so far, what is still to come.
    struct PartialFrame {
        var bytes: [UInt8] = []
        var flags: UInt16
        var gso: FrameOffload.Segmentation?
        var expectExtra: Bool
        var moreData = false
        init(flags: UInt16, expectExtra: Bool) { self.flags = flags; self.expectExtra = expectExtra }
    }

    public struct Failure: Error, CustomStringConvertible {
        public let description: String
        init(_ d: String) { description = d }
    }

    public var backendPath: String { connection.backendPath }

    /// Connects the vif at `frontendPath` (written by the toolstack) to its backend.
    public init(hypervisor: LocalHypervisor, frontendPath: String, options: Options = Options(), timeoutSeconds: Double = 10) throws {
        connection = try LocalFrontend(hypervisor: hypervisor, frontendPath: frontendPath, timeoutSeconds: timeoutSeconds)
        self.options = options
        backendFeatures = try connection.backendNodes(["feature-rx-copy", "feature-sg", "feature-gso-tcpv4", "feature-gso-tcpv6",
                                                       "feature-split-event-channels", "multi-queue-max-queues"])
        guard backendFeatures["feature-rx-copy"] == "1" else {
            throw Failure("backend does not support copying receive path")   // netfront's words
        }
        let maxQueues = Int(backendFeatures["multi-queue-max-queues"] ?? "1") ?? 1
        let queueCount = max(1, min(options.queues, maxQueues))
        let split = options.splitEventChannels && backendFeatures["feature-split-event-channels"] == "1"
        var nodes: [(String, String)] = [("request-rx-copy", "1"), ("feature-rx-notify", "1"),
                                         ("feature-sg", options.scatterGather ? "1" : "0"),
                                         ("feature-gso-tcpv4", options.gso ? "1" : "0"), ("feature-gso-tcpv6", options.gso ? "1" : "0"),
                                         ("feature-ipv6-csum-offload", "1")]
        if backendFeatures["multi-queue-max-queues"] != nil { nodes.append(("multi-queue-num-queues", "\(queueCount)")) }
        for q in 0..<queueCount {
            let prefix = queueCount == 1 ? "" : "queue-\(q)/"
            let tx = try connection.makeRing(NetifTxRing.self, pageOrder: 0)
            let rx = try connection.makeRing(NetifRxRing.self, pageOrder: 0)
            let txChannel = try connection.makeChannel()
            let rxChannel = split ? try connection.makeChannel() : txChannel
            nodes += tx.nodes(prefix: prefix, name: "tx-ring-ref") + rx.nodes(prefix: prefix, name: "rx-ring-ref")
            if split {
                nodes += [(prefix + "event-channel-tx", "\(txChannel.localPort)"), (prefix + "event-channel-rx", "\(rxChannel.localPort)")]
            } else {
                nodes.append((prefix + "event-channel", "\(txChannel.localPort)"))
            }
            let pages = connection.pages
            let slots = Int(tx.ring.size)
            let txFrame = try pages.allocate(pages: slots)
            let txRefs = try connection.grant(frame: txFrame, count: slots, readOnly: true)
            let rxSlots = Int(rx.ring.size)
            let rxFrame = try pages.allocate(pages: rxSlots)
            let rxRefs = try connection.grant(frame: rxFrame, count: rxSlots, readOnly: false)
            let queue = Queue(tx: tx.ring, rx: rx.ring, txChannel: txChannel, rxChannel: rxChannel,
                              txPages: pages.pointer(txFrame), txRefs: txRefs, rxPages: pages.pointer(rxFrame), rxRefs: rxRefs)
            // Post every receive buffer, as netfront does before it connects.
            for _ in 0..<min(rxSlots, max(0, options.rxBuffers)) { postRxBuffer(queue) }
            _ = queue.rx.pushRequests()
            queues.append(queue)
        }
        try connection.connect(nodes: nodes, timeoutSeconds: timeoutSeconds)
    }

    /// Posts up to `count` more receive buffers on queue `queue` (as many as the ring has
    /// room for) and notifies the backend if it asked; returns how many were posted. (A guest
    /// that posted fewer at connect, `Options.rxBuffers`, gives the rest here.)
    @discardableResult
    public func postRxBuffers(_ count: Int, queue: Int = 0) -> Int {
        let q = queues[queue]
        let n = min(count, Int(q.rx.size &- (q.rx.requestProducer &- q.rx.responseConsumer)))
        for _ in 0..<max(0, n) { postRxBuffer(q) }
        if n > 0, q.rx.pushRequests() { q.rxChannel.notify() }
        return max(0, n)
    }

    private func postRxBuffer(_ q: Queue) {
        let index = q.rx.requestProducer
        let id = UInt16(index & (q.rx.size - 1))
        q.rx.putRequest(netif_rx_request(id: id, pad: 0, gref: q.rxRefs[Int(id)]))
    }

    /// Puts `frame` on queue `queue`'s tx ring (first slot, a GSO extra if any, further
    /// slots of up to a page) without pushing; false if the ring has no room for it now.
    @discardableResult
    public func put(_ frame: EthernetFrame, queue: Int = 0) -> Bool {
        let q = queues[queue]
        let dataSlots = max(1, (frame.count + xenPageSize - 1) / xenPageSize)
        let extra = frame.offload.segmentation != nil ? 1 : 0
        guard q.freeTxIDs.count >= dataSlots, Int(q.tx.freeRequests) >= dataSlots + extra else { return false }
        frame.withUnsafeBytes { bytes in
            var offset = 0
            for s in 0..<dataSlots {
                let id = q.freeTxIDs.removeLast()
                let length = min(xenPageSize, frame.count - offset)
                if length > 0 { (q.txPages + Int(id) * xenPageSize).copyMemory(from: bytes.baseAddress! + offset, byteCount: length) }
                var flags: UInt16 = s + 1 < dataSlots ? Netif.txMoreData : 0
                if s == 0 {
                    if case .partial = frame.offload.checksum { flags |= Netif.txChecksumBlank | Netif.txDataValidated }
                    if frame.offload.checksum == .validated { flags |= Netif.txDataValidated }
                    if extra == 1 { flags |= Netif.txExtraInfo }
                }
                // The first slot's size is the frame's; the others' their own.
                let size = s == 0 ? frame.count : length
                q.tx.putRequest(netif_tx_request(gref: q.txRefs[Int(id)], offset: 0, flags: flags, id: id, size: UInt16(size)))
                if s == 0, let gso = frame.offload.segmentation {
                    var e = netif_extra_info()
                    e.type = Netif.extraGSO
                    e.u.gso.size = gso.size
                    e.u.gso.type = gso.kind == .tcpv4 ? Netif.gsoTCPv4 : Netif.gsoTCPv6
                    q.putRawExtra(e)
                }
                offset += length
            }
        }
        return true
    }

    /// Puts `frame` and pushes it.
    @discardableResult
    public func send(_ frame: EthernetFrame, queue: Int = 0) -> Bool {
        guard put(frame, queue: queue) else { return false }
        queues[queue].pushTx()
        return true
    }

    /// Collects the tx responses that arrived, freeing their ids; returns how many slots were
    /// answered.
    @discardableResult
    public func collectTx(queue: Int = 0) -> Int {
        let q = queues[queue]
        var n = 0
        repeat {
            while q.tx.unconsumedResponses() > 0 {
                let r = q.tx.takeResponse()
                n += 1
                if r.status == Netif.statusNull { continue }
                q.txStatuses.append(r.status)
                if Int(r.id) < q.txRefs.count { q.freeTxIDs.append(r.id) }
            }
        } while q.tx.finalCheckForResponses() > 0
        return n
    }

    /// Waits up to `timeoutMilliseconds` until every tx slot put so far is answered.
    public func waitForTx(queue: Int = 0, timeoutMilliseconds: Int32 = 5000) -> Bool {
        let q = queues[queue]
        let deadline = monotonicSeconds() + Double(timeoutMilliseconds) / 1000
        while true {
            collectTx(queue: queue)
            if q.tx.responseConsumer == q.tx.requestProducer { return true }
            if monotonicSeconds() > deadline { return false }
            _ = q.txChannel.wait(timeoutMilliseconds: 10)
        }
    }

    /// The frames received on `queue` so far (reposting their buffers), waiting up to
    /// `timeoutMilliseconds` for at least `atLeast` of them.
    public func receive(queue: Int = 0, atLeast: Int = 1, timeoutMilliseconds: Int32 = 5000) throws -> [EthernetFrame] {
        let q = queues[queue]
        var frames: [EthernetFrame] = []
        let deadline = monotonicSeconds() + Double(timeoutMilliseconds) / 1000
        while true {
            var reposted = 0
            repeat {
                while q.rx.unconsumedResponses() > 0 {
                    let index = q.rx.responseConsumer
                    let raw = q.rx.takeResponse()
                    reposted += 1
                    if let frame = try take(raw, index: index, q) { frames.append(frame) }
                }
            } while q.rx.finalCheckForResponses() > 0
            for _ in 0..<reposted { postRxBuffer(q) }
            if reposted > 0, q.rx.pushRequests() { q.rxChannel.notify() }
            if frames.count >= atLeast || monotonicSeconds() > deadline { return frames }
            _ = q.rxChannel.wait(timeoutMilliseconds: 10)
        }
    }

    /// One rx response slot: a frame when it is the last of one. A frame is its first data
    /// slot, the extras its first slot announces, then the slots `more_data` chains.
    private func take(_ raw: UInt64, index: UInt32, _ q: Queue) throws -> EthernetFrame? {
        if var p = q.partial, p.expectExtra {
            let extra = withUnsafeBytes(of: raw) { $0.load(as: netif_extra_info.self) }
            guard extra.type == Netif.extraGSO else { throw Failure("rx extra of type \(extra.type)") }
            p.gso = .init(kind: extra.u.gso.type == Netif.gsoTCPv4 ? .tcpv4 : .tcpv6, size: extra.u.gso.size)
            p.expectExtra = extra.flags & Netif.extraFlagMore != 0
            q.partial = p
            return p.expectExtra || p.moreData ? nil : finish(q)
        }
        let r = withUnsafeBytes(of: raw) { $0.load(as: netif_rx_response.self) }
        guard r.status >= 0, Int(r.offset) + Int(r.status) <= xenPageSize else {
            throw Failure("rx response id \(r.id) offset \(r.offset) status \(r.status)")
        }
        guard r.id == UInt16(index & (q.rx.size - 1)) else { throw Failure("rx response id \(r.id) in slot \(index)") }
        let data = UnsafeRawBufferPointer(start: q.rxPages + Int(r.id) * xenPageSize + Int(r.offset), count: Int(r.status))
        var p = q.partial ?? PartialFrame(flags: r.flags, expectExtra: r.flags & Netif.rxExtraInfo != 0)
        p.bytes.append(contentsOf: data)
        p.moreData = r.flags & Netif.rxMoreData != 0
        q.partial = p
        return p.expectExtra || p.moreData ? nil : finish(q)
    }

    private func finish(_ q: Queue) -> EthernetFrame {
        let p = q.partial!
        q.partial = nil
        var offload = FrameOffload()
        if p.flags & Netif.rxChecksumBlank != 0, let l = p.bytes.withUnsafeBytes({ FrameHeaders($0) })?.checksumLocation {
            offload.checksum = .partial(start: l.start, offset: l.offset)
        } else if p.flags & Netif.rxDataValidated != 0 {
            offload.checksum = .validated
        }
        offload.segmentation = p.gso
        return EthernetFrame(p.bytes, offload: offload, queue: queue(of: q))
    }

    private func queue(of q: Queue) -> Int { queues.firstIndex { $0 === q } ?? 0 }

    /// Closes as netfront does on removal.
    public func close(timeoutSeconds: Double = 10) throws {
        try connection.close(timeoutSeconds: timeoutSeconds)
    }
}
