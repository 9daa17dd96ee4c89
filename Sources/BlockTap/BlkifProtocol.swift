import CXen
import Core

/// blkif's ring types (io/blkif.h): 112-byte requests, 16-byte responses in a union.
public enum BlkifRing: RingTypes {
    public typealias Request = blkif_request
    public typealias Response = blkif_response
    public static var entrySize: Int { MemoryLayout<blkif_sring_entry>.size }
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
