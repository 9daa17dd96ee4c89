import Core
import Glibc

/// Copies between a request's scatter-gather list and flat memory from any byte of the list:
/// for filters that work on pieces of a request (a sector run, a chunk).
extension IOBuffers {
    /// Copies `count` bytes of the buffers, from byte `start` of the list, to `destination`.
    func gather(into destination: UnsafeMutableRawPointer, from start: Int, count: Int) {
        var skip = start, out = 0
        for b in self where out < count {
            if skip >= b.count { skip -= b.count; continue }
            let take = Swift.min(b.count - skip, count - out)
            memcpy(destination + out, b.baseAddress! + skip, take)
            out += take; skip = 0
        }
    }

    /// Copies `count` bytes from `source` into the buffers, from byte `start` of the list.
    func scatter(from source: UnsafeRawPointer, to start: Int, count: Int) {
        var skip = start, out = 0
        for b in self where out < count {
            if skip >= b.count { skip -= b.count; continue }
            let take = Swift.min(b.count - skip, count - out)
            memcpy(b.baseAddress! + skip, source + out, take)
            out += take; skip = 0
        }
    }
}
