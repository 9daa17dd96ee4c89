import Core

/// Calls `body` for each `chunk`-byte piece of the device that `[offset, offset + total)`
/// touches, with the piece's number, where the range starts in it, how many of its bytes the
/// range covers, and where that is in the range: the walk of a device kept in chunks (`cas`'s
/// blocks, `timetravel`'s index).
func forEachChunk(of chunk: Int, _ offset: UInt64, _ total: Int,
                  _ body: (_ index: Int, _ within: Int, _ count: Int, _ position: Int) throws(BlockError) -> Void) throws(BlockError) {
    var position = 0
    while position < total {
        let at = offset + UInt64(position)
        let index = Int(at / UInt64(chunk)), within = Int(at % UInt64(chunk))
        let n = min(chunk - within, total - position)
        try body(index, within, n, position)
        position += n
    }
}
