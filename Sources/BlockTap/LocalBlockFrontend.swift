import CXen
import Core
import Glibc
import XenStore

/// A blkfront written in Swift for a guest of the local hypervisor: it does what Linux's
/// xen-blkfront does on the wire (rings of 2^order pages, several queues, persistent or
/// per-request grants, indirect segments) so that the demo, the tests and the benchmark drive
/// the backend exactly as a guest would. The handshake, rings and channels are a
/// ``LocalFrontend``'s; this adds blkif's nodes and requests.
public final class LocalBlockFrontend: @unchecked Sendable {
    public struct Options: Sendable {
        public var queues = 1
        public var ringPageOrder = 0
        public var persistentGrants = true
        /// Use BLKIF_OP_INDIRECT for requests of more than 11 segments (if the backend offers it).
        public var indirect = true
        /// Buffer pages per queue (each granted once when persistent).
        public var bufferPages = 512
        public init() {}
    }

    /// The xenbus handshake, grants, rings and channels.
    public let connection: LocalFrontend
    public var hypervisor: LocalHypervisor { connection.hypervisor }
    public var pages: LocalGuestPages { connection.pages }
    public var frontendPath: String { connection.frontendPath }
    public var backendPath: String { connection.backendPath }
    public var backendDomain: DomainID { connection.backendDomain }
    public private(set) var sectors: UInt64 = 0
    public private(set) var sectorSize: UInt32 = 512
    public private(set) var readOnly = false
    public private(set) var backendFeatures: [String: String] = [:]
    public let options: Options
    public private(set) var queues: [Queue] = []

    /// One ring with its event channel and buffers.
    public final class Queue: @unchecked Sendable {
        /// One thread drives a queue (puts, pushes, takes): Swift's dynamic exclusivity checks,
        /// a thread-local lookup per access, would cost a load generator more than the ring.
        @exclusivity(unchecked) public var ring: FrontRing<BlkifRing>
        public let ringFrame: UInt32
        public let ringRefs: [GrantRef]
        public let channel: any EventChannel
        /// Data pages: frame and (when persistent) the grant made once.
        public let bufferFrame: UInt32
        public let bufferRefs: [GrantRef]
        /// Event notifications sent to the backend (pushes the backend asked to hear about).
        @exclusivity(unchecked) public private(set) var notifications = 0
        /// Publishes the requests put so far and notifies the backend if it asked for that.
        public func pushRequests() {
            if ring.pushRequests() { notifications += 1; channel.notify() }
        }
        init(ring: FrontRing<BlkifRing>, ringFrame: UInt32, ringRefs: [GrantRef], channel: any EventChannel, bufferFrame: UInt32, bufferRefs: [GrantRef]) {
            self.ring = ring; self.ringFrame = ringFrame; self.ringRefs = ringRefs; self.channel = channel
            self.bufferFrame = bufferFrame; self.bufferRefs = bufferRefs
        }
    }

    public struct Failure: Error, CustomStringConvertible {
        public let description: String
        init(_ d: String) { description = d }
    }

    /// Connects the frontend at `frontendPath` (written by the toolstack) to its backend.
    public init(hypervisor: LocalHypervisor, frontendPath: String, options: Options = Options(), timeoutSeconds: Double = 10) throws {
        connection = try LocalFrontend(hypervisor: hypervisor, frontendPath: frontendPath, timeoutSeconds: timeoutSeconds)
        self.options = options
        backendFeatures = try connection.backendNodes(["feature-persistent", "feature-max-indirect-segments", "max-ring-page-order",
                                                       "multi-queue-max-queues", "feature-flush-cache", "feature-discard",
                                                       "discard-granularity"])
        let maxOrder = Int(backendFeatures["max-ring-page-order"] ?? "0") ?? 0
        let maxQueues = Int(backendFeatures["multi-queue-max-queues"] ?? "1") ?? 1
        let order = min(options.ringPageOrder, maxOrder)
        let queueCount = max(1, min(options.queues, maxQueues))
        let persistent = options.persistentGrants && backendFeatures["feature-persistent"] == "1"

        var nodes: [(String, String)] = [("protocol", "x86_64-abi"), ("feature-persistent", persistent ? "1" : "0")]
        if order > 0 { nodes.append(("ring-page-order", "\(order)")) }
        if queueCount > 1 { nodes.append(("multi-queue-num-queues", "\(queueCount)")) }
        for i in 0..<queueCount {
            queues.append(try makeQueue(order: order, persistent: persistent, directory: queueCount == 1 ? "" : "queue-\(i)/",
                                        nodes: &nodes))
        }
        try connection.connect(nodes: nodes, timeoutSeconds: timeoutSeconds)
        let info = try connection.backendNodes(["sectors", "sector-size", "info"])
        sectors = info["sectors"].flatMap { UInt64($0) } ?? 0
        sectorSize = info["sector-size"].flatMap { UInt32($0) } ?? 512
        readOnly = ((info["info"].flatMap { UInt64($0) } ?? 0) & UInt64(Blkif.vdiskReadOnly)) != 0
    }

