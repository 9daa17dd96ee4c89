/// How a frame going to a guest is cut into the page-sized buffers the guest posted (netif's
/// rx slots): shared by the backend that cuts it and by a device that makes frames for the
/// buffers it is told of (a generator counts the slots each of its frames will take).
///
/// A frame of one page or less takes one slot. A longer one is cut at the pages of the
/// memory it lies in: the first slot holds what is left of the page the frame starts in,
/// every other slot one whole page. The grant copy of a slot then reads one page, not two:
/// Linux's gntdev cuts every copy where a page of ours ends, pinning each page and spending
/// one operation of its 16-operation hypercall batch on each piece, so a 64 KiB frame cut at
/// its own 4 KiB marks took 32 operations instead of 17. (Netback cuts its chunks where its
/// pages end too; netfront takes slots of any length.) The price is a slot more for some
/// frames; a 65535-byte frame, the largest netif carries, still spans at most 17 pages,
/// within netfront's 18 data slots.
public enum RxSlotLayout {
    /// A first slot shorter than this is not cut short (netfront takes the headers from the
    /// first slot, up to its RX_COPY_THRESHOLD of 256 bytes): the frame is cut at its own
    /// 4 KiB marks instead.
    public static let shortestFirstSlot = 256

    /// The data slots a frame of `count` bytes at `bytes` takes, and the length of the first.
    @inlinable
    public static func slots(count: Int, at bytes: UnsafeRawPointer) -> (slots: Int, first: Int) {
        let whole = (count + xenPageSize - 1) / xenPageSize
        guard whole > 1 else { return (1, count) }
        let first = xenPageSize - Int(bitPattern: UInt(bitPattern: bytes) & UInt(xenPageSize - 1))
        guard first < xenPageSize, first >= shortestFirstSlot else { return (whole, xenPageSize) }
        return (1 + (count - first + xenPageSize - 1) / xenPageSize, first)
    }

    /// The slots `frame` takes as it lies in memory now, its GSO extra included.
    public static func slots(of frame: EthernetFrame) -> Int {
        let data = frame.withUnsafeBytes { bytes in bytes.baseAddress.map { slots(count: bytes.count, at: $0).slots } ?? 1 }
        return data + (frame.offload.segmentation != nil ? 1 : 0)
    }
}
