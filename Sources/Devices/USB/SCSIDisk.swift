import Core

/// SCSI sense data: key, additional sense code and qualifier (SPC-4 §4.5).
public struct SCSISense: Equatable, Sendable, CustomStringConvertible {
    public var key: UInt8, asc: UInt8, ascq: UInt8
    public init(_ key: UInt8, _ asc: UInt8, _ ascq: UInt8) { self.key = key; self.asc = asc; self.ascq = ascq }
    public static let none = SCSISense(0, 0, 0)
    public static let invalidOpcode = SCSISense(0x05, 0x20, 0x00)
    public static let lbaOutOfRange = SCSISense(0x05, 0x21, 0x00)
    public static let invalidField = SCSISense(0x05, 0x24, 0x00)
    public static let lunNotSupported = SCSISense(0x05, 0x25, 0x00)
    public static let savingNotSupported = SCSISense(0x05, 0x39, 0x00)
    public static let writeProtected = SCSISense(0x07, 0x27, 0x00)
    public static let spaceAllocationFailed = SCSISense(0x07, 0x27, 0x07)
    public static let readError = SCSISense(0x03, 0x11, 0x00)
    public static let writeError = SCSISense(0x03, 0x0C, 0x00)
    public var description: String { [key, asc, ascq].map { hex2($0) }.joined(separator: "/") }

    /// The sense a failed block operation reports.
    static func of(_ error: BlockError, writing: Bool) -> SCSISense {
        switch error.code {
        case .readOnly: return .writeProtected
        case .noSpace: return .spaceAllocationFailed
        case .outOfRange: return .lbaOutOfRange
        case .invalid: return .invalidField
        case .io, .notSupported: return writing ? .writeError : .readError
        }
    }
}

func hex2(_ v: UInt8) -> String { v < 16 ? "0" + String(v, radix: 16) : String(v, radix: 16) }

/// The SCSI direct-access device a USB stick presents, over a block stack: it decodes each
/// command block Linux's sd and usb-storage send (and a few more), answers the ones it can
/// from memory, and says which block operation the others need. It keeps the sense of the
/// last failed command for REQUEST SENSE. Not thread-safe: its owner serialises commands.
struct SCSIDisk {
    /// What a command needs done.
    enum Plan: Equatable {
        /// No data; GOOD (or CHECK CONDITION when `sense` was set).
        case none
        /// Data for the host (already cut to the allocation length).
        case dataIn([UInt8])
        /// Read `length` bytes at `offset` for the host.
        case read(offset: UInt64, length: Int)
        /// Take `length` bytes from the host and write them at `offset`.
        case write(offset: UInt64, length: Int, fua: Bool)
        /// Flush the stack's cache.
        case flush
        /// Data the host sends that is accepted and dropped (VERIFY with BYTCHK).
        case discardOut(length: Int)
    }

    let vendor: String, product: String, serial: String
    let blockSize: Int
    let blocks: UInt64
    let writable: Bool
    let writeCache: Bool
    let canFUA: Bool
    /// The largest READ or WRITE taken in one command (bigger ones: invalid field in CDB).
    static let maxTransfer = 16 << 20
    /// The sense of the last command (REQUEST SENSE reports it and clears it).
    private(set) var sense = SCSISense.none

    init(vendor: String, product: String, serial: String, geometry: BlockGeometry, capabilities: BlockCapabilities, readOnly: Bool) {
        self.vendor = vendor; self.product = product; self.serial = serial
        blockSize = Int(geometry.logicalBlockSize)
        blocks = geometry.size / UInt64(geometry.logicalBlockSize)
        writable = !readOnly && capabilities.contains(.write)
        writeCache = writable && capabilities.contains(.flush)
        canFUA = capabilities.contains(.fua)
    }

    /// Records the outcome of a block operation the plan asked for.
    mutating func failed(_ sense: SCSISense) { self.sense = sense }

