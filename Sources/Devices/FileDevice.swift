import CAio
import Core
import Glibc
import Synchronization

/// `file(path=..., readonly=false, direct=auto, size=...)`: a raw image file or a block device.
///
/// With O_DIRECT, reads, writes and flushes submitted with `submit` go to the kernel through libaio and
/// complete on a reaper thread, or on the transport's own thread when it collects them
/// (`attachCompletionSource`: the kernel signals an eventfd the ring thread polls beside its
/// rings, so a completion costs no thread hand-over); `read` and `write` are the same
/// operations done synchronously.
/// Discard and write-zeroes are `fallocate` calls, which have no asynchronous form and only
/// change metadata on a file, so they run on the submitting thread.
///
/// O_DIRECT keeps guest data out of the host's page cache (the guest has its own) and makes
/// completion mean "the device has it", not "the page cache has it". It needs buffers, offsets
/// and lengths aligned to the device's direct I/O block; a request whose buffers are not goes
/// through an aligned bounce buffer rather than failing.
///
/// Without O_DIRECT (direct=off, or a file system without it), reads, writes and flushes run on
/// a pool of worker threads instead: io_submit on a buffered file copies the data itself, on the
/// submitting thread, one request after another. Two exceptions save the handoff: reads whose
/// data is in the page cache are done at once (`preadv2(RWF_NOWAIT)`), and a file on a memory
/// file system (tmpfs, ramfs) is served wholly on the submitting thread, since none of its
/// requests waits for a disk (unless the host swaps tmpfs pages out).
///
/// Batching (`batch=true`): while the submitting thread is plugged (``BlockPlug``: a blkif ring
/// sweep, a burst of NBD requests), O_DIRECT requests are held and go to the kernel together in
/// one `io_submit` when the plug is flushed; otherwise (the default) each `submit` calls
/// `io_submit` at once.
public final class FileDevice: SynchronousBlockDevice, BlockPlugTarget, @unchecked Sendable {
    /// Whether to open with O_DIRECT.
    public enum DirectIO: String, Sendable, CaseIterable {
        /// O_DIRECT if the file system supports it, otherwise buffered.
        case auto
        /// O_DIRECT or fail to open.
        case on
        /// Buffered I/O through the page cache.
        case off
    }

    public struct Options: Sendable {
        public var readOnly = false
        public var direct = DirectIO.auto
        /// Create the file with this size if it does not exist or is empty.
        public var createSize: UInt64?
        /// Requests in flight at once; more wait in a queue for a free slot.
        public var queueDepth = 128
        /// O_DIRECT: hold the requests of a plugged batch (``BlockPlug``) and start them in one
        /// `io_submit`. Off by default: on the bench's virtio disk it cost a quarter of the
        /// 4 KiB queue-depth-32 rate (the kernel then dispatches each batch as a burst, where
        /// fio's libaio, which also submits each request at once, keeps the queue full).
        public var batchSubmits = false
        /// Serve a buffered file on tmpfs or ramfs on the submitting thread (see `servesInline`).
        /// Tests turn it off to reach the worker path on a file system that refuses RWF_NOWAIT.
        var inlineOnMemoryFileSystems = true
        public init(readOnly: Bool = false, direct: DirectIO = .auto, createSize: UInt64? = nil, queueDepth: Int = 128) {
            self.readOnly = readOnly; self.direct = direct; self.createSize = createSize; self.queueDepth = queueDepth
        }
    }

    public let name = "file"
    public let path: String
    public let geometry: BlockGeometry
    public let capabilities: BlockCapabilities
    /// Whether the file is open with O_DIRECT.
    public let isDirect: Bool
    public let isBlockDevice: Bool
    public let isReadOnly: Bool
    /// A buffered file on tmpfs or ramfs: every request is a memory copy, done on the submitting
    /// thread (a worker would only add a thread handoff). Large writes are then copied one at a
    /// time per queue rather than by several workers at once.
    public let servesInline: Bool
    /// `batch=true`: O_DIRECT requests of a plugged batch start in one `io_submit`.
    public let batchSubmits: Bool
    /// The memory and length alignment O_DIRECT needs on this file (1 when buffered).
    public let directAlignment: Int

