import CXen
import Core
import Glibc
import Synchronization

/// What a queue reports when its frontend broke the protocol beyond a dropped frame: the vif
/// is disconnected (netback's xenvif_fatal_tx_err), the daemon and other vifs go on.
typealias NetifFatalHandler = @Sendable (String) -> Void

/// What a queue was told about its frontend at connect.
struct NetifQueueFeatures {
    /// feature-sg: frames to the guest may take several slots.
    var scatterGather = false
    /// feature-gso-tcpv4 / -tcpv6: large TCP segments go to the guest with a GSO extra.
    var gsoTCPv4 = false
    var gsoTCPv6 = false
    /// The most bytes of frames waiting for the guest's buffers (XSA-392): more are dropped.
    var backlogBytes = 1 << 20

    /// What the guest side takes: netfront always finishes partial checksums; large frames
    /// and TSO only with scatter-gather.
    var offloads: NetOffloads {
        var offloads: NetOffloads = [.checksum]
        if scatterGather {
            offloads.insert(.largeFrames)
            if gsoTCPv4 { offloads.insert(.tso4) }
            if gsoTCPv6 { offloads.insert(.tso6) }
        }
        return offloads
    }
}

/// Counters of one queue, read from any thread (`softdev list`, tests, the bench).
final class NetifQueueCounters: Sendable {
    let txFrames = Atomic<UInt64>(0), txBytes = Atomic<UInt64>(0), txDropped = Atomic<UInt64>(0)
    let rxFrames = Atomic<UInt64>(0), rxBytes = Atomic<UInt64>(0), rxDropped = Atomic<UInt64>(0)
}

/// One netif queue (a tx ring and an rx ring with one or two event channels) served on a
/// ``RingServiceLoop`` thread. Tx: each request is copied once out of the ring and validated
/// as netback does; the frames of a whole ring sweep are brought out of the guest with one
/// batched grant copy; one response per consumed slot; then the frames go down the device
/// stack. Rx: frames from the stack (any thread) wait in a backlog bounded in bytes and are
/// copied into the buffers the guest posted, one batched grant copy per sweep.
final class NetifQueue: RingService, @unchecked Sendable {
    /// Frames waiting for the guest's buffers: `count` copies of `frame` (one, but for a
    /// generator's run, ``NetFrameReceiver/toGuest(_:repeating:)``).
    struct RxRun {
        var frame: EthernetFrame
        var count: Int
    }
    typealias Completion = RxRun

    let index: Int
    @exclusivity(unchecked) private var tx: BackRing<NetifTxRing>
    @exclusivity(unchecked) private var rx: BackRing<NetifRxRing>
    private let txMapping: GrantMapping, rxMapping: GrantMapping
    private let txRef: GrantRef, rxRef: GrantRef
    /// The tx channel, and the rx channel (the same object unless the channels are split).
    private let txChannel: any EventChannel, rxChannel: any EventChannel
    private let device: any NetDevice
    private let grants: any GrantTable
    private let domain: DomainID
    private let features: NetifQueueFeatures
    /// The most bytes of frames waiting for the guest's buffers.
    var backlogLimit: Int { features.backlogBytes }
    private let onFatal: NetifFatalHandler
    private let loop: RingServiceLoop<NetifQueue>
    let counters = NetifQueueCounters()
    /// What the guest takes (the same for every queue of a vif).
    let guestOffloads: NetOffloads
    var eventStatistics: RingEventStatistics { loop.eventStatistics }
    /// Multicast addresses the guest added (netback's list; at most 64).
    @exclusivity(unchecked) private(set) var multicast: Set<MACAddress> = []
    @exclusivity(unchecked) private var broken = false

    // Tx sweep state, kept between sweeps so that nothing is allocated once it has grown.
    private struct TxPacket {
        /// Its frame's index in `txFrames`; -1 for none (a dummy request, a dropped frame).
        var frame: Int
        /// How many slots it took (extras included).
        var slots: Int
        var status: Int16
        var segments: Range<Int>
        var csumBlank: Bool
        /// data_validated without csum_blank: the guest vouches for the checksum (netback:
        /// CHECKSUM_UNNECESSARY).
        var dataValidated: Bool
        var gso: FrameOffload.Segmentation?
    }
    /// The sweep's packets (`txPacketCount`) and its slots (`txSlotCount`), in memory of the
    /// queue's own with room for a ring of each: an append to an array checks its uniqueness
    /// and capacity, at every slot.
    private let txPackets: UnsafeMutablePointer<TxPacket>
    @exclusivity(unchecked) private var txPacketCount = 0
    /// The sweep's frames (`txFrameCount` of them), apart from the packets so that moving a
    /// packet touches no reference count, in memory of our own: each is moved in when its
    /// packet is taken and moved out once, to the device or dropped, so that a frame costs one
    /// reference count up (the pool's) and one down (its last holder's), none for the array.
    private let txFrames: UnsafeMutablePointer<EthernetFrame>
    @exclusivity(unchecked) private var txFrameCount = 0
    /// Where tx frames up to a standard frame's size come from: two rings' worth, reused once
    /// the stack has let go of them.
    @exclusivity(unchecked) private var txPool = FramePool(frames: 512, frameCapacity: 2048)
    /// Each consumed slot's id (0 for an extra, answered RSP_NULL) and whether it is an extra.
    private let txSlotIDs: UnsafeMutablePointer<(id: UInt16, extra: Bool)>
    @exclusivity(unchecked) private var txSlotCount = 0
    /// The current packet's data slots after the first, as copied out of the ring.
    @exclusivity(unchecked) private var furtherSlots: [netif_tx_request] = []
    @exclusivity(unchecked) private var copies: UnsafeMutablePointer<GrantCopySegment>
    private let copyCapacity: Int

