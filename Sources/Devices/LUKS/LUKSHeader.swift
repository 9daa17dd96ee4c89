import Core

/// The LUKS1 on-disk header (LUKS1 On-Disk Format Specification 1.2.3; cryptsetup's luks.h,
/// qemu's block/crypto/block-luks.c): 592 big-endian bytes at offset 0, then the key material
/// of each key slot, then the payload.
///
/// ```
///   0 magic "LUKS\xba\xbe"   6 version (1)     8 cipher name[32]   40 cipher mode[32]
///  72 hash spec[32]        104 payload offset (sectors)   108 key bytes
/// 112 mk digest[20]        132 mk digest salt[32]         164 mk digest iterations
/// 168 uuid[40]             208 8 key slots of 48 bytes: active, iterations, salt[32],
///                              key material offset (sectors), stripes
/// ```
public struct LUKSHeader: Equatable, Sendable {
    public static let magic: [UInt8] = [0x4C, 0x55, 0x4B, 0x53, 0xBA, 0xBE]
    public static let size = 592
    public static let slotCount = 8
    public static let stripes: UInt32 = 4000
    public static let slotActive: UInt32 = 0x00AC_71F3
    public static let slotDisabled: UInt32 = 0x0000_DEAD
    public static let digestBytes = 20
    public static let saltBytes = 32
    public static let sectorSize = 512
    /// Field offsets, for error messages.
    public enum Offset {
        public static let version = 6, cipherName = 8, cipherMode = 40, hashSpec = 72, payloadOffset = 104, keyBytes = 108
        public static let mkDigestIterations = 164, slots = 208, slotSize = 48
    }

    public struct KeySlot: Equatable, Sendable {
        public var active: Bool
        public var iterations: UInt32
        public var salt: [UInt8]
        /// In 512-byte sectors from the start of the volume.
        public var keyMaterialOffset: UInt32
        public var stripes: UInt32
        public init(active: Bool, iterations: UInt32, salt: [UInt8], keyMaterialOffset: UInt32, stripes: UInt32) {
            self.active = active; self.iterations = iterations; self.salt = salt
            self.keyMaterialOffset = keyMaterialOffset; self.stripes = stripes
        }
    }

    public var cipherName: String
    public var cipherMode: String
    public var hashSpec: String
    /// Where the payload starts, in 512-byte sectors.
    public var payloadOffset: UInt32
    public var keyBytes: UInt32
    public var mkDigest: [UInt8]
    public var mkDigestSalt: [UInt8]
    public var mkDigestIterations: UInt32
    public var uuid: String
    public var slots: [KeySlot]

    public init(cipherName: String, cipherMode: String, hashSpec: String, payloadOffset: UInt32, keyBytes: UInt32,
                mkDigest: [UInt8], mkDigestSalt: [UInt8], mkDigestIterations: UInt32, uuid: String, slots: [KeySlot]) {
        self.cipherName = cipherName; self.cipherMode = cipherMode; self.hashSpec = hashSpec
        self.payloadOffset = payloadOffset; self.keyBytes = keyBytes; self.mkDigest = mkDigest
        self.mkDigestSalt = mkDigestSalt; self.mkDigestIterations = mkDigestIterations; self.uuid = uuid; self.slots = slots
    }

    /// The bytes of one slot's key material (stripes of the key), rounded up to whole sectors.
    public var keyMaterialBytes: Int {
        let raw = Int(keyBytes) * Int(Self.stripes)
        return (raw + Self.sectorSize - 1) / Self.sectorSize * Self.sectorSize
    }

    /// The layout cryptsetup and qemu give a new volume: the first slot's material at 4 KiB,
    /// each slot's material 4 KiB-aligned, the payload at the next MiB boundary.
    public static func layout(keyBytes: Int) -> (slotOffsets: [UInt32], payloadOffset: UInt32) {
        let materialSectors = (keyBytes * Int(stripes) + sectorSize - 1) / sectorSize
        let aligned = (materialSectors + 7) / 8 * 8
        let offsets = (0..<slotCount).map { UInt32(8 + $0 * aligned) }
        let end = 8 + slotCount * aligned
        return (offsets, UInt32((end + 2047) / 2048 * 2048))
    }

