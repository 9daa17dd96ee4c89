import CXen
import Core
import Glibc
import Synchronization

/// What a queue tells its device when the frontend broke the protocol beyond a per-request
/// error (an impossible producer index): the device is disconnected, the daemon goes on.
public typealias BlkifFatalHandler = (String) -> Void

/// One blkif ring (one queue of a multi-queue device), served on the thread of a
/// ``RingServiceLoop``: it drains the ring, checks each request's private copy, maps its pages,
/// hands a ``BlockRequest`` to the device, and pushes responses as the device completes them,
/// notifying once per batch. SOFTDEV_DEBUG_BLKIF=1 prints why each request failed.
let debugLogging = getenv("SOFTDEV_DEBUG_BLKIF") != nil

final class BlkifQueue: BlockCompletionSink, RingService, @unchecked Sendable {
    let index: Int
    // The ring thread alone touches the mutable state below (ring, free slots, counts): the
    // dynamic exclusivity checks Swift would make on every access are turned off for them, as
    // they cost more than the rest of a request's handling.
    @exclusivity(unchecked) private var ring: BackRing<BlkifRing>
    private let ringMapping: GrantMapping
    private let ringRefs: [GrantRef]
    private let channel: any EventChannel
    private let device: any BlockDevice
    private let grants: any GrantTable
    private let domain: DomainID
    private let sectors: UInt64
    private let blockSize: UInt64
    /// blockSize - 1 when it is a power of two (it always is for real disks): alignment by mask,
    /// not by a division on every request.
    private let blockMask: UInt64?
    /// Read once (a global or static is a lazy-initialisation check on every use).
    private let debug = debugLogging
    private let writable: Bool
    /// feature-max-indirect-segments as advertised: an indirect request with more is an error,
    /// and 0 refuses indirect requests.
    private let maxIndirectSegments: Int
    /// Where blkif_response's fields sit (io/blkif.h): each response is stored field by field
    /// into a zeroed slot, never as a Swift value with its padding.
    private let responseIDOffset = MemoryLayout<blkif_response>.offset(of: \blkif_response.id)!
    private let responseOperationOffset = MemoryLayout<blkif_response>.offset(of: \blkif_response.operation)!
    private let responseStatusOffset = MemoryLayout<blkif_response>.offset(of: \blkif_response.status)!
    private let onFatal: BlkifFatalHandler
    let persistent: PersistentGrantCache?
    /// The persistent cache's table, for lookups that hit (most): no object is touched, so no
    /// reference counting per segment.
    private let persistentPages: UnsafeMutablePointer<UnsafeMutableRawPointer?>?

    /// One in-flight request: everything preallocated, reused, indexed by the completion tag.
    private struct Slot {
        var id: UInt64 = 0
        var operation: UInt8 = 0
        var segmentCount = 0
        var refs: UnsafeMutablePointer<GrantRef>
        var pages: UnsafeMutablePointer<UnsafeMutableRawPointer>
        var vectors: UnsafeMutablePointer<iovec>
        /// References mapped for this request only (not persistent), and their mapping.
        var mappedRefs: UnsafeMutablePointer<GrantRef>
        /// Where each of `mappedRefs` sits in the request, and where it was mapped.
        var batchIndex: UnsafeMutablePointer<Int>
        var batchPages: UnsafeMutablePointer<UnsafeMutableRawPointer>
        var mappedCount = 0
        var mapping: GrantMapping?
        /// For flush-with-data (a FUA write from Linux blkfront): write after the flush completes.
        var pendingWrite: BlockRequest?
    }
    private let slots: UnsafeMutablePointer<Slot>
    /// Free slot tags, a stack in raw memory (an Array would check uniqueness on every use).
    private let freeSlotStack: UnsafeMutablePointer<Int>
    @exclusivity(unchecked) private var freeSlotCount: Int
    /// Requests handed to the device and not yet answered (the loop waits for them at stop).
    @exclusivity(unchecked) private(set) var inFlight = 0
    /// A WRITE_BARRIER waits here until everything before it has completed.
    @exclusivity(unchecked) private var heldBarrier: BlkifRequestBytes?

