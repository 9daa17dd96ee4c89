import CCrypto
import Core
import Glibc

/// Key bytes or a passphrase: memory of its own (locked in RAM where the limit allows), wiped
/// with `OPENSSL_cleanse` (which the compiler cannot drop) when released. Never printed: its
/// description says only how long it is.
public final class SecretBytes: @unchecked Sendable, CustomStringConvertible {
    public let count: Int
    public let pointer: UnsafeMutableRawPointer

    /// `count` zero bytes.
    public init(count: Int) {
        self.count = count
        pointer = .allocate(byteCount: max(count, 1), alignment: 16)
        memset(pointer, 0, max(count, 1))
        _ = mlock(pointer, max(count, 1))   // best effort: keeps keys out of swap
    }

    /// A copy of `bytes`.
    public convenience init(copying bytes: UnsafeRawBufferPointer) {
        self.init(count: bytes.count)
        if let base = bytes.baseAddress, bytes.count > 0 { memcpy(pointer, base, bytes.count) }
    }

    /// The UTF-8 bytes of `text` (a passphrase given on the command line or in a spec: the
    /// String itself stays in memory we cannot wipe, which is why `keyfile` is preferred).
    public convenience init(utf8 text: String) {
        var text = text
        self.init(count: text.utf8.count)
        text.withUTF8 { if $0.count > 0 { memcpy(pointer, $0.baseAddress!, $0.count) } }
    }

    /// The whole of the file at `path`, as cryptsetup's `--key-file` and qemu's
    /// `secret,file=` read it (no newline is stripped). Read straight into wiped memory.
    public static func contents(ofFile path: String, what: String) throws(BlockError) -> SecretBytes {
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { throw BlockError.system("\(what) \(path): cannot open", errno: errno) }
        defer { Glibc.close(fd) }
        var st = stat()
        guard fstat(fd, &st) == 0 else { throw BlockError.system("\(what) \(path): stat", errno: errno) }
        let size = Int(st.st_size)
        guard size > 0 else { throw BlockError(.invalid, "\(what) \(path) is empty: a key file needs at least one byte") }
        guard size <= 8 << 20 else { throw BlockError(.invalid, "\(what) \(path) is \(size) bytes: key files are limited to 8 MiB, as cryptsetup's") }
        let secret = SecretBytes(count: size)
        var done = 0
        while done < size {
            let n = read(fd, secret.pointer + done, size - done)
            if n < 0 && errno == EINTR { continue }
            guard n > 0 else { throw BlockError(.io, "\(what) \(path): short read at offset \(done)") }
            done += n
        }
        return secret
    }

    deinit {
        ccrypto_wipe(pointer, max(count, 1))
        _ = munlock(pointer, max(count, 1))
        pointer.deallocate()
    }

    public var bytes: UnsafeRawBufferPointer { UnsafeRawBufferPointer(start: pointer, count: count) }
    public var description: String { "<\(count) secret bytes>" }

    /// Constant-time comparison (CRYPTO_memcmp).
    public func equals(_ other: UnsafeRawBufferPointer) -> Bool {
        other.count == count && CRYPTO_memcmp(pointer, other.baseAddress!, count) == 0
    }
}

/// Runs `body`, whose closures' untyped throws (Array's `withUnsafeBytes`) carry only
/// BlockErrors, as a typed throw.
func typedThrows<R>(_ body: () throws -> R) throws(BlockError) -> R {
    do { return try body() } catch let error as BlockError { throw error } catch { throw BlockError(.io, "\(error)") }
}

/// The primitives LUKS is made of, all from OpenSSL's libcrypto.
public enum LUKSCrypto {
    /// The message digest OpenSSL knows by `name` (sha1, sha256, sha512).
    static func digest(_ name: String) -> OpaquePointer? { EVP_get_digestbyname(name) }

