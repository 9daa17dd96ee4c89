import CXen

/// The C types of one ring protocol (blkif, netif tx/rx, usbif urb/conn), so that layouts are
/// the C compiler's: `entrySize` is the size of the C union of request and response.
public protocol RingTypes {
    associatedtype Request
    associatedtype Response
    static var entrySize: Int { get }
}

/// The layout of io/ring.h's shared ring: a 64-byte header (req_prod, req_event, rsp_prod,
/// rsp_event, padding), then a power-of-two number of entries.
public enum SharedRingLayout {
    public static let headerSize = 64
    @usableFromInline static let reqProd = 0, reqEvent = 4, rspProd = 8, rspEvent = 12

    /// __RING_SIZE: how many entries of `entrySize` fit in `bytes`, rounded down to a power of two.
    public static func entries(bytes: Int, entrySize: Int) -> UInt32 {
        let n = (bytes - headerSize) / entrySize
        guard n > 0 else { return 0 }
        return UInt32(1) << UInt32(Int.bitWidth - 1 - n.leadingZeroBitCount)
    }

    @inlinable @inline(__always) static func index(_ p: UnsafeMutableRawPointer, _ offset: Int) -> UnsafeMutablePointer<UInt32> {
        (p + offset).assumingMemoryBound(to: UInt32.self)
    }
}

/// The backend's view of a shared ring (BACK_RING): it consumes requests and produces responses.
/// The frontend is untrusted: each request is copied once out of shared memory by
/// `takeRequest` (the caller validates the copy, never the shared entry), and a producer index
/// that claims more requests than the ring can hold is reported, not followed.
public struct BackRing<T: RingTypes> {
    public let shared: UnsafeMutableRawPointer
    public let size: UInt32
    /// T.entrySize, kept here so that the entry arithmetic needs no protocol witness. (The
    /// ring's methods are @inlinable: a backend in another module gets them specialized for
    /// its request type instead of copying entries through generic metadata.)
    @usableFromInline let entrySize: Int
    /// req_cons: the next request to take.
    public var requestConsumer: UInt32 { requestConsumerIndex }
    /// rsp_prod_pvt: responses written but perhaps not yet published.
    public var responseProducer: UInt32 { responseProducerIndex }
    @usableFromInline var requestConsumerIndex: UInt32 = 0
    @usableFromInline var responseProducerIndex: UInt32 = 0

    /// Attaches to a ring of `bytes` bytes that the frontend initialised (BACK_RING_INIT).
    public init(shared: UnsafeMutableRawPointer, bytes: Int) {
        self.shared = shared
        entrySize = T.entrySize
        size = SharedRingLayout.entries(bytes: bytes, entrySize: entrySize)
    }

    @inlinable @inline(__always) func entry(_ i: UInt32) -> UnsafeMutableRawPointer {
        shared + SharedRingLayout.headerSize + Int(i & (size - 1)) * entrySize
    }

    /// Picks up a ring a killed backend left (``RingRecoveryRecord``): its private indices as
    /// recorded, checked against what the shared ring says (the frontend's req_prod, the
    /// published rsp_prod): published <= private producer <= consumer <= req_prod, within one
    /// ring. Throws, touching nothing, when they do not fit: that ring must not be written to.
    public mutating func resume(requestConsumer: UInt32, responseProducer: UInt32) throws(RingResumeError) {
        let reqProd = cxen_load32(SharedRingLayout.index(shared, SharedRingLayout.reqProd))
        let rspProd = cxen_load32(SharedRingLayout.index(shared, SharedRingLayout.rspProd))
        let published = responseProducer &- rspProd, answered = requestConsumer &- responseProducer
        let waiting = reqProd &- requestConsumer
        guard published <= size, answered <= size, waiting <= size, published &+ answered <= size,
              answered &+ waiting <= size else {
            throw RingResumeError(description: "the shared ring (req_prod \(reqProd), rsp_prod \(rspProd)) does not fit the "
                + "recorded state (req_cons \(requestConsumer), rsp_prod_pvt \(responseProducer))")
        }
        requestConsumerIndex = requestConsumer
        responseProducerIndex = responseProducer
    }

