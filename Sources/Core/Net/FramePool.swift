/// Frames for a thread that makes many of them (a netif queue's tx sweep, a TAP reader, a
/// generator), reused instead of allocated: a frame handed out comes back to the pool when
/// every copy of it is gone, wherever they went, and is handed out again with nothing
/// allocated. A frame still held when its turn comes is left to its holders and replaced by
/// a new one. (Kernel netback and QEMU keep such pools of buffers too; an allocation and a
/// free per frame cost more than a small frame's copy.)
///
/// One thread uses a pool; the frames it hands out may go to any thread.
///
/// ```swift
/// var pool = FramePool(frames: 256, frameCapacity: 2048)
/// let (frame, bytes, _) = pool.allocate(count: 60)
/// bytes.copyMemory(from: source, byteCount: 60)
/// receiver.toGuest(frame)
/// ```
public struct FramePool {
    /// The pool's frames' bytes, nil until first used; the pool holds one reference to each.
    @usableFromInline var slots: [FrameStorage?]
    @usableFromInline var cursor = 0
    /// Where the last batch began (``beginBatch()``).
    @usableFromInline var batchStart = 0
    /// The longest frame the pool holds; longer ones are allocated for their own.
    public let frameCapacity: Int

    /// A pool of `frames` frames of up to `frameCapacity` bytes, allocated as they are first used.
    public init(frames: Int, frameCapacity: Int) {
        slots = Array(repeating: nil, count: max(1, frames))
        self.frameCapacity = max(1, frameCapacity)
    }

    /// Marks the start of a batch (a ring sweep, a burst of reads): when the frames of the last
    /// batch are all gone already (a sink, a TAP written at once), this batch takes the same
    /// frames again, so that a thread's working set is one batch's frames, in cache, rather
    /// than the whole pool's (512 frames of 2 KiB overflow a core's L2 beside the guest's
    /// pages: each copy into a frame then missed, and cost twice the copy out of a C backend's
    /// staging area). When they are still held (a switch queueing them for another guest),
    /// the pool goes on round its slots, giving them time to come back.
    @inlinable public mutating func beginBatch() {
        if slots[batchStart] == nil || isKnownUniquelyReferenced(&slots[batchStart]) {
            cursor = batchStart
        } else {
            batchStart = cursor
        }
    }

    /// A frame of `count` bytes not yet written, and where they are (as
    /// ``EthernetFrame/allocate(count:offload:queue:)``): the pool's next frame if no copy of
    /// it is left, else a new one. `reused`: the bytes are those the frame held when it was
    /// last handed out (a source of identical frames need not write them again).
    @inlinable public mutating func allocate(count: Int, offload: FrameOffload = .none,
                                             queue: Int = 0) -> (frame: EthernetFrame, bytes: UnsafeMutableRawPointer, reused: Bool) {
        guard count <= frameCapacity else {
            let (frame, bytes) = EthernetFrame.allocate(count: count, offload: offload, queue: queue)
            return (frame, bytes, false)
        }
        // Unique: every frame handed out with these bytes is gone (their holders' releases
        // happen before this check sees the count drop), so nobody reads them any more.
        let reused = isKnownUniquelyReferenced(&slots[cursor])
        if !reused { slots[cursor] = FrameStorage.make(capacity: frameCapacity) }
        let storage = slots[cursor].unsafelyUnwrapped
        cursor = cursor + 1 == slots.count ? 0 : cursor + 1
        let bytes = storage.withUnsafeMutablePointerToElements { UnsafeMutableRawPointer($0) }
        return (EthernetFrame(storage: storage, count: count, offload: offload, queue: queue), bytes, reused)
    }
}