    /// The thread, its waiting and polling, and the completions of other threads.
    private let loop: RingServiceLoop<BlkifQueue>

    /// The ring's private state where it outlives the daemon (nil: not kept): every request is
    /// recorded before anything can answer it, in the record slot of the tag it gets (the top
    /// of the free stack), or answered at once from that slot.
    private let record: RingRecoveryRecord?
    /// Its stores, for the hot path (a value: no reference counted per request).
    private let recordStores: RingRecoveryRecord.Stores?
    /// The record slot of the request being dispatched, for a response written before or
    /// without a tag.
    @exclusivity(unchecked) private var recordSlot = 0
    /// The tag a held barrier keeps its record in (taken from the free stack, so that no other
    /// request records over it).
    @exclusivity(unchecked) private var heldBarrierTag: Int?
    /// Requests a killed daemon consumed and never answered, served again first (resume).
    @exclusivity(unchecked) private var recovered: [(slot: Int, bytes: [UInt8])]
    /// The device's completions, collected on this ring's thread when it has a queue of its own
    /// (libaio): no other thread wakes and hands them over.
    private let completionSource: BlockCompletionSource?
    @exclusivity(unchecked) private var broken = false
    private let indirectBuffer: UnsafeMutablePointer<blkif_request_segment>
    /// The private copy of the request being dispatched when the ring keeps no record (with
    /// one, the copy lies in the record's slot), and of a recovered or held request.
    private let requestCopy = UnsafeMutableRawPointer.allocate(byteCount: MemoryLayout<BlkifRequestBytes>.size, alignment: 16)

    /// Counters, for `softdev` status and tests.
    /// Only the ring thread writes them, so it keeps its own counts and publishes them with a
    /// plain atomic store when it publishes responses (a read-modify-write per request costs a
    /// locked instruction).
    let requestsServed = Atomic<UInt64>(0)
    let requestsFailed = Atomic<UInt64>(0)
    @exclusivity(unchecked) private var served: UInt64 = 0
    @exclusivity(unchecked) private var failed: UInt64 = 0

    /// Takes over `ringMapping` and `channel` even when it throws: they are released then.
    init(index: Int, ringMapping: GrantMapping, ringRefs: [GrantRef], channel: any EventChannel, device: any BlockDevice,
         grants: any GrantTable, domain: DomainID, persistentGrants: Int, maxIndirectSegments: Int, poller: AdaptivePoller,
         workers: BlockWorkers, record: RingRecoveryRecord? = nil, resume: RingRecoveryRecord.Recovered? = nil,
         onFatal: @escaping BlkifFatalHandler) throws {
        self.index = index
        self.workers = workers
        self.ring = BackRing(shared: ringMapping.base!, bytes: ringMapping.pageCount * xenPageSize)
        self.record = record
        self.recordStores = record?.stores
        self.recovered = resume?.pending.map { ($0.slot, $0.bytes) } ?? []
        self.ringMapping = ringMapping; self.ringRefs = ringRefs
        self.channel = channel; self.device = device; self.grants = grants; self.domain = domain
        self.sectors = device.geometry.sectors
        self.blockSize = UInt64(device.geometry.logicalBlockSize)
        self.blockMask = blockSize.nonzeroBitCount == 1 ? blockSize - 1 : nil
        self.writable = device.capabilities.contains(.write)
        self.maxIndirectSegments = min(max(0, maxIndirectSegments), Blkif.maxIndirectSegments)
        self.onFatal = onFatal
        let n = Int(ring.size)
        do {
            if let resume {
                // The killed daemon's indices, if the shared ring agrees; else nothing is written.
                try ring.resume(requestConsumer: resume.requestConsumer, responseProducer: resume.responseProducer)
            }
            self.persistent = persistentGrants > 0 ? try PersistentGrantCache(grants: grants, domain: domain, capacity: persistentGrants) : nil
            completionSource = device.attachCompletionSource()
            do {
                loop = try RingServiceLoop(purpose: "blkif queue \(index) of domain \(domain)", channels: [channel],
                                           fileDescriptors: completionSource.map { [($0.fileDescriptor, Int16(POLLIN))] } ?? [],
                                           poller: poller, completionCapacity: n)
            } catch {
                completionSource?.detach()
                throw error
            }
        } catch {
            grants.unmap(ringMapping, refs: ringRefs)
            channel.close()
            throw error
        }
        self.persistentPages = persistent?.pages
        slots = .allocate(capacity: n)
        let maxSegs = Blkif.maxIndirectSegments
        for i in 0..<n {
            (slots + i).initialize(to: Slot(refs: .allocate(capacity: maxSegs), pages: .allocate(capacity: maxSegs),
                                            vectors: .allocate(capacity: maxSegs), mappedRefs: .allocate(capacity: maxSegs),
                                            batchIndex: .allocate(capacity: maxSegs), batchPages: .allocate(capacity: maxSegs)))
        }
        freeSlotStack = .allocate(capacity: n)
        for i in 0..<n { freeSlotStack[i] = n - 1 - i }
        freeSlotCount = n
        indirectBuffer = .allocate(capacity: Blkif.segmentsPerIndirectPage * Blkif.maxIndirectPages)
    }

