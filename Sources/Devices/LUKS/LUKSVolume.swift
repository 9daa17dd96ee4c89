import CCrypto
import Core
import Glibc

/// Where a LUKS volume's bytes are: the device below the `crypt` filter, or a file that
/// `softdev luks-format` and `luks-add-key` open. `label` names it in every error.
public final class LUKSStorage {
    public let label: String
    public let size: UInt64
    private let readAt: (UInt64, UnsafeMutableRawBufferPointer) throws(BlockError) -> Void
    private let writeAt: ((UInt64, UnsafeRawBufferPointer) throws(BlockError) -> Void)?
    private let onClose: () -> Void

    public init(label: String, size: UInt64, read: @escaping (UInt64, UnsafeMutableRawBufferPointer) throws(BlockError) -> Void,
                write: ((UInt64, UnsafeRawBufferPointer) throws(BlockError) -> Void)? = nil, close: @escaping () -> Void = {}) {
        self.label = label; self.size = size; readAt = read; writeAt = write; onClose = close
    }
    deinit { onClose() }

    /// Reads `buffer.count` bytes at `offset`; a range past the end is an error naming the offset.
    func read(_ buffer: UnsafeMutableRawBufferPointer, at offset: UInt64, what: String) throws(BlockError) {
        guard offset <= size, UInt64(buffer.count) <= size - offset else {
            throw BlockError(.invalid, "\(label): \(what) at offset \(offset) (\(buffer.count) bytes) is past the end of the \(size)-byte volume (truncated)")
        }
        try readAt(offset, buffer)
    }

    func write(_ buffer: UnsafeRawBufferPointer, at offset: UInt64) throws(BlockError) {
        guard let writeAt else { throw BlockError(.readOnly, "\(label): opened read-only") }
        try writeAt(offset, buffer)
    }

    /// The device below a filter: reads through bounce buffers aligned for O_DIRECT.
    public static func device(_ device: any BlockDevice, label: String) -> LUKSStorage {
        let block = max(4096, Int(device.geometry.logicalBlockSize))
        let size = device.geometry.size
        func aligned(_ offset: UInt64, _ count: Int) -> (start: UInt64, length: Int) {
            let start = offset / UInt64(block) * UInt64(block)
            let end = min(size, (offset + UInt64(count) + UInt64(block) - 1) / UInt64(block) * UInt64(block))
            return (start, Int(end - start))
        }
        func bounce<R>(_ length: Int, _ body: (UnsafeMutableRawPointer, IOBuffers) throws(BlockError) -> R) throws(BlockError) -> R {
            var memory: UnsafeMutableRawPointer?
            guard posix_memalign(&memory, 4096, max(length, 1)) == 0, let memory else { throw BlockError(.noSpace, "\(label): out of memory") }
            defer { ccrypto_wipe(memory, length); free(memory) }
            var vector = iovec(iov_base: memory, iov_len: length)
            return try withUnsafeMutablePointer(to: &vector) { (v) throws(BlockError) in try body(memory, IOBuffers(v, count: 1)) }
        }
        return LUKSStorage(label: label, size: size, read: { (offset, buffer) throws(BlockError) in
            let (start, length) = aligned(offset, buffer.count)
            try bounce(length) { (memory, buffers) throws(BlockError) in
                try device.sync.read(into: buffers, at: start)
                memcpy(buffer.baseAddress!, memory + Int(offset - start), buffer.count)
            }
        }, write: { (offset, buffer) throws(BlockError) in
            let (start, length) = aligned(offset, buffer.count)
            try bounce(length) { (memory, buffers) throws(BlockError) in
                try device.sync.read(into: buffers, at: start)
                memcpy(memory + Int(offset - start), buffer.baseAddress!, buffer.count)
                try device.sync.write(from: buffers, at: start, fua: true)
            }
        })
    }

