import CCrypto
import Core
import Glibc
import Synchronization

/// `crypt(keyfile=PATH)` or `crypt(passphrase=...)`: the plaintext of a LUKS1 volume stored on
/// the device below, as qemu's luks driver, nbdkit's luks filter and dm-crypt serve it. The
/// header is read and checked at open, each active key slot is tried with the passphrase, and
/// the payload's sectors are encrypted with AES-XTS from libgcrypt (or AES-CBC with ESSIV or
/// plain64 IVs from OpenSSL's libcrypto), each 512-byte sector with its number from the
/// payload's start as its IV (plain64).
///
/// - Reads go down into the request's own buffers and are decrypted there when they complete.
/// - Writes are encrypted into a buffer of the filter's (the caller's data is never changed),
///   256 KiB at a time; a larger write goes down in 256 KiB pieces, one after another (pieces
///   that stay in the cache between the cipher and the write below: 1 MiB pieces made 1 MiB
///   writes 0.53-0.59 of the plain file's rate in the bench, 256 KiB pieces 0.64-0.77).
/// - A request (or write piece) of 128 KiB or more is ciphered on every core at once
///   (``ParallelSectorCipher``): the thread that has it (for a read, the thread that completed
///   it below: a file's completion thread, the transport's ring or connection thread) ciphers
///   its share and goes on without waiting for the helpers; whichever finishes last completes
///   the read or submits the write piece.
/// - Each request in flight borrows a ``CryptRequest`` from a pool: its cipher handles (one
///   per direction, keyed once) and its buffer, so that nothing is allocated per request once
///   the pool has grown to the deepest queue seen.
/// - Smaller requests are ciphered on the thread that has them (a handoff would cost more).
/// - Flush and FUA pass through. Write-zeroes writes encrypted zeroes (a hole below would
///   decrypt to noise, and would show where the guest's data is not). Discard is refused
///   unless `discard=on`, dm-crypt's `allow_discards`: a discarded range reads back as noise
///   (which NBD and blkif allow) and the device below learns which blocks are free. qemu's luks
///   driver always passes discard down; dm-crypt does not by default; we follow dm-crypt.
/// - Extents are not passed up: a hole below is not zero above.
/// - `close` wipes the master key and frees the cipher handles (the libraries wipe their key schedules).
public final class CryptFilter: BlockFilter, @unchecked Sendable {
    public override var name: String { "crypt" }
    public let header: LUKSHeader
    public let cipher: LUKSCipherSpec
    /// The key slot the passphrase opened.
    public let unlockedSlot: Int
    /// Where the payload starts on the device below, in bytes.
    public let payloadStart: UInt64
    public let allowDiscard: Bool
    private let payload: BlockGeometry
    private var masterKey: SecretBytes?
    private let pool = Mutex<[CryptRequest]>([])
    /// Large requests are ciphered on several cores at once.
    let crew: ParallelSectorCipher
    /// The largest piece of a write that goes down at once (and the most a request's buffer holds).
    static let chunkBytes = 256 << 10

    /// Opens the LUKS1 volume on `next` with `passphrase`. Errors name `label` (the file below)
    /// and, for a bad header, the offset of the field at fault.
    public init(next: any BlockDevice, passphrase: SecretBytes, allowDiscard: Bool = false, label: String? = nil) throws(BlockError) {
        let label = label ?? next.formatLabel
        let storage = LUKSStorage.device(next, label: label)
        header = try LUKSVolume.readHeader(storage)
        cipher = try LUKSCipherSpec(cipherName: header.cipherName, mode: header.cipherMode, keyBytes: Int(header.keyBytes))
        let (key, slot) = try LUKSVolume.unlock(header, storage: storage, passphrase: passphrase)
        masterKey = key
        unlockedSlot = slot
        payloadStart = UInt64(header.payloadOffset) * 512
        let below = next.geometry
        guard payloadStart % UInt64(below.logicalBlockSize) == 0 else {
            throw BlockError(.invalid, "\(label): the LUKS payload offset \(payloadStart) is not a multiple of the device's \(below.logicalBlockSize)-byte blocks")
        }
        let size = (below.size - payloadStart) / UInt64(below.logicalBlockSize) * UInt64(below.logicalBlockSize)
        payload = BlockGeometry(size: size, logicalBlockSize: below.logicalBlockSize, physicalBlockSize: below.physicalBlockSize)
        self.allowDiscard = allowDiscard
        crew = try ParallelSectorCipher(spec: cipher, key: key, helpers: ParallelSectorCipher.defaultHelpers)
        super.init(next: next)
        // One request's worth of contexts now, so that a bad key fails at open.
        let first = try CryptRequest(filter: self, key: key)
        pool.withLock { $0.append(first) }
    }