    deinit {
        for i in 0..<Int(ring.size) {
            let s = slots[i]
            s.refs.deallocate(); s.pages.deallocate(); s.vectors.deallocate(); s.mappedRefs.deallocate()
            s.batchIndex.deallocate(); s.batchPages.deallocate()
        }
        slots.deinitialize(count: Int(ring.size))
        slots.deallocate()
        freeSlotStack.deallocate()
        indirectBuffer.deallocate()
        requestCopy.deallocate()
    }

    /// Whether `start` was called (by the connecting thread, which also stops): a queue that
    /// never started releases its ring itself, as the loop knows it only from `start`.
    private var started = false

    /// Starts the ring thread; on failure `stop` still releases the ring.
    func start() throws(ThreadStartError) {
        started = true
        try loop.start(self)
    }

    /// Stops taking requests and waits up to `seconds` for those in flight. True if the ring
    /// thread ended, having unmapped everything and closed the channel; false if the device
    /// still holds requests: their pages stay mapped, and the thread releases everything when
    /// the last of them completes.
    @discardableResult
    func stop(timeout seconds: Double = .infinity) -> Bool {
        if !started {
            started = true   // once
            ended()
        }
        return loop.stop(timeout: seconds)
    }

    /// Stops taking requests without waiting (several queues stop together, then are waited for).
    func requestStop() { loop.requestStop() }

    /// The ring thread submits for the vbd's pool: what its devices may block on runs there.
    func threadStarted() { workers.adopt() }
    private let workers: BlockWorkers

    /// The ring's event channel: events taken, spurious ones (XSA-332), unmasks put off.
    var eventStatistics: RingEventStatistics { loop.eventStatistics }

    // MARK: The ring thread (RingService)

    /// One sweep, plugged: a device with its own queue starts what the sweep gave it at once
    /// (one io_submit), when the sweep ends.
    func takeWork() {
        BlockPlug.begin()
        defer { BlockPlug.end() }
        if !recovered.isEmpty { serveRecovered() }
        if !broken { takeRequests() }
    }

    /// The requests a killed daemon consumed and never answered, in the order it took them,
    /// each in the record slot it has (made the top of the free stack, so that it is its tag).
    private func serveRecovered() {
        let pending = recovered
        recovered = []
        for (slot, bytes) in pending {
            for i in 0..<freeSlotCount where freeSlotStack[i] == slot {
                freeSlotStack[i] = freeSlotStack[freeSlotCount - 1]
                freeSlotStack[freeSlotCount - 1] = slot
                break
            }
            recordSlot = slot
            let copy = UnsafeMutableRawBufferPointer(start: requestCopy, count: MemoryLayout<BlkifRequestBytes>.size)
            copy.initializeMemory(as: UInt8.self, repeating: 0)
            copy.copyBytes(from: bytes.prefix(copy.count))
            dispatch(BlkifRequestView(requestCopy))
        }
    }