    // Rx state: the backlog (frames handed over by other threads land in `pendingRx` on the
    // loop's thread; `backlogBytes` counts both, so a flood is refused at the door).
    private let backlogBytes = Atomic<Int>(0)
    @exclusivity(unchecked) private var pendingRx: [RxRun] = []
    @exclusivity(unchecked) private var pendingRxHead = 0
    /// The frames of an rx batch: where each one's first response is (written before the copy,
    /// rewritten if the copy fails) and its grant copies.
    private struct RxFrame { var firstResponse: UInt32; var first: netif_rx_response; var segments: Range<Int>; var bytes: Int }
    /// Room for a ring of them (a frame takes a slot at least), written in place: an append to
    /// an array checks its uniqueness and capacity, at every frame.
    private let rxFrames: UnsafeMutablePointer<RxFrame>
    /// The device makes frames when the guest posts buffers (``NetDevice/makesFramesOnDemand``).
    private let onDemand: Bool
    /// The rx request index up to which posted buffers were announced to such a device.
    @exclusivity(unchecked) private var announcedRx: UInt32 = 0
    /// The device's queues this thread reads, while the guest has buffers
    /// (``NetDevice/handOverReading()``: a TAP's descriptors), polled beside the channels.
    private let sources: [(fd: Int32, queue: Int)]
    /// Where each source stands: polled (found empty), ready (it was readable, or its last read
    /// stopped for lack of buffers: read when the guest has some, not polled), or failed
    /// (POLLERR without data: never polled again).
    private enum SourceState { case polled, ready, failed }
    @exclusivity(unchecked) private var sourceStates: [SourceState]
    /// How many are ready: asked at every turn and in the poll window, so counted, not searched.
    @exclusivity(unchecked) private var readySources: Int
    /// The buffers the first waiting frame takes (1 when none waits): fewer posted is no work,
    /// so a 64 KiB frame waiting for its 18 does not spin the thread while the guest posts 4.
    @exclusivity(unchecked) private var rxBuffersAwaited = 1

    /// Takes over the mappings and channels even when it throws: they are released then.
    init(index: Int, tx txMapping: GrantMapping, txRef: GrantRef, rx rxMapping: GrantMapping, rxRef: GrantRef,
         txChannel: any EventChannel, rxChannel: (any EventChannel)?, device: any NetDevice, grants: any GrantTable,
         domain: DomainID, features: NetifQueueFeatures, sources: [(fd: Int32, queue: Int)] = [], poller: AdaptivePoller,
         onFatal: @escaping NetifFatalHandler) throws {
        self.index = index
        self.txMapping = txMapping; self.rxMapping = rxMapping; self.txRef = txRef; self.rxRef = rxRef
        tx = BackRing(shared: txMapping.base!, bytes: xenPageSize)
        rx = BackRing(shared: rxMapping.base!, bytes: xenPageSize)
        self.txChannel = txChannel
        self.rxChannel = rxChannel ?? txChannel
        self.device = device; self.grants = grants; self.domain = domain; self.features = features; self.onFatal = onFatal
        onDemand = device.makesFramesOnDemand
        self.sources = sources
        sourceStates = Array(repeating: .ready, count: sources.count)   // frames may wait already
        readySources = sources.count
        guestOffloads = features.offloads
        // A sweep copies at most a ring of tx slots, and a ring of rx slots.
        copyCapacity = Int(tx.size) + Int(rx.size)
        copies = .allocate(capacity: copyCapacity)
        txFrames = .allocate(capacity: Int(tx.size))   // a frame takes a slot at least
        rxFrames = .allocate(capacity: Int(rx.size))
        txPackets = .allocate(capacity: Int(tx.size))   // a packet takes a slot at least
        txSlotIDs = .allocate(capacity: Int(tx.size))
        do {
            loop = try RingServiceLoop(purpose: "netif queue \(index) of domain \(domain)",
                                       channels: rxChannel.map { [txChannel, $0] } ?? [txChannel],
                                       fileDescriptors: sources.map { ($0.fd, Int16(POLLIN)) },
                                       poller: poller, completionCapacity: Int(rx.size))
        } catch {
            copies.deallocate()
            txFrames.deallocate()
            rxFrames.deallocate()
            txPackets.deallocate()
            txSlotIDs.deallocate()
            grants.unmap(txMapping, refs: [txRef]); grants.unmap(rxMapping, refs: [rxRef])
            txChannel.close(); rxChannel?.close()
            throw error
        }
        furtherSlots.reserveCapacity(Netif.fatalSlots)
    }

