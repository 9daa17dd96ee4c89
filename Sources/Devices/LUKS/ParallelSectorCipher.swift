import Core
import Glibc

/// Splits a large run of sectors between the calling thread and a few helper threads, each
/// helper with OpenSSL contexts of its own (a context is not safe to share between threads).
/// AES-XTS runs at about 3.5 GB/s per core here, so a 1 MiB request costs ~0.3 ms of one
/// core; split, a large request is ciphered on every core at once (dm-crypt's kcryptd spreads
/// its work over CPUs the same way).
///
/// The caller ciphers its own share first, then takes back any of its pieces no helper has
/// started and ciphers them too, then waits only for the pieces a helper is running: it never
/// waits on a busy helper, so a crew shared by several requests cannot deadlock or stall one.
final class ParallelSectorCipher: @unchecked Sendable {
    /// Requests smaller than this are ciphered on the calling thread alone: waking a helper
    /// costs tens of microseconds, the cipher ~20 µs per 64 KiB.
    static let smallestSplit = 128 << 10
    /// No piece smaller than this goes to a helper.
    static let smallestPiece = 64 << 10

    /// One part of a caller's run, waiting in the queue or being ciphered by a helper.
    private struct Piece {
        var encrypt: Bool
        var input: UnsafeRawPointer
        var output: UnsafeMutableRawPointer
        var sectors: Int
        var first: UInt64
        var batch: Batch
    }

    /// A caller's pieces: how many are still out, and whether one failed. Under `lock`.
    private final class Batch {
        var outstanding = 0
        var failed = false
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

    /// Stops and joins the helpers (their contexts, and with them the key schedules, are freed
    /// as they return). Idempotent; runs must have finished.
    func stop() {
        lock.withLock { stopping = true; lock.broadcast() }
        for t in threads { t.join() }
        threads = []
    }

    /// Ciphers `sectors` sectors from `input` to `output` (may be the same), numbered from
    /// `first`, with `local` (the caller's own context, of the right direction) for the
    /// caller's share. False if OpenSSL failed on any piece.
    func run(encrypt: Bool, _ input: UnsafeRawPointer, _ output: UnsafeMutableRawPointer, sectors: Int, first: UInt64,
             local: LUKSSectorCipher) -> Bool {
        let bytes = sectors * 512
        let parts = min(helpers + 1, bytes / Self.smallestPiece)
        guard threads.count > 0, bytes >= Self.smallestSplit, parts > 1 else {
            return local.run(input, output, sectors: sectors, first: first)
        }
        let each = sectors / parts
        let batch = Batch()
        // The helpers' pieces are the first parts - 1; the caller's is the rest.
        lock.withLock {
            for p in 0..<(parts - 1) {
                let skip = p * each * 512
                queue.append(Piece(encrypt: encrypt, input: input + skip, output: output + skip, sectors: each,
                                   first: first + UInt64(p * each), batch: batch))
            }
            batch.outstanding = parts - 1
            lock.broadcast()
        }
        let mine = (parts - 1) * each
        var ok = local.run(input + mine * 512, output + mine * 512, sectors: sectors - mine, first: first + UInt64(mine))
        // Pieces no helper took yet: ours to do.
        while let piece = lock.withLock({ () -> Piece? in
            guard let index = queue.firstIndex(where: { $0.batch === batch }) else { return nil }
            batch.outstanding -= 1
            return queue.remove(at: index)
        }) {
            ok = local.run(piece.input, piece.output, sectors: piece.sectors, first: piece.first) && ok
        }
        return lock.withLock {
            while batch.outstanding > 0 { lock.wait() }
            return ok && !batch.failed
        }
    }

    private func serve(_ own: Contexts) {
        while let piece = next() {
            let cipher = piece.encrypt ? own.encryptor : own.decryptor
            let ok = cipher.run(piece.input, piece.output, sectors: piece.sectors, first: piece.first)
            lock.withLock {
                if !ok { piece.batch.failed = true }
                piece.batch.outstanding -= 1
                if piece.batch.outstanding == 0 { lock.broadcast() }
            }
        }
    }

    private func next() -> Piece? {
        lock.withLock {
            while queue.isEmpty && !stopping { lock.wait() }
            return stopping ? nil : queue.removeFirst()
        }
    }
}
