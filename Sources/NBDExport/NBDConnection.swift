import Core
import Glibc
import NBDWire

/// The transmission phase of one client: one reader thread that parses requests and submits
/// them to the device without waiting, and replies sent as the device completes them, in any
/// order, from whichever thread completes them.
///
/// The hot path allocates nothing: each request in flight owns a `Slot` (its buffer, iovec and
/// reply header), slots are reused, and replies completed on the reader thread are gathered in
/// one output buffer and sent with one system call before the reader next waits for input.
final class NBDConnection: BlockCompletionSink, @unchecked Sendable {
    /// Requests in flight per connection; fio's deepest queue in the benchmark is 256.
    static let maxInFlight = 512
    /// Slot buffers larger than this are freed when the request completes, so that a burst of
    /// 32 MiB requests does not pin 512 × 32 MiB.
    static let keptBufferSize = 4 << 20
    /// Payload bytes in flight per connection: 512 reads of 32 MiB must not become 16 GiB of
    /// buffers (qemu-nbd bounds this by 16 requests, nbdkit by its thread count).
    static let inFlightByteBudget = 128 << 20

    private let socket: NBDSocket
    private let session: NBDSession
    private let device: any BlockDevice
    private let size: UInt64
    /// The device's alignment; sub-block I/O is read-modify-written to it.
    private let blockSize: UInt64
    /// Serialises read-modify-write cycles on this export across connections.
    private let rmwLock: ConditionLock

    private final class Slot {
        let index: Int
        var buffer: UnsafeMutableRawPointer?
        var capacity = 0
        let iov = UnsafeMutablePointer<iovec>.allocate(capacity: 2)
        /// The reply header: up to 20 + 8 (structured chunk + offset).
        let header = UnsafeMutableRawPointer.allocate(byteCount: 32, alignment: 8)
        var cookie: UInt64 = 0
        var command: NBD.Command = .read
        var offset: UInt64 = 0
        var length = 0
        /// Where the client's bytes start in `buffer` (an unaligned read reads whole blocks).
        var skip = 0
        /// No other request of the connection was in flight when this one was taken.
        var alone = false
        init(index: Int) { self.index = index }
        func reserve(_ n: Int) {
            guard n > capacity else { return }
            buffer?.deallocate()
            buffer = UnsafeMutableRawPointer.allocate(byteCount: n, alignment: 4096)
            capacity = n
        }
        func trim() {
            if capacity > NBDConnection.keptBufferSize { buffer?.deallocate(); buffer = nil; capacity = 0 }
        }
        deinit { buffer?.deallocate(); iov.deallocate(); header.deallocate() }
    }

    // Slots: created on demand, never moved, so completion threads read them without a lock.
    private let slots = UnsafeMutablePointer<Slot>.allocate(capacity: NBDConnection.maxInFlight)
    private var slotCount = 0
    private var freeSlots: [Int] = []
    private var inFlight = 0
    private var inFlightBytes = 0
    private let pool = ConditionLock()

    // Output: guarded by `writer`.
    private let writer = ConditionLock()
    private static let outCapacity = 256 << 10
    private let out = UnsafeMutableRawPointer.allocate(byteCount: NBDConnection.outCapacity, alignment: 8)
    private var outCount = 0
    private var peerAlive = true
    private var closed = false
    private var readerThread = pthread_t()

    // Input: only the reader thread touches these.
    private static let inCapacity = 256 << 10
    private let input = UnsafeMutableRawPointer.allocate(byteCount: NBDConnection.inCapacity, alignment: 8)
    private var inStart = 0
    private var inEnd = 0
    private let scratch = UnsafeMutableRawPointer.allocate(byteCount: 64, alignment: 8)
    private var statusBuffer: [UInt32] = []
    private var bounce: UnsafeMutableRawPointer?
    private var bounceCapacity = 0
    private let syncWaiter = BlockCompletionWaiter()
    private var poller: AdaptivePoller

    init(socket: NBDSocket, session: NBDSession, rmwLock: ConditionLock, poller: AdaptivePoller) {
        self.socket = socket
        self.poller = poller
        self.session = session
        self.device = session.export.device
        self.size = device.geometry.size
        self.blockSize = UInt64(max(1, device.geometry.logicalBlockSize))
        self.rmwLock = rmwLock
        freeSlots.reserveCapacity(Self.maxInFlight)
        statusBuffer.reserveCapacity(1024)
    }

    deinit {
        slots.deinitialize(count: slotCount)
        slots.deallocate()
        out.deallocate(); input.deallocate(); scratch.deallocate()
        bounce?.deallocate()
    }

