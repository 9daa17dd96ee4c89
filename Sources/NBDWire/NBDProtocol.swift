import Core
import Glibc

/// The numbers of the NBD protocol (doc/proto.md in NetworkBlockDevice/nbd), as qemu-nbd,
/// nbdkit and libnbd speak it. Everything on the wire is big-endian. Shared by the NBD export
/// (the server) and the `nbd` device (a client).
public enum NBD {
    // Handshake: "NBDMAGIC", then "IHAVEOPT" marks the (fixed) newstyle negotiation.
    public static let initMagic: UInt64 = 0x4e42_444d_4147_4943
    public static let optionMagic: UInt64 = 0x4948_4156_454f_5054
    public static let optionReplyMagic: UInt64 = 0x0003_e889_0455_65a9
    public static let requestMagic: UInt32 = 0x2560_9513
    public static let simpleReplyMagic: UInt32 = 0x6744_6698
    public static let structuredReplyMagic: UInt32 = 0x668e_33ef

    // Handshake flags (server) and client flags: the same two bits.
    public static let flagFixedNewstyle: UInt16 = 1 << 0
    public static let flagNoZeroes: UInt16 = 1 << 1

    public enum Option: UInt32 {
        case exportName = 1, abort = 2, list = 3, peekExport = 4, startTLS = 5, info = 6, go = 7
        case structuredReply = 8, listMetaContext = 9, setMetaContext = 10, extendedHeaders = 11
    }

    // Option reply types; errors have the top bit set.
    public static let repAck: UInt32 = 1
    public static let repServer: UInt32 = 2
    public static let repInfo: UInt32 = 3
    public static let repMetaContext: UInt32 = 4
    public static let repErrUnsup: UInt32 = 0x8000_0001
    public static let repErrPolicy: UInt32 = 0x8000_0002
    public static let repErrInvalid: UInt32 = 0x8000_0003
    public static let repErrUnknown: UInt32 = 0x8000_0006

    // NBD_INFO_* in NBD_REP_INFO replies to OPT_INFO and OPT_GO.
    public static let infoExport: UInt16 = 0
    public static let infoName: UInt16 = 1
    public static let infoDescription: UInt16 = 2
    public static let infoBlockSize: UInt16 = 3

    // Transmission flags: what the export lets the client send.
    public static let tflagHasFlags: UInt16 = 1 << 0
    public static let tflagReadOnly: UInt16 = 1 << 1
    public static let tflagSendFlush: UInt16 = 1 << 2
    public static let tflagSendFUA: UInt16 = 1 << 3
    public static let tflagSendTrim: UInt16 = 1 << 5
    public static let tflagSendWriteZeroes: UInt16 = 1 << 6
    public static let tflagSendDF: UInt16 = 1 << 7
    public static let tflagCanMultiConn: UInt16 = 1 << 8

    public enum Command: UInt16 {
        case read = 0, write = 1, disconnect = 2, flush = 3, trim = 4, cache = 5, writeZeroes = 6
        case blockStatus = 7
    }
    public static let cmdFlagFUA: UInt16 = 1 << 0
    public static let cmdFlagNoHole: UInt16 = 1 << 1
    public static let cmdFlagDF: UInt16 = 1 << 2
    public static let cmdFlagReqOne: UInt16 = 1 << 3

    // Structured reply chunks.
    public static let replyFlagDone: UInt16 = 1 << 0
    public static let replyTypeNone: UInt16 = 0
    public static let replyTypeOffsetData: UInt16 = 1
    public static let replyTypeOffsetHole: UInt16 = 2
    public static let replyTypeBlockStatus: UInt16 = 5
    public static let replyTypeError: UInt16 = 0x8001
    public static let replyTypeErrorOffset: UInt16 = 0x8002

    // base:allocation descriptor flags.
    public static let stateHole: UInt32 = 1 << 0
    public static let stateZero: UInt32 = 1 << 1

    /// The one metadata context we serve; its id on the wire.
    public static let baseAllocation = "base:allocation"
    public static let baseAllocationID: UInt32 = 1

    // The errno values of the protocol: fixed numbers, not the host's.
    public static let EPERM: UInt32 = 1
    public static let EIO: UInt32 = 5
    public static let ENOMEM: UInt32 = 12
    public static let EINVAL: UInt32 = 22
    public static let ENOSPC: UInt32 = 28
    public static let EOVERFLOW: UInt32 = 75
    public static let ENOTSUP: UInt32 = 95
    public static let ESHUTDOWN: UInt32 = 108

    public static let requestHeaderSize = 28
    public static let simpleReplySize = 16
    public static let structuredReplyHeaderSize = 20
    /// The largest READ or WRITE payload we take, like qemu-nbd and nbdkit (32 MiB).
    public static let maxPayload: UInt32 = 32 << 20
    /// An option longer than this is garbage (names are at most 4 KiB by the spec).
    public static let maxOptionLength: UInt32 = 64 << 10