    deinit {
        copies.deallocate()
        txFrames.deinitialize(count: txFrameCount)
        txFrames.deallocate()
        rxFrames.deallocate()
        txPackets.deallocate()
        txSlotIDs.deallocate()
    }

    private var started = false

    func start() throws(ThreadStartError) {
        started = true
        try loop.start(self)
    }

    @discardableResult
    func stop(timeout seconds: Double = .infinity) -> Bool {
        if !started { started = true; ended() }
        return loop.stop(timeout: seconds)
    }

    func requestStop() { loop.requestStop() }

    /// From any thread: a frame for the guest. Dropped (and counted) when the backlog is full,
    /// so a guest that posts no buffers costs bounded memory. On the queue's own thread (a
    /// device making frames on demand, one answering a frame from the guest) it joins the
    /// backlog at once, with no lock and no wake-up.
    func enqueue(_ frame: EthernetFrame) { enqueue(frame, repeating: 1) }

    /// From any thread: frames for the guest, handed over with one lock and one wake-up.
    func enqueue(_ frames: some Sequence<EthernetFrame>) {
        let admitted = frames.lazy.filter { self.admit($0, copies: 1) == 1 }.map { RxRun(frame: $0, count: 1) }
        if loop.isLoopThread { pendingRx.append(contentsOf: admitted) } else { loop.post(contentsOf: admitted) }
    }

    /// From any thread: `count` copies of `frame`, as many as the backlog has room for (one at
    /// least when it is empty), kept as one entry: no copy is counted or released one by one.
    func enqueue(_ frame: EthernetFrame, repeating count: Int) {
        let admitted = admit(frame, copies: count)
        guard admitted > 0 else { return }
        let run = RxRun(frame: frame, count: admitted)
        if loop.isLoopThread { pendingRx.append(run) } else { loop.post(run) }
    }

    /// From any thread: a batch for the guest, admitted with one atomic operation when the
    /// backlog has room for all of it (else frame by frame, as far as the room goes).
    func enqueue(_ frames: [EthernetFrame]) {
        var bytes = 0
        for i in frames.indices { bytes += frames[i].count }
        let before = backlogBytes.add(bytes, ordering: .relaxed).oldValue
        guard before + bytes <= features.backlogBytes else {
            backlogBytes.subtract(bytes, ordering: .relaxed)
            return enqueue(frames.lazy)
        }
        guard loop.isLoopThread else { return loop.post(contentsOf: frames.lazy.map { RxRun(frame: $0, count: 1) }) }
        pendingRx.reserveCapacity(pendingRx.count + frames.count)
        for i in frames.indices { pendingRx.append(RxRun(frame: frames[i], count: 1)) }
    }

    /// How many of `asked` copies of `frame` the backlog has room for (one at least when it
    /// is empty): those are counted in it, the rest dropped and counted. The one admission
    /// rule, for a frame (one copy) and a run alike.
    private func admit(_ frame: EthernetFrame, copies asked: Int) -> Int {
        guard asked > 0 else { return 0 }
        let bytes = frame.count
        // Copies the backlog could never hold are dropped before any arithmetic on their size
        // (a device may ask for any number); a frame of no bytes never reaches a guest.
        let count = bytes == 0 ? 0 : min(asked, features.backlogBytes / bytes + 1)
        if count < asked { counters.rxDropped.wrappingAdd(UInt64(asked - count), ordering: .relaxed) }
        guard count > 0 else { return 0 }
        let before = backlogBytes.add(bytes * count, ordering: .relaxed).oldValue
        guard before + bytes * count > features.backlogBytes else { return count }
        var admitted = max(0, features.backlogBytes - before) / bytes
        if admitted == 0 && before == 0 { admitted = 1 }
        backlogBytes.subtract(bytes * (count - admitted), ordering: .relaxed)
        counters.rxDropped.add(UInt64(count - admitted), ordering: .relaxed)
        return admitted
    }

    // MARK: The ring thread (RingService)

    var inFlight: Int { 0 }
    var awaitsWork: Bool { !broken }

    func takeWork() {
        guard !broken else { return }
        takeTx()
        if onDemand { announceRxBuffers() }
        if readySources > 0 { readSources() }
    }