    /// Decodes `cdb` (for LUN `lun`) and returns what to do; a refused command sets `sense` and
    /// returns `.none` (the caller reports CHECK CONDITION when `sense` is not `.none`).
    mutating func plan(_ cdb: [UInt8], lun: UInt8) -> Plan {
        let opcode = cdb.first ?? 0
        if opcode != 0x03 { sense = .none }
        guard lun == 0 else { return refuse(.lunNotSupported) }
        switch opcode {
        case 0x00, 0x1E, 0x1B:   // TEST UNIT READY, PREVENT ALLOW MEDIUM REMOVAL, START STOP UNIT
            return .none
        case 0x03:   // REQUEST SENSE, fixed format
            var data = [UInt8](repeating: 0, count: 18)
            data[0] = 0x70; data[2] = sense.key; data[7] = 10; data[12] = sense.asc; data[13] = sense.ascq
            sense = .none
            return .dataIn(Array(data.prefix(Int(byte(cdb, 4)))))
        case 0x12:   // INQUIRY
            return inquiry(cdb)
        case 0x25:   // READ CAPACITY(10)
            var data = be32(UInt32(clamping: blocks == 0 ? 0 : blocks - 1))
            data += be32(UInt32(blockSize))
            return .dataIn(data)
        case 0x9E where byte(cdb, 1) & 0x1f == 0x10:   // SERVICE ACTION IN(16): READ CAPACITY(16)
            var data = be64(blocks == 0 ? 0 : blocks - 1) + be32(UInt32(blockSize))
            data += [0, 0] + [UInt8](repeating: 0, count: 18)
            return .dataIn(Array(data.prefix(Int(field(cdb, 10, 4)))))
        case 0x1A:   // MODE SENSE(6)
            return modeSense(cdb, ten: false)
        case 0x5A:   // MODE SENSE(10)
            return modeSense(cdb, ten: true)
        case 0x23:   // READ FORMAT CAPACITIES
            var data: [UInt8] = [0, 0, 0, 8] + be32(UInt32(clamping: blocks)) + [0x02]
            data += Array(be32(UInt32(blockSize)).suffix(3))
            return .dataIn(Array(data.prefix(Int(field(cdb, 7, 2)))))
        case 0xA0:   // REPORT LUNS: LUN 0 alone
            let data: [UInt8] = [0, 0, 0, 8] + [UInt8](repeating: 0, count: 12)
            return .dataIn(Array(data.prefix(Int(field(cdb, 6, 4)))))
        case 0x08, 0x0A:   // READ(6), WRITE(6)
            let count = byte(cdb, 4) == 0 ? 256 : UInt64(byte(cdb, 4))
            return transfer(write: opcode == 0x0A, lba: field(cdb, 1, 3) & 0x1f_ffff, count: count, fua: false)
        case 0x28, 0x2A:   // READ(10), WRITE(10)
            return transfer(write: opcode == 0x2A, lba: field(cdb, 2, 4), count: field(cdb, 7, 2), fua: byte(cdb, 1) & 0x08 != 0)
        case 0xA8, 0xAA:   // READ(12), WRITE(12)
            return transfer(write: opcode == 0xAA, lba: field(cdb, 2, 4), count: field(cdb, 6, 4), fua: byte(cdb, 1) & 0x08 != 0)
        case 0x88, 0x8A:   // READ(16), WRITE(16)
            return transfer(write: opcode == 0x8A, lba: field(cdb, 2, 8), count: field(cdb, 10, 4), fua: byte(cdb, 1) & 0x08 != 0)
        case 0x35, 0x91:   // SYNCHRONIZE CACHE(10), (16)
            return writeCache ? .flush : .none
        case 0x2F:   // VERIFY(10): the medium is always good; BYTCHK's data is taken and dropped
            let lba = field(cdb, 2, 4), count = field(cdb, 7, 2)
            guard lba <= blocks, count <= blocks - lba else { return refuse(.lbaOutOfRange) }
            return byte(cdb, 1) & 0x06 != 0 ? .discardOut(length: Int(count) * blockSize) : .none
        default:
            return refuse(.invalidOpcode)
        }
    }

    private mutating func refuse(_ s: SCSISense) -> Plan { sense = s; return .none }