    func finish(_ completion: (UInt64, BlockResult)) { finish(Int(completion.0), completion.1) }

    func publish() { publishResponses() }

    /// The device's completion descriptor (the one extra descriptor) is readable.
    func fileDescriptorReady(_ index: Int, events: Int16) { completionSource?.collect() }
    var pollsCompletions: Bool { completionSource != nil }
    func completionsReady() -> Bool { completionSource?.ready() ?? false }
    func collectCompletions() { completionSource?.collect() }

    /// A held barrier waits for completions, a broken ring for the stop: neither watches the ring.
    var awaitsWork: Bool { !broken && heldBarrier == nil }

    /// An impossible producer index counts as work: takeRequests breaks the ring.
    func hasWork() -> Bool { ring.unconsumedRequests().map { $0 != 0 } ?? true }
    func requestsTaken(channel index: Int) -> UInt32 { ring.requestConsumer }

    func prepareToSleep() -> Bool {
        switch ring.finalCheckForRequests() {
        case .some(let n) where n > 0: return true
        case .none: breakRing("the frontend published an impossible request producer index"); return true
        default: return false
        }
    }

    /// Nothing is in flight: no device can write into a mapped page any more. The ring was
    /// stopped on purpose (the frontend closed, a detach, the daemon stopping): nothing is left
    /// to resume, so the record goes.
    func ended() {
        completionSource?.detach()
        record?.remove()
        persistent?.unmapAll()
        ringRefs.withUnsafeBufferPointer { grants.unmap(ringMapping, refs: $0) }
    }

    private func breakRing(_ why: String) {
        guard !broken else { return }
        broken = true
        onFatal(why)
    }

    /// Responses are published at least this often within one sweep (a power of two).
    static let publishEvery: UInt32 = 32

    private func publishResponses() {
        // The counts, as the responses they count become visible.
        requestsServed.store(served, ordering: .relaxed)
        requestsFailed.store(failed, ordering: .relaxed)
        if ring.pushResponses() { channel.notify() }
    }

    private func takeRequests() {
        while heldBarrier == nil {
            guard let n = ring.unconsumedRequests() else {
                breakRing("the frontend published an impossible request producer index")
                return
            }
            if n == 0 { return }
            for taken in 1...n {
                let index = ring.requestConsumer
                // The one copy out of shared memory, which is all that is read from then on:
                // into the record (before anything can answer the request: a response may
                // overwrite its entry), else into the thread's own buffer.
                let copy: UnsafeMutableRawPointer
                if let recordStores {
                    recordSlot = freeSlotStack[freeSlotCount - 1]
                    copy = recordStores.request(slot: recordSlot)
                    ring.takeRequest(into: copy)
                    recordStores.noteTaken(slot: recordSlot, index: index)
                } else {
                    copy = requestCopy
                    ring.takeRequest(into: copy)
                }
                dispatch(BlkifRequestView(copy))
                if heldBarrier != nil { return }
                // A deep ring's sweep is long: show the frontend what completed every few
                // requests (Linux blkback pushes each response), so that a frontend watching its
                // ring for responses keeps finding some and keeps the ring full.
                if taken & (Self.publishEvery - 1) == 0 { publishResponses() }
            }
            // Respond to what completed inline before taking more, so the frontend sees progress.
            publishResponses()
        }
    }

    /// Writes a response; `tag` names the request's record slot (nil: the request being
    /// dispatched, answered at once).
    private func respond(id: UInt64, operation: UInt8, status: Int16, tag: Int? = nil) {
        // Field by field into a zeroed slot: blkif_response has 5 bytes of padding, which a
        // Swift value would fill with whatever was on this stack (XSA-216).
        let idOffset = responseIDOffset, operationOffset = responseOperationOffset, statusOffset = responseStatusOffset
        let responseIndex = ring.responseProducer
        ring.putResponse(zeroed: { slot in
            slot.storeBytes(of: id, toByteOffset: idOffset, as: UInt64.self)
            slot.storeBytes(of: operation, toByteOffset: operationOffset, as: UInt8.self)
            slot.storeBytes(of: status, toByteOffset: statusOffset, as: Int16.self)
        })
        if let recordStores {
            let slot = tag ?? recordSlot
            recordStores.answered(slot: slot, response: responseIndex)
            recordStores.released(slot: slot)
        }
        if status == Blkif.statusOkay { served &+= 1 } else { failed &+= 1 }
    }