    /// Reads frames from the device's queues that may hold some, while the guest has buffers
    /// that no waiting frame takes: they join the backlog for this turn's delivery. A source
    /// found empty is polled again; one that filled the buffers waits for the guest's next.
    private func readSources() {
        guard pendingRxHead == pendingRx.count, var room = rx.unconsumedRequests().map(Int.init), room > 0 else { return }
        for i in sources.indices where sourceStates[i] == .ready {
            let read = device.readFrames(queue: sources[i].queue, buffers: room)
            if read.empty { sourceStates[i] = .polled; readySources -= 1 }
            room -= read.buffers
            if room <= 0 { return }
        }
    }

    func fileDescriptorReady(_ index: Int, events: Int16) {
        guard sourceStates[index] == .polled else { return }
        if events & Int16(POLLIN) == 0 && events & Int16(POLLERR | POLLHUP | POLLNVAL) != 0 {
            sourceStates[index] = .failed   // the interface went away: its device reports that
        } else {
            sourceStates[index] = .ready
            readySources += 1
        }
    }

    func watchesFileDescriptor(_ index: Int) -> Bool { !broken && sourceStates[index] == .polled }

    /// Tells a device that makes frames on demand of the rx buffers posted since it was last
    /// told; the frames it makes join the backlog now, for this turn's delivery.
    private func announceRxBuffers() {
        guard let n = rx.requestsPublished(after: announcedRx) else {
            return fatal("the frontend published an impossible rx request producer index (more than a ring ahead)")
        }
        guard n > 0, !broken else { return }
        announcedRx &+= n
        device.guestPostedBuffers(Int(n), queue: index)
    }

    func finish(_ run: RxRun) {
        if broken { return dropBacklogged(run) }
        pendingRx.append(run)
    }

    /// The frames other threads handed over: taken as a whole when nothing waits before them.
    func finish(batch: inout [RxRun]) {
        if broken {
            for i in 0..<batch.count { dropBacklogged(batch[i]) }
        } else if pendingRx.isEmpty {
            swap(&pendingRx, &batch)
        } else {
            pendingRx.append(contentsOf: batch)
        }
    }

    func publish() {
        if !broken && pendingRxHead < pendingRx.count { deliverRx() }
        if tx.pushResponses() { txChannel.notify() }
    }

    func hasWork() -> Bool {
        guard let t = tx.unconsumedRequests() else { return true }
        if t > 0 { return true }
        guard pendingRxHead < pendingRx.count else {
            if onDemand { return (rx.requestsPublished(after: announcedRx) ?? 1) > 0 }
            return readySources > 0 && (rx.unconsumedRequests() ?? 1) > 0
        }
        guard let buffers = rx.unconsumedRequests() else { return true }   // impossible: deliverRx says so
        return buffers >= rxBuffersAwaited
    }

    /// Tx requests, rx buffers taken for frames (or announced to a device that makes frames
    /// on demand), or both when one channel serves both rings.
    func requestsTaken(channel index: Int) -> UInt32 {
        let rxTaken = rx.requestConsumer &+ (onDemand ? announcedRx : 0)
        guard txChannel !== rxChannel else { return tx.requestConsumer &+ rxTaken }
        return index == 0 ? tx.requestConsumer : rxTaken
    }

    func prepareToSleep() -> Bool {
        guard let t = tx.finalCheckForRequests() else { fatal("the frontend published an impossible tx request producer index"); return true }
        if t > 0 { return true }
        // Frames wait for buffers (in the backlog, or in a source the guest's buffers ran out
        // for): ask to hear of the next one the guest posts. A device that makes frames on
        // demand waits for buffers past those it was told of.
        if pendingRxHead < pendingRx.count || readySources > 0 {
            // Notified once the guest has posted what the first waiting frame takes (req_event
            // that far ahead): a frame waiting for 18 buffers sleeps through the guest's first 4.
            let awaited = pendingRxHead < pendingRx.count ? rxBuffersAwaited : 1
            guard let r = rx.finalCheckForRequests(after: rx.requestConsumer &+ UInt32(awaited - 1)) else {
                fatal("the frontend published an impossible rx request producer index"); return true
            }
            if r > 0 { return true }
        } else if onDemand {
            guard let r = rx.finalCheckForRequests(after: announcedRx) else {
                fatal("the frontend published an impossible rx request producer index"); return true
            }
            if r > 0 { return true }
        }
        return false
    }

    func ended() {
        for i in pendingRxHead..<pendingRx.count { dropBacklogged(pendingRx[i]) }
        pendingRx = []; pendingRxHead = 0
        grants.unmap(txMapping, refs: [txRef])
        grants.unmap(rxMapping, refs: [rxRef])
    }

    private func dropBacklogged(_ run: RxRun) {
        backlogBytes.subtract(run.frame.count * run.count, ordering: .relaxed)
        counters.rxDropped.add(UInt64(run.count), ordering: .relaxed)
    }

