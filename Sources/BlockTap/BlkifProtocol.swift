import CXen
import Core

/// blkif's ring types (io/blkif.h): 112-byte requests, 16-byte responses in a union.
public enum BlkifRing: RingTypes {
    public typealias Request = BlkifRequestBytes
    public typealias Response = blkif_response
    public static var entrySize: Int { MemoryLayout<blkif_sring_entry>.size }
}

/// A request slot's 112 bytes, copied whole. A request is one of several C structs laid over
/// the same bytes (blkif_request, _discard, _indirect), and one struct's padding is another's
/// data (indirect_grefs overlaps seg[0]'s padding), so the bytes are kept raw and each view is
/// loaded from them, never copied through another view.
public struct BlkifRequestBytes {
    public var storage: (UInt64, UInt64, UInt64, UInt64, UInt64, UInt64, UInt64,
                         UInt64, UInt64, UInt64, UInt64, UInt64, UInt64, UInt64) = (0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0)
    public init() {}
    public init<T>(_ view: T) {
        precondition(MemoryLayout<T>.size <= 112)
        withUnsafeMutableBytes(of: &storage) { $0.storeBytes(of: view, as: T.self) }
    }
    /// The bytes as one of blkif's request structs.
    @inline(__always) public func view<T>(as type: T.Type) -> T {
        withUnsafeBytes(of: storage) { $0.load(as: T.self) }
    }
    public var operation: UInt8 { withUnsafeBytes(of: storage) { $0[0] } }
    public var request: blkif_request { view(as: blkif_request.self) }
    public var discard: blkif_request_discard { view(as: blkif_request_discard.self) }
    public var indirect: blkif_request_indirect { view(as: blkif_request_indirect.self) }
    /// `sector_number`, which every view (read/write, discard, indirect) keeps at one offset
    /// (BlkifProtocolTests checks it): a frontend that reuses a built request changes only
    /// this. Written through the read/write view, so the offset is the compiler's constant.
    public var sectorNumber: UInt64 {
        get { request.sector_number }
        set {
            withUnsafeMutableBytes(of: &storage) { raw in
                raw.baseAddress!.withMemoryRebound(to: blkif_request.self, capacity: 1) { $0.pointee.sector_number = newValue }
            }
        }
    }
    /// Byte-level access, for tests that write garbage.
    public mutating func withBytes<R>(_ body: (UnsafeMutableRawBufferPointer) -> R) -> R { withUnsafeMutableBytes(of: &storage, body) }
}

/// A request's private copy where it lies (a ring's restart record, or a buffer of the ring
/// thread's), read field by field: a backend's hot path loads the fields it needs instead of
/// moving the 112 bytes again.
struct BlkifRequestView {
    let base: UnsafeRawPointer
    @inline(__always) init(_ base: UnsafeRawPointer) { self.base = base }
    @inline(__always) func field<T>(_ offset: Int?, _ type: T.Type) -> T { base.load(fromByteOffset: offset!, as: T.self) }

    /// The bytes as a value (a held barrier, kept past its copy's reuse).
    var bytes: BlkifRequestBytes {
        var value = BlkifRequestBytes()
        withUnsafeMutableBytes(of: &value.storage) { $0.copyMemory(from: UnsafeRawBufferPointer(start: base, count: $0.count)) }
        return value
    }

    // Every view keeps operation, id and sector_number at the same offsets (BlkifProtocolTests).
    var operation: UInt8 { base.load(as: UInt8.self) }
    var id: UInt64 { field(MemoryLayout<blkif_request>.offset(of: \.id), UInt64.self) }
    var sectorNumber: UInt64 { field(MemoryLayout<blkif_request>.offset(of: \.sector_number), UInt64.self) }
    var segmentCount: Int { Int(field(MemoryLayout<blkif_request>.offset(of: \.nr_segments), UInt8.self)) }
    /// The direct segments (read/write view).
    var segments: UnsafePointer<blkif_request_segment> {
        (base + MemoryLayout<blkif_request>.offset(of: \.seg)!).assumingMemoryBound(to: blkif_request_segment.self)
    }
    var discardSectors: UInt64 { field(MemoryLayout<blkif_request_discard>.offset(of: \.nr_sectors), UInt64.self) }
    var indirectOperation: UInt8 { field(MemoryLayout<blkif_request_indirect>.offset(of: \.indirect_op), UInt8.self) }
    var indirectSegmentCount: Int { Int(field(MemoryLayout<blkif_request_indirect>.offset(of: \.nr_segments), UInt16.self)) }
    func indirectRef(_ page: Int) -> GrantRef {
        field(MemoryLayout<blkif_request_indirect>.offset(of: \.indirect_grefs)! + page * MemoryLayout<GrantRef>.stride, GrantRef.self)
    }
}

/// Numbers fixed by io/blkif.h.
public enum Blkif {
    public static let opRead = UInt8(BLKIF_OP_READ)
    public static let opWrite = UInt8(BLKIF_OP_WRITE)
    public static let opWriteBarrier = UInt8(BLKIF_OP_WRITE_BARRIER)
    public static let opFlushDiskCache = UInt8(BLKIF_OP_FLUSH_DISKCACHE)
    public static let opDiscard = UInt8(BLKIF_OP_DISCARD)
    public static let opIndirect = UInt8(BLKIF_OP_INDIRECT)

    public static let statusOkay = Int16(BLKIF_RSP_OKAY)
    public static let statusError = Int16(BLKIF_RSP_ERROR)
    public static let statusNotSupported = Int16(BLKIF_RSP_EOPNOTSUPP)

    /// Segments carried in the request itself.
    public static let maxDirectSegments = Int(BLKIF_MAX_SEGMENTS_PER_REQUEST)
    /// Segments per indirect page: 4096 / sizeof(struct blkif_request_segment).
    public static let segmentsPerIndirectPage = xenPageSize / MemoryLayout<blkif_request_segment>.size
    public static let maxIndirectPages = Int(BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST)
    /// The most indirect segments SoftDev accepts (Linux blkback's default too).
    public static let maxIndirectSegments = 256
    /// Sectors of 512 bytes per 4 KiB page: first_sect and last_sect are at most 7.
    public static let sectorsPerPage = UInt8(xenPageSize / 512)
    /// The largest ring SoftDev maps: 2^4 pages, 512 requests.
    public static let maxRingPageOrder = 4
    /// `info` bits.
    public static let vdiskReadOnly: UInt32 = 4   // VDISK_READONLY

}
