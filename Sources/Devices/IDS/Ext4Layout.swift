/// The parts of ext2/3/4's on-disk format the `ids` filter reads (Linux's
/// Documentation/filesystems/ext4/, fs/ext4/ext4.h, ext4_extents.h and include/linux/jbd2.h):
/// the superblock, the group descriptors, inodes, extent trees, block maps, directory entries
/// and the journal's descriptor blocks. Every field is read with a bounds check: a damaged
/// or hostile file system gives nil or nothing, never a crash.
enum Ext4 {
    static let superblockOffset = 1024
    static let magic: UInt16 = 0xEF53
    static let extentMagic: UInt16 = 0xF30A
    static let rootInode: UInt32 = 2

    struct Superblock: Equatable {
        var blockSize: Int
        var blocksCount: UInt64
        var inodesCount: UInt32
        var blocksPerGroup: UInt32
        var inodesPerGroup: UInt32
        var firstDataBlock: UInt32
        var inodeSize: Int
        var descriptorSize: Int
        var is64Bit: Bool
        var metaBG: Bool
        var journalInode: UInt32
        var groups: Int { Int((blocksCount - UInt64(firstDataBlock) + UInt64(blocksPerGroup) - 1) / UInt64(blocksPerGroup)) }

        /// The superblock in `bytes` (1024 bytes read at offset 1024), if it is one.
        init?(_ bytes: [UInt8]) {
            guard bytes.count >= 1024, bytes.u16(0x38) == Ext4.magic else { return nil }
            let logBlock = bytes.u32(0x18)
            guard logBlock <= 6 else { return nil }
            blockSize = 1024 << Int(logBlock)
            let incompat = bytes.u32(0x60)
            is64Bit = incompat & 0x80 != 0
            metaBG = incompat & 0x10 != 0
            blocksCount = UInt64(bytes.u32(0x4)) | (is64Bit ? UInt64(bytes.u32(0x150)) << 32 : 0)
            inodesCount = bytes.u32(0x0)
            blocksPerGroup = bytes.u32(0x20)
            inodesPerGroup = bytes.u32(0x28)
            firstDataBlock = bytes.u32(0x14)
            let revision = bytes.u32(0x4C)
            inodeSize = revision == 0 ? 128 : Int(bytes.u16(0x58))
            descriptorSize = is64Bit ? max(32, Int(bytes.u16(0xFE))) : 32
            journalInode = bytes.u32(0xE0)
            guard blocksPerGroup > 0, inodesPerGroup > 0, inodeSize >= 128, inodeSize <= blockSize,
                  inodeSize & (inodeSize - 1) == 0, blocksCount > 0, descriptorSize <= 1024 else { return nil }
        }
    }

    /// Where group `g`'s descriptor is: the block after the superblock's, unless meta_bg
    /// (not read: `ids` says so at open).
    static func descriptorLocation(_ sb: Superblock, group g: Int) -> (block: UInt64, offset: Int) {
        let perBlock = sb.blockSize / sb.descriptorSize
        return (UInt64(sb.firstDataBlock) + 1 + UInt64(g / perBlock), (g % perBlock) * sb.descriptorSize)
    }

    struct GroupDescriptor: Equatable {
        var blockBitmap: UInt64
        var inodeBitmap: UInt64
        var inodeTable: UInt64
        /// INODE_UNINIT: no inode of the group is in use (its table may be garbage).
        var inodesUninitialized: Bool
        /// Inodes at the end of the group's table never used (their slots may be garbage).
        var unusedInodes: UInt32
        init(_ bytes: ArraySlice<UInt8>, is64Bit: Bool) {
            let b = Array(bytes)
            inodesUninitialized = b.u16(0x12) & 0x1 != 0
            unusedInodes = UInt32(b.u16(0x1C)) | (is64Bit && b.count >= 64 ? UInt32(b.u16(0x32)) << 16 : 0)
            blockBitmap = UInt64(b.u32(0x0)) | (is64Bit && b.count >= 64 ? UInt64(b.u32(0x20)) << 32 : 0)
            inodeBitmap = UInt64(b.u32(0x4)) | (is64Bit && b.count >= 64 ? UInt64(b.u32(0x24)) << 32 : 0)
            inodeTable = UInt64(b.u32(0x8)) | (is64Bit && b.count >= 64 ? UInt64(b.u32(0x28)) << 32 : 0)
        }
    }

    struct Inode: Equatable {
        var mode: UInt16
        var links: UInt16
        var flags: UInt32
        var size: UInt64
        /// i_block: the extent tree's root, a block map, an inline symlink or inline data.
        var blockArea: [UInt8]
        var isDirectory: Bool { mode & 0xF000 == 0x4000 }
        var isRegular: Bool { mode & 0xF000 == 0x8000 }
        var isSymlink: Bool { mode & 0xF000 == 0xA000 }
        var usesExtents: Bool { flags & 0x80000 != 0 }
        var hasInlineData: Bool { flags & 0x1000_0000 != 0 }
        var inUse: Bool { links > 0 && mode != 0 }
        /// A symbolic link short enough to live in i_block has no blocks.
        var storesNoBlocks: Bool { hasInlineData || (isSymlink && size < 60 && !usesExtents) }

        init?(_ bytes: ArraySlice<UInt8>) {
            let b = Array(bytes)
            guard b.count >= 128 else { return nil }
            mode = b.u16(0x0)
            links = b.u16(0x1A)
            flags = b.u32(0x20)
            size = UInt64(b.u32(0x4)) | UInt64(b.u32(0x6C)) << 32
            blockArea = Array(b[0x28..<0x64])
        }
    }

