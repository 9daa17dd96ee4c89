import Glibc
import Synchronization

/// A backend ring's private state, kept where it outlives the process: the request consumer
/// index, the private response producer, and a copy of every request consumed and not yet
/// answered. The shared ring cannot say which requests were answered (responses go out of
/// order and overwrite request slots), so without this a daemon that is killed (SIGKILL, an OOM
/// kill, an upgrade) and started again cannot pick up a Connected ring: it would replay answered
/// slots or lose unanswered ones.
///
/// The record is a small file under /run mapped shared: the ring thread's updates are plain
/// stores to memory (no system call on the hot path), and the kernel keeps every store of a
/// process that dies, in program order (x86-64 stores are seen in order; each update is a
/// single aligned store where order matters, and a fence keeps the compiler from moving a
/// store past the next step's: no instruction on x86-64), so the record is exact at whatever
/// point the process was killed. It does not survive the machine (nor do the guests).
///
/// Each request goes through three stores, and a recovery reads them back:
/// 1. `taken(slot:index:request:)`: the copy and its index, then the consumer index moves past
///    it. Killed before the move, the request is taken again from the ring, where it still is
///    (its entry is overwritten only by a response with the same index, which comes later).
/// 2. `answered(slot:response:)`, after the response is in the ring: the slot notes the
///    response's index, then the private producer moves past it. Killed in between, recovery
///    sees the note and moves the producer itself: the response is in the ring, once.
/// 3. `released(slot:)`: the slot is free.
public final class RingRecoveryRecord: @unchecked Sendable {
    /// What identifies one ring of one device: a record for other rings (the frontend
    /// reconnected with new ones) is not this one's.
    public struct Identity: Equatable, Sendable {
        public var frontendDomain: UInt16
        public var ringRefs: [UInt32]
        public var eventPort: UInt32
        public init(frontendDomain: UInt16, ringRefs: [UInt32], eventPort: UInt32) {
            self.frontendDomain = frontendDomain; self.ringRefs = ringRefs; self.eventPort = eventPort
        }
        /// FNV-1a over the fields: a fingerprint stored in the header.
        var fingerprint: UInt64 {
            var h: UInt64 = 0xcbf2_9ce4_8422_2325
            func mix(_ v: UInt32) { for b in 0..<4 { h = (h ^ UInt64((v >> (8 * UInt32(b))) & 0xff)) &* 0x100_0000_01b3 } }
            mix(UInt32(frontendDomain)); mix(eventPort); mix(UInt32(ringRefs.count))
            ringRefs.forEach(mix)
            return h
        }
    }

    /// What a recovery found: where the ring's private indices were, and the requests that were
    /// consumed and not answered, to serve again (in the order they were taken).
    public struct Recovered: Sendable, Equatable {
        public var requestConsumer: UInt32
        public var responseProducer: UInt32
        /// The unanswered requests: their slot, their index in the ring, their bytes.
        public var pending: [(slot: Int, index: UInt32, bytes: [UInt8])]
        public static func == (a: Recovered, b: Recovered) -> Bool {
            a.requestConsumer == b.requestConsumer && a.responseProducer == b.responseProducer
                && a.pending.map(\.slot) == b.pending.map(\.slot) && a.pending.map(\.index) == b.pending.map(\.index)
                && a.pending.map(\.bytes) == b.pending.map(\.bytes)
        }
    }

    public struct Failure: Error, CustomStringConvertible {
        public let description: String
    }

    // Layout: a 64-byte header, then `slots` records of 16 bytes + the request.
    private static let magic: UInt64 = 0x5344_5249_4e47_0001   // "SDRING", version 1
    // (Inlinable constants: the ring threads of other modules store through ``Stores``.)
    @inlinable static var headerSize: Int { 64 }
    @usableFromInline enum Header {
        static var magic: Int { 0 }
        static var fingerprint: Int { 8 }
        static var slots: Int { 16 }
        static var requestSize: Int { 20 }
        @inlinable static var consumer: Int { 24 }
        @inlinable static var producer: Int { 28 }
    }
    @usableFromInline enum Slot {
        @inlinable static var state: Int { 0 }
        @inlinable static var index: Int { 4 }
        @inlinable static var answer: Int { 8 }
    }
    @inlinable static var taken: UInt32 { 1 }

