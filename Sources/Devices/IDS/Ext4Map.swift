import Core
import Glibc

/// What the `ids` filter knows of the ext2/3/4 file system on its device: which inode owns
/// each block (its data, a directory's entries, an extent tree node or an indirect block),
/// and each inode's names, hence each block's path. Built by reading the file system at open,
/// then kept current from the blocks the guest writes: inode table blocks, directory blocks,
/// tree blocks, the superblock and group descriptors (a new mkfs), and the journal, whose
/// committed transactions carry the metadata before it is written home (a semantically smart
/// disk, as the block-tap paper puts it).
///
/// Not thread-safe: the filter serializes its calls.
final class Ext4Map {
    enum Role: UInt8 { case data = 0, directory = 1, tree = 2 }

    struct Owner: Equatable {
        var inode: UInt32
        var role: Role
    }

    /// A change the map saw that rules may care about: a name that appeared, went or now
    /// names another inode, or a file whose blocks or size changed.
    struct Change: Equatable {
        var inode: UInt32
        var detail: String
    }

    private let read: (UInt64, Int) -> [UInt8]?
    private(set) var superblock: Ext4.Superblock?
    private var groups: [Ext4.GroupDescriptor] = []
    /// Block -> the first inode number of the inode table block it is.
    private var inodeTableBlocks: [UInt64: UInt32] = [:]
    private var descriptorBlocks: Set<UInt64> = []
    private(set) var owners: [UInt64: Owner] = [:]

    private struct InodeState {
        var inode: Ext4.Inode
        var blocks: [UInt64]
    }
    private var inodes: [UInt32: InodeState] = [:]
    /// Each inode's names: (directory, name), from the directory blocks.
    private var links: [UInt32: [(parent: UInt32, name: String)]] = [:]
    /// Each directory block's entries as last parsed, to see what a write changed.
    private var directoryBlocks: [UInt64: [(inode: UInt32, name: String)]] = [:]

    // The journal.
    private var journalFormat: Ext4.JournalFormat?
    /// The journal's blocks: disk block -> position in the journal, and back.
    private var journalPosition: [UInt64: Int] = [:]
    private var journalBlocks: [UInt64] = []
    /// Journal positions a descriptor announced: position -> (home block, escaped).
    private var announced: [Int: (home: UInt64, escaped: Bool)] = [:]
    /// The blocks of the open transaction, by home block, in order.
    private var pending: [(home: UInt64, contents: [UInt8])] = []

    /// `read(offset, length)` reads the device (nil on an error).
    init(read: @escaping (UInt64, Int) -> [UInt8]?) {
        self.read = read
        rescan()
    }

    var blockSize: Int { superblock?.blockSize ?? 4096 }

    // MARK: Whole scan

    /// Reads the file system from scratch (at open, and when a new one is made).
    func rescan() {
        superblock = nil; groups = []; inodeTableBlocks = [:]; descriptorBlocks = []; owners = [:]
        inodes = [:]; links = [:]; directoryBlocks = [:]
        journalFormat = nil; journalPosition = [:]; journalBlocks = []; announced = [:]; pending = []
        guard let bytes = read(UInt64(Ext4.superblockOffset), 1024), let sb = Ext4.Superblock(bytes), !sb.metaBG,
              sb.groups <= 1 << 20 else { return }
        superblock = sb
        for g in 0..<sb.groups {
            let place = Ext4.descriptorLocation(sb, group: g)
            descriptorBlocks.insert(place.block)
            guard let block = readBlock(place.block) else { superblock = nil; return }
            groups.append(Ext4.GroupDescriptor(block[place.offset..<(place.offset + sb.descriptorSize)], is64Bit: sb.is64Bit))
        }
        let tableBlocks = (Int(sb.inodesPerGroup) * sb.inodeSize + sb.blockSize - 1) / sb.blockSize
        let perBlock = sb.blockSize / sb.inodeSize
        for (g, group) in groups.enumerated() {
            for i in 0..<tableBlocks { inodeTableBlocks[group.inodeTable + UInt64(i)] = UInt32(g) * sb.inodesPerGroup + UInt32(i * perBlock) + 1 }
        }
        // Every inode in use, then the directories' entries.
        for (g, group) in groups.enumerated() where !group.inodesUninitialized {
            let used = Int(sb.inodesPerGroup) - Int(min(group.unusedInodes, sb.inodesPerGroup))
            let blocks = (used * sb.inodeSize + sb.blockSize - 1) / sb.blockSize
            for i in 0..<blocks {
                guard let table = readBlock(group.inodeTable + UInt64(i)) else { continue }
                let first = UInt32(g) * sb.inodesPerGroup + UInt32(i * perBlock) + 1
                for slot in 0..<perBlock where Int(first) - 1 + slot - g * Int(sb.inodesPerGroup) < used {
                    let number = first + UInt32(slot)
                    guard let inode = Ext4.Inode(table[(slot * sb.inodeSize)..<((slot + 1) * sb.inodeSize)]), inode.inUse else { continue }
                    install(number, inode)
                }
            }
        }
        for (number, state) in inodes where state.inode.isDirectory { parseDirectory(number) }
        setUpJournal()
    }

