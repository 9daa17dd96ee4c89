import Core
import CZstd

/// One-shot zstd compression and decompression of whole chunks, with contexts made once and
/// reused (a context costs far more to make than a 64 KiB chunk costs to compress).
final class ZstdCodec {
    private let compressor: OpaquePointer
    private let decompressor: OpaquePointer
    let level: Int32

    init(level: Int32) throws(BlockError) {
        guard let c = ZSTD_createCCtx(), let d = ZSTD_createDCtx() else {
            throw BlockError(.noSpace, "compress: zstd could not allocate its contexts")
        }
        compressor = c; decompressor = d; self.level = level
    }
    deinit { ZSTD_freeCCtx(compressor); ZSTD_freeDCtx(decompressor) }

    static func bound(_ count: Int) -> Int { ZSTD_compressBound(count) }

    /// Compresses `count` bytes into `destination` (at least ``bound(_:)`` bytes): the size, or
    /// nil if zstd failed.
    func compress(_ source: UnsafeRawPointer, count: Int, into destination: UnsafeMutableRawPointer, capacity: Int) -> Int? {
        let n = ZSTD_compressCCtx(compressor, destination, capacity, source, count, level)
        return ZSTD_isError(n) != 0 ? nil : n
    }

    /// Decompresses a frame of `count` bytes that must give exactly `expected` bytes: false for
    /// anything else (a damaged chunk is an I/O error, never wrong data).
    func decompress(_ source: UnsafeRawPointer, count: Int, into destination: UnsafeMutableRawPointer, expected: Int) -> Bool {
        let n = ZSTD_decompressDCtx(decompressor, destination, expected, source, count)
        return ZSTD_isError(n) == 0 && n == expected
    }
}
