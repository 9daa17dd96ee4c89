import BlockTap
import CXen
import Core
import Glibc

/// Drives one queue of a ``LocalBlockFrontend`` as hard as a guest could: keeps `queueDepth`
/// READs (or WRITEs, of the granted buffer pages) in flight, refilling as responses arrive, for
/// a fixed time. Every request is built once per slot up front (its buffer pages persistently
/// granted, its indirect page filled and granted), so that the frontend costs the same few
/// stores per request whichever backend it measures: the difference between two runs is the
/// backend's.
public final class BlkifLoadGenerator {
    /// The bench's workloads (``BenchmarkWorkload``), named as in the NBD table.
    public typealias Workload = BenchmarkWorkload

    public struct Result: Sendable {
        public var requests: UInt64
        public var bytes: UInt64
        public var seconds: Double
        public var errors: UInt64
        public var iops: Double { Double(requests) / seconds }
        public var megabytesPerSecond: Double { Double(bytes) / seconds / 1e6 }
    }

    private let front: LocalBlockFrontend
    private let workload: Workload
    private var slots: [BlkifRequestBytes] = []
    /// Grants made here (indirect pages) to revoke at the end.
    private var ownGrants: [GrantRef] = []

    /// Prepares one request per slot. The frontend must have been made with persistent grants
    /// and at least `workload.bufferPages` buffer pages.
    /// How long the guest watches its ring for responses before it sleeps on the event
    /// channel, in microseconds (0: never), as the backends watch theirs for requests.
    public var pollMicroseconds = 0

    public init(front: LocalBlockFrontend, workload: Workload) throws {
        self.front = front
        self.workload = workload
        let pagesPerRequest = workload.blockSize / xenPageSize
        guard workload.blockSize % xenPageSize == 0, pagesPerRequest >= 1, pagesPerRequest <= Blkif.maxIndirectSegments else {
            throw HarnessFailure("block size \(workload.blockSize): use 4 KiB to 1 MiB in whole pages")
        }
        guard front.options.bufferPages >= workload.bufferPages else {
            throw HarnessFailure("\(workload.name) needs \(workload.bufferPages) buffer pages, the frontend has \(front.options.bufferPages)")
        }
        let indirect = pagesPerRequest > Blkif.maxDirectSegments
        var page = 0
        for slot in 0..<workload.queueDepth {
            let first = page
            page += pagesPerRequest
            var indirectFrame: UInt32?
            if indirect {
                indirectFrame = front.queues[0].bufferFrame + UInt32(page)
                page += 1
            }
            let (request, refs) = try front.makeRequest(id: UInt64(slot), write: workload.write, sector: 0, firstPage: first,
                                                        pageCount: pagesPerRequest, indirectPageFrame: indirectFrame)
            if indirect, let r = refs.last { ownGrants.append(r) }
            slots.append(request)
        }
    }

    deinit {
        for r in ownGrants { try? front.pages.endAccess(r) }
    }

    /// Runs for `seconds` and returns what completed in that time.
    public func run(seconds: Double) throws -> Result {
        let q = front.queues[0]
        let slots = self.slots
        let sectorsPerRequest = UInt64(workload.blockSize / 512)
        let slotsOnDevice = max(1, front.sectors / sectorsPerRequest)
        var rng: UInt64 = 0x9E37_79B9_7F4A_7C15
        var nextSequential: UInt64 = 0
        func nextSector() -> UInt64 {
            if workload.random {
                rng ^= rng << 13; rng ^= rng >> 7; rng ^= rng << 17
                return (rng % slotsOnDevice) * sectorsPerRequest
            }
            let s = nextSequential
            nextSequential = (nextSequential + 1) % slotsOnDevice
            return s * sectorsPerRequest
        }
        func submit(_ slot: Int) {
            var r = slots[slot]
            r.sectorNumber = nextSector()
            q.ring.putRequest(r)
        }

        var completed: UInt64 = 0, errors: UInt64 = 0
        let start = monotonicSeconds()
        let end = start + seconds
        for slot in 0..<workload.queueDepth { submit(slot) }
        q.pushRequests()
        var inFlight = workload.queueDepth
        var stopping = false
        var poller = AdaptivePoller(microseconds: pollMicroseconds)
        while inFlight > 0 {
            var reaped = 0
            while q.ring.unconsumedResponses() > 0 {
                let rsp = q.ring.takeResponse()
                reaped += 1
                inFlight -= 1
                if rsp.status == Blkif.statusOkay { completed += 1 } else { errors += 1 }
                if !stopping { submit(Int(rsp.id)); inFlight += 1 }
            }
            if reaped > 0 {
                q.pushRequests()
                // Checking the clock once per batch keeps it off the per-request path.
                if !stopping && monotonicSeconds() >= end { stopping = true }
                continue
            }
            if poller.wait(idle: true, { q.ring.unconsumedResponses() > 0 ? true : nil }) != nil { continue }
            if q.ring.finalCheckForResponses() > 0 { continue }
            guard q.channel.wait(timeoutMilliseconds: 10_000) else {
                throw HarnessFailure("\(workload.name): no response within 10 s (\(inFlight) in flight)")
            }
        }
        let elapsed = monotonicSeconds() - start
        return Result(requests: completed, bytes: completed * UInt64(workload.blockSize), seconds: elapsed, errors: errors)
    }
}

extension BenchmarkWorkload {
    /// Buffer pages a frontend needs for this workload: one set per slot, plus one indirect
    /// page per slot when requests are indirect.
    public var bufferPages: Int {
        let pages = blockSize / xenPageSize
        return queueDepth * (pages + (pages > Blkif.maxDirectSegments ? 1 : 0)) + 1
    }
}