    /// PBKDF2-HMAC-`hash` of `password` and `salt`, `iterations` rounds, `length` bytes.
    static func pbkdf2(_ password: UnsafeRawBufferPointer, salt: [UInt8], iterations: UInt32, hash: OpaquePointer,
                       length: Int) throws(BlockError) -> SecretBytes {
        let out = SecretBytes(count: length)
        let ok = salt.withUnsafeBufferPointer { s in
            PKCS5_PBKDF2_HMAC(password.baseAddress?.assumingMemoryBound(to: CChar.self), Int32(password.count),
                              s.baseAddress, Int32(s.count), Int32(clamping: iterations), hash, Int32(length),
                              out.pointer.assumingMemoryBound(to: UInt8.self))
        }
        guard ok == 1 else { throw BlockError(.io, "PBKDF2 failed in OpenSSL") }
        return out
    }

    /// How many PBKDF2 iterations of `hash` take `milliseconds` on this machine (at least 1000,
    /// cryptsetup's floor), measured as cryptsetup measures.
    public static func iterations(for milliseconds: Int, hash: OpaquePointer, keyBytes: Int) throws(BlockError) -> UInt32 {
        let probe: UInt32 = 20_000
        let password = [UInt8](repeating: 0x55, count: 16)
        let start = BlockCompletionRelay.nanoseconds()
        _ = try typedThrows {
            try password.withUnsafeBytes { p in
                try pbkdf2(p, salt: [UInt8](repeating: 1, count: 32), iterations: probe, hash: hash, length: keyBytes)
            }
        }
        let elapsed = max(1, BlockCompletionRelay.nanoseconds() - start)
        let perMillisecond = Double(probe) / (Double(elapsed) / 1e6)
        return UInt32(min(Double(UInt32.max / 2), max(1000, perMillisecond * Double(milliseconds))))
    }

    /// `count` bytes from the kernel's CSPRNG (getrandom).
    static func random(_ count: Int) throws(BlockError) -> SecretBytes {
        let out = SecretBytes(count: count)
        guard ccrypto_random(out.pointer, count) == 1 else { throw BlockError.system("getrandom", errno: errno) }
        return out
    }
    static func randomBytes(_ count: Int) throws(BlockError) -> [UInt8] {
        let secret = try random(count)
        return Array(secret.bytes)
    }

    // MARK: Anti-forensic splitter (LUKS1 spec, section 2.4; cryptsetup's af.c)

    /// H's diffusion of `block` in place: each digest-sized piece i becomes H(be32(i) || piece),
    /// the last, shorter piece the first bytes of its hash. `scratch` holds EVP_MAX_MD_SIZE bytes.
    static func diffuse(_ block: UnsafeMutableRawPointer, _ length: Int, hash: OpaquePointer, context: OpaquePointer,
                        scratch: UnsafeMutablePointer<UInt8>) throws(BlockError) {
        let size = Int(EVP_MD_get_size(hash))
        var index: UInt32 = 0, position = 0
        while position < length {
            let n = min(size, length - position)
            var be = index.bigEndian
            guard EVP_DigestInit_ex(context, hash, nil) == 1, EVP_DigestUpdate(context, &be, 4) == 1,
                  EVP_DigestUpdate(context, block + position, n) == 1,
                  EVP_DigestFinal_ex(context, scratch, nil) == 1 else { throw BlockError(.io, "OpenSSL: digest failed") }
            memcpy(block + position, scratch, n)
            position += n; index += 1
        }
    }

    /// Runs the AF chain over `stripes - 1` stripes of `material` into `buffer`:
    /// buffer = diffuse(buffer ^ stripe) for each (cryptsetup's af.c).
    private static func afChain(_ material: UnsafeRawPointer, into buffer: SecretBytes, stripes: Int, hash: OpaquePointer) throws(BlockError) {
        guard let context = EVP_MD_CTX_new() else { throw BlockError(.noSpace, "OpenSSL: no digest context") }
        defer { EVP_MD_CTX_free(context) }
        let scratch = SecretBytes(count: Int(EVP_MAX_MD_SIZE))
        let digest = scratch.pointer.assumingMemoryBound(to: UInt8.self)
        for i in 0..<(stripes - 1) {
            xor(buffer.pointer, material + i * buffer.count, buffer.count)
            try diffuse(buffer.pointer, buffer.count, hash: hash, context: context, scratch: digest)
        }
    }