    public override var geometry: BlockGeometry { payload }
    public override var capabilities: BlockCapabilities {
        var caps = next.capabilities.subtracting([.extents, .discard])
        if allowDiscard && next.capabilities.contains(.discard) { caps.insert(.discard) }
        if caps.contains(.write) { caps.insert(.writeZeroes) }
        return caps
    }

    public override func extents(at offset: UInt64, length: UInt64) throws(BlockError) -> [BlockExtent] {
        [BlockExtent(offset: offset, length: length, isHole: false, isZero: false)]
    }

    public override func submit(_ request: BlockRequest, completion: BlockCompletion) {
        switch request.operation {
        case .flush:
            return next.submit(request, completion: completion)
        case .discard:
            guard allowDiscard else {
                return completion.complete(.failure(BlockError(.notSupported, "crypt: discard is off (discard=on passes it down)")))
            }
            fallthrough
        default:
            guard request.offset <= payload.size, request.length <= payload.size - request.offset else {
                return completion.complete(.failure(BlockError(.outOfRange, "crypt: \(request.offset)+\(request.length) is past the end of the \(payload.size)-byte payload")))
            }
        }
        if request.operation == .discard {
            var moved = request
            moved.offset += payloadStart
            return next.submit(moved, completion: completion)
        }
        let worker: CryptRequest
        do { worker = try acquire() } catch { return completion.complete(.failure(error)) }
        worker.start(request, completion: completion)
    }

    private func acquire() throws(BlockError) -> CryptRequest {
        if let worker = pool.withLock({ $0.popLast() }) { return worker }
        guard let key = masterKey else { throw BlockError(.io, "crypt: the device is closed") }
        return try CryptRequest(filter: self, key: key)
    }

    fileprivate func release(_ worker: CryptRequest) {
        pool.withLock { $0.append(worker) }
    }

    /// Wipes the master key and frees every idle request's contexts, then closes the device below.
    public override func close() {
        masterKey = nil
        pool.withLock { $0.removeAll() }
        crew.stop()
        super.close()
    }
}

/// One request in flight through a ``CryptFilter``: the contexts it encrypts and decrypts with,
/// its buffer, and where it is. Lent by the filter's pool for the life of one request.
final class CryptRequest: BlockCompletionSink, SectorCipherClient, @unchecked Sendable {
    private unowned let filter: CryptFilter
    private let encryptor: LUKSSectorCipher
    private let decryptor: LUKSSectorCipher
    private var buffer: UnsafeMutableRawPointer?
    private var capacity = 0
    private let vector = UnsafeMutablePointer<iovec>.allocate(capacity: 1)

    private var completion: BlockCompletion?
    private var operation = BlockOperation.read
    private var buffers = IOBuffers.empty
    private var offset: UInt64 = 0
    private var length: UInt64 = 0
    private var fua = false
    private var done: UInt64 = 0
    private var piece: UInt64 = 0
    private var pieceResult = BlockResult.success
    /// 0 while a piece is being submitted, 1 once submit returned first, 2 once it completed first.
    private let phase = Atomic<Int>(0)

    init(filter: CryptFilter, key: SecretBytes) throws(BlockError) {
        self.filter = filter
        encryptor = try LUKSSectorCipher(spec: filter.cipher, key: key, encrypt: true)
        decryptor = try LUKSSectorCipher(spec: filter.cipher, key: key, encrypt: false)
    }

    deinit {
        if let buffer { ccrypto_wipe(buffer, capacity); free(buffer) }
        vector.deallocate()
    }

    func start(_ request: BlockRequest, completion: BlockCompletion) {
        self.completion = completion
        operation = request.operation
        offset = request.offset; length = request.length; fua = request.fua
        buffers = request.buffers
        done = 0
        if operation == .read {
            var down = request
            down.offset += filter.payloadStart
            filter.next.submit(down, completion: BlockCompletion(sink: self, tag: 1))
        } else if length == 0 {
            finish(.success)
        } else {
            pump(callerMayWait: request.callerMayWait)
        }
    }

