import Core
import Glibc

/// A sparse in-memory disk for the tests: an anonymous mapping the kernel fills lazily, with a
/// map of which 64 KiB chunks were ever written so that `extents` reports holes. 512-byte
/// logical blocks, so sub-sector client I/O exercises the export's read-modify-write.
final class SparseTestDevice: SynchronousBlockDevice, @unchecked Sendable {
    static let chunk: UInt64 = 64 << 10
    let name = "sparse-test"
    let geometry: BlockGeometry
    let capabilities: BlockCapabilities
    private let base: UnsafeMutableRawPointer
    private var allocated: [Bool]
    private let lock = UnsafeMutablePointer<pthread_mutex_t>.allocate(capacity: 1)
    /// Completes requests on another thread after this many microseconds (0: at once, inline).
    let asyncDelay: UInt32

    init(size: UInt64, capabilities: BlockCapabilities = .all, asyncDelay: UInt32 = 0) {
        geometry = BlockGeometry(size: size, logicalBlockSize: 512, physicalBlockSize: 4096)
        self.capabilities = capabilities
        self.asyncDelay = asyncDelay
        base = mmap(nil, Int(size), PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0)!
        allocated = Array(repeating: false, count: Int((size + Self.chunk - 1) / Self.chunk))
        pthread_mutex_init(lock, nil)
    }
    deinit { munmap(base, Int(geometry.size)); lock.deallocate() }

    private func locked<T>(_ body: () -> T) -> T { pthread_mutex_lock(lock); defer { pthread_mutex_unlock(lock) }; return body() }

    func submit(_ request: BlockRequest, completion: BlockCompletion) {
        guard asyncDelay > 0 else { return completion.complete(performSynchronously(request)) }
        let delay = asyncDelay
        DispatchQueue.global().async { usleep(delay); completion.complete(self.performSynchronously(request)) }
    }

    private func check(_ offset: UInt64, _ length: UInt64) throws(BlockError) {
        guard offset % 512 == 0, length % 512 == 0 else { throw BlockError(.invalid, "unaligned request reached the device: \(offset)+\(length)") }
        guard offset + length <= geometry.size else { throw BlockError(.outOfRange, "beyond the end") }
    }

    func read(into buffers: IOBuffers, at offset: UInt64) throws(BlockError) {
        try check(offset, UInt64(buffers.byteCount))
        buffers.copy(from: base + Int(offset), count: buffers.byteCount)
    }

    func write(from buffers: IOBuffers, at offset: UInt64, fua: Bool) throws(BlockError) {
        let n = UInt64(buffers.byteCount)
        try check(offset, n)
        markAllocated(offset, n, true)
        buffers.copy(to: base + Int(offset), count: Int(n))
    }

    func discard(at offset: UInt64, length: UInt64) throws(BlockError) {
        try writeZeroes(at: offset, length: length, mayDiscard: true)
    }

    func writeZeroes(at offset: UInt64, length: UInt64, mayDiscard: Bool) throws(BlockError) {
        try check(offset, length)
        memset(base + Int(offset), 0, Int(length))
        // Only whole chunks become holes again.
        let first = (offset + Self.chunk - 1) / Self.chunk, last = (offset + length) / Self.chunk
        if mayDiscard && first < last {
            locked { for c in Int(first)..<Int(last) { allocated[c] = false } }
            madvise(base + Int(first * Self.chunk), Int((last - first) * Self.chunk), MADV_DONTNEED)
        }
        if !mayDiscard { markAllocated(offset, length, true) }
    }

    private func markAllocated(_ offset: UInt64, _ length: UInt64, _ value: Bool) {
        guard length > 0 else { return }
        locked { for c in Int(offset / Self.chunk)...Int((offset + length - 1) / Self.chunk) { allocated[c] = value } }
    }

    func extents(at offset: UInt64, length: UInt64) throws(BlockError) -> [BlockExtent] {
        locked {
            var result: [BlockExtent] = []
            var c = offset / Self.chunk
            let end = offset + length
            while c * Self.chunk < end {
                let hole = !allocated[Int(c)]
                let s = max(c * Self.chunk, offset), t = min((c + 1) * Self.chunk, geometry.size)
                if let last = result.last, last.isHole == hole {
                    result[result.count - 1].length = t - last.offset
                } else {
                    result.append(BlockExtent(offset: s, length: t - s, isHole: hole, isZero: hole))
                }
                c += 1
            }
            return result
        }
    }
}

import Foundation