    private let fd: Int32
    /// With O_DIRECT only: buffered files never use libaio (see above), so they hold no
    /// context (it counts against the system's aio-max-nr) and no reaper thread.
    private let aio: AsyncIOContext?
    private let slotCount: Int
    private let slots: UnsafeMutablePointer<Slot>
    private let queue: Mutex<Queue>
    /// Submitted at close: a read of nothing whose completion tells the reaper to stop.
    private let stopRequest = UnsafeMutablePointer<iocb>.allocate(capacity: 1)
    /// Set once the reaper runs (the last step of `init`), with O_DIRECT only.
    private var reaper: PosixThread?
    /// With O_DIRECT: the eventfd every iocb signals when it completes (io_set_eventfd), which
    /// the reaper, or a transport that attached (`attachCompletionSource`), polls; -1 without.
    private let completionEvent: Int32
    /// Wakes the reaper when transports attach or detach, or the stop request was collected.
    private let reaperWake: Int32
    /// Transports collecting completions now: while any does, the reaper leaves them to it.
    private let attachedCollectors = Atomic<Int>(0)
    /// The stop request's completion was collected (by whichever thread).
    private let stopCollected = Atomic<Bool>(false)
    private var isClosed = false
    /// For buffered files (see above), what misses the page cache runs on the transport's
    /// workers; nil with O_DIRECT or inline.
    private let offload: BlockOffload?
    /// Tests only: an errno the reaper's next wait fails with (see `failNextCompletionWait`).
    private let injectedWaitFailure = Atomic<Int32>(0)
    /// Buffered writes waiting for the worker that is writing (``queueWrite(_:_:)``).
    private let writes = Mutex(WriteQueue())
    private struct WriteQueue {
        var pending: [(BlockRequest, BlockCompletion)] = []
        var writing = false
    }
    /// Cleared when the file system refuses RWF_NOWAIT (EOPNOTSUPP, e.g. tmpfs on older
    /// kernels): every read then goes straight to a worker instead of paying a failed call.
    private let pageCacheReads = Atomic<Bool>(true)

    /// One request in flight. The iocb lives here, in memory that never moves, because the
    /// kernel holds on to it from `io_submit` until the completion is reaped.
    private struct Slot {
        var iocb = CAio.iocb()
        var request = BlockRequest(operation: .flush, offset: 0, length: 0)
        var completion: BlockCompletion?
        /// An aligned copy of a request whose buffers O_DIRECT cannot use.
        var bounce: UnsafeMutableRawPointer?
        var bounceVector = iovec()
    }

    private struct Queue {
        var free: [Int]
        /// Requests submitted while every slot was busy, started as slots free up.
        var waiting: [(BlockRequest, BlockCompletion)] = []
        var inFlight = 0
        var stopping = false
        /// Set when completions can no longer be reaped (see `failAll`): every request fails.
        var failure: BlockError?
    }

    /// Opens `path`. Errors name the file and say what failed, e.g.
    /// "file(path=/x): cannot open: No such file or directory".
    public init(path: String, options: Options = Options()) throws(BlockError) {
        self.path = path
        let label = "file(path=\(path))"
        if options.readOnly && options.createSize != nil {
            throw BlockError(.invalid, "\(label): size= creates the file and cannot be used with readonly=true")
        }
        var flags = (options.readOnly ? O_RDONLY : O_RDWR) | O_CLOEXEC
        if options.createSize != nil { flags |= O_CREAT }
        var fd: Int32 = -1
        var direct = options.direct != .off
        if direct {
            fd = open(path, flags | LinuxFile.O_DIRECT, 0o644)
            // EINVAL: this file system has no O_DIRECT (tmpfs before Linux 6.6, ramfs, some FUSE).
            if fd < 0 && errno == EINVAL && options.direct == .auto { direct = false }
            if fd < 0 && errno == EINVAL && options.direct == .on {
                throw BlockError(.notSupported, "\(label): this file system does not support O_DIRECT (use direct=auto or direct=off)")
            }
        }
        if !direct { fd = open(path, flags, 0o644) }
        guard fd >= 0 else { throw BlockError.system("\(label): cannot open", errno: errno) }
        var opened = false
        defer { if !opened { Glibc.close(fd) } }

        var st = stat()
        guard fstat(fd, &st) == 0 else { throw BlockError.system("\(label): cannot stat", errno: errno) }
        let type = st.st_mode & S_IFMT
        guard type == S_IFREG || type == S_IFBLK else {
            throw BlockError(.invalid, "\(label): not a regular file or a block device")
        }
        isBlockDevice = type == S_IFBLK
        var size = UInt64(st.st_size)
        var logical: UInt32 = 512, physical: UInt32 = 4096
        if isBlockDevice {
            var bytes: UInt64 = 0, sector: Int32 = 0, physicalSector: Int32 = 0
            guard ioctl(fd, LinuxFile.BLKGETSIZE64, &bytes) == 0 else { throw BlockError.system("\(label): BLKGETSIZE64", errno: errno) }
            size = bytes
            if ioctl(fd, LinuxFile.BLKSSZGET, &sector) == 0 && sector == 4096 { logical = 4096 }
            if ioctl(fd, LinuxFile.BLKPBSZGET, &physicalSector) == 0 && physicalSector > 4096 { physical = UInt32(physicalSector) }
        } else if size == 0, let createSize = options.createSize {
            guard ftruncate(fd, off_t(createSize)) == 0 else { throw BlockError.system("\(label): cannot set the size", errno: errno) }
            size = createSize
        }
        // The geometry counts whole blocks: a partial block at the end of a file is not served.
        size -= size % UInt64(logical)
        guard size > 0 else { throw BlockError(.invalid, "\(label): the file is empty (give size=... to create it)") }

        self.fd = fd
        isDirect = direct
        isReadOnly = options.readOnly
        servesInline = !direct && !isBlockDevice && options.inlineOnMemoryFileSystems && Self.isOnMemoryFileSystem(fd)
        batchSubmits = options.batchSubmits
        directAlignment = direct ? Self.probeDirectAlignment(fd: fd, logical: Int(logical)) : 1
        geometry = BlockGeometry(size: size, logicalBlockSize: max(logical, UInt32(directAlignment)), physicalBlockSize: physical)
        capabilities = options.readOnly ? (isBlockDevice ? [.multiConn] : [.extents, .multiConn])
            : (isBlockDevice ? BlockCapabilities.all.subtracting(.extents) : .all)

        if direct {
            do throws(SystemCallError) {
                aio = try AsyncIOContext(depth: options.queueDepth)
            } catch {
                throw BlockError.system("\(label): \(error.call)", errno: error.errno)
            }
            completionEvent = caio_eventfd()
            reaperWake = caio_eventfd()
            guard completionEvent >= 0, reaperWake >= 0 else {
                let e = errno
                if completionEvent >= 0 { Glibc.close(completionEvent) }
                if reaperWake >= 0 { Glibc.close(reaperWake) }
                throw BlockError.system("\(label): eventfd", errno: e)
            }
        } else {
            aio = nil
            completionEvent = -1
            reaperWake = -1
        }
        offload = direct || servesInline ? nil : BlockOffload()
        slotCount = options.queueDepth
        slots = .allocate(capacity: options.queueDepth)
        slots.initialize(repeating: Slot(), count: options.queueDepth)
        var free = [Int]()
        free.reserveCapacity(options.queueDepth)
        free.append(contentsOf: (0..<options.queueDepth).reversed())
        queue = Mutex(Queue(free: free))
        opened = true
        guard aio != nil else { return }

        // The reaper thread owns io_getevents: a transport thread that submits never blocks on
        // a completion, and completions are delivered as soon as the kernel posts them. `close`
        // joins it, so it need not hold the device. If it cannot start, the open fails (and
        // `deinit`, run for the failed initialiser, closes the file).
        do throws(ThreadStartError) {
            reaper = try PosixThread("\(label)'s completions") { [unowned(unsafe) self] in reap() }
        } catch {
            throw BlockError.system("\(label): cannot start the completion thread", errno: error.errno)
        }
    }