    /// The NBD errno for a device error. Only the protocol's own values may go on the wire.
    public static func errno(for error: BlockError) -> UInt32 {
        switch error.code {
        case .io: return EIO
        case .notSupported: return ENOTSUP
        case .outOfRange, .invalid: return EINVAL
        case .readOnly: return EPERM
        case .noSpace: return ENOSPC
        }
    }
}

extension NBD {
    /// The device error for an errno a server sent (a protocol value, not the host's).
    public static func error(fromWire value: UInt32, _ message: String) -> BlockError {
        switch value {
        case EPERM: return BlockError(.readOnly, errno: Glibc.EPERM, "\(message): EPERM")
        case ENOMEM: return BlockError(.io, errno: Glibc.ENOMEM, "\(message): ENOMEM")
        case EINVAL: return BlockError(.invalid, errno: Glibc.EINVAL, "\(message): EINVAL")
        case ENOSPC: return BlockError(.noSpace, errno: Glibc.ENOSPC, "\(message): ENOSPC")
        case EOVERFLOW: return BlockError(.invalid, errno: Glibc.EOVERFLOW, "\(message): EOVERFLOW")
        case ENOTSUP: return BlockError(.notSupported, errno: Glibc.EOPNOTSUPP, "\(message): ENOTSUP")
        case ESHUTDOWN: return BlockError(.io, errno: Glibc.ESHUTDOWN, "\(message): ESHUTDOWN (the server is shutting down)")
        default: return BlockError(.io, errno: Glibc.EIO, "\(message): EIO" + (value == EIO ? "" : " (errno \(value))"))
        }
    }
}

/// Big-endian stores and loads into raw memory: the codec of every header.
/// `@inlinable`: the export and the `nbd` device are other modules, and these are their hot path.
extension UnsafeMutableRawPointer {
    @inlinable @inline(__always) public func storeBE(_ v: UInt16, at o: Int) { storeBytes(of: v.bigEndian, toByteOffset: o, as: UInt16.self) }
    @inlinable @inline(__always) public func storeBE(_ v: UInt32, at o: Int) { storeBytes(of: v.bigEndian, toByteOffset: o, as: UInt32.self) }
    @inlinable @inline(__always) public func storeBE(_ v: UInt64, at o: Int) { storeBytes(of: v.bigEndian, toByteOffset: o, as: UInt64.self) }
}

extension UnsafeRawPointer {
    @inlinable @inline(__always) public func loadBE(_: UInt16.Type, at o: Int) -> UInt16 { UInt16(bigEndian: loadUnaligned(fromByteOffset: o, as: UInt16.self)) }
    @inlinable @inline(__always) public func loadBE(_: UInt32.Type, at o: Int) -> UInt32 { UInt32(bigEndian: loadUnaligned(fromByteOffset: o, as: UInt32.self)) }
    @inlinable @inline(__always) public func loadBE(_: UInt64.Type, at o: Int) -> UInt64 { UInt64(bigEndian: loadUnaligned(fromByteOffset: o, as: UInt64.self)) }
}

/// A growable byte array for the negotiation phase (not the hot path), big-endian appends.
public struct NBDMessage {
    public var bytes: [UInt8] = []
    public init() {}
    public mutating func append(_ v: UInt16) { withUnsafeBytes(of: v.bigEndian) { bytes += $0 } }
    public mutating func append(_ v: UInt32) { withUnsafeBytes(of: v.bigEndian) { bytes += $0 } }
    public mutating func append(_ v: UInt64) { withUnsafeBytes(of: v.bigEndian) { bytes += $0 } }
    public mutating func append(_ s: String) { bytes += Array(s.utf8) }
}

/// Reads big-endian fields from an option's payload, failing (nil) past its end, so that a
/// length field from the client can never make us read outside what it sent.
public struct NBDPayloadReader {
    public let bytes: [UInt8]
    public var position = 0
    public init(_ bytes: [UInt8]) { self.bytes = bytes }
    public var remaining: Int { bytes.count - position }
    public mutating func u16() -> UInt16? {
        guard remaining >= 2 else { return nil }
        defer { position += 2 }
        return UInt16(bytes[position]) << 8 | UInt16(bytes[position + 1])
    }
    public mutating func u32() -> UInt32? {
        guard let hi = u16(), let lo = u16() else { return nil }
        return UInt32(hi) << 16 | UInt32(lo)
    }
    public mutating func string(_ count: Int) -> String? {
        guard count >= 0, remaining >= count else { return nil }
        defer { position += count }
        return String(decoding: bytes[position..<position + count], as: UTF8.self)
    }
}
