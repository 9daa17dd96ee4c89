import CCrypto

/// The SHA-256 of a chunk: the name a ``ChunkStore`` keeps it under (OpenSSL's, with the CPU's
/// SHA extensions where it has them).
struct ChunkHash: Hashable, CustomStringConvertible {
    static let byteCount = 32
    private var words: (UInt64, UInt64, UInt64, UInt64)

    /// The hash of `count` bytes at `bytes`.
    init(of bytes: UnsafeRawPointer, count: Int) {
        words = (0, 0, 0, 0)
        withUnsafeMutableBytes(of: &words) { out in
            _ = CCrypto.SHA256(bytes.assumingMemoryBound(to: UInt8.self), count, out.baseAddress!.assumingMemoryBound(to: UInt8.self))
        }
    }

    /// A hash as stored in the index.
    init(loading bytes: UnsafeRawPointer) {
        words = (0, 0, 0, 0)
        withUnsafeMutableBytes(of: &words) { $0.copyMemory(from: UnsafeRawBufferPointer(start: bytes, count: Self.byteCount)) }
    }

    var bytes: [UInt8] { withUnsafeBytes(of: words) { Array($0) } }

    static func == (a: ChunkHash, b: ChunkHash) -> Bool {
        a.words.0 == b.words.0 && a.words.1 == b.words.1 && a.words.2 == b.words.2 && a.words.3 == b.words.3
    }
    func hash(into hasher: inout Hasher) { hasher.combine(words.0) }

    var description: String {
        withUnsafeBytes(of: words) { $0.map { ($0 < 16 ? "0" : "") + String($0, radix: 16) }.joined() }
    }
}