    deinit {
        close()
        slots.deinitialize(count: slotCount)
        slots.deallocate()
        stopRequest.deallocate()
    }

    /// tmpfs or ramfs (their statfs magic numbers, from linux/magic.h).
    private static func isOnMemoryFileSystem(_ fd: Int32) -> Bool {
        var fs = statfs()
        guard fstatfs(fd, &fs) == 0 else { return false }
        return fs.f_type == 0x0102_1994 || fs.f_type == 0x8584_58f6
    }

    /// The smallest O_DIRECT block this file accepts: the logical block size, or 4096 if a
    /// 512-byte direct read fails with EINVAL (a file system on a 4K-sector disk).
    private static func probeDirectAlignment(fd: Int32, logical: Int) -> Int {
        guard logical < 4096 else { return logical }
        guard let buffer = alignedAllocate(4096) else { return 4096 }
        defer { free(buffer) }
        return pread(fd, buffer, logical, 0) < 0 && errno == EINVAL ? 4096 : logical
    }

    private static func alignedAllocate(_ count: Int) -> UnsafeMutableRawPointer? {
        var memory: UnsafeMutableRawPointer?
        return posix_memalign(&memory, 4096, max(count, 1)) == 0 ? memory : nil
    }

    private func error(_ operation: String, _ errno: Int32) -> BlockError {
        BlockError.system("file(path=\(path)): \(operation)", errno: errno)
    }

    private func checkWritable() throws(BlockError) {
        if isReadOnly { throw BlockError(.readOnly, "file(path=\(path)): opened with readonly=true") }
    }

    /// Whether O_DIRECT can use `buffers` as they are: every address and length a multiple of
    /// the direct I/O block (a 512-byte-aligned address inside a page is enough for most disks).
    private func directCanUse(_ buffers: IOBuffers) -> Bool {
        guard isDirect else { return true }
        for buffer in buffers where Int(bitPattern: buffer.baseAddress) % directAlignment != 0 || buffer.count % directAlignment != 0 {
            return false
        }
        return true
    }

    // MARK: Asynchronous path (libaio)