    /// A ring, its channel and its buffers; adds the nodes that describe it under `directory`.
    private func makeQueue(order: Int, persistent: Bool, directory: String, nodes: inout [(String, String)]) throws -> Queue {
        let ring = try connection.makeRing(BlkifRing.self, pageOrder: order)
        let channel = try connection.makeChannel()
        nodes += ring.nodes(prefix: directory) + [(directory + "event-channel", "\(channel.localPort)")]
        let bufferFrame = try pages.allocate(pages: options.bufferPages)
        let bufferRefs = persistent ? try connection.grant(frame: bufferFrame, count: options.bufferPages, readOnly: false) : []
        return Queue(ring: ring.ring, ringFrame: ring.frame, ringRefs: ring.refs, channel: channel, bufferFrame: bufferFrame, bufferRefs: bufferRefs)
    }

    /// Closes as blkfront does: Closing, wait for the backend to close, Closed.
    public func close(timeoutSeconds: Double = 10) throws {
        try connection.close(timeoutSeconds: timeoutSeconds)
    }

    // MARK: Requests

    /// Sends raw requests exactly as given (any bytes: the hostile-frontend tests use this) on
    /// `queue`, and waits for as many responses.
    public func roundTrip(_ requests: [BlkifRequestBytes], queue index: Int = 0, timeoutMilliseconds: Int32 = 10_000) throws -> [blkif_response] {
        let q = queues[index]
        for r in requests { q.ring.putRequest(r) }
        q.pushRequests()
        return try collect(requests.count, queue: index, timeoutMilliseconds: timeoutMilliseconds)
    }

    /// Takes `count` responses from `queue`, waiting for events as needed.
    public func collect(_ count: Int, queue index: Int = 0, timeoutMilliseconds: Int32 = 10_000) throws -> [blkif_response] {
        let q = queues[index]
        var out: [blkif_response] = []
        out.reserveCapacity(count)
        while out.count < count {
            while q.ring.unconsumedResponses() > 0 && out.count < count { out.append(q.ring.takeResponse()) }
            if out.count == count { break }
            if q.ring.finalCheckForResponses() > 0 { continue }
            guard q.channel.wait(timeoutMilliseconds: timeoutMilliseconds) else {
                throw Failure("no response from the backend within \(timeoutMilliseconds) ms (\(out.count) of \(count))")
            }
        }
        return out
    }

    /// The page `i` of the queue's buffer pool, and the reference to put in a segment: the
    /// persistent grant, or a fresh grant for this request (revoked by `releaseGrant`).
    public func bufferPage(_ i: Int, queue index: Int = 0) -> UnsafeMutableRawPointer {
        pages.pointer(queues[index].bufferFrame + UInt32(i))
    }
    public func grantBuffer(_ i: Int, queue index: Int = 0, readOnly: Bool) throws -> GrantRef {
        let q = queues[index]
        if !q.bufferRefs.isEmpty { return q.bufferRefs[i] }
        return try pages.grant(frame: q.bufferFrame + UInt32(i), to: backendDomain, readOnly: readOnly)
    }
    public func releaseGrant(_ ref: GrantRef, queue index: Int = 0) {
        if queues[index].bufferRefs.isEmpty { try? pages.endAccess(ref) }
    }