    /// Merges `stripes` stripes of `keyBytes` each back into the key.
    static func afMerge(_ material: UnsafeRawPointer, keyBytes: Int, stripes: Int, hash: OpaquePointer) throws(BlockError) -> SecretBytes {
        let buffer = SecretBytes(count: keyBytes)
        try afChain(material, into: buffer, stripes: stripes, hash: hash)
        xor(buffer.pointer, material + (stripes - 1) * keyBytes, keyBytes)
        return buffer
    }

    /// Splits `key` into `stripes` stripes (all random but the last): the key material.
    static func afSplit(_ key: SecretBytes, stripes: Int, hash: OpaquePointer) throws(BlockError) -> SecretBytes {
        let keyBytes = key.count
        let material = try random(keyBytes * stripes)
        let buffer = SecretBytes(count: keyBytes)
        try afChain(material.pointer, into: buffer, stripes: stripes, hash: hash)
        let last = material.pointer + (stripes - 1) * keyBytes
        memcpy(last, buffer.pointer, keyBytes)
        xor(last, key.pointer, keyBytes)
        return material
    }

    private static func xor(_ into: UnsafeMutableRawPointer, _ from: UnsafeRawPointer, _ count: Int) {
        let a = into.assumingMemoryBound(to: UInt8.self), b = from.assumingMemoryBound(to: UInt8.self)
        for i in 0..<count { a[i] ^= b[i] }
    }
}

/// What a LUKS1 header's cipher name and mode say: the EVP cipher and how each sector's IV is
/// made. `aes` with `xts-plain64` (the default everywhere), and `cbc-essiv:sha256` and
/// `cbc-plain64` (older cryptsetup and qemu defaults).
public struct LUKSCipherSpec: Equatable, Sendable, CustomStringConvertible {
    public enum Mode: String, Sendable { case xtsPlain64 = "xts-plain64", cbcESSIV = "cbc-essiv:sha256", cbcPlain64 = "cbc-plain64" }
    public var mode: Mode
    public var keyBytes: Int

    /// The modes this implementation reads and writes.
    public static let modes: [Mode] = [.xtsPlain64, .cbcESSIV, .cbcPlain64]

    /// Checks that `mode` with keys of `keyBytes` bytes is AES as OpenSSL has it.
    public init(cipherName: String, mode modeName: String, keyBytes: Int) throws(BlockError) {
        guard cipherName == "aes" else {
            throw BlockError(.notSupported, "cipher '\(cipherName)' is not supported (only aes)")
        }
        guard let mode = Mode(rawValue: modeName) else {
            throw BlockError(.notSupported, "cipher mode '\(modeName)' is not supported (use \(Self.modes.map(\.rawValue).joined(separator: ", ")))")
        }
        let sizes = mode == .xtsPlain64 ? [32, 64] : [16, 24, 32]
        guard sizes.contains(keyBytes) else {
            throw BlockError(.invalid, "aes-\(modeName) takes keys of \(sizes.map { "\($0)" }.joined(separator: " or ")) bytes, not \(keyBytes)")
        }
        self.mode = mode; self.keyBytes = keyBytes
    }

    public var description: String { "aes-\(mode.rawValue) (\(keyBytes * 8)-bit key)" }

    /// The CBC modes' EVP cipher (XTS runs on AES-ECB: ``LUKSSectorCipher``).
    var evpCipher: OpaquePointer {
        switch keyBytes {
        case 16: return EVP_aes_128_cbc()
        case 24: return EVP_aes_192_cbc()
        default: return EVP_aes_256_cbc()
        }
    }
}