    /// Serves requests until the client disconnects, breaks the protocol or the server stops;
    /// returns only when no request of this client is still in the device.
    func run() {
        readerThread = pthread_self()
        // Plugged while it reads: the requests of one burst start together (one io_submit for
        // an O_DIRECT file), flushed whenever the reader would wait (`flushOut`).
        BlockPlug.begin()
        while serveOne() {}
        BlockPlug.end()
        // The device may still hold our buffers: wait for it before the socket goes away, so
        // every write the client saw acknowledged reached the device first.
        drain(to: 0)
        writer.withLock {
            flushOutLocked()
            peerAlive = false
            closed = true
            socket.close()
        }
    }

    /// Wakes the reader (the server is stopping). Under the lock, so that it never reaches a
    /// descriptor number already closed and perhaps reused.
    func shutdown() { writer.withLock { if !closed { socket.shutdown() } } }

    // MARK: Requests

    /// Reads and dispatches one request; false when the connection is over.
    private func serveOne() -> Bool {
        guard fill(NBDRequestHeader.size) else { return false }
        let header = NBDRequestHeader(loading: input + inStart)
        inStart += NBDRequestHeader.size
        // Garbage: the stream cannot be resynchronised, drop this client alone.
        guard let h = header else { return false }

        guard let command = NBD.Command(rawValue: h.type) else {
            return replyNow(h.cookie, .cache, NBD.EINVAL, "unknown command \(h.type)")
        }
        switch command {
        case .read: return read(h.cookie, h.flags, h.offset, h.length)
        case .write: return write(h.cookie, h.flags, h.offset, h.length)
        case .disconnect: return false
        case .flush:
            let slot = acquire(h.cookie, command, 0, 0)
            submit(BlockRequest(operation: .flush, offset: 0, length: 0), slot)
            return true
        case .trim: return trim(h.cookie, h.offset, h.length)
        case .writeZeroes: return writeZeroes(h.cookie, h.flags, h.offset, h.length)
        case .blockStatus: return blockStatus(h.cookie, h.flags, h.offset, h.length)
        case .cache: return replyNow(h.cookie, command, NBD.EINVAL, "NBD_CMD_CACHE is not supported")
        }
    }

    /// Hands `request` to the device, completing into `slot`. Alone in flight with no other
    /// request waiting in the input, this thread has nothing else to do: the device may run a
    /// blocking operation on it (`callerMayWait`) rather than hand it to a thread and back.
    private func submit(_ request: BlockRequest, _ slot: Slot) {
        var request = request
        request.callerMayWait = slot.alone && inStart == inEnd
        device.submit(request, completion: BlockCompletion(sink: self, tag: UInt64(slot.index)))
    }

    /// The error for a request outside the device; nil if it is inside. Writes past the end are
    /// ENOSPC, everything else EINVAL, as in nbdkit.
    private func rangeError(_ offset: UInt64, _ length: UInt32, write: Bool) -> UInt32? {
        let (end, overflow) = offset.addingReportingOverflow(UInt64(length))
        if overflow || end > size { return write ? NBD.ENOSPC : NBD.EINVAL }
        if session.enforceBlockSize && (offset % blockSize != 0 || UInt64(length) % blockSize != 0) { return NBD.EINVAL }
        return nil
    }

    private func read(_ cookie: UInt64, _ flags: UInt16, _ offset: UInt64, _ length: UInt32) -> Bool {
        if length > NBD.maxPayload { return replyNow(cookie, .read, NBD.EOVERFLOW, "read of \(length) bytes is over 32 MiB") }
        if let e = rangeError(offset, length, write: false) { return replyNow(cookie, .read, e, "read beyond the end of the export") }
        if length == 0 { return replyNow(cookie, .read, 0) }
        // Whole blocks around the range; the client gets its bytes from `skip` on.
        let start = offset / blockSize * blockSize
        let end = (offset + UInt64(length) + blockSize - 1) / blockSize * blockSize
        let slot = acquire(cookie, .read, offset, Int(length))
        slot.skip = Int(offset - start)
        slot.reserve(Int(end - start))
        slot.iov[0] = iovec(iov_base: slot.buffer, iov_len: Int(end - start))
        submit(BlockRequest(operation: .read, offset: start, length: end - start, buffers: IOBuffers(slot.iov, count: 1)), slot)
        return true
    }