    /// A file opened with pread/pwrite (the commands'; `create` makes it, or cuts it to `size`).
    public static func file(_ path: String, writable: Bool, create size: UInt64? = nil) throws(BlockError) -> LUKSStorage {
        let flags = (writable ? O_RDWR : O_RDONLY) | O_CLOEXEC | (size != nil ? O_CREAT | O_EXCL : 0)
        let fd = open(path, flags, 0o600)
        guard fd >= 0 else { throw BlockError.system("\(path): cannot open", errno: errno) }
        if let size, ftruncate(fd, off_t(size)) != 0 {
            let e = errno
            Glibc.close(fd); unlink(path)
            throw BlockError.system("\(path): cannot size to \(size) bytes", errno: e)
        }
        var st = stat()
        fstat(fd, &st)
        return LUKSStorage(label: path, size: UInt64(st.st_size), read: { (offset, buffer) throws(BlockError) in
            var done = 0
            while done < buffer.count {
                let n = pread(fd, buffer.baseAddress! + done, buffer.count - done, off_t(offset) + off_t(done))
                if n < 0 && errno == EINTR { continue }
                if n < 0 { throw BlockError.system("\(path): read at offset \(offset + UInt64(done))", errno: errno) }
                if n == 0 { throw BlockError(.io, "\(path): unexpected end of file at offset \(offset + UInt64(done))") }
                done += n
            }
        }, write: !writable ? nil : { (offset, buffer) throws(BlockError) in
            var done = 0
            while done < buffer.count {
                let n = pwrite(fd, buffer.baseAddress! + done, buffer.count - done, off_t(offset) + off_t(done))
                if n < 0 && errno == EINTR { continue }
                if n <= 0 { throw BlockError.system("\(path): write at offset \(offset + UInt64(done))", errno: errno) }
                done += n
            }
        }, close: { fsync(fd); Glibc.close(fd) })
    }
}

/// LUKS1 volumes: open one with a passphrase, make one, add a key slot.
public enum LUKSVolume {
    /// Reads and checks the header of `storage`.
    public static func readHeader(_ storage: LUKSStorage) throws(BlockError) -> LUKSHeader {
        guard storage.size >= UInt64(LUKSHeader.size) else {
            throw BlockError(.invalid, "\(storage.label): the LUKS header needs \(LUKSHeader.size) bytes at offset 0 but the volume is \(storage.size) bytes long (truncated)")
        }
        var bytes = [UInt8](repeating: 0, count: LUKSHeader.size)
        try typedThrows { try bytes.withUnsafeMutableBytes { b in try storage.read(b, at: 0, what: "the LUKS header") } }
        return try typedThrows { try bytes.withUnsafeBytes { b in try LUKSHeader(parsing: b, volumeSize: storage.size, source: storage.label) } }
    }

    /// The master key, from the first active key slot that `passphrase` opens (PBKDF2 of the
    /// passphrase with the slot's salt, key material decrypted with it, AF-merged, checked
    /// against the header's digest), and the slot's number.
    public static func unlock(_ header: LUKSHeader, storage: LUKSStorage, passphrase: SecretBytes) throws(BlockError) -> (key: SecretBytes, slot: Int) {
        let spec = try LUKSCipherSpec(cipherName: header.cipherName, mode: header.cipherMode, keyBytes: Int(header.keyBytes))
        let hash = LUKSCrypto.digest(header.hashSpec)!
        let keyBytes = Int(header.keyBytes)
        let material = SecretBytes(count: header.keyMaterialBytes)
        var tried: [Int] = []
        for (index, slot) in header.slots.enumerated() where slot.active {
            tried.append(index)
            let slotKey = try LUKSCrypto.pbkdf2(passphrase.bytes, salt: slot.salt, iterations: slot.iterations, hash: hash, length: keyBytes)
            try storage.read(UnsafeMutableRawBufferPointer(start: material.pointer, count: material.count),
                             at: UInt64(slot.keyMaterialOffset) * 512, what: "key slot \(index)'s key material")
            let cipher = try LUKSSectorCipher(spec: spec, key: slotKey, encrypt: false)
            guard cipher.run(material.pointer, material.pointer, sectors: material.count / 512, first: 0) else {
                throw BlockError(.io, "\(storage.label): OpenSSL failed to decrypt key slot \(index)")
            }
            let candidate = try LUKSCrypto.afMerge(material.pointer, keyBytes: keyBytes, stripes: Int(slot.stripes), hash: hash)
            let digest = try LUKSCrypto.pbkdf2(candidate.bytes, salt: header.mkDigestSalt, iterations: header.mkDigestIterations,
                                               hash: hash, length: LUKSHeader.digestBytes)
            if header.mkDigest.withUnsafeBytes({ digest.equals($0) }) { return (candidate, index) }
        }
        guard !tried.isEmpty else { throw BlockError(.invalid, "\(storage.label): the LUKS volume has no active key slot") }
        throw BlockError(.readOnly, errno: EACCES,
                         "\(storage.label): wrong passphrase or key file: no key slot opens with it (tried slot\(tried.count > 1 ? "s" : "") \(tried.map(String.init).joined(separator: ", ")))")
    }