    /// A committed transaction's blocks while it is applied: newer than the disk.
    private var overlay: [UInt64: [UInt8]] = [:]

    private func readBlock(_ block: UInt64) -> [UInt8]? {
        guard let sb = superblock, block < sb.blocksCount else { return nil }
        if let newer = overlay[block] { return newer }
        return read(block * UInt64(sb.blockSize), sb.blockSize)
    }

    // MARK: Inodes

    /// Records `inode` as number `number` and the blocks it owns.
    private func install(_ number: UInt32, _ inode: Ext4.Inode) {
        let blocks = collectBlocks(inode)
        for (block, role) in blocks { owners[block] = Owner(inode: number, role: role) }
        inodes[number] = InodeState(inode: inode, blocks: blocks.map(\.0))
    }

    /// Forgets inode `number`'s blocks (and, for a directory, its entries).
    private func uninstall(_ number: UInt32) {
        guard let state = inodes.removeValue(forKey: number) else { return }
        for block in state.blocks where owners[block]?.inode == number {
            owners[block] = nil
            if let entries = directoryBlocks.removeValue(forKey: block) {
                for entry in entries { removeLink(entry.inode, parent: number, name: entry.name) }
            }
        }
    }

    /// The blocks an inode owns, each with its role: its extent tree's nodes and leaves (or its
    /// block map's indirect blocks and data). Bounded by the file system's size, so a loop in a
    /// damaged tree ends.
    private func collectBlocks(_ inode: Ext4.Inode) -> [(UInt64, Role)] {
        guard let sb = superblock, !inode.storesNoBlocks else { return [] }
        let dataRole: Role = inode.isDirectory ? .directory : .data
        var out: [(UInt64, Role)] = []
        let limit = Int(min(sb.blocksCount, 1 << 26))
        func add(_ block: UInt64, _ role: Role) -> Bool {
            guard block > 0, block < sb.blocksCount, out.count < limit else { return false }
            out.append((block, role)); return true
        }
        if inode.usesExtents {
            var nodes = [(inode.blockArea, 0)]
            while let (node, level) = nodes.popLast(), level <= 5 {
                guard let parsed = Ext4.extentNode(node) else { continue }
                for extent in parsed.extents {
                    for b in 0..<UInt64(extent.count) where !add(extent.start + b, dataRole) { break }
                }
                for child in parsed.children where add(child, .tree) {
                    if let block = readBlock(child) { nodes.append((block, level + 1)) }
                }
            }
        } else {
            let perBlock = sb.blockSize / 4
            func walk(_ block: UInt64, depth: Int) {
                guard add(block, depth == 0 ? dataRole : .tree), depth > 0, let bytes = readBlock(block) else { return }
                for i in 0..<perBlock { let next = UInt64(bytes.u32(i * 4)); if next != 0 { walk(next, depth: depth - 1) } }
            }
            for i in 0..<15 {
                let block = UInt64(inode.blockArea.u32(i * 4))
                if block != 0 { walk(block, depth: i < 12 ? 0 : i - 11) }
            }
        }
        return out
    }

    // MARK: Directories

    /// Reads every block of directory `number`; returns the names that appeared or went.
    @discardableResult
    private func parseDirectory(_ number: UInt32) -> [Change] {
        guard let state = inodes[number] else { return [] }
        var changes: [Change] = []
        for block in state.blocks where owners[block] == Owner(inode: number, role: .directory) {
            if let bytes = readBlock(block) { changes += updateDirectoryBlock(block, bytes, directory: number) }
        }
        return changes
    }