    public func submit(_ request: BlockRequest, completion: BlockCompletion) {
        switch request.operation {
        case .discard, .writeZeroes:
            completion.complete(performSynchronously(request))
            return
        case .write where isReadOnly:
            completion.complete(.failure(BlockError(.readOnly, "file(path=\(path)): opened with readonly=true")))
            return
        default: break
        }
        if servesInline { completion.complete(performSynchronously(request)); return }
        if let offload {
            // Data already in the page cache is copied here and now; the rest waits for a worker.
            if readFromPageCache(request) { completion.complete(.success); return }
            if request.operation == .write && !request.fua && !request.callerMayWait && !BlockWorkers.onWorkerThread {
                return queueWrite(request, completion)
            }
            offload.serve(request, completion) { self.performSynchronously(request) }
            return
        }
        let slot: Result<Int, BlockError>? = queue.withLock { queue in
            if let failure = queue.failure { return .failure(failure) }
            guard let slot = queue.free.popLast() else {
                queue.waiting.append((request, completion))
                return nil
            }
            queue.inFlight += 1
            // Under the lock, as every change of a slot's completion: `failAll` takes them.
            slots[slot].request = request
            slots[slot].completion = completion
            return .success(slot)
        }
        switch slot {
        case .success(let slot): start(slot)
        case .failure(let error): completion.complete(.failure(error))
        case nil: break
        }
    }

    /// Field offsets in a slot, computed once (a key path offset is a runtime call).
    private static let iocbOffset = MemoryLayout<Slot>.offset(of: \Slot.iocb)!
    private static let bounceVectorOffset = MemoryLayout<Slot>.offset(of: \Slot.bounceVector)!

    /// Submits the request the slot holds to the kernel.
    private func start(_ index: Int) {
        let slot = slots + index
        let request = slot.pointee.request
        let iocb = UnsafeMutableRawPointer(slot).advanced(by: Self.iocbOffset)
            .assumingMemoryBound(to: CAio.iocb.self)
        let data = UnsafeMutableRawPointer(bitPattern: index + 1)  // 0 is the stop request
        switch request.operation {
        case .read, .write:
            var vectors = UnsafePointer(request.buffers.vectors)
            var count = request.buffers.count
            if !directCanUse(request.buffers) {
                guard let bounce = Self.alignedAllocate(Int(request.length)) else {
                    return finish(index, result: -Int(ENOMEM))
                }
                if request.operation == .write { request.buffers.copy(to: bounce, count: Int(request.length)) }
                slot.pointee.bounce = bounce
                slot.pointee.bounceVector = iovec(iov_base: bounce, iov_len: Int(request.length))
                vectors = UnsafeRawPointer(slot).advanced(by: Self.bounceVectorOffset)
                    .assumingMemoryBound(to: iovec.self)
                count = 1
            }
            // FUA as RWF_DSYNC on the write itself: durable when it completes, no second request.
            AsyncIOContext.prepare(iocb, request.operation == .read ? .read : .write, fd: fd, vectors: vectors, count: count,
                                   offset: request.offset, rwFlags: request.fua ? LinuxFile.RWF_DSYNC : 0, data: data)
        default:
            AsyncIOContext.prepare(iocb, .dataSync, fd: fd, data: data)
        }
        io_set_eventfd(iocb, completionEvent)
        if batchSubmits, let plug = BlockPlug.current { return plug.hold(UnsafeMutableRawPointer(iocb), for: self) }
        do throws(SystemCallError) {
            // Only O_DIRECT files reach here: buffered ones are served inline or by workers.
            try aio!.submit(iocb)
        } catch {
            finish(index, result: -Int(error.errno))
        }
    }

    /// The iocbs `start` held while its thread was plugged, in one `io_submit` (more if the
    /// kernel takes a prefix). An iocb the kernel refuses fails alone, as it would unplugged.
    public func startHeld(_ items: UnsafeBufferPointer<UnsafeMutableRawPointer>) {
        if offload != nil {   // buffered: the items are `heldWrite`s
            return BlockPlug.flushCallerMayWait ? writeQueuedHere() : startWriterIfIdle()
        }
        guard let aio, !items.isEmpty else { return }
        withUnsafeTemporaryAllocation(of: UnsafeMutablePointer<iocb>?.self, capacity: items.count) { list in
            for k in items.indices { list[k] = items[k].assumingMemoryBound(to: iocb.self) }
            var done = 0
            while done < items.count {
                do throws(SystemCallError) {
                    let taken = try aio.submit(list.baseAddress! + done, count: items.count - done)
                    if taken == 0 { throw SystemCallError("io_submit", errno: EAGAIN) }
                    done += taken
                } catch {
                    // io_submit reports the error of the first iocb it could not take.
                    finish(Int(bitPattern: list[done]!.pointee.data) - 1, result: -Int(error.errno))
                    done += 1
                }
            }
        }
    }