    /// How a new volume is made.
    public struct FormatOptions: Sendable {
        public var cipher: LUKSCipherSpec
        public var hash: String
        /// PBKDF2 time per key slot, in milliseconds (cryptsetup's --iter-time; its default 2000).
        public var iterationMilliseconds: Int
        public init(cipher: LUKSCipherSpec, hash: String = "sha256", iterationMilliseconds: Int = 2000) {
            self.cipher = cipher; self.hash = hash; self.iterationMilliseconds = iterationMilliseconds
        }
    }

    /// The payload offset a volume made with `options` has, in bytes.
    public static func payloadBytes(_ options: FormatOptions) -> UInt64 {
        UInt64(LUKSHeader.layout(keyBytes: options.cipher.keyBytes).payloadOffset) * 512
    }

    /// Writes a new header to `storage` with a fresh master key (getrandom) and `passphrase` in
    /// slot 0; with `zeroPayload`, writes the payload as encrypted zeroes (so that it reads as
    /// zeroes; otherwise unwritten sectors read as noise, as on cryptsetup's and qemu-img's volumes).
    @discardableResult
    public static func format(_ storage: LUKSStorage, options: FormatOptions, passphrase: SecretBytes,
                              zeroPayload: Bool = false) throws(BlockError) -> LUKSHeader {
        guard let hash = LUKSCrypto.digest(options.hash), ["sha1", "sha256", "sha512"].contains(options.hash) else {
            throw BlockError(.invalid, "hash '\(options.hash)' is not supported (use sha1, sha256 or sha512)")
        }
        let keyBytes = options.cipher.keyBytes
        let layout = LUKSHeader.layout(keyBytes: keyBytes)
        guard UInt64(layout.payloadOffset) * 512 <= storage.size else {
            throw BlockError(.invalid, "\(storage.label): \(storage.size) bytes cannot hold a LUKS header and key slots (\(UInt64(layout.payloadOffset) * 512) bytes)")
        }
        let masterKey = try LUKSCrypto.random(keyBytes)
        let rate = try LUKSCrypto.iterations(for: 1000, hash: hash, keyBytes: keyBytes)
        let mkIterations = max(1000, UInt32(min(Double(UInt32.max / 2), Double(rate) * Double(options.iterationMilliseconds) / 8000)))
        let mkSalt = try LUKSCrypto.randomBytes(LUKSHeader.saltBytes)
        let digest = try LUKSCrypto.pbkdf2(masterKey.bytes, salt: mkSalt, iterations: mkIterations, hash: hash, length: LUKSHeader.digestBytes)
        var header = LUKSHeader(
            cipherName: "aes", cipherMode: options.cipher.mode.rawValue, hashSpec: options.hash, payloadOffset: layout.payloadOffset,
            keyBytes: UInt32(keyBytes), mkDigest: Array(digest.bytes), mkDigestSalt: mkSalt, mkDigestIterations: mkIterations,
            uuid: try uuid(),
            slots: layout.slotOffsets.map { LUKSHeader.KeySlot(active: false, iterations: 0, salt: [UInt8](repeating: 0, count: 32),
                                                                keyMaterialOffset: $0, stripes: LUKSHeader.stripes) })
        // Zeroes from the header to the payload (no stale key material survives a re-format).
        let gap = [UInt8](repeating: 0, count: Int(layout.payloadOffset) * 512)
        try typedThrows { try gap.withUnsafeBytes { b in try storage.write(b, at: 0) } }
        try writeSlot(0, of: &header, storage: storage, masterKey: masterKey, passphrase: passphrase,
                      milliseconds: options.iterationMilliseconds)
        if zeroPayload { try writeZeroes(storage, header: header, masterKey: masterKey) }
        return header
    }