    /// How many requests may be taken now (RING_UNCONSUMED_REQUESTS), or nil when the frontend
    /// published an impossible producer index (RING_REQUEST_PROD_OVERFLOW): the ring is broken
    /// and must be disconnected.
    @inlinable public func unconsumedRequests() -> UInt32? {
        // Acquire: the entries are read only after the index that covers them (xen_rmb).
        let prod = cxen_load32(SharedRingLayout.index(shared, SharedRingLayout.reqProd))
        if prod &- responseProducer > size { return nil }
        let requests = prod &- requestConsumer
        let room = size &- (requestConsumer &- responseProducer)
        return min(requests, room)
    }

    /// How many requests the frontend published past index `seen` (one between the consumer
    /// and the producer: netif rx buffers already announced to a device that has not filled
    /// them all), or nil when the producer index is impossible.
    @inlinable public func requestsPublished(after seen: UInt32) -> UInt32? {
        guard let n = unconsumedRequests() else { return nil }
        let beyond = (requestConsumer &+ n) &- seen
        return beyond > size ? 0 : beyond
    }

    /// Copies the next request out of shared memory and consumes it.
    @inlinable @inline(__always) public mutating func takeRequest() -> T.Request {
        let r = entry(requestConsumer).load(as: T.Request.self)
        requestConsumerIndex &+= 1
        return r
    }

    /// Copies the next request out of shared memory to `destination` (aligned for
    /// `T.Request`) and consumes it: the caller keeps its private copy where it needs it.
    @inlinable @inline(__always) public mutating func takeRequest(into destination: UnsafeMutableRawPointer) {
        destination.storeBytes(of: entry(requestConsumer).load(as: T.Request.self), as: T.Request.self)
        requestConsumerIndex &+= 1
    }

    /// Writes a response into the next slot (not yet visible to the frontend). Only for a
    /// response type without padding: a Swift value's padding bytes are whatever was on the
    /// stack, and they would land in the guest's page. Use `putResponse(zeroed:)` otherwise.
    @inlinable @inline(__always) public mutating func putResponse(_ response: T.Response) {
        entry(responseProducer).storeBytes(of: response, as: T.Response.self)
        responseProducerIndex &+= 1
    }

    /// Rewrites the response at `index`, one that `putResponse` wrote and that is not yet
    /// published (a status learnt after the slot was written: a grant copy that failed).
    @inlinable @inline(__always) public func rewriteResponse(at index: UInt32, _ response: T.Response) {
        precondition(responseProducerIndex &- index &- 1 < size, "response \(index) is not one of the last \(size) written")
        entry(index).storeBytes(of: response, as: T.Response.self)
    }

    /// Writes the next response slot whole: its `MemoryLayout<T.Response>.size` bytes are
    /// zeroed, then `fill` stores the fields at their C offsets, so no padding byte carries
    /// this process's memory into the peer's page (XSA-216: blkback leaked kernel stack through
    /// blkif_response's padding). Not yet visible to the frontend.
    @inlinable @inline(__always) public mutating func putResponse(zeroed fill: (UnsafeMutableRawPointer) -> Void) {
        let slot = entry(responseProducer)
        slot.initializeMemory(as: UInt8.self, repeating: 0, count: MemoryLayout<T.Response>.size)
        fill(slot)
        responseProducerIndex &+= 1
    }

    /// Publishes the written responses (RING_PUSH_RESPONSES_AND_CHECK_NOTIFY); true if the
    /// frontend asked to be notified of a response in the range just published.
    @inlinable public mutating func pushResponses() -> Bool {
        let rspProd = SharedRingLayout.index(shared, SharedRingLayout.rspProd)
        let old = cxen_load32(rspProd)
        let new = responseProducer
        cxen_wmb()                 // the frontend sees the responses before the index
        cxen_store32(rspProd, new)
        cxen_mb()                  // publish the index before reading rsp_event
        let event = cxen_load32(SharedRingLayout.index(shared, SharedRingLayout.rspEvent))
        return new &- event < new &- old
    }

    /// RING_FINAL_CHECK_FOR_REQUESTS: before sleeping, ask to be notified of the next request,
    /// then look again so that a request published meanwhile is not missed. nil: broken ring.
    @inlinable public mutating func finalCheckForRequests() -> UInt32? {
        guard let n = unconsumedRequests() else { return nil }
        if n > 0 { return n }
        cxen_store32(SharedRingLayout.index(shared, SharedRingLayout.reqEvent), requestConsumer &+ 1)
        cxen_mb()                  // publish req_event before re-reading req_prod
        return unconsumedRequests()
    }