    private func write(_ cookie: UInt64, _ flags: UInt16, _ offset: UInt64, _ length: UInt32) -> Bool {
        if length > NBD.maxPayload {
            // Keep the stream in step: swallow the payload, then refuse.
            guard discardInput(Int(length)) else { return false }
            return replyNow(cookie, .write, NBD.EINVAL, "write of \(length) bytes is over 32 MiB")
        }
        let slot = acquire(cookie, .write, offset, Int(length))
        slot.reserve(Int(length))
        guard take(into: slot.buffer, Int(length)) else { release(slot); return false }
        let fua = flags & NBD.cmdFlagFUA != 0
        if let e = writeError(offset, length) {
            release(slot)
            return replyNow(cookie, .write, e, e == NBD.EPERM ? "the export is read-only" : "write beyond the end of the export")
        }
        if length == 0 { release(slot); return replyNow(cookie, .write, 0) }
        if offset % blockSize == 0 && UInt64(length) % blockSize == 0 {
            slot.iov[0] = iovec(iov_base: slot.buffer, iov_len: Int(length))
            submit(BlockRequest(operation: .write, offset: offset, length: UInt64(length), buffers: IOBuffers(slot.iov, count: 1), fua: fua), slot)
            return true
        }
        let result = readModifyWrite(offset, Int(length), fua: fua, data: slot.buffer, holding: 1)
        release(slot)
        return replyNow(cookie, .write, result)
    }

    private func writeError(_ offset: UInt64, _ length: UInt32) -> UInt32? {
        if !session.export.writable { return NBD.EPERM }
        return rangeError(offset, length, write: true)
    }

    private func trim(_ cookie: UInt64, _ offset: UInt64, _ length: UInt32) -> Bool {
        if let e = writeError(offset, length) { return replyNow(cookie, .trim, e, "trim refused") }
        guard device.capabilities.contains(.discard) else { return replyNow(cookie, .trim, NBD.EINVAL, "the device cannot trim") }
        // A trim is advisory: the blocks wholly inside the range are enough.
        let start = (offset + blockSize - 1) / blockSize * blockSize
        let end = (offset + UInt64(length)) / blockSize * blockSize
        if end <= start { return replyNow(cookie, .trim, 0) }
        let slot = acquire(cookie, .trim, start, Int(end - start))
        device.submit(BlockRequest(operation: .discard, offset: start, length: end - start),
                      completion: BlockCompletion(sink: self, tag: UInt64(slot.index)))
        return true
    }

    private func writeZeroes(_ cookie: UInt64, _ flags: UInt16, _ offset: UInt64, _ length: UInt32) -> Bool {
        if let e = writeError(offset, length) { return replyNow(cookie, .writeZeroes, e, "write zeroes refused") }
        let fua = flags & NBD.cmdFlagFUA != 0
        let mayDiscard = flags & NBD.cmdFlagNoHole == 0
        if length == 0 { return replyNow(cookie, .writeZeroes, 0) }
        if offset % blockSize == 0 && UInt64(length) % blockSize == 0 {
            let slot = acquire(cookie, .writeZeroes, offset, Int(length))
            device.submit(BlockRequest(operation: .writeZeroes, offset: offset, length: UInt64(length), fua: fua, mayDiscard: mayDiscard),
                          completion: BlockCompletion(sink: self, tag: UInt64(slot.index)))
            return true
        }
        // Partial blocks at the ends by read-modify-write, whole blocks in between as zeroes.
        let end = offset + UInt64(length)
        let innerStart = (offset + blockSize - 1) / blockSize * blockSize
        let innerEnd = end / blockSize * blockSize
        var error: UInt32 = 0
        if innerEnd <= innerStart {
            error = readModifyWrite(offset, Int(length), fua: fua, data: nil)
        } else {
            if offset < innerStart { error = readModifyWrite(offset, Int(innerStart - offset), fua: fua, data: nil) }
            if error == 0 {
                error = waitFor(BlockRequest(operation: .writeZeroes, offset: innerStart, length: innerEnd - innerStart, fua: fua, mayDiscard: mayDiscard))
            }
            if error == 0 && innerEnd < end { error = readModifyWrite(innerEnd, Int(end - innerEnd), fua: fua, data: nil) }
        }
        return replyNow(cookie, .writeZeroes, error)
    }