    /// Adds `newPassphrase` in a free key slot (`slot`, or the first free one), after `existing`
    /// opens the volume. Returns the slot's number.
    public static func addKey(_ storage: LUKSStorage, existing: SecretBytes, newPassphrase: SecretBytes, slot wanted: Int? = nil,
                              iterationMilliseconds: Int = 2000) throws(BlockError) -> Int {
        var header = try readHeader(storage)
        let (masterKey, _) = try unlock(header, storage: storage, passphrase: existing)
        let slot: Int
        if let wanted {
            guard (0..<LUKSHeader.slotCount).contains(wanted) else { throw BlockError(.invalid, "key slot \(wanted): use 0 to 7") }
            guard !header.slots[wanted].active else { throw BlockError(.invalid, "\(storage.label): key slot \(wanted) is in use") }
            slot = wanted
        } else {
            guard let free = header.slots.firstIndex(where: { !$0.active }) else {
                throw BlockError(.noSpace, "\(storage.label): all 8 key slots are in use")
            }
            slot = free
        }
        try writeSlot(slot, of: &header, storage: storage, masterKey: masterKey, passphrase: newPassphrase,
                      milliseconds: iterationMilliseconds)
        return slot
    }

    /// Fills key slot `index`: the master key AF-split, encrypted with the passphrase's PBKDF2
    /// key, written at the slot's offset; then the header, with the slot active.
    static func writeSlot(_ index: Int, of header: inout LUKSHeader, storage: LUKSStorage, masterKey: SecretBytes,
                          passphrase: SecretBytes, milliseconds: Int) throws(BlockError) {
        guard passphrase.count > 0 else { throw BlockError(.invalid, "an empty passphrase cannot protect a key slot") }
        let spec = try LUKSCipherSpec(cipherName: header.cipherName, mode: header.cipherMode, keyBytes: Int(header.keyBytes))
        let hash = LUKSCrypto.digest(header.hashSpec)!
        let keyBytes = Int(header.keyBytes)
        let iterations = try LUKSCrypto.iterations(for: milliseconds, hash: hash, keyBytes: keyBytes)
        let salt = try LUKSCrypto.randomBytes(LUKSHeader.saltBytes)
        let slotKey = try LUKSCrypto.pbkdf2(passphrase.bytes, salt: salt, iterations: iterations, hash: hash, length: keyBytes)
        let split = try LUKSCrypto.afSplit(masterKey, stripes: Int(LUKSHeader.stripes), hash: hash)
        let material = SecretBytes(count: header.keyMaterialBytes)
        memcpy(material.pointer, split.pointer, split.count)
        let cipher = try LUKSSectorCipher(spec: spec, key: slotKey, encrypt: true)
        guard cipher.run(material.pointer, material.pointer, sectors: material.count / 512, first: 0) else {
            throw BlockError(.io, "OpenSSL failed to encrypt key slot \(index)")
        }
        try storage.write(UnsafeRawBufferPointer(start: material.pointer, count: material.count),
                          at: UInt64(header.slots[index].keyMaterialOffset) * 512)
        header.slots[index].active = true
        header.slots[index].iterations = iterations
        header.slots[index].salt = salt
        header.slots[index].stripes = LUKSHeader.stripes
        try typedThrows { try header.bytes.withUnsafeBytes { b in try storage.write(b, at: 0) } }
    }

    /// The whole payload as encrypted zeroes, 1 MiB at a time.
    static func writeZeroes(_ storage: LUKSStorage, header: LUKSHeader, masterKey: SecretBytes) throws(BlockError) {
        let spec = try LUKSCipherSpec(cipherName: header.cipherName, mode: header.cipherMode, keyBytes: Int(header.keyBytes))
        let cipher = try LUKSSectorCipher(spec: spec, key: masterKey, encrypt: true)
        let start = UInt64(header.payloadOffset) * 512
        let chunk = 1 << 20
        let buffer = UnsafeMutableRawPointer.allocate(byteCount: chunk, alignment: 4096)
        defer { buffer.deallocate() }
        var done: UInt64 = 0
        while start + done < storage.size {
            let n = Int(min(UInt64(chunk), storage.size - start - done))
            memset(buffer, 0, n)
            guard cipher.run(buffer, buffer, sectors: n / 512, first: done / 512) else { throw BlockError(.io, "OpenSSL failed to encrypt") }
            try storage.write(UnsafeRawBufferPointer(start: buffer, count: n), at: start + done)
            done += UInt64(n)
        }
    }

    /// A random (version 4) UUID, as cryptsetup writes it.
    static func uuid() throws(BlockError) -> String {
        var b = try LUKSCrypto.randomBytes(16)
        b[6] = b[6] & 0x0F | 0x40
        b[8] = b[8] & 0x3F | 0x80
        let hex = b.map { String(format2: $0) }
        return [hex[0..<4], hex[4..<6], hex[6..<8], hex[8..<10], hex[10..<16]].map { $0.joined() }.joined(separator: "-")
    }
}