    private func fatal(_ why: String) {
        guard !broken else { return }
        broken = true
        onFatal(why)
    }

    // MARK: Tx: frames from the guest

    /// The slots a tx batch takes before its copies run and its slots are answered (a packet
    /// is never split): the guest refills the first part of a full ring while the backend
    /// copies the next, where one batch for the whole ring kept each side waiting for the
    /// other.
    static let txBatchSlots = 64

    /// One sweep: every complete packet the ring holds, in batches of about
    /// ``txBatchSlots`` slots. One sweep a turn, so that frames for the guest are delivered
    /// between sweeps however busy its tx ring is.
    private func takeTx() {
        guard let available = tx.unconsumedRequests() else {
            return fatal("the frontend published an impossible tx request producer index (more than a ring ahead)")
        }
        var remaining = Int(available)
        while remaining > 0 && takeTxBatch(&remaining) {}
    }

    /// One batch: its packets are validated and their data copied out with one batched grant
    /// copy; then each slot is answered (and the responses pushed), and the good frames go
    /// down the stack. False if the frontend broke the protocol (fatal, reported).
    private func takeTxBatch(_ remaining: inout Int) -> Bool {
        var copyCount = 0
        txPool.beginBatch()
        txPacketCount = 0
        txSlotCount = 0
        while remaining > 0 && txSlotCount < Self.txBatchSlots {
            guard takePacket(&remaining, &copyCount) else {   // fatal
                txFrames.deinitialize(count: txFrameCount)
                txFrameCount = 0
                return false
            }
        }
        let anyFailed = copyCount > 0 && copyAndCheck(copyCount)
        // Answer every slot (the copies are done: no grant is held any more), then hand
        // the frames on.
        var slot = 0
        for p in 0..<txPacketCount {
            var packet = txPackets[p]
            if packet.status == Netif.statusOkay, packet.frame >= 0 {
                if anyFailed {
                    for s in packet.segments where copies[s].failed {
                        packet.status = Netif.statusError
                        break
                    }
                }
                if packet.status == Netif.statusOkay && (packet.csumBlank || packet.dataValidated || packet.gso != nil)
                    && !prepareOffload(&txFrames[packet.frame], packet) { packet.status = Netif.statusError }
            }
            if packet.status != Netif.statusOkay && packet.frame >= 0 {
                (txFrames + packet.frame).deinitialize(count: 1)   // dropped
                packet.frame = -1
            }
            for i in 0..<packet.slots {
                let s = txSlotIDs[slot + i]
                let status = s.extra ? Netif.statusNull : packet.status
                tx.putResponse(netif_tx_response(id: s.id, status: status))
            }
            slot += packet.slots
            txPackets[p] = packet
        }
        if tx.pushResponses() { txChannel.notify() }
        var frames: UInt64 = 0, bytes: UInt64 = 0, drops: UInt64 = 0
        for p in 0..<txPacketCount {
            let packet = txPackets[p]
            if packet.frame >= 0 {
                // Moved out: ours goes when the device returns; one that keeps it holds its own.
                let frame = (txFrames + packet.frame).move()
                frames += 1
                bytes += UInt64(frame.count)
                device.fromGuest(frame)
            } else if packet.status != Netif.statusOkay {
                drops += 1
            }
        }
        txFrameCount = 0
        if frames > 0 {
            counters.txFrames.add(frames, ordering: .relaxed)
            counters.txBytes.add(bytes, ordering: .relaxed)
        }
        if drops > 0 { counters.txDropped.add(drops, ordering: .relaxed) }
        return true
    }

    /// Runs the sweep's first `count` grant copies; true if any of them failed.
    private func copyAndCheck(_ count: Int) -> Bool {
        grants.copy(UnsafeMutableBufferPointer(start: copies, count: count))
        for i in 0..<count where copies[i].failed { return true }
        return false
    }

    /// Takes one packet's slots (first, extras, more data) from the ring, copying each request
    /// once; queues its grant copies and appends it to `txPackets`. False: the frontend broke
    /// the protocol (fatal, reported).
    private func takePacket(_ remaining: inout Int, _ copyCount: inout Int) -> Bool {
        guard let packet = takePacketSlots(&remaining, &copyCount) else { return false }
        txPackets[txPacketCount] = packet
        txPacketCount += 1
        return true
    }

