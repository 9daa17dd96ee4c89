import CXen

/// What a frame's sender left for the next hop to do or did already, as netif's flags and
/// virtio_net_hdr say it: a checksum to finish, a large TCP segment to cut (GSO).
public struct FrameOffload: Equatable, Sendable {
    public enum Checksum: Equatable, Sendable {
        /// Whatever the bytes hold; nobody vouches for it (netif: no flag; virtio: flags 0).
        case none
        /// The sender checked it, or the bytes have never left memory (netif `data_validated`,
        /// virtio `DATA_VALID`).
        case validated
        /// The layer-4 checksum is not filled in: the field at `start + offset` holds the
        /// pseudo-header's sum, and whoever puts the frame on a wire completes it over
        /// `[start, end)` (Linux's CHECKSUM_PARTIAL; netif `csum_blank`, virtio `NEEDS_CSUM`).
        case partial(start: UInt16, offset: UInt16)
    }
    /// A TCP segment larger than the wire's MTU, to be cut into `size`-byte segments.
    public struct Segmentation: Equatable, Sendable {
        public enum Kind: UInt8, Sendable { case tcpv4, tcpv6 }
        public var kind: Kind
        /// Payload bytes per segment (MSS); never 0.
        public var size: UInt16
        public init(kind: Kind, size: UInt16) { self.kind = kind; self.size = size }
    }
    public var checksum: Checksum
    public var segmentation: Segmentation?
    public init(checksum: Checksum = .none, segmentation: Segmentation? = nil) {
        self.checksum = checksum; self.segmentation = segmentation
    }
    public static let none = FrameOffload()
}

/// One Ethernet frame (destination MAC first, no FCS) with its offload metadata: what a network
/// device sees, whichever tap, endpoint or filter it came from.
///
/// The bytes live in one heap block, shared by copies of the frame until one of them writes
/// (copy on write), so a switch that floods a frame to several ports copies nothing.
public struct EthernetFrame: @unchecked Sendable {
    @usableFromInline var storage: FrameStorage
    /// The frame's length in bytes.
    public private(set) var count: Int
    public var offload: FrameOffload
    /// The queue the frame came in on (a vif's ring, a multi-queue TAP's descriptor): a hint
    /// that keeps one flow on one queue on its way out.
    public var queue: Int

    /// A frame of `count` zero bytes.
    public init(count: Int, offload: FrameOffload = .none, queue: Int = 0) {
        storage = FrameStorage.make(capacity: count)
        storage.withUnsafeMutablePointerToElements { $0.initialize(repeating: 0, count: count) }
        self.count = count; self.offload = offload; self.queue = queue
    }

    /// A frame of `count` bytes that `fill` writes (all of them) before anyone reads the frame.
    public init(count: Int, offload: FrameOffload = .none, queue: Int = 0,
                filling fill: (UnsafeMutableRawBufferPointer) throws -> Void) rethrows {
        storage = FrameStorage.make(capacity: count)
        self.count = count; self.offload = offload; self.queue = queue
        try storage.withUnsafeMutablePointerToElements { try fill(UnsafeMutableRawBufferPointer(start: $0, count: count)) }
    }

    /// A frame of `count` bytes not yet written, and where they are: for a transport that
    /// fills many frames with one batched copy (netif's grant copies per ring sweep). The
    /// pointer stays valid while the frame (or a copy of it) lives; every byte must be written
    /// before the frame is handed on, and nothing else may write through it after that.
    public static func allocate(count: Int, offload: FrameOffload = .none, queue: Int = 0) -> (frame: EthernetFrame, bytes: UnsafeMutableRawPointer) {
        let storage = FrameStorage.make(capacity: count)
        let pointer = storage.withUnsafeMutablePointerToElements { UnsafeMutableRawPointer($0) }
        return (EthernetFrame(storage: storage, count: count, offload: offload, queue: queue), pointer)
    }

    @usableFromInline init(storage: FrameStorage, count: Int, offload: FrameOffload, queue: Int) {
        self.storage = storage; self.count = count; self.offload = offload; self.queue = queue
    }

    /// A frame holding `bytes`.
    public init<C: Collection>(_ bytes: C, offload: FrameOffload = .none, queue: Int = 0) where C.Element == UInt8 {
        let n = bytes.count
        storage = FrameStorage.make(capacity: n)
        storage.withUnsafeMutablePointerToElements { p in
            _ = UnsafeMutableBufferPointer(start: p, count: n).initialize(from: bytes)
        }
        count = n; self.offload = offload; self.queue = queue
    }

    /// The bytes, for reading (a filter's match, a capture's write).
    @inlinable public func withUnsafeBytes<R>(_ body: (UnsafeRawBufferPointer) throws -> R) rethrows -> R {
        try storage.withUnsafeMutablePointerToElements { try body(UnsafeRawBufferPointer(start: $0, count: count)) }
    }