    /// The reaper thread: waits for completions and collects them while no transport does,
    /// until `close`'s stop request is collected and nothing is in flight.
    private func reap() {
        var fds = [pollfd(fd: completionEvent, events: Int16(POLLIN), revents: 0),
                   pollfd(fd: reaperWake, events: Int16(POLLIN), revents: 0)]
        while !(stopCollected.load(ordering: .acquiring) && queue.withLock({ $0.inFlight == 0 })) {
            // A negative descriptor is skipped by poll: while a transport collects, only a
            // wake-up (attach, detach, the stop collected elsewhere) concerns this thread.
            let collecting = attachedCollectors.load(ordering: .acquiring) == 0
            fds[0].fd = collecting ? completionEvent : -1
            fds[0].revents = 0; fds[1].revents = 0
            if poll(&fds, 2, -1) < 0 && errno != EINTR {
                return failAll(SystemCallError("poll", errno: errno))
            }
            if fds[1].revents != 0 { var v: UInt64 = 0; _ = Glibc.read(reaperWake, &v, 8) }
            if collecting && fds[0].revents != 0 && !collect() { return }
        }
    }

    /// Delivers the completions the kernel has posted, on the calling thread (the reaper, or a
    /// transport's); false once completions can no longer be collected (`failAll` ran).
    @discardableResult
    private func collect() -> Bool {
        guard let aio else { return true }
        // Reset the eventfd first: a completion posted after this signals it again.
        var signalled: UInt64 = 0
        _ = Glibc.read(completionEvent, &signalled, 8)
        return withUnsafeTemporaryAllocation(of: io_event.self, capacity: 32) { events -> Bool in
            while true {
                let count: Int
                do throws(SystemCallError) {
                    count = try aio.reap(into: events, minimum: 0)
                    let injected = injectedWaitFailure.exchange(0, ordering: .relaxed)
                    if injected != 0 { throw SystemCallError("io_getevents", errno: injected) }
                } catch {
                    failAll(error)
                    return false
                }
                for event in events[0..<count] {
                    let tag = Int(bitPattern: event.data)
                    if tag == 0 {
                        stopCollected.store(true, ordering: .releasing)
                        wakeReaper()
                        continue
                    }
                    finish(tag - 1, result: Int(bitPattern: event.res))
                }
                if count < events.count { return true }
            }
        }
    }

    private func wakeReaper() {
        var one: UInt64 = 1
        _ = Glibc.write(reaperWake, &one, 8)
    }

    /// O_DIRECT files: the transport's thread polls the completion eventfd beside its rings and
    /// collects the completions itself; the reaper steps aside until it detaches.
    public func attachCompletionSource() -> BlockCompletionSource? {
        guard aio != nil else { return nil }
        attachedCollectors.wrappingAdd(1, ordering: .acquiringAndReleasing)
        wakeReaper()
        return BlockCompletionSource(fileDescriptor: completionEvent, collect: { [unowned(unsafe) self] in collect() },
                                     detach: { [unowned(unsafe) self] in
            attachedCollectors.wrappingSubtract(1, ordering: .acquiringAndReleasing)
            wakeReaper()
        }, ready: { [unowned(unsafe) aio] in aio!.hasCompletions })
    }

    /// io_getevents failed (EFAULT or EINVAL: a bug, not an I/O error, but the daemon serves
    /// other devices and must not trap): no completion can be reaped any more, and none names
    /// its request, so every request in flight or waiting fails with EIO, and so does every
    /// later one, until the device is closed. The slots in flight stay taken: the kernel may
    /// still hold their iocbs (io_destroy waits for them).
    private func failAll(_ error: SystemCallError) {
        let failure = BlockError(.io, errno: EIO, "file(path=\(path)): \(error): the device fails every request until it is reopened")
        let failed: [BlockCompletion] = queue.withLock { queue in
            queue.failure = failure
            var failed = queue.waiting.map(\.1)
            queue.waiting = []
            for i in 0..<slotCount {
                if let completion = slots[i].completion { failed.append(completion) }
                slots[i].completion = nil
            }
            return failed
        }
        fputs("softdev: \(failure.message) (\(failed.count) requests failed)\n", stderr)
        for completion in failed { completion.complete(.failure(failure)) }
    }

    /// Tests only: the reaper's next wait for completions fails with `errno` once it returns
    /// (what it reaped is lost), as io_getevents would on a bug; nothing else makes it fail on
    /// demand.
    func failNextCompletionWait(errno: Int32) {
        injectedWaitFailure.store(errno, ordering: .relaxed)
    }