    /// RING_FINAL_CHECK_FOR_REQUESTS for the requests past index `seen`
    /// (``requestsPublished(after:)``): asks to be notified of the one after it.
    @inlinable public mutating func finalCheckForRequests(after seen: UInt32) -> UInt32? {
        guard let n = requestsPublished(after: seen) else { return nil }
        if n > 0 { return n }
        cxen_store32(SharedRingLayout.index(shared, SharedRingLayout.reqEvent), seen &+ 1)
        cxen_mb()                  // publish req_event before re-reading req_prod
        return requestsPublished(after: seen)
    }
}

/// Why a ring cannot be picked up where a killed backend left it.
public struct RingResumeError: Error, CustomStringConvertible {
    public let description: String
}

/// The frontend's view of a shared ring (FRONT_RING): it produces requests and consumes
/// responses. Used by SoftDev's local frontends; the backend side is trusted less than nothing,
/// so responses are copied out once too.
public struct FrontRing<T: RingTypes> {
    public let shared: UnsafeMutableRawPointer
    public let size: UInt32
    @usableFromInline let entrySize: Int
    public var requestProducer: UInt32 { requestProducerIndex }
    public var responseConsumer: UInt32 { responseConsumerIndex }
    @usableFromInline var requestProducerIndex: UInt32 = 0
    @usableFromInline var responseConsumerIndex: UInt32 = 0

    /// Initialises the shared ring (SHARED_RING_INIT) and attaches to it (FRONT_RING_INIT).
    public init(initializing shared: UnsafeMutableRawPointer, bytes: Int) {
        self.shared = shared
        entrySize = T.entrySize
        size = SharedRingLayout.entries(bytes: bytes, entrySize: entrySize)
        cxen_store32(SharedRingLayout.index(shared, SharedRingLayout.reqProd), 0)
        cxen_store32(SharedRingLayout.index(shared, SharedRingLayout.rspProd), 0)
        cxen_store32(SharedRingLayout.index(shared, SharedRingLayout.reqEvent), 1)
        cxen_store32(SharedRingLayout.index(shared, SharedRingLayout.rspEvent), 1)
        (shared + 16).initializeMemory(as: UInt8.self, repeating: 0, count: SharedRingLayout.headerSize - 16)
    }

    @inlinable @inline(__always) func entry(_ i: UInt32) -> UnsafeMutableRawPointer {
        shared + SharedRingLayout.headerSize + Int(i & (size - 1)) * entrySize
    }

    /// RING_FREE_REQUESTS.
    @inlinable public var freeRequests: UInt32 { size &- (requestProducer &- responseConsumer) }

    @inlinable @inline(__always) public mutating func putRequest(_ request: T.Request) {
        entry(requestProducer).storeBytes(of: request, as: T.Request.self)
        requestProducerIndex &+= 1
    }

    /// RING_PUSH_REQUESTS_AND_CHECK_NOTIFY.
    @inlinable public mutating func pushRequests() -> Bool {
        let reqProd = SharedRingLayout.index(shared, SharedRingLayout.reqProd)
        let old = cxen_load32(reqProd)
        let new = requestProducer
        cxen_wmb()                 // the backend sees the requests before the index
        cxen_store32(reqProd, new)
        cxen_mb()                  // publish the index before reading req_event
        let event = cxen_load32(SharedRingLayout.index(shared, SharedRingLayout.reqEvent))
        return new &- event < new &- old
    }

    /// RING_HAS_UNCONSUMED_RESPONSES.
    @inlinable public func unconsumedResponses() -> UInt32 {
        cxen_load32(SharedRingLayout.index(shared, SharedRingLayout.rspProd)) &- responseConsumer
    }

    @inlinable @inline(__always) public mutating func takeResponse() -> T.Response {
        let r = entry(responseConsumer).load(as: T.Response.self)
        responseConsumerIndex &+= 1
        return r
    }

    /// RING_FINAL_CHECK_FOR_RESPONSES.
    @inlinable public mutating func finalCheckForResponses() -> UInt32 {
        let n = unconsumedResponses()
        if n > 0 { return n }
        cxen_store32(SharedRingLayout.index(shared, SharedRingLayout.rspEvent), responseConsumer &+ 1)
        cxen_mb()
        return unconsumedResponses()
    }
}
