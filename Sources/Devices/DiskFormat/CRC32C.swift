import CZstd

/// CRC-32C (Castagnoli): the checksum of SoftDev's own metadata blocks (a header, a map block)
/// and of each chunk `compress` stores: a torn, flipped or misplaced block is refused, never
/// trusted. The instruction (SSE 4.2) where the CPU has it (CZstd's shim).
enum CRC32C {
    static func checksum(_ bytes: UnsafeRawBufferPointer) -> UInt32 {
        softdev_crc32c(0, bytes.baseAddress, bytes.count)
    }

    static func checksum(_ bytes: ArraySlice<UInt8>) -> UInt32 { bytes.withUnsafeBytes { checksum($0) } }

    /// `crc` continued over `count` more bytes (0 to start).
    static func update(_ crc: UInt32, _ bytes: UnsafeRawPointer?, _ count: Int) -> UInt32 { softdev_crc32c(crc, bytes, count) }
}