    private mutating func transfer(write: Bool, lba: UInt64, count: UInt64, fua: Bool) -> Plan {
        guard lba <= blocks, count <= blocks - lba else { return refuse(.lbaOutOfRange) }
        if write && !writable { return refuse(.writeProtected) }
        guard count * UInt64(blockSize) <= UInt64(Self.maxTransfer) else { return refuse(.invalidField) }
        guard count > 0 else { return .none }
        let offset = lba * UInt64(blockSize), length = Int(count) * blockSize
        return write ? .write(offset: offset, length: length, fua: fua && canFUA) : .read(offset: offset, length: length)
    }

    private mutating func inquiry(_ cdb: [UInt8]) -> Plan {
        let allocation = Int(field(cdb, 3, 2))
        if byte(cdb, 1) & 0x01 != 0 {   // EVPD
            let page = byte(cdb, 2)
            let data: [UInt8]
            switch page {
            case 0x00: data = [0, 0x00, 0, 2, 0x00, 0x80]
            case 0x80:
                let s = Array(serial.utf8.prefix(251))
                data = [0, 0x80, 0, UInt8(s.count)] + s
            default: return refuse(.invalidField)
            }
            return .dataIn(Array(data.prefix(allocation)))
        }
        guard byte(cdb, 2) == 0 else { return refuse(.invalidField) }
        // Direct access, removable (RMB), SPC-2, response format 2, 31 more bytes.
        var data: [UInt8] = [0x00, 0x80, 0x04, 0x02, 31, 0, 0, 0]
        data += padded(vendor, 8) + padded(product, 16) + padded("1.00", 4)
        return .dataIn(Array(data.prefix(allocation)))
    }

    private mutating func modeSense(_ cdb: [UInt8], ten: Bool) -> Plan {
        let control = byte(cdb, 2) >> 6, page = byte(cdb, 2) & 0x3f
        let dbd = byte(cdb, 1) & 0x08 != 0
        guard control != 3 else { return refuse(.savingNotSupported) }
        // The caching page (08h): WCE when the stack has a cache to flush; nothing changeable.
        var caching = [UInt8](repeating: 0, count: 20)
        caching[0] = 0x08; caching[1] = 18
        if control != 1 && writeCache { caching[2] = 0x04 }
        let pages: [UInt8]
        switch page {
        case 0x08, 0x3F: pages = caching
        default: return refuse(.invalidField)
        }
        let blockDescriptor: [UInt8] = dbd ? [] : [0] + Array(be32(UInt32(min(blocks, 0xff_ffff))).suffix(3)) + [0]
            + Array(be32(UInt32(blockSize)).suffix(3))
        let deviceSpecific: UInt8 = writable ? 0 : 0x80
        var data: [UInt8]
        if ten {
            let length = 6 + blockDescriptor.count + pages.count
            data = [UInt8(length >> 8), UInt8(length & 0xff), 0, deviceSpecific, 0, 0, 0, UInt8(blockDescriptor.count)]
        } else {
            data = [UInt8(3 + blockDescriptor.count + pages.count), 0, deviceSpecific, UInt8(blockDescriptor.count)]
        }
        data += blockDescriptor + pages
        return .dataIn(Array(data.prefix(Int(ten ? field(cdb, 7, 2) : UInt64(byte(cdb, 4))))))
    }

    private func byte(_ cdb: [UInt8], _ i: Int) -> UInt8 { i < cdb.count ? cdb[i] : 0 }
    /// A big-endian field of `count` bytes at `at`.
    private func field(_ cdb: [UInt8], _ at: Int, _ count: Int) -> UInt64 {
        (at..<(at + count)).reduce(0) { $0 << 8 | UInt64(byte(cdb, $1)) }
    }
    private func be32(_ v: UInt32) -> [UInt8] { [UInt8(v >> 24), UInt8(v >> 16 & 0xff), UInt8(v >> 8 & 0xff), UInt8(v & 0xff)] }
    private func be64(_ v: UInt64) -> [UInt8] { be32(UInt32(v >> 32)) + be32(UInt32(v & 0xffff_ffff)) }
    private func padded(_ s: String, _ n: Int) -> [UInt8] {
        let ascii = s.unicodeScalars.map { $0.isASCII && $0.value >= 0x20 ? UInt8($0.value) : UInt8(ascii: "?") }
        return Array(ascii.prefix(n)) + [UInt8](repeating: 0x20, count: max(0, n - ascii.count))
    }
}