    func complete(tag: UInt64, result: BlockResult) {
        if tag == 1 {
            // A read: decrypt in place, on the helpers if it is large (`ciphered` finishes it).
            guard result == .success else { return finish(result) }
            if filter.crew.splits(Int(length)) && wholeSectors {
                let outcome = filter.crew.start(encrypt: false, buffers, at: 0, count: Int(length), into: nil, first: offset / 512,
                                                local: decryptor, client: self)
                guard case .done(let ok) = outcome else { return }
                return finish(ok ? .success : Self.decryptFailure)
            }
            return finish(decryptRead() ? .success : Self.decryptFailure)
        }
        pieceResult = result
        // Completed while `pump` was still in submit: pump goes on.
        if phase.compareExchange(expected: 0, desired: 2, ordering: .acquiringAndReleasing).exchanged { return }
        if advance() { pump(callerMayWait: false) }
    }

    /// A helper finished the last part of a large read's decryption, or of a write piece's encryption.
    func ciphered(ok: Bool) {
        if operation == .read { return finish(ok ? .success : Self.decryptFailure) }
        guard ok else { return finish(Self.encryptFailure) }
        if submitPiece(callerMayWait: false) && advance() { pump(callerMayWait: false) }
    }

    private static let decryptFailure = BlockResult.failure(BlockError(.io, "crypt: the cipher library failed to decrypt"))
    private static let encryptFailure = BlockResult.failure(BlockError(.io, "crypt: the cipher library failed to encrypt"))

    /// Every buffer of the request holds whole sectors (so any sector of it lies in one).
    private var wholeSectors: Bool { buffers.allSatisfy { $0.count % 512 == 0 } }

    /// Encrypts and submits the pieces of a write or write-zeroes, one at a time; a piece that
    /// completes inside `submit` loops here rather than recursing.
    private func pump(callerMayWait: Bool) {
        var mayWait = callerMayWait
        while true {
            let n = Int(min(UInt64(CryptFilter.chunkBytes), length - done))
            piece = UInt64(n)
            if filter.crew.splits(n) {
                // The helper that finishes last submits it (`ciphered`), unless we did.
                guard let outcome = startFill(n) else { return finish(Self.encryptFailure) }
                guard case .done(let ok) = outcome else { return }
                guard ok else { return finish(Self.encryptFailure) }
            } else {
                guard fill(n) else { return finish(Self.encryptFailure) }
            }
            guard submitPiece(callerMayWait: mayWait) else { return }
            mayWait = false
            guard advance() else { return }
        }
    }

    /// Submits the encrypted piece in the buffer; true if it completed inside `submit` (the
    /// caller goes on with the next), false if its completion will.
    private func submitPiece(callerMayWait: Bool) -> Bool {
        phase.store(0, ordering: .releasing)
        vector.pointee = iovec(iov_base: buffer, iov_len: Int(piece))
        var down = BlockRequest(operation: .write, offset: filter.payloadStart + offset + done, length: piece,
                                buffers: IOBuffers(vector, count: 1), fua: fua)
        down.callerMayWait = callerMayWait
        filter.next.submit(down, completion: BlockCompletion(sink: self, tag: 0))
        return !phase.compareExchange(expected: 0, desired: 1, ordering: .acquiringAndReleasing).exchanged
    }

    /// After a piece: false when the request is finished (or failed).
    private func advance() -> Bool {
        if case .failure = pieceResult { finish(pieceResult); return false }
        done += piece
        if done >= length { finish(.success); return false }
        return true
    }

    private func finish(_ result: BlockResult) {
        let completion = self.completion!
        self.completion = nil
        buffers = .empty
        filter.release(self)
        completion.complete(result)
    }

    private func ensureBuffer(_ n: Int) -> Bool {
        if capacity >= n { return true }
        if let buffer { ccrypto_wipe(buffer, capacity); free(buffer); self.buffer = nil }
        let size = min(CryptFilter.chunkBytes, max(n, 64 << 10))
        var memory: UnsafeMutableRawPointer?
        guard posix_memalign(&memory, 4096, size) == 0 else { capacity = 0; return false }
        buffer = memory; capacity = size
        return true
    }

    /// Starts encrypting the next `n` bytes of the write (or zeroes) into the buffer, split with
    /// the helpers: straight from the caller's buffers if they hold whole sectors, else
    /// gathered into ours first and encrypted in place. Nil if there is no buffer.
    private func startFill(_ n: Int) -> ParallelSectorCipher.Outcome? {
        guard ensureBuffer(n), let buffer else { return nil }
        let sector = (offset + done) / 512
        if operation == .write && wholeSectors {
            return filter.crew.start(encrypt: true, buffers, at: Int(done), count: n, into: buffer, first: sector, local: encryptor, client: self)
        }
        if operation == .writeZeroes { memset(buffer, 0, n) } else { buffers.copy(to: buffer, count: n, at: Int(done)) }
        vector.pointee = iovec(iov_base: buffer, iov_len: n)
        return filter.crew.start(encrypt: true, IOBuffers(vector, count: 1), at: 0, count: n, into: nil, first: sector, local: encryptor, client: self)
    }