    /// Completes the request in slot `index` whose kernel result was `result` (bytes or -errno),
    /// frees the slot and starts a waiting request in it.
    private func finish(_ index: Int, result: Int) {
        let slot = slots + index
        let request = slot.pointee.request
        let outcome: BlockResult
        switch request.operation {
        case .read, .write:
            outcome = finishTransfer(request, bounce: slot.pointee.bounce, result: result)
        default:
            if result >= 0 {
                outcome = .success
            } else if -result == Int(EINVAL) {
                // This file system has no asynchronous fdsync: do it here.
                outcome = performSynchronously(request)
            } else {
                outcome = .failure(error("flush", Int32(-result)))
            }
        }
        if let bounce = slot.pointee.bounce {
            free(bounce)
            slot.pointee.bounce = nil
        }
        // Free the slot before completing, so that a transport that submits from its
        // completion finds one.
        let (completion, startNext): (BlockCompletion?, Bool) = queue.withLock { queue in
            // None: `failAll` has failed this request already; the slot stays taken.
            guard let completion = slot.pointee.completion else { return (nil, false) }
            slot.pointee.completion = nil
            if !queue.waiting.isEmpty {
                (slot.pointee.request, slot.pointee.completion) = queue.waiting.removeFirst()
                return (completion, true)
            }
            queue.free.append(index)
            queue.inFlight -= 1
            return (completion, false)
        }
        completion?.complete(outcome)
        if startNext { start(index) }
    }

    /// A read or write the kernel has finished with `result`: complete, short or failed.
    private func finishTransfer(_ request: BlockRequest, bounce: UnsafeMutableRawPointer?, result: Int) -> BlockResult {
        let write = request.operation == .write
        do throws(BlockError) {
            if result == Int(request.length) {
                if let bounce, !write { request.buffers.copy(from: bounce, count: result) }
            } else if result >= 0 && bounce == nil {
                // Short: the end of a file that shrank, or a full disk part way. Carry on from
                // where the kernel stopped; the synchronous loop reports why it cannot go on.
                try transfer(write: write, request.buffers, at: request.offset, skipping: result, fua: request.fua)
            } else if result >= 0 || -result == Int(EINVAL) {
                // Short through the bounce buffer, or EINVAL (an alignment the probe missed, or a
                // kernel without RWF_DSYNC): do it all again synchronously; the same bytes at the
                // same place, so repeating the part that was done is harmless.
                try transfer(write: write, request.buffers, at: request.offset, fua: request.fua)
            } else {
                throw error(write ? "write" : "read", Int32(-result))
            }
            return .success
        } catch {
            return .failure(error)
        }
    }

    // MARK: Synchronous path

    public func read(into buffers: IOBuffers, at offset: UInt64) throws(BlockError) {
        try transfer(write: false, buffers, at: offset, fua: false)
    }

    public func write(from buffers: IOBuffers, at offset: UInt64, fua: Bool) throws(BlockError) {
        try checkWritable()
        try transfer(write: true, buffers, at: offset, fua: fua)
    }

    /// preadv/pwritev until every byte is done, through an aligned copy if O_DIRECT cannot use
    /// `buffers`, skipping the first `skipping` bytes (already done).
    private func transfer(write: Bool, _ buffers: IOBuffers, at offset: UInt64, skipping: Int = 0, fua: Bool) throws(BlockError) {
        let length = buffers.byteCount
        if !directCanUse(buffers) || skipping % directAlignment != 0 {
            guard let bounce = Self.alignedAllocate(length) else { throw error(write ? "write" : "read", ENOMEM) }
            defer { free(bounce) }
            var vector = iovec(iov_base: bounce, iov_len: length)
            if write { buffers.copy(to: bounce, count: length) }
            try withUnsafeMutablePointer(to: &vector) { (v) throws(BlockError) in
                try loop(write: write, v, count: 1, at: offset, skipping: 0)
            }
            if !write { buffers.copy(from: bounce, count: length) }
        } else {
            // A private copy of the iovecs, which the loop advances past what is done.
            try withUnsafeTemporaryAllocation(of: iovec.self, capacity: max(buffers.count, 1)) { (copy) throws(BlockError) in
                for i in 0..<buffers.count { copy[i] = buffers.vectors![i] }
                try loop(write: write, copy.baseAddress!, count: buffers.count, at: offset, skipping: skipping)
            }
        }
        if write && fua { try flush() }
    }

    private func loop(write: Bool, _ vectors: UnsafeMutablePointer<iovec>, count: Int, at offset: UInt64, skipping: Int) throws(BlockError) {
        var first = 0
        var pending = skipping  // bytes to step over before the next call
        var position = offset + UInt64(skipping)
        while true {
            while first < count && vectors[first].iov_len <= pending {
                pending -= vectors[first].iov_len
                first += 1
            }
            if first == count { return }
            if pending > 0 {
                vectors[first].iov_base = vectors[first].iov_base! + pending
                vectors[first].iov_len -= pending
            }
            let done = write ? pwritev(fd, vectors + first, Int32(count - first), off_t(position))
                             : preadv(fd, vectors + first, Int32(count - first), off_t(position))
            if done < 0 && errno == EINTR { pending = 0; continue }
            if done < 0 { throw error(write ? "write" : "read", errno) }
            if done == 0 {
                // A read at the end of a file that shrank under us, or a write that made no progress.
                throw write ? error("write", ENOSPC)
                            : BlockError(.io, "file(path=\(path)): read: unexpected end of file at offset \(position)")
            }
            position += UInt64(done)
            pending = done
        }
    }