    private func dispatch(_ request: BlkifRequestView) {
        let operation = request.operation
        switch operation {
        case Blkif.opRead, Blkif.opWrite:
            dispatchReadWrite(request, operation: operation, sector: request.sectorNumber,
                              segmentCount: request.segmentCount, indirect: false)
        case Blkif.opFlushDiskCache:
            if request.segmentCount == 0 {
                submitNoData(request, .flush, offset: 0, length: 0)
            } else {
                // Linux blkfront sends FUA and flush-with-data writes as FLUSH_DISKCACHE with
                // segments: flush first (REQ_PREFLUSH), then the write, made durable.
                dispatchReadWrite(request, operation: Blkif.opWrite, sector: request.sectorNumber,
                                  segmentCount: request.segmentCount, indirect: false, preflush: true)
            }
        case Blkif.opWriteBarrier:
            if inFlight > 0 {
                heldBarrier = request.bytes
                if recordStores != nil { heldBarrierTag = takeSlot() }   // == recordSlot: its record stays
                return
            }
            runBarrier(request)
        case Blkif.opDiscard:
            // BLKIF_DISCARD_SECURE is "ignored if discard-secure=0" (blkif.h), which we advertise.
            guard device.capabilities.contains(.discard) else {
                respond(id: request.id, operation: operation, status: Blkif.statusNotSupported); return
            }
            guard writable else { respond(id: request.id, operation: operation, status: Blkif.statusError); return }
            let sector = request.sectorNumber, count = request.discardSectors
            // Nothing to discard: done, wherever it points, as Linux blkback answers it
            // (xen_vbd_translate checks the range only for a non-empty request).
            if count == 0 { respond(id: request.id, operation: operation, status: Blkif.statusOkay); return }
            guard let end = checkedEnd(sector, count), end <= sectors, aligned(sector, count) else {
                respond(id: request.id, operation: operation, status: Blkif.statusError); return
            }
            submitNoData(request, .discard, offset: sector * 512, length: count * 512)
        case Blkif.opIndirect:
            let inner = request.indirectOperation
            guard inner == Blkif.opRead || inner == Blkif.opWrite else {
                respond(id: request.id, operation: operation, status: Blkif.statusError); return
            }
            dispatchReadWrite(request, operation: inner, sector: request.sectorNumber,
                              segmentCount: request.indirectSegmentCount, indirect: true)
        default:
            respond(id: request.id, operation: operation, status: Blkif.statusNotSupported)
        }
    }

    /// A free slot. There is always one: the ring bounds the requests taken and not yet
    /// answered by its size, which is the number of slots.
    @inline(__always) private func takeSlot() -> Int {
        precondition(freeSlotCount > 0, "blkif: more requests in flight than ring slots")
        freeSlotCount -= 1
        return freeSlotStack[freeSlotCount]
    }

    @inline(__always) private func returnSlot(_ tag: Int) {
        freeSlotStack[freeSlotCount] = tag
        freeSlotCount += 1
    }

    /// `sector + count` in 512-byte sectors, or nil on overflow.
    private func checkedEnd(_ sector: UInt64, _ count: UInt64) -> UInt64? {
        let (end, overflow) = sector.addingReportingOverflow(count)
        return overflow || end > UInt64.max / 512 ? nil : end
    }

    private func aligned(_ sector: UInt64, _ count: UInt64) -> Bool {
        if let blockMask { return (sector * 512) & blockMask == 0 && (count * 512) & blockMask == 0 }
        return (sector * 512) % blockSize == 0 && (count * 512) % blockSize == 0
    }

