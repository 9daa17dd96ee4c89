import CXen

/// The message types of xs_wire.h's `enum xsd_sockmsg_type`, taken from the C header so the
/// numbers are Xen's, not ours.
public enum XenStoreMessageType {
    public static let control = UInt32(XS_CONTROL.rawValue)
    public static let directory = UInt32(XS_DIRECTORY.rawValue)
    public static let read = UInt32(XS_READ.rawValue)
    public static let getPermissions = UInt32(XS_GET_PERMS.rawValue)
    public static let watch = UInt32(XS_WATCH.rawValue)
    public static let unwatch = UInt32(XS_UNWATCH.rawValue)
    public static let transactionStart = UInt32(XS_TRANSACTION_START.rawValue)
    public static let transactionEnd = UInt32(XS_TRANSACTION_END.rawValue)
    public static let introduce = UInt32(XS_INTRODUCE.rawValue)
    public static let release = UInt32(XS_RELEASE.rawValue)
    public static let getDomainPath = UInt32(XS_GET_DOMAIN_PATH.rawValue)
    public static let write = UInt32(XS_WRITE.rawValue)
    public static let mkdir = UInt32(XS_MKDIR.rawValue)
    public static let remove = UInt32(XS_RM.rawValue)
    public static let setPermissions = UInt32(XS_SET_PERMS.rawValue)
    public static let watchEvent = UInt32(XS_WATCH_EVENT.rawValue)
    public static let error = UInt32(XS_ERROR.rawValue)
    public static let isDomainIntroduced = UInt32(XS_IS_DOMAIN_INTRODUCED.rawValue)
    public static let resume = UInt32(XS_RESUME.rawValue)
    public static let setTarget = UInt32(XS_SET_TARGET.rawValue)
    public static let resetWatches = UInt32(XS_RESET_WATCHES.rawValue)
    public static let directoryPart = UInt32(XS_DIRECTORY_PART.rawValue)
}

/// Limits from xs_wire.h.
public enum XenStoreLimits {
    /// The largest payload a message may carry, either way ("violating this is very bad").
    public static let payloadMax = Int(XENSTORE_PAYLOAD_MAX)
    /// The longest absolute path (after a relative path is made absolute).
    public static let absolutePathMax = Int(XENSTORE_ABS_PATH_MAX)
    /// The longest relative path a client may send.
    public static let relativePathMax = Int(XENSTORE_REL_PATH_MAX)
    /// Size of `struct xsd_sockmsg`.
    public static let headerSize = MemoryLayout<xsd_sockmsg>.size
}

/// One xenstore message: the `struct xsd_sockmsg` header and its payload. The header is in the
/// host's byte order (little endian on x86), as both the Unix socket and /dev/xen/xenbus use it.
public struct XenStoreMessage: Equatable, Sendable {
    public var type: UInt32
    public var requestID: UInt32
    public var transactionID: UInt32
    public var payload: [UInt8]

    public init(type: UInt32, requestID: UInt32 = 0, transactionID: UInt32 = 0, payload: [UInt8] = []) {
        self.type = type; self.requestID = requestID; self.transactionID = transactionID; self.payload = payload
    }

    /// A message whose payload is `strings`, each NUL-terminated ("path\0token\0").
    public init(type: UInt32, requestID: UInt32 = 0, transactionID: UInt32 = 0, strings: [String]) {
        self.init(type: type, requestID: requestID, transactionID: transactionID,
                  payload: XenStoreMessage.nulTerminated(strings))
    }

    /// The header fields as decoded from the first 16 bytes of `bytes`; nil if there are fewer.
    public struct Header: Equatable, Sendable {
        public var type: UInt32, requestID: UInt32, transactionID: UInt32, length: UInt32
    }

    public static func decodeHeader(_ bytes: some Collection<UInt8>) -> Header? {
        guard bytes.count >= XenStoreLimits.headerSize else { return nil }
        var words = (UInt32(0), UInt32(0), UInt32(0), UInt32(0))
        withUnsafeMutableBytes(of: &words) { raw in
            for (i, b) in bytes.prefix(XenStoreLimits.headerSize).enumerated() { raw[i] = b }
        }
        return Header(type: words.0, requestID: words.1, transactionID: words.2, length: words.3)
    }

    /// Header and payload, ready to write.
    public func encoded() -> [UInt8] {
        var msg = xsd_sockmsg(type: type, req_id: requestID, tx_id: transactionID, len: UInt32(payload.count))
        var out = withUnsafeBytes(of: &msg) { Array($0) }
        out.append(contentsOf: payload)
        return out
    }

    /// The payload split at NULs: "a\0b\0" gives ["a", "b"]; bytes after the last NUL form a
    /// final element ("path\0value" gives ["path", "value"]).
    public var strings: [String] {
        if payload.isEmpty { return [] }
        var parts = payload.split(separator: 0, omittingEmptySubsequences: false).map { String(decoding: $0, as: UTF8.self) }
        if payload.last == 0 { parts.removeLast() }
        return parts
    }

    /// The payload's first NUL-terminated string, without the NUL (nil if no NUL).
    public var firstString: String? {
        guard let nul = payload.firstIndex(of: 0) else { return nil }
        return String(decoding: payload[..<nul], as: UTF8.self)
    }

    static func nulTerminated(_ strings: [String]) -> [UInt8] {
        var out: [UInt8] = []
        for s in strings { out.append(contentsOf: s.utf8); out.append(0) }
        return out
    }

    /// An XS_ERROR reply naming an xsd error ("ENOENT").
    public static func error(_ name: String, replyingTo request: XenStoreMessage) -> XenStoreMessage {
        XenStoreMessage(type: XenStoreMessageType.error, requestID: request.requestID,
                        transactionID: request.transactionID, strings: [name])
    }

    /// A watch event as xenstored sends it: not a reply, so request id 0.
    public static func watchEvent(_ event: XenStoreWatchEvent) -> XenStoreMessage {
        XenStoreMessage(type: XenStoreMessageType.watchEvent, strings: [event.path, event.token])
    }
}

extension XenStoreError {
    /// The error an xsd error name ("ENOENT") stands for, about `path`.
    public init(wireName name: String, path: String) {
        switch name {
        case "ENOENT": self = .noEntry(path)
        case "EACCES": self = .permissionDenied(path)
        case "EAGAIN": self = .again
        case "EEXIST": self = .exists(path)
        case "EINVAL": self = .invalid(path)
        default: self = .other(name)
        }
    }

    /// The xsd error name for this error, as the server puts it on the wire.
    public var wireName: String {
        switch self {
        case .noEntry: return "ENOENT"
        case .permissionDenied: return "EACCES"
        case .again: return "EAGAIN"
        case .exists: return "EEXIST"
        case .invalid: return "EINVAL"
        case let .other(name): return name
        case .disconnected: return "EIO"
        }
    }
}