    public func flush() throws(BlockError) {
        while fdatasync(fd) != 0 {
            if errno != EINTR { throw error("flush", errno) }
        }
    }

    /// Punches a hole (files) or discards the blocks (block devices). A file system without hole
    /// punching ignores the request: discard is a hint, and the data must stay readable anyway.
    public func discard(at offset: UInt64, length: UInt64) throws(BlockError) {
        try checkWritable()
        var failed: Bool
        if isBlockDevice {
            var range: (UInt64, UInt64) = (offset, length)
            failed = ioctl(fd, LinuxFile.BLKDISCARD, &range) != 0
        } else {
            failed = LinuxFile.fallocate(fd, LinuxFile.FALLOC_FL_PUNCH_HOLE | LinuxFile.FALLOC_FL_KEEP_SIZE, offset, length) != 0
        }
        if failed && errno != EOPNOTSUPP && errno != ENOSYS { throw error("discard", errno) }
    }

    /// A punched hole if allowed, else an allocated zeroed range, else writes of zeroes.
    public func writeZeroes(at offset: UInt64, length: UInt64, mayDiscard: Bool) throws(BlockError) {
        try checkWritable()
        let keep = LinuxFile.FALLOC_FL_KEEP_SIZE
        if mayDiscard && LinuxFile.fallocate(fd, LinuxFile.FALLOC_FL_PUNCH_HOLE | keep, offset, length) == 0 { return }
        if LinuxFile.fallocate(fd, LinuxFile.FALLOC_FL_ZERO_RANGE | keep, offset, length) == 0 { return }
        guard [EOPNOTSUPP, ENOSYS, EINVAL, ENODEV].contains(errno) else { throw error("write-zeroes", errno) }
        try writeZeroesByWriting(at: offset, length: length)
    }

    /// SEEK_DATA/SEEK_HOLE on a file; a block device is all data.
    public func extents(at offset: UInt64, length: UInt64) throws(BlockError) -> [BlockExtent] {
        let end = min(offset + length, geometry.size)
        guard !isBlockDevice else { return [BlockExtent(offset: offset, length: end - offset, isHole: false, isZero: false)] }
        var extents: [BlockExtent] = []
        var position = offset
        while position < end {
            let data = lseek(fd, off_t(position), LinuxFile.SEEK_DATA)
            if data < 0 && errno != ENXIO { throw error("extents", errno) }
            // ENXIO: no data after `position`, the rest is a hole.
            let dataStart = data < 0 ? end : min(UInt64(data), end)
            if dataStart > position {
                extents.append(BlockExtent(offset: position, length: dataStart - position, isHole: true, isZero: true))
                position = dataStart
                continue
            }
            let hole = lseek(fd, off_t(position), LinuxFile.SEEK_HOLE)
            if hole < 0 { throw error("extents", errno) }
            let dataEnd = min(UInt64(hole), end)
            extents.append(BlockExtent(offset: position, length: dataEnd - position, isHole: false, isZero: false))
            position = dataEnd
        }
        return extents
    }

    /// A buffered read whose bytes are all in the page cache, done on the calling thread:
    /// preadv2 with RWF_NOWAIT answers EAGAIN (or reads short) rather than wait for the disk,
    /// and then the caller hands the request to a worker. Saves a thread handoff per hit.
    private func readFromPageCache(_ request: BlockRequest) -> Bool {
        guard request.operation == .read, request.buffers.count > 0, let vectors = request.buffers.vectors,
              pageCacheReads.load(ordering: .relaxed) else { return false }
        let done = preadv2(fd, vectors, Int32(request.buffers.count), off_t(request.offset), LinuxFile.RWF_NOWAIT)
        if done < 0 && errno == EOPNOTSUPP { pageCacheReads.store(false, ordering: .relaxed) }
        return done == Int(request.length)
    }

    /// A buffered write (not FUA), written by one worker at a time: the worker that is writing
    /// takes every write queued meanwhile, so a deep queue of small writes keeps one thread busy
    /// rather than waking one per write to wait on the file's inode lock (a buffered write
    /// holds it on ext4 and XFS). FUA writes go to workers of their own: their syncs overlap.
    /// A plugged thread's writes (a ring sweep, an NBD burst) wait for its plug's flush: an NBD
    /// reader that flushes before it waits for its client writes the burst itself then, unless
    /// a worker is writing (``writeQueuedHere()``); other threads hand it to a worker.
    private func queueWrite(_ request: BlockRequest, _ completion: BlockCompletion) {
        let plug = BlockPlug.current
        let start = writes.withLock { q -> Bool in
            q.pending.append((request, completion))
            if q.writing || plug != nil { return false }
            q.writing = true
            return true
        }
        if let plug { return plug.hold(Self.heldWrite, for: self) }
        if start { startWriter() }
    }