    private func submitNoData(_ request: BlkifRequestView, _ op: BlockOperation, offset: UInt64, length: UInt64) {
        let tag = takeSlot()
        slots[tag].id = request.id
        slots[tag].operation = request.operation
        slots[tag].segmentCount = 0
        inFlight += 1
        device.submit(BlockRequest(operation: op, offset: offset, length: length), completion: BlockCompletion(sink: self, tag: UInt64(tag)))
    }

    /// Copies the segment list of an indirect request out of its granted pages, once.
    private func loadIndirectSegments(_ request: BlkifRequestView, count: Int) -> Bool {
        let pages = (count + Blkif.segmentsPerIndirectPage - 1) / Blkif.segmentsPerIndirectPage
        for p in 0..<pages {
            let ref = request.indirectRef(p)
            let want = min(Blkif.segmentsPerIndirectPage, count - p * Blkif.segmentsPerIndirectPage)
            let destination = indirectBuffer + p * Blkif.segmentsPerIndirectPage
            let bytes = want * MemoryLayout<blkif_request_segment>.size
            if let page = persistentPage(ref) {
                memcpy(destination, page, bytes)
                continue
            }
            let page: UnsafeMutableRawPointer, m: GrantMapping
            do { (page, m) = try grants.mapPage(domain: domain, ref: ref, writable: false) } catch {
                if debug { print("blkif: indirect page: \(error)") }
                return false
            }
            memcpy(destination, page, bytes)
            grants.unmapPage(m, ref: ref)
        }
        return true
    }

    private func dispatchReadWrite(_ request: BlkifRequestView, operation: UInt8, sector: UInt64, segmentCount: Int,
                                   indirect: Bool, preflush: Bool = false) {
        let id = request.id
        // Linux blkback answers an indirect request with its inner operation.
        let responseOperation = indirect ? operation : request.operation
        let fail = { (why: String) in
            if self.debug { print("blkif: request \(id) op \(request.operation): \(why)") }
            self.respond(id: id, operation: responseOperation, status: Blkif.statusError)
        }
        let maxSegments = indirect ? maxIndirectSegments : Blkif.maxDirectSegments
        guard segmentCount >= 1, segmentCount <= maxSegments else { fail("\(segmentCount) segments"); return }
        let isWrite = operation == Blkif.opWrite
        if isWrite && !writable { fail("write to a read-only device"); return }
        if indirect && !loadIndirectSegments(request, count: segmentCount) { fail("bad indirect page"); return }

        // A free slot has no mapping and no pending write (`finish` leaves it so).
        let tag = takeSlot()
        let slot = slots + tag
        slot.pointee.id = id
        slot.pointee.operation = responseOperation
        slot.pointee.segmentCount = segmentCount

        // Check every segment of the private copy before mapping anything.
        var total: UInt64 = 0
        var ok = true
        let segs = indirect ? UnsafePointer(indirectBuffer) : request.segments
        for i in 0..<segmentCount {
            let s = segs[i]
            guard s.first_sect <= s.last_sect, s.last_sect < Blkif.sectorsPerPage else { ok = false; break }
            slot.pointee.refs[i] = s.gref
            let length = Int(s.last_sect - s.first_sect + 1) * 512
            slot.pointee.vectors[i] = iovec(iov_base: UnsafeMutableRawPointer(bitPattern: Int(s.first_sect) * 512),
                                            iov_len: length)
            total += UInt64(length)
        }
        guard ok, let end = checkedEnd(sector, total / 512), end <= sectors, aligned(sector, total / 512) else {
            returnSlot(tag); fail("bad segment or range"); return
        }
        guard mapSegments(slot, deviceWrites: !isWrite) else { returnSlot(tag); fail("grant map failed"); return }
        for i in 0..<segmentCount {
            let offset = Int(bitPattern: slot.pointee.vectors[i].iov_base)
            slot.pointee.vectors[i].iov_base = slot.pointee.pages[i] + offset
        }
        inFlight += 1
        let io = BlockRequest(operation: isWrite ? .write : .read, offset: sector * 512, length: total,
                              buffers: IOBuffers(slot.pointee.vectors, count: segmentCount), fua: preflush)
        if preflush {
            slot.pointee.pendingWrite = io
            device.submit(BlockRequest(operation: .flush, offset: 0, length: 0), completion: BlockCompletion(sink: self, tag: UInt64(tag)))
        } else if let result = device.immediateResult(of: io) {
            finish(tag, result)   // no completion made, retained and called back
        } else {
            device.submit(io, completion: BlockCompletion(sink: self, tag: UInt64(tag)))
        }
    }

