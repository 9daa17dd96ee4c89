import Core
import Glibc

/// Told when a run given to ``ParallelSectorCipher/start`` that returned `.later` is all
/// ciphered, on the helper thread that finished its last piece.
protocol SectorCipherClient: AnyObject {
    func ciphered(ok: Bool)
}

/// Splits a large run of sectors between the calling thread and a few helper threads, each
/// helper with cipher handles of its own (a handle is not safe to share between threads).
/// AES-XTS runs at about 6 GB/s per core here, so a 1 MiB request costs ~0.17 ms of one
/// core; split, a large request is ciphered on every core at once (dm-crypt's kcryptd spreads
/// its work over CPUs the same way).
///
/// The caller ciphers its own share first (the last part), then takes back any of its parts no
/// helper has started and ciphers them too; it never waits on a busy helper's queue, so a crew
/// shared by several requests cannot deadlock or stall one. Then:
/// - `run` waits for the parts helpers are running;
/// - `start` does not: if a helper is still at work, the helper that finishes the last part
///   tells the client. A completion thread (a file's reaper, a transport's ring or connection
///   thread) decrypts a large read this way and goes straight on to the next requests rather
///   than wait for the slowest helper, and a write is submitted by whoever finishes last.
final class ParallelSectorCipher: @unchecked Sendable {
    /// Requests smaller than this are ciphered on the calling thread alone: waking a helper
    /// costs tens of microseconds, the cipher ~11 µs per 64 KiB.
    static let smallestSplit = 128 << 10
    /// No piece smaller than this goes to a helper.
    static let smallestPiece = 64 << 10

    /// One part of a caller's run, waiting in the queue or being ciphered by a helper: bytes
    /// `[position, position + count)` of `buffers` (seen as one run, every buffer whole
    /// sectors), into `output` (nil: in place), the first sector numbered `first`.
    private struct Piece {
        var encrypt: Bool
        var buffers: IOBuffers
        var position: Int
        var count: Int
        var output: UnsafeMutableRawPointer?
        var first: UInt64
        var batch: Batch
    }

    /// A caller's pieces: how many are still out, whether one failed, and for `start`, whom
    /// to tell. Under `lock`.
    private final class Batch {
        var outstanding = 0
        var failed = false
        var client: SectorCipherClient?
    }

    /// A helper's contexts, keyed once.
    private struct Contexts {
        let encryptor: LUKSSectorCipher
        let decryptor: LUKSSectorCipher
    }

    private let lock = ConditionLock()
    private var queue: [Piece] = []          // under lock
    private var stopping = false             // under lock
    private var threads: [PosixThread] = []
    let helpers: Int

    /// Starts `helpers` threads (none is fine: every run is then the caller's alone).
    init(spec: LUKSCipherSpec, key: SecretBytes, helpers: Int) throws(BlockError) {
        var contexts: [Contexts] = []
        for _ in 0..<helpers {
            contexts.append(Contexts(encryptor: try LUKSSectorCipher(spec: spec, key: key, encrypt: true),
                                     decryptor: try LUKSSectorCipher(spec: spec, key: key, encrypt: false)))
        }
        self.helpers = helpers
        for own in contexts {
            do throws(ThreadStartError) {
                // `stop` joins every thread before the crew goes, so they need not hold it.
                let thread = try PosixThread("crypt cipher") { [unowned(unsafe) self] in serve(own) }
                threads.append(thread)
            } catch {
                stop()
                throw BlockError(.io, errno: error.errno, "crypt: \(error)")
            }
        }
    }

    /// The helpers' share of the machine: one fewer than the cores (the caller is one), at most 7.
    static var defaultHelpers: Int { max(0, min(7, Int(sysconf(Int32(_SC_NPROCESSORS_ONLN))) - 1)) }

    deinit { stop() }

    /// Stops and joins the helpers once the queue is empty (their contexts, and with them the
    /// key schedules, are freed as they return). Idempotent.
    func stop() {
        lock.withLock { stopping = true; lock.broadcast() }
        for t in threads { t.join() }
        threads = []
    }

    /// Whether a run of `bytes` is split between the caller and the helpers.
    func splits(_ bytes: Int) -> Bool { !threads.isEmpty && bytes >= Self.smallestSplit }

    /// What `start` did: the run is all ciphered (by the caller last, or by helpers that were
    /// quicker), or a helper still runs a piece and will tell the client.
    enum Outcome: Equatable {
        case done(ok: Bool)
        case later
    }