    /// Parses and checks the header in `bytes` (at least 592 bytes) of a volume of
    /// `volumeSize` bytes. Errors name `source` and the offset of the field that is wrong.
    public init(parsing bytes: UnsafeRawBufferPointer, volumeSize: UInt64, source: String) throws(BlockError) {
        func fail(_ offset: Int, _ what: String) -> BlockError {
            BlockError(.invalid, "\(source): LUKS header at offset \(offset): \(what)")
        }
        guard bytes.count >= Self.size else {
            throw BlockError(.invalid, "\(source): the LUKS header needs \(Self.size) bytes at offset 0 but the volume is \(bytes.count) bytes long (truncated)")
        }
        func be32(_ at: Int) -> UInt32 { (0..<4).reduce(0) { $0 << 8 | UInt32(bytes[at + $1]) } }
        func string(_ at: Int, _ length: Int) -> String {
            let field = bytes[at..<at + length]
            return String(decoding: field.prefix { $0 != 0 }, as: UTF8.self)
        }
        guard Array(bytes[0..<6]) == Self.magic else {
            throw fail(0, "bad magic \(bytes[0..<6].map { String(format2: $0) }.joined()) (not a LUKS volume)")
        }
        let version = UInt16(bytes[6]) << 8 | UInt16(bytes[7])
        guard version == 1 else {
            throw fail(Offset.version, version == 2 ? "LUKS version 2 is not supported (only LUKS1: cryptsetup --type luks1)"
                                                      : "unknown LUKS version \(version)")
        }
        cipherName = string(Offset.cipherName, 32)
        cipherMode = string(Offset.cipherMode, 32)
        hashSpec = string(Offset.hashSpec, 32)
        payloadOffset = be32(Offset.payloadOffset)
        keyBytes = be32(Offset.keyBytes)
        mkDigest = Array(bytes[112..<132])
        mkDigestSalt = Array(bytes[132..<164])
        mkDigestIterations = be32(Offset.mkDigestIterations)
        uuid = string(168, 40)
        slots = (0..<Self.slotCount).map { i in
            let at = Offset.slots + i * Offset.slotSize
            return KeySlot(active: be32(at) == Self.slotActive, iterations: be32(at + 4), salt: Array(bytes[(at + 8)..<(at + 40)]),
                           keyMaterialOffset: be32(at + 40), stripes: be32(at + 44))
        }
        // The checks qemu's and nbdkit's readers make, each naming the field.
        do throws(BlockError) {
            _ = try LUKSCipherSpec(cipherName: cipherName, mode: cipherMode, keyBytes: Int(keyBytes))
        } catch {
            throw fail(cipherName == "aes" ? (error.code == .invalid ? Offset.keyBytes : Offset.cipherMode) : Offset.cipherName, error.message)
        }
        guard ["sha1", "sha256", "sha512"].contains(hashSpec), LUKSCrypto.digest(hashSpec) != nil else {
            throw fail(Offset.hashSpec, "hash '\(hashSpec)' is not supported (use sha1, sha256 or sha512)")
        }
        guard mkDigestIterations > 0 else { throw fail(Offset.mkDigestIterations, "master key digest iterations are 0") }
        let payloadStart = UInt64(payloadOffset) * UInt64(Self.sectorSize)
        guard payloadStart >= UInt64(Self.size) else {
            throw fail(Offset.payloadOffset, "payload offset \(payloadOffset) sectors overlaps the header")
        }
        guard payloadStart <= volumeSize else {
            throw fail(Offset.payloadOffset, "payload offset \(payloadOffset) sectors (\(payloadStart) bytes) is past the end of the \(volumeSize)-byte volume (truncated?)")
        }
        for (i, slot) in slots.enumerated() {
            let at = Offset.slots + i * Offset.slotSize
            let state = be32(at)
            guard state == Self.slotActive || state == Self.slotDisabled else {
                throw fail(at, "key slot \(i) has an invalid state 0x\(String(state, radix: 16)) (neither active nor disabled)")
            }
            guard slot.active else { continue }
            guard slot.stripes == Self.stripes else { throw fail(at + 44, "key slot \(i) has \(slot.stripes) stripes (LUKS1 uses 4000)") }
            guard slot.iterations > 0 else { throw fail(at + 4, "key slot \(i) has 0 iterations") }
            let start = UInt64(slot.keyMaterialOffset) * UInt64(Self.sectorSize)
            guard start >= UInt64(Self.size), start + UInt64(keyMaterialBytes) <= payloadStart else {
                throw fail(at + 40, "key slot \(i)'s key material (sector \(slot.keyMaterialOffset), \(keyMaterialBytes) bytes) lies outside [header end, payload offset)")
            }
        }
    }

    /// The 592 bytes of the header.
    public var bytes: [UInt8] {
        var out = [UInt8](repeating: 0, count: Self.size)
        func put32(_ value: UInt32, _ at: Int) { for b in 0..<4 { out[at + b] = UInt8(truncatingIfNeeded: value >> (24 - 8 * b)) } }
        func put(_ text: String, _ at: Int, _ length: Int) { for (i, c) in text.utf8.prefix(length - 1).enumerated() { out[at + i] = c } }
        func put(_ bytes: [UInt8], _ at: Int) { for (i, c) in bytes.enumerated() { out[at + i] = c } }
        put(Self.magic, 0)
        out[7] = 1
        put(cipherName, Offset.cipherName, 32); put(cipherMode, Offset.cipherMode, 32); put(hashSpec, Offset.hashSpec, 32)
        put32(payloadOffset, Offset.payloadOffset); put32(keyBytes, Offset.keyBytes)
        put(mkDigest, 112); put(mkDigestSalt, 132); put32(mkDigestIterations, Offset.mkDigestIterations)
        put(uuid, 168, 40)
        for (i, slot) in slots.enumerated() {
            let at = Offset.slots + i * Offset.slotSize
            put32(slot.active ? Self.slotActive : Self.slotDisabled, at)
            put32(slot.iterations, at + 4); put(slot.salt, at + 8)
            put32(slot.keyMaterialOffset, at + 40); put32(slot.stripes, at + 44)
        }
        return out
    }
}

extension String {
    /// Two lowercase hex digits.
    init(format2 byte: UInt8) {
        let digits = Array("0123456789abcdef")
        self = String([digits[Int(byte >> 4)], digits[Int(byte & 15)]])
    }
}