/// One direction of a sector cipher keyed with one key: handles for one thread at a time (a
/// request in flight owns one). The handles hold the key schedule; freeing them wipes it.
///
/// XTS runs on libgcrypt (cryptsetup's own backend), one data unit per 512-byte sector with
/// its plain64 tweak: libgcrypt has VAES and VPCLMULQDQ code for XTS, which OpenSSL 3.0 has
/// not, and runs it at 6.2 GB/s per core here against 4.6 for OpenSSL's AES-NI ECB with the
/// tweaks stepped in C. The CBC modes (read compatibility with older volumes) go through
/// OpenSSL's EVP per sector.
final class LUKSSectorCipher {
    private let encrypt: Bool
    /// XTS: libgcrypt's handle keyed with both halves of the key.
    private let xts: OpaquePointer?
    /// CBC: OpenSSL's context for the direction wanted.
    private let context: OpaquePointer?
    /// CBC-ESSIV: AES-256-ECB keyed with SHA-256 of the key (the IVs).
    private let essiv: OpaquePointer?

    /// libgcrypt initialised, once for the process (Swift runs a static's initialiser once).
    private static let gcryptReady = ccrypto_gcrypt_ready() == 1

    init(spec: LUKSCipherSpec, key: SecretBytes, encrypt: Bool) throws(BlockError) {
        self.encrypt = encrypt
        let keyPointer = key.pointer.assumingMemoryBound(to: UInt8.self)
        func make(_ cipher: OpaquePointer, _ key: UnsafePointer<UInt8>, encrypt: Bool) throws(BlockError) -> OpaquePointer {
            guard let context = EVP_CIPHER_CTX_new() else { throw BlockError(.noSpace, "OpenSSL: no cipher context") }
            guard EVP_CipherInit_ex(context, cipher, nil, key, nil, encrypt ? 1 : 0) == 1 else {
                EVP_CIPHER_CTX_free(context)
                throw BlockError(.io, "OpenSSL refused the \(spec) key")
            }
            EVP_CIPHER_CTX_set_padding(context, 0)
            return context
        }
        switch spec.mode {
        case .xtsPlain64:
            guard Self.gcryptReady else { throw BlockError(.io, "libgcrypt is older than the headers SoftDev was built with") }
            guard let handle = ccrypto_gcrypt_xts(keyPointer, spec.keyBytes) else { throw BlockError(.io, "libgcrypt refused the \(spec) key") }
            xts = handle
            context = nil; essiv = nil
        case .cbcPlain64:
            context = try make(spec.evpCipher, keyPointer, encrypt: encrypt)
            xts = nil; essiv = nil
        case .cbcESSIV:
            let context = try make(spec.evpCipher, keyPointer, encrypt: encrypt)
            self.context = context
            xts = nil
            // ESSIV: the IV is the sector number encrypted with AES-256 keyed by SHA-256(key).
            let salt = SecretBytes(count: 32)
            var length: UInt32 = 0
            guard EVP_Digest(key.pointer, key.count, salt.pointer.assumingMemoryBound(to: UInt8.self), &length, EVP_sha256(), nil) == 1 else {
                EVP_CIPHER_CTX_free(context); throw BlockError(.io, "OpenSSL: ESSIV setup failed")
            }
            do throws(BlockError) { essiv = try make(EVP_aes_256_ecb(), salt.pointer.assumingMemoryBound(to: UInt8.self), encrypt: true) } catch {
                EVP_CIPHER_CTX_free(context); throw error
            }
        }
    }

    deinit {
        if let xts { ccrypto_gcrypt_close(xts) }
        if let context { EVP_CIPHER_CTX_free(context) }
        if let essiv { EVP_CIPHER_CTX_free(essiv) }
    }

    /// Transforms `count` sectors from `input` to `output` (may be the same), numbered from `sector`.
    @inline(__always)
    func run(_ input: UnsafeRawPointer, _ output: UnsafeMutableRawPointer, sectors count: Int, first sector: UInt64) -> Bool {
        let input = input.assumingMemoryBound(to: UInt8.self), output = output.assumingMemoryBound(to: UInt8.self)
        if let xts { return ccrypto_gcrypt_xts_sectors(xts, encrypt ? 1 : 0, input, output, count, sector) == 1 }
        return ccrypto_sectors(context, essiv, input, output, count, sector) == 1
    }
}