    /// Sub-block write: read the whole blocks, patch them, write them back. Our own earlier
    /// requests are drained first and read-modify-writes from other connections to the export
    /// wait on `rmwLock`, so that no sub-block write to a neighbouring byte of the same block
    /// is lost. (A whole-block write from another connection racing with it is, as in any
    /// multi-connection NBD use, ordered only by the clients' own flushes.) `data` nil writes zeroes;
    /// `holding` is how many slots the caller itself holds.
    private func readModifyWrite(_ offset: UInt64, _ length: Int, fua: Bool, data: UnsafeMutableRawPointer?, holding: Int = 0) -> UInt32 {
        drain(to: holding)
        let start = offset / blockSize * blockSize
        let end = (offset + UInt64(length) + blockSize - 1) / blockSize * blockSize
        let n = Int(end - start)
        if n > bounceCapacity {
            bounce?.deallocate()
            bounce = UnsafeMutableRawPointer.allocate(byteCount: n, alignment: 4096)
            bounceCapacity = n
        }
        let b = bounce!
        rmwLock.lock(); defer { rmwLock.unlock() }
        var v = iovec(iov_base: b, iov_len: Int(blockSize))
        return withUnsafeMutablePointer(to: &v) { iov -> UInt32 in
            // The first and last blocks are the only ones not wholly overwritten.
            var e = waitFor(BlockRequest(operation: .read, offset: start, length: blockSize, buffers: IOBuffers(iov, count: 1)))
            if e == 0 && end - blockSize > start {
                iov.pointee = iovec(iov_base: b + n - Int(blockSize), iov_len: Int(blockSize))
                e = waitFor(BlockRequest(operation: .read, offset: end - blockSize, length: blockSize, buffers: IOBuffers(iov, count: 1)))
            }
            guard e == 0 else { return e }
            if let data { memcpy(b + Int(offset - start), data, length) } else { memset(b + Int(offset - start), 0, length) }
            iov.pointee = iovec(iov_base: b, iov_len: n)
            return waitFor(BlockRequest(operation: .write, offset: start, length: UInt64(n), buffers: IOBuffers(iov, count: 1), fua: fua))
        }
    }

    /// Submits and waits on the reader thread (read-modify-write only).
    private func waitFor(_ request: BlockRequest) -> UInt32 {
        device.submit(request, completion: BlockCompletion(sink: syncWaiter, tag: 0))
        switch syncWaiter.wait() {
        case .success: return 0
        case .failure(let e): return NBD.errno(for: e)
        }
    }

    private func blockStatus(_ cookie: UInt64, _ flags: UInt16, _ offset: UInt64, _ length: UInt32) -> Bool {
        guard session.baseAllocation else {
            return replyNow(cookie, .blockStatus, NBD.EINVAL, "base:allocation was not negotiated")
        }
        if length == 0 { return replyNow(cookie, .blockStatus, NBD.EINVAL, "empty block status request") }
        let (end, overflow) = offset.addingReportingOverflow(UInt64(length))
        if overflow || end > size { return replyNow(cookie, .blockStatus, NBD.EINVAL, "block status beyond the end of the export") }
        let extents: [BlockExtent]
        if device.capabilities.contains(.extents) {
            do { extents = try device.extents(at: offset, length: UInt64(length)) } catch {
                return replyNow(cookie, .blockStatus, NBD.errno(for: error), error.message)
            }
        } else {
            extents = [BlockExtent(offset: offset, length: UInt64(length), isHole: false, isZero: false)]
        }
        // Pairs of (length, flags), clipped to the request, neighbours with equal flags merged.
        statusBuffer.removeAll(keepingCapacity: true)
        var position = offset
        for e in extents {
            let s = max(e.offset, position), t = min(e.offset + e.length, end)
            guard t > s, s == position else { continue }
            let state = (e.isHole ? NBD.stateHole : 0) | (e.isHole || e.isZero ? NBD.stateZero : 0)
            if let last = statusBuffer.last, last == state {
                statusBuffer[statusBuffer.count - 2] += UInt32(t - s)
            } else {
                statusBuffer.append(UInt32(t - s)); statusBuffer.append(state)
            }
            position = t
            if position == end { break }
        }
        // A device that said nothing about the range: data is the safe answer.
        if statusBuffer.isEmpty { statusBuffer = [length, 0] }
        if flags & NBD.cmdFlagReqOne != 0 { statusBuffer.removeSubrange(2...) }
        let count = statusBuffer.count / 2
        // The chunk's payload: the context id, then the pairs.
        let h = scratch, payload = NBDStructuredReplyHeader.payload
        NBDStructuredReplyHeader(flags: NBD.replyFlagDone, type: NBD.replyTypeBlockStatus, cookie: cookie, length: UInt32(4 + 8 * count)).store(to: h)
        h.storeBE(NBD.baseAllocationID, at: payload)
        for i in statusBuffer.indices { statusBuffer[i] = statusBuffer[i].bigEndian }
        return statusBuffer.withUnsafeMutableBytes { body in
            sendReply(header: h, headerCount: payload + 4, data: body.baseAddress, dataCount: 8 * count)
        }
    }