    /// Reads the entries of directory block `block` from `bytes`; returns what changed.
    @discardableResult
    private func updateDirectoryBlock(_ block: UInt64, _ bytes: [UInt8], directory: UInt32) -> [Change] {
        let old = directoryBlocks[block] ?? []
        let new = Ext4.directoryEntries(bytes)
        directoryBlocks[block] = new
        var changes: [Change] = []
        for entry in old where !new.contains(where: { $0.inode == entry.inode && $0.name == entry.name }) {
            let path = self.path(of: entry.inode)
            removeLink(entry.inode, parent: directory, name: entry.name)
            if let path { changes.append(Change(inode: entry.inode, detail: "name \(path) removed")) }
        }
        for entry in new where !old.contains(where: { $0.inode == entry.inode && $0.name == entry.name }) {
            links[entry.inode, default: []].append((directory, entry.name))
            changes.append(Change(inode: entry.inode, detail: "name \(path(of: entry.inode) ?? entry.name) now names inode \(entry.inode)"))
        }
        return changes
    }

    private func removeLink(_ inode: UInt32, parent: UInt32, name: String) {
        links[inode]?.removeAll { $0.parent == parent && $0.name == name }
        if links[inode]?.isEmpty == true { links[inode] = nil }
    }

    // MARK: Paths

    /// The path of `inode` through its first name ("/" for the root), nil if it has none.
    func path(of inode: UInt32) -> String? {
        if inode == Ext4.rootInode { return "/" }
        var parts: [String] = []
        var current = inode
        for _ in 0..<256 {
            guard let link = links[current]?.first else { return nil }
            parts.append(link.name)
            if link.parent == Ext4.rootInode { return "/" + parts.reversed().joined(separator: "/") }
            current = link.parent
        }
        return nil
    }

    /// Every path of `inode` (hard links give several).
    func paths(of inode: UInt32) -> [String] {
        guard let names = links[inode] else { return inode == Ext4.rootInode ? ["/"] : [] }
        return names.compactMap { link in path(of: link.parent).map { $0 == "/" ? "/" + link.name : $0 + "/" + link.name } }
    }

    /// The owner of file-system block `block`.
    func owner(of block: UInt64) -> Owner? { owners[block] }

    // MARK: Keeping current

    /// Whether a write to file-system block `block` changes what the map knows: the map wants
    /// its new contents then.
    func isMetadata(_ block: UInt64) -> Bool {
        guard superblock != nil else { return block * UInt64(blockSize) <= UInt64(Ext4.superblockOffset) && UInt64(Ext4.superblockOffset) < (block + 1) * UInt64(blockSize) }
        if isSuperblock(block) || descriptorBlocks.contains(block) || inodeTableBlocks[block] != nil || journalPosition[block] != nil { return true }
        if let owner = owners[block], owner.role != .data { return true }
        return false
    }

    private func isSuperblock(_ block: UInt64) -> Bool {
        let size = UInt64(blockSize)
        return block * size <= UInt64(Ext4.superblockOffset) && UInt64(Ext4.superblockOffset) < (block + 1) * size
    }

