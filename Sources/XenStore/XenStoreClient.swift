/// A xenstore transaction id (0 is "no transaction" on the wire).
public struct XenStoreTransaction: Hashable, Sendable {
    public let id: UInt32
    public init(id: UInt32) { self.id = id }
    public static let none = XenStoreTransaction(id: 0)
}

/// A xenstore permission entry, as xenstore-chmod writes them: `n0` (owner 0, nobody else),
/// `r5` (domain 5 may read), `w5`, `b5` (both). The first entry names the owner and the
/// access of every domain not listed after it.
public struct XenStorePermission: Hashable, Sendable, CustomStringConvertible {
    public enum Access: Character, Sendable { case none = "n", read = "r", write = "w", both = "b" }
    public var domain: UInt16
    public var access: Access
    public init(domain: UInt16, access: Access) { self.domain = domain; self.access = access }
    public var description: String { "\(access.rawValue)\(domain)" }
    /// Parses "r5"; nil if malformed.
    public init?(_ text: Substring) {
        guard let c = text.first, let a = Access(rawValue: c), let d = UInt16(text.dropFirst()) else { return nil }
        self.init(domain: d, access: a)
    }
}

/// One watch firing: the path that changed (or the watched path, on registration) and the token.
public struct XenStoreWatchEvent: Hashable, Sendable {
    public var path: String
    public var token: String
    public init(path: String, token: String) { self.path = path; self.token = token }
}

/// A xenstore error as xenstored reports it (xs_wire.h's xsd_errors names).
public enum XenStoreError: Error, Equatable, Sendable, CustomStringConvertible {
    case noEntry(String)          // ENOENT
    case permissionDenied(String) // EACCES
    case again                    // EAGAIN: transaction conflict, retry
    case exists(String)           // EEXIST
    case invalid(String)          // EINVAL
    case other(String)            // any other xsd error name, e.g. "E2BIG"
    case disconnected(String)     // the connection to the store is gone

    public var description: String {
        switch self {
        case let .noEntry(p): return "xenstore: no such path \(p)"
        case let .permissionDenied(p): return "xenstore: permission denied on \(p)"
        case .again: return "xenstore: transaction conflict (EAGAIN)"
        case let .exists(p): return "xenstore: \(p) exists"
        case let .invalid(s): return "xenstore: invalid request: \(s)"
        case let .other(s): return "xenstore: \(s)"
        case let .disconnected(s): return "xenstore: disconnected: \(s)"
        }
    }
}

/// Access to a xenstore, local or Xen's. Every call may be made from any thread.
public protocol XenStoreClient: AnyObject, Sendable {
    func read(_ path: String, transaction: XenStoreTransaction) throws(XenStoreError) -> [UInt8]
    func write(_ path: String, _ value: [UInt8], transaction: XenStoreTransaction) throws(XenStoreError)
    func mkdir(_ path: String, transaction: XenStoreTransaction) throws(XenStoreError)
    /// Removes `path` and everything below it.
    func remove(_ path: String, transaction: XenStoreTransaction) throws(XenStoreError)
    func directory(_ path: String, transaction: XenStoreTransaction) throws(XenStoreError) -> [String]
    func permissions(_ path: String, transaction: XenStoreTransaction) throws(XenStoreError) -> [XenStorePermission]
    func setPermissions(_ path: String, _ permissions: [XenStorePermission], transaction: XenStoreTransaction) throws(XenStoreError)
    func startTransaction() throws(XenStoreError) -> XenStoreTransaction
    /// Commits (or aborts); throws `.again` when the transaction conflicted and must be retried.
    func endTransaction(_ transaction: XenStoreTransaction, commit: Bool) throws(XenStoreError)
    /// Registers a watch; an event for `path` itself arrives at once, as xenstored does.
    func watch(_ path: String, token: String) throws(XenStoreError)
    func unwatch(_ path: String, token: String) throws(XenStoreError)
    /// Where watch events arrive.
    var watchEvents: XenStoreWatchQueue { get }
    /// "/local/domain/<domid>".
    func domainPath(_ domain: UInt16) throws(XenStoreError) -> String
}

extension XenStoreClient {
    /// Reads a string; nil if the node does not exist.
    public func readString(_ path: String, transaction: XenStoreTransaction = .none) throws(XenStoreError) -> String? {
        do { return String(decoding: try read(path, transaction: transaction), as: UTF8.self) }
        catch .noEntry { return nil }
    }
    public func write(_ path: String, _ value: String, transaction: XenStoreTransaction = .none) throws(XenStoreError) {
        try write(path, Array(value.utf8), transaction: transaction)
    }
    /// Reads an unsigned integer node; nil if missing, throws `.invalid` if it is not a number.
    public func readInt(_ path: String, transaction: XenStoreTransaction = .none) throws(XenStoreError) -> UInt64? {
        guard let s = try readString(path, transaction: transaction) else { return nil }
        guard let v = UInt64(s.trimmingWhitespace()) else { throw .invalid("\(path) = \"\(s)\" is not a number") }
        return v
    }
    /// Writes `nodes` (path, value) in one transaction, only while `anchor` exists; false if it
    /// did not (nothing written). For a backend writing into a device's directory that a
    /// toolstack may remove at any moment (a detach, `softdev attach` taking a refused device
    /// away): a plain write would create the directory again.
    @discardableResult
    public func writeWhilePresent(_ anchor: String, _ nodes: [(String, String)]) throws(XenStoreError) -> Bool {
        try transaction { (tx) throws(XenStoreError) -> Bool in
            guard try readString(anchor, transaction: tx) != nil else { return false }
            for (path, value) in nodes { try write(path, value, transaction: tx) }
            return true
        }
    }

    /// Runs `body` in a transaction, retrying on conflict (EAGAIN) up to `attempts` times.
    public func transaction<T>(attempts: Int = 16, _ body: (XenStoreTransaction) throws(XenStoreError) -> T) throws(XenStoreError) -> T {
        var lastError = XenStoreError.again
        for _ in 0..<attempts {
            let tx = try startTransaction()
            let value: T
            do { value = try body(tx) } catch {
                try? endTransaction(tx, commit: false)
                throw error
            }
            do { try endTransaction(tx, commit: true); return value }
            catch .again { lastError = .again; continue }
        }
        throw lastError
    }
}

extension String {
    func trimmingWhitespace() -> String {
        var s = Substring(self)
        while let f = s.first, f.isWhitespace || f == "\0" { s = s.dropFirst() }
        while let l = s.last, l.isWhitespace || l == "\0" { s = s.dropLast() }
        return String(s)
    }
}