    // MARK: Completions

    func complete(tag: UInt64, result: BlockResult) {
        let slot = slots[Int(tag)]
        switch result {
        case .success:
            if slot.command == .read { replyReadData(slot) } else { replySimple(slot.header, slot.cookie, 0) }
        case .failure(let e):
            replyError(slot.header, slot.cookie, slot.command, NBD.errno(for: e), e.message)
        }
        release(slot)
    }

    private func replyReadData(_ slot: Slot) {
        let h = slot.header
        let data = slot.buffer! + slot.skip
        if session.structuredReplies {
            // One OFFSET_DATA chunk with DONE: the whole read, so NBD_CMD_FLAG_DF always holds.
            // Its payload: the offset, then the data.
            let payload = NBDStructuredReplyHeader.payload
            NBDStructuredReplyHeader(flags: NBD.replyFlagDone, type: NBD.replyTypeOffsetData, cookie: slot.cookie, length: UInt32(8 + slot.length)).store(to: h)
            h.storeBE(slot.offset, at: payload)
            sendReply(header: h, headerCount: payload + 8, data: data, dataCount: slot.length)
        } else {
            NBDSimpleReplyHeader(error: 0, cookie: slot.cookie).store(to: h)
            sendReply(header: h, headerCount: NBDSimpleReplyHeader.size, data: data, dataCount: slot.length)
        }
    }

    @discardableResult
    private func replySimple(_ h: UnsafeMutableRawPointer, _ cookie: UInt64, _ error: UInt32) -> Bool {
        NBDSimpleReplyHeader(error: error, cookie: cookie).store(to: h)
        return sendReply(header: h, headerCount: NBDSimpleReplyHeader.size, data: nil, dataCount: 0)
    }

    /// Structured clients get the message too (nbdinfo and qemu print it); reads and block
    /// status must fail with a structured chunk once structured replies are on.
    @discardableResult
    private func replyError(_ h: UnsafeMutableRawPointer, _ cookie: UInt64, _ command: NBD.Command, _ error: UInt32, _ message: String) -> Bool {
        guard session.structuredReplies, command == .read || command == .blockStatus else {
            return replySimple(h, cookie, error)
        }
        // The chunk's payload: the errno, the message's length, the message.
        var text = Array(message.utf8.prefix(1024))
        let payload = NBDStructuredReplyHeader.payload
        NBDStructuredReplyHeader(flags: NBD.replyFlagDone, type: NBD.replyTypeError, cookie: cookie, length: UInt32(6 + text.count)).store(to: h)
        h.storeBE(error, at: payload)
        h.storeBE(UInt16(text.count), at: payload + 4)
        return text.withUnsafeMutableBytes { sendReply(header: h, headerCount: payload + 6, data: $0.baseAddress, dataCount: $0.count) }
    }

    /// A reply from the reader thread for a request that never reached the device.
    private func replyNow(_ cookie: UInt64, _ command: NBD.Command, _ error: UInt32, _ message: String = "") -> Bool {
        if error == 0 { return replySimple(scratch, cookie, 0) }
        return replyError(scratch, cookie, command, error, message)
    }

    /// Sends one reply whole. On the reader thread small replies are gathered in `out` and
    /// leave together before the reader waits; other threads write theirs at once. Either
    /// way the lock keeps replies from interleaving. False if the client is gone.
    @discardableResult
    private func sendReply(header: UnsafeMutableRawPointer, headerCount: Int, data: UnsafeMutableRawPointer?, dataCount: Int) -> Bool {
        writer.lock(); defer { writer.unlock() }
        guard peerAlive else { return false }
        let total = headerCount + dataCount
        if pthread_equal(pthread_self(), readerThread) != 0 && total <= 64 << 10 {
            if outCount + total > Self.outCapacity { flushOutLocked() }
            memcpy(out + outCount, header, headerCount)
            if dataCount > 0 { memcpy(out + outCount + headerCount, data!, dataCount) }
            outCount += total
            return peerAlive
        }
        flushOutLocked()
        guard peerAlive else { return false }
        var v = (iovec(iov_base: header, iov_len: headerCount), iovec(iov_base: data, iov_len: dataCount))
        let ok = withUnsafeMutablePointer(to: &v) {
            $0.withMemoryRebound(to: iovec.self, capacity: 2) { socket.writeFully($0, count: dataCount > 0 ? 2 : 1) }
        }
        if !ok { lostPeerLocked() }
        return ok
    }