    /// What a plugged thread holds for a buffered write (the write itself is in `writes`).
    private static let heldWrite = UnsafeMutableRawPointer(bitPattern: 1)!

    /// At a plug's flush: the queued writes, by a worker, unless one is writing already.
    private func startWriterIfIdle() {
        let start = writes.withLock { q -> Bool in
            if q.writing || q.pending.isEmpty { return false }
            q.writing = true
            return true
        }
        if start { startWriter() }
    }

    /// At the flush of a thread that would wait anyway (an NBD reader whose client waits for
    /// the burst's replies): the writes queued now, written and completed on this thread, unless
    /// a worker is writing; what is queued meanwhile goes to a worker. Handing every burst to
    /// a worker cost half again the CPU per write on a 2-CPU machine (the worker's and the
    /// reader's wake-ups; NBD 4 KiB writes at queue depth 32: 48-64k IOPS, against 70-86k
    /// written here, in alternating runs).
    private func writeQueuedHere() {
        var batch: [(BlockRequest, BlockCompletion)] = []
        let mine = writes.withLock { q -> Bool in
            if q.writing || q.pending.isEmpty { return false }
            q.writing = true
            swap(&batch, &q.pending)
            return true
        }
        guard mine else { return }
        for (request, completion) in batch { completion.complete(performSynchronously(request)) }
        let more = writes.withLock { q -> Bool in
            if !q.pending.isEmpty { return true }
            q.writing = false
            return false
        }
        if more { startWriter() }
    }

    /// The worker that writes the queued writes, until none is left; `writes.writing` is set.
    private func startWriter() {
        guard let offload else { return }
        offload.run { [self] in
            var batch: [(BlockRequest, BlockCompletion)] = []
            while true {
                writes.withLock { q in swap(&batch, &q.pending) }
                for (request, completion) in batch.dropLast() { completion.complete(performSynchronously(request)) }
                let (request, completion) = batch[batch.count - 1]
                let result = performSynchronously(request)
                batch.removeAll(keepingCapacity: true)
                // The last write completes after the device counts the worker done (its
                // completion may lead to the device's close); the others here and now.
                let last = writes.withLock { q -> Bool in
                    if !q.pending.isEmpty { return false }
                    q.writing = false
                    return true
                }
                if last { return { completion.complete(result) } }
                completion.complete(result)
            }
        }
    }

    /// Waits for the requests in flight, stops the reaper and closes the file.
    public func close() {
        let alreadyClosed = queue.withLock { queue in
            defer { queue.stopping = true }
            return queue.stopping
        }
        if alreadyClosed { return }
        offload?.waitUntilIdle()   // what was submitted has run
        if let aio, let reaper {
            // A read of no bytes completes at once, last; whichever thread collects it tells the
            // reaper, which stops once the requests in flight are done. (Transports have
            // detached by now: the device is closed after their rings stopped.)
            AsyncIOContext.prepare(stopRequest, .read, fd: fd, data: nil)
            io_set_eventfd(stopRequest, completionEvent)
            do throws(SystemCallError) {
                try aio.submit(stopRequest)
                reaper.join()
            } catch {
                // The reaper cannot be woken; leave it blocked rather than free what it uses.
                return
            }
        }
        if completionEvent >= 0 { Glibc.close(completionEvent); Glibc.close(reaperWake) }
        Glibc.close(fd)
    }
}

extension FileDevice {
    public static let descriptor = DeviceDescriptor(
        name: "file", kind: .device,
        summary: "A raw image file or a block device, with asynchronous I/O (libaio) and O_DIRECT.",
        parameters: [
            DeviceParameter("path", required: true, "The image file or block device."),
            DeviceParameter("readonly", "true to refuse writes (default false)."),
            DeviceParameter("direct", "auto (O_DIRECT where the file system has it), on, or off (page cache). Default auto."),
            DeviceParameter("size", "Create the file with this size (e.g. 10G) if it does not exist or is empty."),
            DeviceParameter("batch", "true to start each batch of a transport (a blkif ring sweep, an NBD burst) in one io_submit (O_DIRECT only; default false: each request at once)."),
        ],
        open: { parameters, _ throws(DeviceSpecError) in
            let path = try parameters.required("path")
            let direct = try parameters.choice("direct", FileDevice.DirectIO.allCases.map(\.rawValue), default: "auto")
            var options = Options(readOnly: try parameters.bool("readonly", default: false),
                                  direct: DirectIO(rawValue: direct)!,
                                  createSize: try parameters.size("size"))
            options.batchSubmits = try parameters.bool("batch", default: false)
            return try DeviceSpecError.opening { () throws(BlockError) in try FileDevice(path: path, options: options) }
        })
}