    /// The bytes, for writing: a frame shared with another copy is copied first.
    public mutating func withUnsafeMutableBytes<R>(_ body: (UnsafeMutableRawBufferPointer) throws -> R) rethrows -> R {
        if !isKnownUniquelyReferenced(&storage) {
            let copy = FrameStorage.make(capacity: count)
            let n = count
            storage.withUnsafeMutablePointerToElements { src in
                copy.withUnsafeMutablePointerToElements { $0.initialize(from: src, count: n) }
            }
            storage = copy
        }
        return try storage.withUnsafeMutablePointerToElements { try body(UnsafeMutableRawBufferPointer(start: $0, count: count)) }
    }

    /// Shortens the frame to its first `length` bytes.
    public mutating func truncate(to length: Int) {
        precondition(length >= 0 && length <= count, "truncate(to: \(length)) of a \(count)-byte frame")
        count = length
    }

    /// Whether no other copy of the frame shares its bytes: a reader that handed a copy up and
    /// gets true back knows every receiver let go of it, and may fill the bytes again (through
    /// the pointer ``allocate(count:offload:queue:)`` gave it).
    public mutating func isUniquelyReferenced() -> Bool { isKnownUniquelyReferenced(&storage) }

    /// A copy of the bytes (tests, logs).
    public var bytes: [UInt8] { withUnsafeBytes { Array($0) } }

    /// The byte at `index` (a header field); `index` must be below `count`.
    @inlinable public subscript(index: Int) -> UInt8 {
        precondition(index >= 0 && index < count)
        return storage.withUnsafeMutablePointerToElements { $0[index] }
    }

    /// Destination and source MAC addresses (zero for a frame shorter than a header).
    public var destination: MACAddress { count >= 6 ? withUnsafeBytes { MACAddress($0, at: 0) } : MACAddress.zero }
    public var source: MACAddress { count >= 12 ? withUnsafeBytes { MACAddress($0, at: 6) } : MACAddress.zero }
}

/// The heap settings a process moving frames should have: glibc gives freed memory back to the
/// kernel once 128 KiB sit free at the top of a heap, so a thread that allocates and frees a
/// 64 KiB frame over and over pays page faults on every one (a third of a TSO frame's cost in
/// the ring benchmark). Keeping freed memory (up to 64 MiB per heap) avoids that.
public enum FrameMemory {
    public static func keepFreedMemory() {
        cxen_keep_freed_memory(64 << 20, 1 << 20)
    }
}

/// The frame's bytes: one allocation with the bytes after the header (its capacity).
@usableFromInline final class FrameStorage: ManagedBuffer<Int, UInt8> {
    @usableFromInline static func make(capacity: Int) -> FrameStorage {
        unsafeDowncast(FrameStorage.create(minimumCapacity: max(capacity, 1)) { _ in capacity }, to: FrameStorage.self)
    }
}

/// A 48-bit Ethernet address, held in the low 48 bits of an integer (first octet highest), so
/// that a switch's table hashes and compares it without touching memory.
public struct MACAddress: Hashable, Sendable, CustomStringConvertible {
    public let value: UInt64
    public init(value: UInt64) { self.value = value & 0xffff_ffff_ffff }
    public init(_ a: UInt8, _ b: UInt8, _ c: UInt8, _ d: UInt8, _ e: UInt8, _ f: UInt8) {
        value = UInt64(a) << 40 | UInt64(b) << 32 | UInt64(c) << 24 | UInt64(d) << 16 | UInt64(e) << 8 | UInt64(f)
    }
    /// The address at `offset` in `bytes` (six bytes must be there).
    public init(_ bytes: UnsafeRawBufferPointer, at offset: Int) {
        self.init(bytes[offset], bytes[offset + 1], bytes[offset + 2], bytes[offset + 3], bytes[offset + 4], bytes[offset + 5])
    }
    /// Parses "00:16:3e:12:34:56"; nil for anything else.
    public init?(_ text: String) {
        let parts = text.split(separator: ":", omittingEmptySubsequences: false)
        guard parts.count == 6 else { return nil }
        var v: UInt64 = 0
        for p in parts {
            guard p.count == 2, let b = UInt8(p, radix: 16) else { return nil }
            v = v << 8 | UInt64(b)
        }
        value = v
    }
    public static let zero = MACAddress(value: 0)
    public static let broadcast = MACAddress(value: 0xffff_ffff_ffff)
    /// The six octets, first first.
    public var octets: [UInt8] { (0..<6).map { UInt8(truncatingIfNeeded: value >> (40 - 8 * UInt64($0))) } }
    /// Group bit set: broadcast or multicast.
    public var isMulticast: Bool { value & (1 << 40) != 0 }
    public var description: String {
        octets.map { ($0 < 16 ? "0" : "") + String($0, radix: 16) }.joined(separator: ":")
    }
}