    /// Builds a READ or WRITE of `count` pages of the buffer pool starting at page `first`,
    /// whole pages, as one request (indirect if more than 11 pages).
    public func makeRequest(id: UInt64, write: Bool, sector: UInt64, firstPage: Int, pageCount: Int, queue index: Int = 0,
                            indirectPageFrame: UInt32? = nil) throws -> (BlkifRequestBytes, [GrantRef]) {
        var refs: [GrantRef] = []
        var segs: [blkif_request_segment] = []
        for p in 0..<pageCount {
            let ref = try grantBuffer(firstPage + p, queue: index, readOnly: write)
            refs.append(ref)
            segs.append(blkif_request_segment(gref: ref, first_sect: 0, last_sect: 7))
        }
        var r = blkif_request()
        if pageCount <= Blkif.maxDirectSegments {
            r.operation = write ? Blkif.opWrite : Blkif.opRead
            r.nr_segments = UInt8(pageCount)
            r.id = id
            r.sector_number = sector
            withUnsafeMutableBytes(of: &r.seg) { raw in
                let s = raw.bindMemory(to: blkif_request_segment.self)
                for (i, seg) in segs.enumerated() { s[i] = seg }
            }
            return (BlkifRequestBytes(r), refs)
        }
        guard let frame = indirectPageFrame else { throw Failure("an indirect request needs an indirect page") }
        let page = pages.pointer(frame).bindMemory(to: blkif_request_segment.self, capacity: Blkif.segmentsPerIndirectPage)
        for (i, seg) in segs.enumerated() { page[i] = seg }
        let indirectRef = try pages.grant(frame: frame, to: backendDomain, readOnly: true)
        var ind = blkif_request_indirect()
        ind.operation = Blkif.opIndirect
        ind.indirect_op = write ? Blkif.opWrite : Blkif.opRead
        ind.nr_segments = UInt16(pageCount)
        ind.id = id
        ind.sector_number = sector
        ind.handle = 0
        withUnsafeMutableBytes(of: &ind.indirect_grefs) { $0.bindMemory(to: GrantRef.self)[0] = indirectRef }
        return (BlkifRequestBytes(ind), refs + [indirectRef])
    }

    // MARK: Simple synchronous I/O (demo, tests)

    /// Writes `data` (a multiple of 4096 bytes, at most the buffer pool) at `sector`.
    public func write(sector: UInt64, _ data: [UInt8], queue: Int = 0) throws {
        try io(write: true, sector: sector, count: data.count, queue: queue) { p in
            data.withUnsafeBytes { p.copyMemory(from: $0.baseAddress!, byteCount: data.count) }
        }
    }

    /// Reads `count` bytes (a multiple of 4096) at `sector`.
    public func read(sector: UInt64, count: Int, queue: Int = 0) throws -> [UInt8] {
        var out = [UInt8](repeating: 0, count: count)
        try io(write: false, sector: sector, count: count, queue: queue) { _ in }
        out.withUnsafeMutableBytes { dst in
            for p in 0..<(count / xenPageSize) { memcpy(dst.baseAddress! + p * xenPageSize, bufferPage(p, queue: queue), xenPageSize) }
        }
        return out
    }

    private func io(write: Bool, sector: UInt64, count: Int, queue: Int, fill: (UnsafeMutableRawPointer) -> Void) throws {
        guard count > 0, count % xenPageSize == 0, count / xenPageSize < options.bufferPages else {
            throw Failure("I/O of \(count) bytes: use whole pages, at most \(options.bufferPages - 1)")
        }
        let n = count / xenPageSize
        if write {
            let staging = UnsafeMutableRawPointer.allocate(byteCount: count, alignment: 16)
            defer { staging.deallocate() }
            fill(staging)
            for p in 0..<n { memcpy(bufferPage(p, queue: queue), staging + p * xenPageSize, xenPageSize) }
        }
        // The last buffer page holds the indirect segment list when one is needed.
        let indirectFrame = queues[queue].bufferFrame + UInt32(options.bufferPages - 1)
        let (req, refs) = try makeRequest(id: 1, write: write, sector: sector, firstPage: 0, pageCount: n, queue: queue, indirectPageFrame: indirectFrame)
        let rsp = try roundTrip([req], queue: queue)
        let indirect = n > Blkif.maxDirectSegments
        for r in refs.dropLast(indirect ? 1 : 0) { releaseGrant(r, queue: queue) }
        if indirect, let last = refs.last { try? pages.endAccess(last) }   // the indirect page's own grant
        guard rsp[0].status == Blkif.statusOkay else { throw Failure("\(write ? "write" : "read") at sector \(sector) failed: status \(rsp[0].status)") }
    }

    /// Sends a request without data (FLUSH_DISKCACHE, DISCARD) and returns its status.
    public func control(operation: UInt8, sector: UInt64 = 0, sectors count: UInt64 = 0, queue: Int = 0) throws -> Int16 {
        if operation == Blkif.opDiscard {
            var d = blkif_request_discard()
            d.operation = operation; d.id = 7; d.sector_number = sector; d.nr_sectors = count
            return try roundTrip([BlkifRequestBytes(d)], queue: queue)[0].status
        }
        var r = blkif_request()
        r.operation = operation; r.id = 7; r.nr_segments = 0
        return try roundTrip([BlkifRequestBytes(r)], queue: queue)[0].status
    }
}
