import Core
import Glibc

/// One record of a `timetravel` log segment: a 48-byte header, then its payload.
///
///     0  magic "TTLR"      4  kind (1 data, 2 zeroes, 3 mark)    8  sequence number
///     16 time (ns since the epoch)   24 disk offset (bytes)      32 disk length (bytes)
///     36 payload bytes     40 CRC-32C of bytes 0..<40 and the payload   44 zero
///
/// A data record's payload is the bytes written; a zeroes record (write-zeroes, discard) has
/// none; a mark (a named snapshot) has its name. Sequence numbers rise by one from record to
/// record across segments, so a record that does not follow its predecessor, or whose CRC
/// fails, ends what a segment holds (a write torn by a crash).
struct TimeTravelRecord: Equatable {
    static let headerBytes = 48
    static let magic: UInt32 = 0x524C_5454   // "TTLR" little-endian

    enum Kind: UInt8 { case data = 1, zeroes = 2, mark = 3 }

    var kind: Kind
    var sequence: UInt64
    var time: UInt64
    var offset: UInt64
    var length: UInt32
    var payloadBytes: UInt32
    /// Where the record starts in its segment.
    var position: UInt64 = 0

    var totalBytes: UInt64 { UInt64(Self.headerBytes) + UInt64(payloadBytes) }
    var payloadPosition: UInt64 { position + UInt64(Self.headerBytes) }

    /// The header's bytes, its CRC covering `payload` (the payload's buffers, in order).
    func header(payload: (UInt32) -> UInt32) -> [UInt8] {
        var bytes = [UInt8](repeating: 0, count: Self.headerBytes)
        bytes.storeLE(Self.magic, at: 0)
        bytes[4] = kind.rawValue
        bytes.storeLE(sequence, at: 8)
        bytes.storeLE(time, at: 16)
        bytes.storeLE(offset, at: 24)
        bytes.storeLE(length, at: 32)
        bytes.storeLE(payloadBytes, at: 36)
        let crc = payload(bytes.withUnsafeBytes { CRC32C.update(0, $0.baseAddress, 40) })
        bytes.storeLE(crc, at: 40)
        return bytes
    }

    /// The record whose header is `bytes` (at `position`), if the header is whole and sane;
    /// the CRC is checked once the payload is read (``checks(_:payload:)``).
    static func parse(_ bytes: UnsafeRawBufferPointer, at position: UInt64) -> TimeTravelRecord? {
        guard bytes.count >= headerBytes, bytes.loadUnaligned(fromByteOffset: 0, as: UInt32.self) == magic.littleEndian,
              let kind = Kind(rawValue: bytes[4]) else { return nil }
        func le<T: FixedWidthInteger>(_ offset: Int, _: T.Type) -> T { T(littleEndian: bytes.loadUnaligned(fromByteOffset: offset, as: T.self)) }
        let record = TimeTravelRecord(kind: kind, sequence: le(8, UInt64.self), time: le(16, UInt64.self), offset: le(24, UInt64.self),
                                      length: le(32, UInt32.self), payloadBytes: le(36, UInt32.self), position: position)
        switch kind {
        case .data: guard record.payloadBytes == record.length, record.length > 0 else { return nil }
        case .zeroes: guard record.payloadBytes == 0, record.length > 0 else { return nil }
        case .mark: guard record.payloadBytes > 0, record.payloadBytes <= 4096 else { return nil }
        }
        return record
    }

    /// Whether the CRC in `header` covers it and `payload`.
    static func checks(_ header: UnsafeRawBufferPointer, payload: UnsafeRawBufferPointer) -> Bool {
        var crc = CRC32C.update(0, header.baseAddress, 40)
        if payload.count > 0 { crc = CRC32C.update(crc, payload.baseAddress, payload.count) }
        return crc == UInt32(littleEndian: header.loadUnaligned(fromByteOffset: 40, as: UInt32.self))
    }

    /// Nanoseconds since the epoch, now.
    static func now() -> UInt64 {
        var t = timespec()
        clock_gettime(CLOCK_REALTIME, &t)
        return UInt64(t.tv_sec) * 1_000_000_000 + UInt64(t.tv_nsec)
    }
}

/// Reads the records of a segment file in order, checking each, and says where the valid part
/// ends: what recovery and `softdev timetravel-points` both walk.
struct TimeTravelSegmentScan {
    var records: [TimeTravelRecord] = []
    /// Names of the marks, by sequence number.
    var marks: [UInt64: String] = [:]
    /// The end of the last whole record.
    var validEnd: UInt64 = 0
    /// Why the scan stopped before the end of the file (nil: it read it all).
    var stoppedBecause: String?

    /// Scans `file`; `after` is the sequence number the first record must follow (nil: any).
    init(_ file: FormatFile, after previous: UInt64?) throws(BlockError) {
        let size = try file.size
        var expected = previous.map { $0 + 1 }
        var position: UInt64 = 0
        let window = 1 << 20
        var capacity = window
        var buffer = UnsafeMutableRawPointer.allocate(byteCount: capacity, alignment: 16)
        defer { buffer.deallocate() }
        while position < size {
            let headerBytes = try file.read(count: Int(min(UInt64(TimeTravelRecord.headerBytes), size - position)), at: position, what: "a record header")
            guard let record = headerBytes.withUnsafeBytes({ TimeTravelRecord.parse($0, at: position) }) else {
                stoppedBecause = "no valid record header at offset \(position)"; break
            }
            guard expected == nil || record.sequence == expected else {
                stoppedBecause = "record \(record.sequence) at offset \(position) does not follow record \(expected! - 1)"; break
            }
            guard position + record.totalBytes <= size else {
                stoppedBecause = "record \(record.sequence) at offset \(position) is cut short"; break
            }
            let n = Int(record.payloadBytes)
            if capacity < n { buffer.deallocate(); capacity = n; buffer = .allocate(byteCount: capacity, alignment: 16) }
            if n > 0 { try file.read(buffer, count: n, at: record.payloadPosition, what: "record \(record.sequence)'s payload") }
            let payload = UnsafeRawBufferPointer(start: buffer, count: n)
            guard headerBytes.withUnsafeBytes({ TimeTravelRecord.checks($0, payload: payload) }) else {
                stoppedBecause = "record \(record.sequence) at offset \(position) fails its CRC"; break
            }
            if record.kind == .mark { marks[record.sequence] = String(decoding: payload, as: UTF8.self) }
            records.append(record)
            position += record.totalBytes
            validEnd = position
            expected = record.sequence + 1
        }
    }
}
