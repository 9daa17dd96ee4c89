import Core
import Glibc

/// One block of a device's own metadata (a header, a map block) as little-endian fields, with
/// the checksum that closes it, and the error that names the file and offset of a bad field.
struct FormatBlock {
    var bytes: [UInt8]
    init(count: Int) { bytes = [UInt8](repeating: 0, count: count) }
    init(bytes: [UInt8]) { self.bytes = bytes }

    func u32(_ at: Int) -> UInt32 { (0..<4).reduce(0) { $0 | UInt32(bytes[at + $1]) << (8 * $1) } }
    func u64(_ at: Int) -> UInt64 { (0..<8).reduce(0) { $0 | UInt64(bytes[at + $1]) << (8 * $1) } }
    mutating func put32(_ value: UInt32, _ at: Int) { for b in 0..<4 { bytes[at + b] = UInt8(truncatingIfNeeded: value >> (8 * b)) } }
    mutating func put64(_ value: UInt64, _ at: Int) { for b in 0..<8 { bytes[at + b] = UInt8(truncatingIfNeeded: value >> (8 * b)) } }

    var isZero: Bool { bytes.allSatisfy { $0 == 0 } }

    /// The CRC-32C of the block but its last 4 bytes, which hold it.
    var computedChecksum: UInt32 { CRC32C.checksum(bytes[0..<bytes.count - 4]) }
    var storedChecksum: UInt32 { u32(bytes.count - 4) }
    mutating func seal() { put32(computedChecksum, bytes.count - 4) }

    /// "FILE: WHAT at offset N": the message of every bad-metadata error.
    static func error(_ label: String, _ what: String, at offset: UInt64) -> BlockError {
        BlockError(.invalid, "\(label): \(what) at offset \(offset)")
    }
}

/// Metadata I/O on the device below a filter: whole blocks at aligned offsets, through aligned
/// memory (the device may be an O_DIRECT file), off the hot path.
extension BlockDevice {
    func readFormatBlocks(at offset: UInt64, count: Int) throws(BlockError) -> [UInt8] {
        let memory = try AlignedMemory(count)
        try sync.read(into: memory.buffers, at: offset)
        return memory.bytes
    }

    func writeFormatBlocks(_ bytes: [UInt8], at offset: UInt64) throws(BlockError) {
        let memory = try AlignedMemory(bytes.count)
        bytes.withUnsafeBytes { memory.pointer.copyMemory(from: $0.baseAddress!, byteCount: bytes.count) }
        try sync.write(from: memory.buffers, at: offset, fua: false)
    }

    /// The file at the bottom of the stack, for messages: `file(path=...)`'s path, else the
    /// device's name.
    var formatLabel: String {
        var below: any BlockDevice = self
        while let filter = below as? BlockFilter { below = filter.next }
        if let file = below as? FileDevice { return file.path }
        return name
    }
}

/// Page-aligned memory with one iovec over it, freed with the value.
final class AlignedMemory {
    let pointer: UnsafeMutableRawPointer
    let count: Int
    private let vector = UnsafeMutablePointer<iovec>.allocate(capacity: 1)

    init(_ count: Int) throws(BlockError) {
        var memory: UnsafeMutableRawPointer?
        guard posix_memalign(&memory, 4096, max(count, 1)) == 0, let memory else {
            vector.deallocate()
            throw BlockError(.noSpace, errno: ENOMEM, "out of memory for a \(count)-byte buffer")
        }
        pointer = memory; self.count = count
        vector.pointee = iovec(iov_base: memory, iov_len: count)
    }
    deinit { free(pointer); vector.deallocate() }

    var buffers: IOBuffers { IOBuffers(vector, count: 1) }
    var bytes: [UInt8] { Array(UnsafeRawBufferPointer(start: pointer, count: count)) }

    /// A view of `[start, start+length)` as its own one-iovec buffers (the iovec lives in `vectors`).
    func slice(_ start: Int, _ length: Int, vector: UnsafeMutablePointer<iovec>) -> IOBuffers {
        vector.pointee = iovec(iov_base: pointer + start, iov_len: length)
        return IOBuffers(vector, count: 1)
    }
}