    @inline(__always)
    private func takePacketSlots(_ remaining: inout Int, _ copyCount: inout Int) -> TxPacket? {
        let first = tx.takeRequest()
        remaining -= 1
        takeSlot(first.id, extra: false)
        var packet = TxPacket(frame: -1, slots: 1, status: Netif.statusOkay,
                              segments: copyCount..<copyCount, csumBlank: first.flags & Netif.txChecksumBlank != 0,
                              dataValidated: first.flags & Netif.txDataValidated != 0, gso: nil)
        // Extra-info slots follow the first, chained by EXTRA_FLAG_MORE.
        var multicastAdd: MACAddress?, multicastDel: MACAddress?
        if first.flags & Netif.txExtraInfo != 0 {
            var more = true
            while more {
                guard remaining > 0 else { fatal("a tx request announces an extra-info slot the ring does not hold"); return nil }
                let raw = tx.takeRequest()
                remaining -= 1
                packet.slots += 1
                takeSlot(0, extra: true)
                let extra = withUnsafeBytes(of: raw) { $0.load(as: netif_extra_info.self) }
                guard extra.type != 0, extra.type < Netif.extraTypeMax else {
                    fatal("invalid extra-info type \(extra.type)"); return nil
                }
                switch extra.type {
                case Netif.extraGSO:
                    let gso = extra.u.gso
                    guard gso.size != 0 else { fatal("a GSO extra with size 0"); return nil }
                    switch gso.type {
                    case Netif.gsoTCPv4: packet.gso = .init(kind: .tcpv4, size: gso.size)
                    case Netif.gsoTCPv6: packet.gso = .init(kind: .tcpv6, size: gso.size)
                    default: fatal("a GSO extra of type \(gso.type) (only TCPv4 and TCPv6 exist)"); return nil
                    }
                case Netif.extraMulticastAdd: multicastAdd = mac(extra)
                case Netif.extraMulticastDel: multicastDel = mac(extra)
                default: break   // a hash: nothing to do with it here
                }
                more = extra.flags & Netif.extraFlagMore != 0
            }
        }
        // A multicast add or delete is a dummy request: answered, its data never read (netback).
        if multicastAdd != nil || multicastDel != nil {
            if let a = multicastAdd {
                if multicast.count < Netif.maxMulticastAddresses || multicast.contains(a) { multicast.insert(a) }
                else { packet.status = Netif.statusError }
            }
            if let d = multicastDel { multicast.remove(d) }
            return packet
        }
        // The data slots: the first request's size is the frame's; each further slot's size is
        // its own and must fit in what is left (netback's xenvif_count_requests).
        let total = Int(first.size)
        var firstOwn = total
        if !furtherSlots.isEmpty { furtherSlots.removeAll(keepingCapacity: true) }
        var more = first.flags & Netif.txMoreData != 0
        var drop = false
        // Counted as netback's xenvif_count_requests counts: the slots after the first.
        var further = 0
        while more {
            guard remaining > 0 else {
                fatal("a tx frame announces more slots than the ring holds (\(further + 2) or more)"); return nil
            }
            if further >= Netif.fatalSlots {
                fatal("a tx frame of \(further + 2) or more slots (at most \(Netif.fatalSlots + 1))"); return nil
            }
            if further >= Netif.maxSlots { drop = true }
            let r = tx.takeRequest()
            remaining -= 1
            packet.slots += 1
            further += 1
            furtherSlots.append(r)   // the copy taken out of the ring: never read from the ring again
            takeSlot(r.id, extra: false)
            if Int(r.size) > firstOwn { drop = true }   // larger than what is left of the frame
            if Int(r.offset) + Int(r.size) > xenPageSize {
                fatal("a tx slot crosses its page (offset \(r.offset), size \(r.size))"); return nil
            }
            if !drop { firstOwn -= Int(r.size) }
            more = r.flags & Netif.txMoreData != 0
        }
        if Int(first.offset) + firstOwn > xenPageSize && !drop {
            fatal("the first tx slot crosses its page (offset \(first.offset), size \(firstOwn))"); return nil
        }
        if drop || firstOwn < Netif.minimumFirstSlot {
            packet.status = Netif.statusError
            return packet
        }
        // The frame, and its copies: the first slot's own bytes, then each further slot's.
        let (frame, bytes, _) = txPool.allocate(count: total, queue: index)
        packet.frame = txFrameCount
        (txFrames + txFrameCount).initialize(to: frame)
        txFrameCount += 1
        var position = 0
        func copy(_ ref: GrantRef, _ offset: UInt16, _ length: Int) {
            guard length > 0 else { return }   // a zero-length slot carries nothing (XSA-448)
            copies[copyCount] = GrantCopySegment(direction: .fromGuest, domain: domain, ref: ref, offset: offset,
                                                 length: UInt16(length), local: bytes + position)
            copyCount += 1
            position += length
        }
        copy(first.gref, first.offset, firstOwn)
        for i in furtherSlots.indices { copy(furtherSlots[i].gref, furtherSlots[i].offset, Int(furtherSlots[i].size)) }
        packet.segments = packet.segments.lowerBound..<copyCount
        return packet
    }

    /// A slot of the sweep taken: its id, answered once the copies are done.
    @inline(__always) private func takeSlot(_ id: UInt16, extra: Bool) {
        txSlotIDs[txSlotCount] = (id, extra)
        txSlotCount += 1
    }

