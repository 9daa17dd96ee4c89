/// The fixed headers of the transmission phase (doc/proto.md, "Transmission"), each laid out
/// once here, so that no other file names an offset into them. They load from and store into
/// raw memory (a receive buffer, a reply slot) and allocate nothing: they are on the hot path.
///
/// ```swift
/// guard let request = NBDRequestHeader(loading: input) else { return false }  // bad magic
/// NBDSimpleReplyHeader(error: 0, cookie: request.cookie).store(to: reply)
/// ```

/// C: magic (32), command flags (16), type (16), cookie (64), offset (64), length (32).
public struct NBDRequestHeader: Equatable, Sendable {
    public static let size = NBD.requestHeaderSize
    public var flags: UInt16
    /// The raw type: a command we do not know must still be answered, with its cookie.
    public var type: UInt16
    public var cookie: UInt64
    public var offset: UInt64
    public var length: UInt32

    public init(flags: UInt16 = 0, type: UInt16, cookie: UInt64, offset: UInt64, length: UInt32) {
        self.flags = flags; self.type = type; self.cookie = cookie; self.offset = offset; self.length = length
    }

    /// The header at `p`; nil if the magic is wrong (the stream cannot be resynchronised).
    @inlinable @inline(__always)
    public init?(loading p: UnsafeRawPointer) {
        guard p.loadBE(UInt32.self, at: 0) == NBD.requestMagic else { return nil }
        flags = p.loadBE(UInt16.self, at: 4)
        type = p.loadBE(UInt16.self, at: 6)
        cookie = p.loadBE(UInt64.self, at: 8)
        offset = p.loadBE(UInt64.self, at: 16)
        length = p.loadBE(UInt32.self, at: 24)
    }

    @inlinable @inline(__always)
    public func store(to p: UnsafeMutableRawPointer) {
        p.storeBE(NBD.requestMagic, at: 0)
        p.storeBE(flags, at: 4)
        p.storeBE(type, at: 6)
        p.storeBE(cookie, at: 8)
        p.storeBE(offset, at: 16)
        p.storeBE(length, at: 24)
    }
}

/// C: magic (32), error (32), cookie (64); a successful READ's data follows.
public struct NBDSimpleReplyHeader: Equatable, Sendable {
    public static let size = NBD.simpleReplySize
    public var error: UInt32
    public var cookie: UInt64

    public init(error: UInt32, cookie: UInt64) { self.error = error; self.cookie = cookie }

    @inlinable @inline(__always)
    public func store(to p: UnsafeMutableRawPointer) {
        p.storeBE(NBD.simpleReplyMagic, at: 0)
        p.storeBE(error, at: 4)
        p.storeBE(cookie, at: 8)
    }
}

/// C: magic (32), flags (16), type (16), cookie (64), length (32) of the chunk's payload,
/// which follows (`payload` is where it starts).
public struct NBDStructuredReplyHeader: Equatable, Sendable {
    public static let size = NBD.structuredReplyHeaderSize
    /// The offset of the payload in the chunk.
    public static let payload = size
    public var flags: UInt16
    public var type: UInt16
    public var cookie: UInt64
    public var length: UInt32

    public init(flags: UInt16, type: UInt16, cookie: UInt64, length: UInt32) {
        self.flags = flags; self.type = type; self.cookie = cookie; self.length = length
    }

    @inlinable @inline(__always)
    public func store(to p: UnsafeMutableRawPointer) {
        p.storeBE(NBD.structuredReplyMagic, at: 0)
        p.storeBE(flags, at: 4)
        p.storeBE(type, at: 6)
        p.storeBE(cookie, at: 8)
        p.storeBE(length, at: 16)
    }
}