    /// The next `n` bytes of the write (or zeroes), encrypted into the buffer.
    private func fill(_ n: Int) -> Bool {
        guard ensureBuffer(n), let buffer else { return false }
        let sector = (offset + done) / 512
        if operation == .writeZeroes {
            memset(buffer, 0, n)
            return encrypt(buffer, buffer, sectors: n / 512, first: sector)
        }
        // Straight from the caller's buffers where whole sectors lie in one of them.
        var skip = Int(done), out = 0, aligned = true
        for b in buffers where out < n {
            if skip >= b.count { skip -= b.count; continue }
            let take = min(b.count - skip, n - out)
            if take % 512 != 0 || skip % 512 != 0 { aligned = false; break }
            guard encrypt(b.baseAddress! + skip, buffer + out, sectors: take / 512, first: sector + UInt64(out / 512)) else { return false }
            out += take; skip = 0
        }
        if aligned { return true }
        // Sectors that straddle two buffers: gather, then encrypt in place.
        buffers.copy(to: buffer, count: n, at: Int(done))
        return encrypt(buffer, buffer, sectors: n / 512, first: sector)
    }

    private func encrypt(_ input: UnsafeRawPointer, _ output: UnsafeMutableRawPointer, sectors: Int, first: UInt64) -> Bool {
        filter.crew.run(encrypt: true, input, output, sectors: sectors, first: first, local: encryptor)
    }

    private func decrypt(_ input: UnsafeRawPointer, _ output: UnsafeMutableRawPointer, sectors: Int, first: UInt64) -> Bool {
        filter.crew.run(encrypt: false, input, output, sectors: sectors, first: first, local: decryptor)
    }

    /// Decrypts a completed read in the request's buffers.
    private func decryptRead() -> Bool {
        let first = offset / 512
        if wholeSectors {
            var sector = first
            for b in buffers where b.count > 0 {
                guard decrypt(b.baseAddress!, b.baseAddress!, sectors: b.count / 512, first: sector) else { return false }
                sector += UInt64(b.count / 512)
            }
            return true
        }
        // Buffers that split sectors: through our buffer, a piece at a time.
        var position = 0
        let total = Int(length)
        while position < total {
            let n = min(CryptFilter.chunkBytes, total - position)
            guard ensureBuffer(n), let buffer else { return false }
            buffers.copy(to: buffer, count: n, at: position)
            guard decrypt(buffer, buffer, sectors: n / 512, first: first + UInt64(position / 512)) else { return false }
            buffers.copy(from: buffer, count: n, at: position)
            position += n
        }
        return true
    }
}

extension CryptFilter {
    public static let descriptor = DeviceDescriptor(
        name: "crypt", kind: .filter,
        summary: "The plaintext of a LUKS1 volume on the device below (AES-XTS from libgcrypt; reads and writes what qemu-img's luks driver, nbdkit's luks filter and cryptsetup do).",
        parameters: [
            DeviceParameter("keyfile", "A file whose whole contents are the passphrase (as cryptsetup --key-file, qemu's secret,file=)."),
            DeviceParameter("passphrase", "The passphrase itself: for tests only, it shows in process lists and configs (use keyfile)."),
            DeviceParameter("discard", "on: pass discards down (dm-crypt's allow_discards; reveals which blocks are free and they read back as noise). Default off."),
        ],
        open: { parameters, next throws(DeviceSpecError) in
            let next = next!
            let keyfile = parameters.string("keyfile"), text = parameters.string("passphrase")
            guard (keyfile == nil) != (text == nil) else {
                throw DeviceSpecError("crypt: give exactly one of keyfile= and passphrase=")
            }
            let discard = try parameters.bool("discard", default: false)
            return try DeviceSpecError.opening { () throws(BlockError) in
                let secret: SecretBytes
                if let keyfile {
                    secret = try SecretBytes.contents(ofFile: keyfile, what: "crypt: keyfile")
                } else {
                    secret = SecretBytes(utf8: text!)
                    guard secret.count > 0 else { throw BlockError(.invalid, "crypt: the passphrase is empty") }
                }
                do throws(BlockError) {
                    return try CryptFilter(next: next, passphrase: secret, allowDiscard: discard)
                } catch {
                    throw BlockError(error.code, errno: error.errno, "crypt: \(error.message)")
                }
            }
        })
}