    private func mac(_ extra: netif_extra_info) -> MACAddress {
        withUnsafeBytes(of: extra.u.mcast.addr) { MACAddress($0, at: 0) }
    }

    /// The frame's offload metadata from the request's flags and GSO extra, checked as
    /// netback's checksum_setup does: a partial checksum must sit in TCP or UDP over IP.
    private func prepareOffload(_ frame: inout EthernetFrame, _ packet: TxPacket) -> Bool {
        frame.offload.segmentation = packet.gso
        guard packet.csumBlank || packet.gso != nil else {
            if packet.dataValidated { frame.offload.checksum = .validated }
            return true
        }
        guard let headers = FrameHeaders(frame), let location = headers.checksumLocation else { return false }
        if let gso = packet.gso {
            guard headers.transportProtocol == FrameHeaders.tcp,
                  headers.network == (gso.kind == .tcpv4 ? .ipv4 : .ipv6) else { return false }
            // A GSO frame is always partial; one not marked so gets its pseudo-header sum.
            if !packet.csumBlank { return FrameChecksum.preparePartial(&frame, headers: headers) }
        }
        frame.offload.checksum = .partial(start: location.start, offset: location.offset)
        return true
    }

    // MARK: Rx: frames to the guest

    /// The slots an rx batch fills before its copies run and its responses are pushed (a frame
    /// is never split): the guest takes the first frames and posts their buffers again while
    /// the backend fills the next, as on tx (``txBatchSlots``).
    static let rxBatchSlots = 64