    private func flushOutLocked() {
        guard outCount > 0 else { return }
        var v = iovec(iov_base: out, iov_len: outCount)
        outCount = 0
        if peerAlive && !socket.writeFully(&v, count: 1) { lostPeerLocked() }
    }

    /// The client is gone: later replies are dropped, and the reader wakes up to end.
    private func lostPeerLocked() {
        peerAlive = false
        socket.shutdown()
    }

    // MARK: Slots

    private func acquire(_ cookie: UInt64, _ command: NBD.Command, _ offset: UInt64, _ length: Int) -> Slot {
        pool.lock()
        // Only reads and writes hold buffers; a trim's length costs nothing.
        let bytes = command == .read || command == .write ? length : 0
        func full() -> Bool {
            (freeSlots.isEmpty && slotCount == Self.maxInFlight) || (inFlight > 0 && inFlightBytes + bytes > Self.inFlightByteBudget)
        }
        if full() {
            pool.unlock()
            flushOut()
            pool.lock()
            while full() { pool.wait() }
        }
        let slot: Slot
        if let i = freeSlots.popLast() {
            slot = slots[i]
        } else {
            slot = Slot(index: slotCount)
            (slots + slotCount).initialize(to: slot)
            slotCount += 1
        }
        inFlight += 1
        inFlightBytes += bytes
        let alone = inFlight == 1
        pool.unlock()
        slot.cookie = cookie; slot.command = command; slot.offset = offset; slot.length = length; slot.skip = 0
        slot.alone = alone
        return slot
    }

    private func release(_ slot: Slot) {
        slot.trim()
        pool.withLock {
            freeSlots.append(slot.index)
            inFlight -= 1
            inFlightBytes -= slot.command == .read || slot.command == .write ? slot.length : 0
            pool.broadcast()
        }
    }

    /// Waits (on the reader thread) until at most `count` requests are in the device.
    private func drain(to count: Int) {
        flushOut()
        pool.withLock { while inFlight > count { pool.wait() } }
    }

    /// Before the reader waits (for the client, or for room in the device): the requests held in
    /// its plug start (with nothing else to do, the reader may run those that block itself: a
    /// burst of buffered writes), and the replies gathered so far leave.
    private func flushOut() {
        BlockPlug.flush(callerMayWait: true)
        writer.withLock { flushOutLocked() }
    }

    // MARK: Input

    /// Makes `count` bytes (at most `inCapacity`) available at `input + inStart`.
    private func fill(_ count: Int) -> Bool {
        if inEnd - inStart >= count { return true }
        if inStart > 0 {
            memmove(input, input + inStart, inEnd - inStart)
            inEnd -= inStart; inStart = 0
        }
        // Replies gathered so far leave before we wait on the client.
        flushOut()
        while inEnd < count {
            // Completion threads change inFlight under the pool lock.
            let n = poller.wait(idle: pool.withLock { inFlight == 0 }) { socket.readNow(input + inEnd, Self.inCapacity - inEnd) }
                ?? socket.readSome(input + inEnd, Self.inCapacity - inEnd)
            if n <= 0 { return false }
            inEnd += n
        }
        return true
    }

    /// Moves `count` payload bytes to `destination`: what is buffered, then straight from the socket.
    private func take(into destination: UnsafeMutableRawPointer?, _ count: Int) -> Bool {
        let buffered = min(count, inEnd - inStart)
        if buffered > 0 { memcpy(destination!, input + inStart, buffered); inStart += buffered }
        guard count > buffered else { return true }
        flushOut()
        // The rest of a large payload arrives as the client's socket buffer drains, a buffer
        // at a time: watch for each as for the next request, rather than sleep and be woken
        // per buffer (the client is sending: it will come).
        var done = buffered
        while done < count {
            let n = poller.wait(idle: true) { socket.readNow(destination! + done, count - done) }
                ?? socket.readSome(destination! + done, count - done)
            if n <= 0 { return false }
            done += n
        }
        return true
    }

    private func discardInput(_ count: Int) -> Bool {
        var left = count
        while left > 0 {
            let n = min(left, Self.inCapacity)
            guard fill(n) else { return false }
            inStart += n
            left -= n
        }
        return true
    }
}