    /// One extent: `count` blocks at `start` on disk.
    struct Extent: Equatable {
        var start: UInt64
        var count: UInt32
    }

    /// The extent tree node in `node` (i_block's 60 bytes, or a tree block): its leaves'
    /// extents, or its children's block numbers. Nil if the header is not an extent header.
    static func extentNode(_ node: [UInt8]) -> (depth: Int, extents: [Extent], children: [UInt64])? {
        guard node.count >= 12, node.u16(0) == extentMagic else { return nil }
        let entries = Int(node.u16(2)), depth = Int(node.u16(6))
        guard depth <= 5, 12 + entries * 12 <= node.count else { return nil }
        var extents: [Extent] = [], children: [UInt64] = []
        for i in 0..<entries {
            let e = 12 + i * 12
            if depth == 0 {
                var length = UInt32(node.u16(e + 4))
                if length > 32768 { length -= 32768 }   // an uninitialized extent
                let start = UInt64(node.u16(e + 6)) << 32 | UInt64(node.u32(e + 8))
                if length > 0 { extents.append(Extent(start: start, count: length)) }
            } else {
                children.append(UInt64(node.u16(e + 8)) << 32 | UInt64(node.u32(e + 4)))
            }
        }
        return (depth, extents, children)
    }

    /// A directory block's entries: (inode, name, file type), skipping unused entries, the
    /// htree's internal nodes (one empty entry spanning the block) and the checksum tail.
    static func directoryEntries(_ block: [UInt8]) -> [(inode: UInt32, name: String)] {
        var entries: [(UInt32, String)] = []
        var at = 0
        while at + 8 <= block.count {
            let inode = block.u32(at), recordLength = Int(block.u16(at + 4)), nameLength = Int(block[at + 6])
            guard recordLength >= 8, at + recordLength <= block.count, 8 + nameLength <= recordLength else { break }
            if inode != 0 && nameLength > 0 {
                let name = String(decoding: block[(at + 8)..<(at + 8 + nameLength)], as: UTF8.self)
                if name != "." && name != ".." { entries.append((inode, name)) }
            }
            at += recordLength
        }
        return entries
    }

    // MARK: The journal (jbd2)

    static let journalMagic: UInt32 = 0xC03B_3998

    /// The journal superblock's features that change how tags are laid out.
    struct JournalFormat: Equatable {
        var blockSize: Int
        var is64Bit: Bool
        var checksumV3: Bool
        var checksumV2: Bool
        init?(_ bytes: [UInt8]) {
            guard bytes.count >= 0x30, bytes.u32be(0) == journalMagic else { return nil }
            let type = bytes.u32be(4)
            guard type == 3 || type == 4 else { return nil }   // superblock v1 or v2
            blockSize = Int(bytes.u32be(0x0C))
            let incompat = type == 4 ? bytes.u32be(0x28) : 0
            is64Bit = incompat & 0x2 != 0
            checksumV2 = incompat & 0x8 != 0
            checksumV3 = incompat & 0x10 != 0
            guard blockSize >= 1024, blockSize <= 65536 else { return nil }
        }
        /// jbd2's journal_tag_bytes(): tag3 with csum v3, else the 12-byte tag (+2 with csum
        /// v2) without its high block number unless 64-bit.
        var tagBytes: Int { checksumV3 ? 16 : 12 + (checksumV2 ? 2 : 0) - (is64Bit ? 0 : 4) }
    }

    /// A descriptor block's tags: the home block of each journal block after it, and whether
    /// its first four bytes were escaped (the magic number, replaced by zeroes in the journal).
    /// Nil if `block` is not a descriptor block.
    static func descriptorTags(_ block: [UInt8], format: JournalFormat) -> [(home: UInt64, escaped: Bool)]? {
        guard block.count >= 12, block.u32be(0) == journalMagic, block.u32be(4) == 1 else { return nil }
        var tags: [(UInt64, Bool)] = []
        var at = 12
        let tail = format.checksumV2 || format.checksumV3 ? 4 : 0
        while at + format.tagBytes <= block.count - tail {
            let low = UInt64(block.u32be(at))
            let flags: UInt32, high: UInt64
            if format.checksumV3 {
                flags = block.u32be(at + 4)
                high = format.is64Bit ? UInt64(block.u32be(at + 8)) : 0
            } else {
                flags = UInt32(block.u16be(at + 6))
                high = format.is64Bit ? UInt64(block.u32be(at + 8)) : 0
            }
            tags.append((high << 32 | low, flags & 0x1 != 0))
            at += format.tagBytes
            if flags & 0x2 == 0 { at += 16 }      // not SAME_UUID: a UUID follows
            if flags & 0x8 != 0 { break }         // LAST_TAG
        }
        return tags
    }

    /// Whether `block` is a journal commit block.
    static func isCommitBlock(_ block: [UInt8]) -> Bool {
        block.count >= 12 && block.u32be(0) == journalMagic && block.u32be(4) == 2
    }
}

extension Array where Element == UInt8 {
    func u16(_ at: Int) -> UInt16 { at + 2 <= count ? UInt16(self[at]) | UInt16(self[at + 1]) << 8 : 0 }
    func u32(_ at: Int) -> UInt32 { at + 4 <= count ? UInt32(u16(at)) | UInt32(u16(at + 2)) << 16 : 0 }
    func u16be(_ at: Int) -> UInt16 { at + 2 <= count ? UInt16(self[at]) << 8 | UInt16(self[at + 1]) : 0 }
    func u32be(_ at: Int) -> UInt32 { at + 4 <= count ? UInt32(u16be(at)) << 16 | UInt32(u16be(at + 2)) : 0 }
}