    public let path: String
    /// Slots for requests in flight, 0..<slots, and one more, `inlineSlot`.
    public let slots: Int
    /// The slot of a request answered at once, before the next is taken (a malformed request,
    /// a device that completed inline): it is recorded too, because its response may overwrite
    /// its entry in the ring (a response and a request with the same index share an entry).
    public var inlineSlot: Int { slots }
    public let requestSize: Int
    private let recordSize: Int
    private let base: UnsafeMutableRawPointer
    private let length: Int

    /// Opens the record at `path` for a ring of `slots` entries (the ring's size: at most that
    /// many requests are in flight, plus `inlineSlot`) of `requestSize` bytes. With `resume`, the record must
    /// exist and be this ring's: what it holds is returned. Without, a new record is started
    /// (a ring that was just connected).
    public init(path: String, identity: Identity, slots: Int, requestSize: Int, resume: Bool) throws(Failure) {
        self.path = path; self.slots = slots; self.requestSize = requestSize
        recordSize = (16 + requestSize + 7) & ~7
        length = Self.headerSize + (slots + 1) * recordSize
        let fd = open(path, resume ? O_RDWR | O_CLOEXEC : O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0o600)
        guard fd >= 0 else {
            throw Failure(description: "\(path): \(resume ? "no saved ring state to resume from" : "cannot create the ring's record"): \(String(cString: strerror(errno)))")
        }
        defer { close(fd) }
        var st = stat()
        fstat(fd, &st)
        if resume && st.st_size != length {
            throw Failure(description: "\(path): the saved ring state is \(st.st_size) bytes, not the \(length) of this ring")
        }
        if !resume && ftruncate(fd, off_t(length)) != 0 {
            throw Failure(description: "\(path): cannot size the ring's record: \(String(cString: strerror(errno)))")
        }
        guard let p = mmap(nil, length, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0), p != MAP_FAILED else {
            throw Failure(description: "\(path): cannot map the ring's record: \(String(cString: strerror(errno)))")
        }
        base = p
        if resume {
            let ok = load(Header.magic, UInt64.self) == Self.magic && load(Header.fingerprint, UInt64.self) == identity.fingerprint
                && load(Header.slots, UInt32.self) == UInt32(slots) && load(Header.requestSize, UInt32.self) == UInt32(requestSize)
            if !ok {
                munmap(base, length)
                throw Failure(description: "\(path): the saved ring state is for another ring (the frontend reconnected, or the file is not ours)")
            }
        } else {
            memset(base, 0, length)
            store(Header.fingerprint, identity.fingerprint)
            store(Header.slots, UInt32(slots))
            store(Header.requestSize, UInt32(requestSize))
            store(Header.magic, Self.magic)
        }
    }

    deinit { munmap(base, length) }

    private func load<T>(_ offset: Int, _: T.Type) -> T { (base + offset).load(as: T.self) }
    private func store<T>(_ offset: Int, _ value: T) { (base + offset).storeBytes(of: value, as: T.self) }
    @inline(__always) private func record(_ slot: Int) -> UnsafeMutableRawPointer { base + Self.headerSize + slot * recordSize }

    /// What the record holds, recovered as the header comment says; call once, before the
    /// ring thread uses the record.
    public func recover() -> Recovered {
        let consumer = load(Header.consumer, UInt32.self)
        var producer = load(Header.producer, UInt32.self)
        var pending: [(slot: Int, index: UInt32, bytes: [UInt8])] = []
        for slot in 0...slots {
            let r = record(slot)
            guard r.load(fromByteOffset: Slot.state, as: UInt32.self) == Self.taken else { continue }
            let index = r.load(fromByteOffset: Slot.index, as: UInt32.self)
            let answer = r.load(fromByteOffset: Slot.answer, as: UInt32.self)
            if Int32(bitPattern: index &- consumer) >= 0 {
                // Not consumed yet as far as the record goes: it is taken from the ring again.
                released(slot: slot)
            } else if answer != 0 {
                // Answered; the producer may not have moved past it yet.
                let response = answer &- 1
                if Int32(bitPattern: response &- producer) >= 0 { producer = response &+ 1 }
                released(slot: slot)
            } else {
                pending.append((slot, index, Array(UnsafeRawBufferPointer(start: r + 16, count: requestSize))))
            }
        }
        store(Header.producer, producer)
        pending.sort { Int32(bitPattern: $0.index &- $1.index) < 0 }
        return Recovered(requestConsumer: consumer, responseProducer: producer, pending: pending)
    }

    /// Step 1: `request` (`requestSize` bytes), the ring's request `index`, is in `slot`; the
    /// consumer index is past it.
    @inline(__always) public func taken(slot: Int, index: UInt32, request: UnsafeRawPointer) {
        stores.taken(slot: slot, index: index, request: request)
    }

    /// Step 2: the response to `slot`'s request is in the ring at index `response`.
    @inline(__always) public func answered(slot: Int, response: UInt32) { stores.answered(slot: slot, response: response) }

    /// Step 3: the slot is free.
    @inline(__always) public func released(slot: Int) { stores.released(slot: slot) }

    /// The three steps as plain stores into the mapping, for a ring thread's hot path: a value
    /// with no reference to count (valid while the record lives; the ring holds it).
    public var stores: Stores { Stores(base: base, recordSize: recordSize, requestSize: requestSize) }

    /// Inlinable: the ring threads of other modules store straight into the mapping, a request's
    /// copy with the compiler's own moves (a call to memcpy per request was 3% of a null
    /// device's ring thread).
    public struct Stores: @unchecked Sendable {
        @usableFromInline let base: UnsafeMutableRawPointer
        @usableFromInline let recordSize: Int
        @usableFromInline let requestSize: Int

        @usableFromInline init(base: UnsafeMutableRawPointer, recordSize: Int, requestSize: Int) {
            self.base = base; self.recordSize = recordSize; self.requestSize = requestSize
        }

        @inlinable @inline(__always) func record(_ slot: Int) -> UnsafeMutableRawPointer {
            base + RingRecoveryRecord.headerSize + slot * recordSize
        }
        @inlinable @inline(__always) public func taken(slot: Int, index: UInt32, request: UnsafeRawPointer) {
            let r = record(slot)
            memcpy(r + 16, request, requestSize)
            noteTaken(r, index: index)
        }
        /// Where `slot`'s copy of its request lies (`requestSize` bytes, 8-aligned): a ring
        /// copies the request there itself, out of shared memory, and then notes it taken.
        @inlinable @inline(__always) public func request(slot: Int) -> UnsafeMutableRawPointer { record(slot) + 16 }
        /// Step 1 for a request already copied to `request(slot:)`.
        @inlinable @inline(__always) public func noteTaken(slot: Int, index: UInt32) { noteTaken(record(slot), index: index) }
        @inlinable @inline(__always) func noteTaken(_ r: UnsafeMutableRawPointer, index: UInt32) {
            atomicMemoryFence(ordering: .releasing)   // the copy, then the slot says it is there
            r.storeBytes(of: index, toByteOffset: Slot.index, as: UInt32.self)
            r.storeBytes(of: 0, toByteOffset: Slot.answer, as: UInt32.self)
            atomicMemoryFence(ordering: .releasing)
            r.storeBytes(of: RingRecoveryRecord.taken, toByteOffset: Slot.state, as: UInt32.self)
            atomicMemoryFence(ordering: .releasing)   // the slot, then the consumer past it
            base.storeBytes(of: index &+ 1, toByteOffset: Header.consumer, as: UInt32.self)
        }
        @inlinable @inline(__always) public func answered(slot: Int, response: UInt32) {
            atomicMemoryFence(ordering: .releasing)   // the response in the ring, then the note
            record(slot).storeBytes(of: response &+ 1, toByteOffset: Slot.answer, as: UInt32.self)
            atomicMemoryFence(ordering: .releasing)   // the note, then the producer past it
            base.storeBytes(of: response &+ 1, toByteOffset: Header.producer, as: UInt32.self)
        }
        @inlinable @inline(__always) public func released(slot: Int) {
            atomicMemoryFence(ordering: .releasing)
            record(slot).storeBytes(of: 0, toByteOffset: Slot.state, as: UInt32.self)
        }
    }

    /// The ring was disconnected cleanly: nothing to resume, the file goes.
    public func remove() {
        unlink(path)
    }
}