    /// Copies as many waiting frames as the posted buffers hold, in batches of about
    /// ``rxBatchSlots`` slots, one batched grant copy each; a frame the guest cannot take (too
    /// large without scatter-gather, GSO it did not ask for) is dropped.
    private func deliverRx() {
        guard var available = rx.unconsumedRequests().map(Int.init) else {
            return fatal("the frontend published an impossible rx request producer index (more than a ring ahead)")
        }
        // Bytes leaving the backlog: frames delivered (their copies are done below, before
        // they are released) and frames dropped.
        var leaving = 0, dropped = 0, deliveredBytes = 0, failed = 0
        // The frames are read in place (a copy of each would cost its reference count twice),
        // and each slot's response is written as its request is taken: the copies' outcome
        // only changes a failed frame's first response. What a frame needs (room, flags, its
        // bytes) is worked out once for a run of copies of it.
        pendingRx.withUnsafeMutableBufferPointer { runs in
            var starved = false
            rxBuffersAwaited = 1
            while !starved && pendingRxHead < runs.count {
                var copyCount = 0, frameCount = 0, slots = 0
                while pendingRxHead < runs.count && slots < Self.rxBatchSlots {
                    let r = pendingRxHead
                    guard fitsGuest(&runs[r].frame) else {
                        pendingRxHead += 1
                        leaving += runs[r].frame.count * runs[r].count
                        dropped += runs[r].count
                        continue
                    }
                    let count = runs[r].frame.count
                    // Valid while the frame waits in the backlog, which it does until the copy is done.
                    let bytes = runs[r].frame.withUnsafeBytes { UnsafeMutableRawPointer(mutating: $0.baseAddress!) }
                    let (dataSlots, firstSlot) = RxSlotLayout.slots(count: count, at: bytes)
                    let segmentation = runs[r].frame.offload.segmentation
                    let needed = dataSlots + (segmentation != nil ? 1 : 0)
                    // As many copies as the buffers hold and the batch takes (a batch may end
                    // a frame past its size: a frame is never split).
                    let n = needed == 1 ? min(runs[r].count, available, Self.rxBatchSlots - slots)
                        : min(runs[r].count, available / needed, (Self.rxBatchSlots - slots + needed - 1) / needed)
                    if n == 0 {   // wait for buffers (the backlog is bounded)
                        starved = true
                        rxBuffersAwaited = needed
                        break
                    }
                    available -= n * needed
                    slots += n * needed
                    if n == runs[r].count { pendingRxHead += 1 } else { runs[r].count -= n }
                    leaving += n * count
                    deliveredBytes += n * count
                    var firstFlags: UInt16 = 0
                    switch runs[r].frame.offload.checksum {
                    case .partial: firstFlags = Netif.rxChecksumBlank | Netif.rxDataValidated
                    case .validated: firstFlags = Netif.rxDataValidated
                    case .none: break
                    }
                    if segmentation != nil { firstFlags |= Netif.rxExtraInfo }
                    if needed == 1 {
                        // One slot a frame (up to a page, no GSO): the request's buffer takes it all.
                        for _ in 0..<n {
                            let request = rx.takeRequest()
                            copies[copyCount] = GrantCopySegment(direction: .toGuest, domain: domain, ref: request.gref, offset: 0,
                                                                 length: UInt16(count), local: bytes)
                            let response = netif_rx_response(id: request.id, offset: 0, flags: firstFlags, status: Int16(count))
                            rxFrames[frameCount] = RxFrame(firstResponse: rx.responseProducer, first: response,
                                                           segments: copyCount..<copyCount + 1, bytes: count)
                            rx.putResponse(Self.raw(response))
                            copyCount += 1
                            frameCount += 1
                        }
                        continue
                    }
                    for _ in 0..<n {
                        var frame = RxFrame(firstResponse: rx.responseProducer, first: netif_rx_response(), segments: copyCount..<copyCount, bytes: count)
                        var offset = 0
                        for s in 0..<dataSlots {
                            let request = rx.takeRequest()
                            let length = min(s == 0 ? firstSlot : xenPageSize, count - offset)
                            var flags: UInt16 = s + 1 < dataSlots ? Netif.rxMoreData : 0
                            if s == 0 { flags |= firstFlags }
                            if length > 0 {
                                copies[copyCount] = GrantCopySegment(direction: .toGuest, domain: domain, ref: request.gref, offset: 0,
                                                                     length: UInt16(length), local: bytes + offset)
                                copyCount += 1
                            }
                            let response = netif_rx_response(id: request.id, offset: 0, flags: flags, status: Int16(length))
                            rx.putResponse(Self.raw(response))
                            if s == 0 { frame.first = response }
                            offset += length
                            // The GSO extra takes the slot after the first data slot (its response is
                            // the extra itself; netfront recycles the buffer by position).
                            if s == 0, let gso = segmentation {
                                _ = rx.takeRequest()
                                var extra = netif_extra_info()
                                extra.type = Netif.extraGSO
                                extra.u.gso.size = gso.size
                                extra.u.gso.type = gso.kind == .tcpv4 ? Netif.gsoTCPv4 : Netif.gsoTCPv6
                                rx.putResponse(Self.raw(extra))
                            }
                        }
                        frame.segments = frame.segments.lowerBound..<copyCount
                        rxFrames[frameCount] = frame
                        frameCount += 1
                    }
                }
                if frameCount == 0 { continue }   // only drops (or starved: the loop ends)
                if copyCount > 0 && copyAndCheck(copyCount) {
                    for f in UnsafeBufferPointer(start: rxFrames, count: frameCount) where f.segments.contains(where: { copies[$0].failed }) {
                        // A failed copy: the frame's first slot says so, netfront drops the frame.
                        var response = f.first
                        response.status = Netif.statusError
                        rx.rewriteResponse(at: f.firstResponse, Self.raw(response))
                        failed += 1
                        deliveredBytes -= f.bytes
                    }
                }
                // Counted before the guest can see them: whoever saw the guest get a frame
                // (after the push's release) sees it counted.
                counters.rxFrames.add(UInt64(frameCount - failed), ordering: .relaxed)
                counters.rxBytes.add(UInt64(deliveredBytes), ordering: .relaxed)
                if failed > 0 { counters.rxDropped.add(UInt64(failed), ordering: .relaxed) }
                deliveredBytes = 0; failed = 0
                if rx.pushResponses() { rxChannel.notify() }
            }
        }
        if dropped > 0 { counters.rxDropped.add(UInt64(dropped), ordering: .relaxed) }
        // The delivered frames' bytes are copied: release them and their room in the backlog.
        if leaving > 0 { backlogBytes.subtract(leaving, ordering: .relaxed) }
        if pendingRxHead == pendingRx.count {
            pendingRx.removeAll(keepingCapacity: true)
        } else if pendingRxHead > 0 {
            pendingRx.removeFirst(pendingRxHead)
        }
        pendingRxHead = 0
    }

    /// A response or an extra as the rx ring's 8-byte slot.
    private static func raw<T>(_ value: T) -> UInt64 {
        var raw: UInt64 = 0
        withUnsafeMutableBytes(of: &raw) { $0.storeBytes(of: value, as: T.self) }
        return raw
    }

    /// Whether the guest can take `frame` as it negotiated (finishing a checksum it could not
    /// find); false: drop it.
    private func fitsGuest(_ frame: inout EthernetFrame) -> Bool {
        if frame.count == 0 || frame.count > Netif.maxFrameSize { return false }
        if frame.count > xenPageSize && !features.scatterGather { return false }
        // (The backend cuts such a segment before it queues it.)
        if guestOffloads.mustSegment(frame) { return false }
        if (frame.count + xenPageSize - 1) / xenPageSize > Netif.maxSlots { return false }
        // netfront finds a partial checksum itself, for TCP and UDP over IP only.
        if case .partial = frame.offload.checksum, FrameHeaders(frame)?.checksumLocation == nil {
            return FrameChecksum.complete(&frame)
        }
        return true
    }
}
