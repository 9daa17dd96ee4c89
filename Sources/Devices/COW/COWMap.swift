import Core
import Synchronization

/// Which clusters of a cow overlay hold data of their own (the rest read from the base): one
/// bit per cluster, in the ``MetadataBlocks`` after the header: cluster (index * 32704 + n) is
/// bit n % 8 of the block's content byte n / 8.
///
/// Bits are set here only once the cluster's data is written below, and a block reaches the
/// disk only at a flush, after the data it covers was flushed (``COWFilter``): so a bit on
/// disk always covers written data.
final class COWMap: Sendable {
    static let blockSize = MetadataBlocks.size
    static let clustersPerBlock = MetadataBlocks.contentBytes * 8

    enum Allocation { case none, all, mixed }

    private struct State {
        var table: MetadataBlocks
        /// Each block as it is on disk after the last flush (a FUA write needs its bits there).
        var durable: [[UInt8]]
    }
    private let state: Mutex<State>
    let clusters: UInt64

    /// Checks the map read from the overlay (`bytes`, the header's map blocks at `offset`).
    init(bytes: [UInt8], clusters: UInt64, offset: UInt64, label: String) throws(BlockError) {
        self.clusters = clusters
        let table = try MetadataBlocks(bytes: bytes, offset: offset, label: label, what: "cow map")
        // Bits past the last cluster: a map for another size.
        if let last = table.blocks.last {
            let index = table.blocks.count - 1
            let first = UInt64(index) * UInt64(Self.clustersPerBlock)
            for n in 0..<Self.clustersPerBlock where first + UInt64(n) >= clusters {
                let byte = MetadataBlocks.contentStart + n / 8
                if last[byte] & (1 << UInt8(n % 8)) != 0 {
                    throw FormatBlock.error(label, "cow map block \(index): cluster \(first + UInt64(n)) is marked but the overlay has \(clusters)",
                                            at: offset + UInt64(index * Self.blockSize + byte))
                }
            }
        }
        state = Mutex(State(table: table, durable: table.blocks))
    }

    private static func place(_ cluster: UInt64) -> (block: Int, byte: Int, mask: UInt8) {
        let block = Int(cluster / UInt64(clustersPerBlock)), n = Int(cluster % UInt64(clustersPerBlock))
        return (block, MetadataBlocks.contentStart + n / 8, 1 << UInt8(n % 8))
    }

    func allocation(_ range: ClosedRange<UInt64>) -> Allocation {
        state.withLock { s in
            var set = 0
            for c in range {
                let p = Self.place(c)
                if s.table.blocks[p.block][p.byte] & p.mask != 0 { set += 1 }
            }
            return set == 0 ? .none : set == range.count ? .all : .mixed
        }
    }

    func isAllocated(_ cluster: UInt64) -> Bool { allocation(cluster...cluster) == .all }

    /// Whether every cluster of `range` is allocated on disk too (a FUA write may then pass down).
    func isDurable(_ range: ClosedRange<UInt64>) -> Bool {
        state.withLock { s in
            range.allSatisfy { c in let p = Self.place(c); return s.durable[p.block][p.byte] & p.mask != 0 }
        }
    }

    func set(_ range: ClosedRange<UInt64>) { change(range, to: true) }
    func clear(_ range: ClosedRange<UInt64>) { change(range, to: false) }

    private func change(_ range: ClosedRange<UInt64>, to value: Bool) {
        state.withLock { s in
            for c in range {
                let p = Self.place(c)
                let old = s.table.blocks[p.block][p.byte]
                let new = value ? old | p.mask : old & ~p.mask
                if new != old { s.table.blocks[p.block][p.byte] = new; s.table.dirty.insert(p.block) }
            }
        }
    }

    /// The blocks changed since the last flush, sealed for the disk.
    func takeDirty() -> [(index: Int, bytes: [UInt8])] { state.withLock { $0.table.takeDirty() } }

    /// These blocks are on disk now.
    func persisted(_ taken: [(index: Int, bytes: [UInt8])]) {
        state.withLock { s in for t in taken { s.durable[t.index] = t.bytes } }
    }

    /// Writing these blocks failed: they are dirty again.
    func failed(_ taken: [(index: Int, bytes: [UInt8])]) { state.withLock { $0.table.failed(taken) } }

    /// The allocated clusters, in order.
    func allocatedClusters() -> [UInt64] {
        state.withLock { s in
            var found: [UInt64] = []
            for (index, block) in s.table.blocks.enumerated() {
                for byte in MetadataBlocks.contentStart..<(MetadataBlocks.contentStart + MetadataBlocks.contentBytes) where block[byte] != 0 {
                    for bit in 0..<8 where block[byte] & (1 << UInt8(bit)) != 0 {
                        found.append(UInt64(index) * UInt64(Self.clustersPerBlock) + UInt64((byte - MetadataBlocks.contentStart) * 8 + bit))
                    }
                }
            }
            return found
        }
    }
}