    /// Ciphers `sectors` sectors from `input` to `output` (may be the same), numbered from
    /// `first`, with `local` (the caller's own context, of the right direction) for the
    /// caller's share, and waits for the helpers' shares. False if the cipher failed on any piece.
    func run(encrypt: Bool, _ input: UnsafeRawPointer, _ output: UnsafeMutableRawPointer, sectors: Int, first: UInt64,
             local: LUKSSectorCipher) -> Bool {
        guard splits(sectors * 512) else { return local.run(input, output, sectors: sectors, first: first) }
        // The run as buffers the pieces can name; it outlives them (we wait for them below).
        return withUnsafeTemporaryAllocation(of: iovec.self, capacity: 1) { vector in
            vector[0] = iovec(iov_base: UnsafeMutableRawPointer(mutating: input), iov_len: sectors * 512)
            let (batch, outcome) = split(encrypt: encrypt, IOBuffers(vector.baseAddress!, count: 1), at: 0, count: sectors * 512,
                                         into: output, first: first, local: local, client: nil)
            if case .done(let ok) = outcome { return ok }
            return lock.withLock {
                while batch.outstanding > 0 { lock.wait() }
                return !batch.failed
            }
        }
    }

    /// Ciphers `count` bytes of `buffers` (seen as one run, from byte `position`; every buffer
    /// whole sectors) into `output` (nil: in place), numbered from `first`: the caller its
    /// share with `local`, the helpers the rest. The caller never waits for a helper: if one
    /// is still at work when the caller's share is done, this returns `.later` and the helper
    /// that finishes the last piece calls `client.ciphered` (the bytes are not the caller's to
    /// touch until then). Only when `splits(count)`.
    func start(encrypt: Bool, _ buffers: IOBuffers, at position: Int, count: Int, into output: UnsafeMutableRawPointer?,
               first: UInt64, local: LUKSSectorCipher, client: SectorCipherClient) -> Outcome {
        split(encrypt: encrypt, buffers, at: position, count: count, into: output, first: first, local: local, client: client).1
    }

    /// Queues every part but the last for the helpers, ciphers the last and then any part no
    /// helper took yet; `.later` if some part is still out.
    private func split(encrypt: Bool, _ buffers: IOBuffers, at position: Int, count: Int, into output: UnsafeMutableRawPointer?,
                       first: UInt64, local: LUKSSectorCipher, client: SectorCipherClient?) -> (Batch, Outcome) {
        let sectors = count / 512
        let parts = max(1, min(helpers + 1, count / Self.smallestPiece))
        let each = sectors / parts
        let batch = Batch()
        batch.client = client
        func part(_ p: Int) -> Piece {
            let skip = p * each * 512
            return Piece(encrypt: encrypt, buffers: buffers, position: position + skip, count: p == parts - 1 ? count - skip : each * 512,
                         output: output.map { $0 + skip }, first: first + UInt64(p * each), batch: batch)
        }
        lock.withLock {
            for p in 0..<(parts - 1) { queue.append(part(p)) }
            batch.outstanding = parts
            lock.broadcast()
        }
        var ok = Self.cipher(part(parts - 1), with: local)
        var mine = 1
        // Parts no helper took yet: ours to do.
        while let piece = lock.withLock({ () -> Piece? in
            guard let index = queue.firstIndex(where: { $0.batch === batch }) else { return nil }
            return queue.remove(at: index)
        }) {
            ok = Self.cipher(piece, with: local) && ok
            mine += 1
        }
        let outcome = lock.withLock { () -> Outcome in
            if !ok { batch.failed = true }
            batch.outstanding -= mine
            guard batch.outstanding == 0 else { return .later }
            batch.client = nil
            return .done(ok: !batch.failed)
        }
        return (batch, outcome)
    }

    /// Runs `piece` with `cipher`, buffer by buffer.
    private static func cipher(_ piece: Piece, with cipher: LUKSSectorCipher) -> Bool {
        var skip = piece.position, done = 0, ok = true
        for b in piece.buffers where done < piece.count {
            if skip >= b.count { skip -= b.count; continue }
            let n = min(b.count - skip, piece.count - done)
            let input = b.baseAddress! + skip
            ok = cipher.run(input, piece.output.map { $0 + done } ?? input, sectors: n / 512, first: piece.first + UInt64(done / 512)) && ok
            done += n; skip = 0
        }
        return ok
    }

    private func serve(_ own: Contexts) {
        while let piece = next() {
            let ok = Self.cipher(piece, with: piece.encrypt ? own.encryptor : own.decryptor)
            let told = lock.withLock { () -> (SectorCipherClient, Bool)? in
                if !ok { piece.batch.failed = true }
                piece.batch.outstanding -= 1
                guard piece.batch.outstanding == 0 else { return nil }
                guard let client = piece.batch.client else { lock.broadcast(); return nil }
                piece.batch.client = nil
                return (client, !piece.batch.failed)
            }
            if let (client, ok) = told { client.ciphered(ok: ok) }
        }
    }

    /// The next piece, waiting for one; nil once stopping and the queue is empty (a run
    /// already started is finished even while the crew stops).
    private func next() -> Piece? {
        lock.withLock {
            while queue.isEmpty && !stopping { lock.wait() }
            return queue.isEmpty ? nil : queue.removeFirst()
        }
    }
}