    /// The persistently mapped page of `ref`: from the table when kept already, else mapped
    /// into the cache now if it has room; nil when not persistent.
    @inline(__always) private func persistentPage(_ ref: GrantRef) -> UnsafeMutableRawPointer? {
        guard let table = persistentPages else { return nil }
        if ref < PersistentGrantCache.tableEntries, let page = table[Int(ref)] { return page }
        return persistent?.keep(ref)
    }

    /// Maps the slot's references: persistent ones from the cache, the rest in one batch.
    private func mapSegments(_ slot: UnsafeMutablePointer<Slot>, deviceWrites: Bool) -> Bool {
        let n = slot.pointee.segmentCount
        var batch = 0
        for i in 0..<n {
            let ref = slot.pointee.refs[i]
            if let p = persistentPage(ref) {
                slot.pointee.pages[i] = p
            } else {
                slot.pointee.mappedRefs[batch] = ref
                slot.pointee.batchIndex[batch] = i
                batch += 1
            }
        }
        guard batch > 0 else { return true }
        do {
            slot.pointee.mapping = try grants.mapBatch(
                domain: domain, refs: UnsafeBufferPointer(start: slot.pointee.mappedRefs, count: batch), writable: deviceWrites,
                pages: UnsafeMutableBufferPointer(start: slot.pointee.batchPages, count: batch))
        } catch {
            return false
        }
        slot.pointee.mappedCount = batch
        for k in 0..<batch { slot.pointee.pages[slot.pointee.batchIndex[k]] = slot.pointee.batchPages[k] }
        return true
    }

    private func runBarrier(_ request: BlkifRequestView) {
        // Everything before the barrier has completed (we waited); make it durable, then the
        // barrier's own data, durable too.
        var status = Blkif.statusOkay
        if case .failure = device.submitAndWait(BlockRequest(operation: .flush, offset: 0, length: 0)) { status = Blkif.statusError }
        if status == Blkif.statusOkay && request.segmentCount > 0 {
            dispatchReadWrite(request, operation: Blkif.opWrite, sector: request.sectorNumber,
                              segmentCount: request.segmentCount, indirect: false, preflush: false)
            return
        }
        respond(id: request.id, operation: request.operation, status: status)
    }

    // MARK: Completions

    func complete(tag: UInt64, result: BlockResult) {
        if loop.isLoopThread {
            finish(Int(tag), result)
        } else {
            loop.post((tag, result))
        }
    }

    private func finish(_ tag: Int, _ result: BlockResult) {
        let slot = slots + tag
        if let write = slot.pointee.pendingWrite {
            slot.pointee.pendingWrite = nil
            if case .success = result {
                device.submit(write, completion: BlockCompletion(sink: self, tag: UInt64(tag)))
                return
            }
        }
        if let m = slot.pointee.mapping {
            grants.unmap(m, refs: UnsafeBufferPointer(start: slot.pointee.mappedRefs, count: slot.pointee.mappedCount))
            slot.pointee.mapping = nil
        }
        let status: Int16
        switch result {
        case .success: status = Blkif.statusOkay
        case .failure(let e): status = e.code == .notSupported ? Blkif.statusNotSupported : Blkif.statusError
        }
        respond(id: slot.pointee.id, operation: slot.pointee.operation, status: status, tag: tag)
        returnSlot(tag)
        inFlight -= 1
        if inFlight == 0, let barrier = heldBarrier {
            heldBarrier = nil
            if let kept = heldBarrierTag {
                // Its record slot on top again: the barrier's write (if any) takes it as its tag.
                heldBarrierTag = nil
                returnSlot(kept)
                recordSlot = kept
            }
            withUnsafeBytes(of: barrier.storage) { runBarrier(BlkifRequestView($0.baseAddress!)) }
        }
    }
}