    /// The guest wrote `contents` to file-system block `block` (and it landed): updates the
    /// map and returns the changes seen. `viaJournal`: contents a committed transaction
    /// carries, not yet written home.
    func written(_ block: UInt64, _ contents: [UInt8], viaJournal: Bool = false) -> [Change] {
        if !viaJournal, let position = journalPosition[block] { return journalWritten(position, contents) }
        if isSuperblock(block) || descriptorBlocks.contains(block) {
            // The journal carries the kernel's counter updates: nothing for the map.
            guard !viaJournal else { return [] }
            // A new file system (mkfs), or the kernel's periodic update of the counters:
            // rescan only when the layout changed.
            let newSuperblock = read(UInt64(Ext4.superblockOffset), 1024).flatMap { Ext4.Superblock($0) }
            var layoutChanged = newSuperblock != superblock
            if !layoutChanged, let sb = superblock, descriptorBlocks.contains(block) {
                for g in 0..<sb.groups {
                    let place = Ext4.descriptorLocation(sb, group: g)
                    guard place.block == block else { continue }
                    let descriptor = Ext4.GroupDescriptor(contents[place.offset..<(place.offset + sb.descriptorSize)], is64Bit: sb.is64Bit)
                    if descriptor.inodeTable != groups[g].inodeTable { layoutChanged = true }
                }
            }
            guard layoutChanged else { return [] }
            rescan()
            guard let sb = superblock else { return [] }
            return [Change(inode: 0, detail: "a file system: \(sb.blocksCount) blocks of \(sb.blockSize) bytes, \(sb.inodesCount) inodes")]
        }
        if let first = inodeTableBlocks[block], let sb = superblock {
            var changes: [Change] = []
            for slot in 0..<(sb.blockSize / sb.inodeSize) {
                let number = first + UInt32(slot)
                guard number <= sb.inodesCount else { break }
                let inode = Ext4.Inode(contents[(slot * sb.inodeSize)..<((slot + 1) * sb.inodeSize)])
                let old = inodes[number]
                if let inode, inode.inUse {
                    guard old?.inode != inode else { continue }
                    uninstall(number)
                    install(number, inode)
                    if inode.isDirectory { changes += parseDirectory(number) }
                    if old != nil, let path = path(of: number) {
                        changes.append(Change(inode: number, detail: "\(path) changed (size \(inode.size), \(inodes[number]!.blocks.count) blocks)"))
                    }
                } else if old != nil {
                    let path = self.path(of: number)
                    uninstall(number)
                    if let path { changes.append(Change(inode: number, detail: "\(path) deleted (inode \(number) freed)")) }
                }
            }
            return changes
        }
        guard let owner = owners[block] else { return [] }
        switch owner.role {
        case .directory: return updateDirectoryBlock(block, contents, directory: owner.inode)
        case .tree:
            // A tree block changed: the inode's blocks again (the tree is read from the disk,
            // where this block has just landed, or from the transaction being applied).
            guard let state = inodes[owner.inode] else { return [] }
            uninstall(owner.inode)
            install(owner.inode, state.inode)
            if state.inode.isDirectory { parseDirectory(owner.inode) }
            return []
        case .data: return []
        }
    }

    // MARK: The journal

    private func setUpJournal() {
        guard let sb = superblock, sb.journalInode != 0, let state = inodes[sb.journalInode] else { return }
        journalBlocks = state.blocks.filter { owners[$0]?.role == .data }
        for (position, block) in journalBlocks.enumerated() { journalPosition[block] = position }
        if let first = journalBlocks.first, let bytes = readBlock(first) { journalFormat = Ext4.JournalFormat(bytes) }
    }

    /// A journal block was written: a descriptor announces the home of the blocks after it,
    /// those blocks are kept, and a commit applies them to the map.
    private func journalWritten(_ position: Int, _ contents: [UInt8]) -> [Change] {
        guard let format = journalFormat else {
            if position == 0 { journalFormat = Ext4.JournalFormat(contents) }
            return []
        }
        if position == 0 { journalFormat = Ext4.JournalFormat(contents) ?? format; return [] }
        if let tags = Ext4.descriptorTags(contents, format: format) {
            var next = position
            for tag in tags {
                next += 1
                if next >= journalBlocks.count { next = 1 }   // the log wraps after its superblock
                announced[next] = tag
            }
            return []
        }
        if Ext4.isCommitBlock(contents) {
            // Applied as if written home: the inode tables first, so that a new directory's
            // or file's blocks are known when their own blocks are read (from the transaction).
            let transaction = pending
            pending = []
            announced = [:]
            overlay = Dictionary(transaction.map { ($0.home, $0.contents) }, uniquingKeysWith: { $1 })
            defer { overlay = [:] }
            let tables = transaction.filter { inodeTableBlocks[$0.home] != nil }
            let rest = transaction.filter { inodeTableBlocks[$0.home] == nil }
            return (tables + rest).flatMap { isMetadata($0.home) ? written($0.home, $0.contents, viaJournal: true) : [] }
        }
        if let tag = announced.removeValue(forKey: position) {
            var block = contents
            if tag.escaped && block.count >= 4 {
                block[0] = 0xC0; block[1] = 0x3B; block[2] = 0x39; block[3] = 0x98
            }
            pending.append((tag.home, block))
        }
        return []
    }
}
