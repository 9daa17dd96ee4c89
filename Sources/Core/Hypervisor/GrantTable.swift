import Synchronization

/// Why a grant operation failed. A guest's bad reference is one of these, never a crash.
public enum GrantError: Error, Equatable, Sendable, CustomStringConvertible {
    /// The reference is past the end of the granting domain's table, or the entry grants nothing.
    case badReference(domain: DomainID, ref: GrantRef)
    /// The entry exists but grants access to another domain, or only read access.
    case permissionDenied(domain: DomainID, ref: GrantRef)
    /// The granting domain does not exist (or is gone).
    case noSuchDomain(DomainID)
    /// The frame the entry names lies outside the granting domain's memory.
    case badFrame(domain: DomainID, ref: GrantRef)
    /// The reference is mapped so many times at once that its use count would overflow (Xen:
    /// "Risk of counter overflow"): a guest naming one page in every segment.
    case tooManyMappings(domain: DomainID, ref: GrantRef)
    /// A system call failed.
    case system(operation: String, errno: Int32)

    public var description: String {
        switch self {
        case let .badReference(d, r): return "grant reference \(r) of domain \(d) is invalid"
        case let .permissionDenied(d, r): return "grant reference \(r) of domain \(d) does not permit this access"
        case let .noSuchDomain(d): return "domain \(d) does not exist"
        case let .badFrame(d, r): return "grant reference \(r) of domain \(d) names a frame outside its memory"
        case let .tooManyMappings(d, r): return "grant reference \(r) of domain \(d) is mapped too many times at once"
        case let .system(op, e): return "\(op) failed: \(String(cString: strerror(e)))"
        }
    }
}

/// Pages of another domain mapped into ours by one `map` call. Unmap it with the same table.
public struct GrantMapping: @unchecked Sendable {
    /// Where page `i` is mapped: `pages[i]`. For a contiguous mapping, also `base + i * 4096`.
    public let base: UnsafeMutableRawPointer?
    public let pageCount: Int
    public let domain: DomainID
    public let writable: Bool
    /// Implementation-specific (the emulator keeps the references here).
    public let token: UInt64
    public init(base: UnsafeMutableRawPointer?, pageCount: Int, domain: DomainID, writable: Bool, token: UInt64) {
        self.base = base; self.pageCount = pageCount; self.domain = domain; self.writable = writable; self.token = token
    }
}

/// One segment of a grant copy: up to a page between a granted page and local memory.
public struct GrantCopySegment: @unchecked Sendable {
    public enum Direction: Sendable { case fromGuest, toGuest }
    public var direction: Direction
    public var domain: DomainID
    public var ref: GrantRef
    /// Offset in the granted page; `offset + length` must not pass the page's end.
    public var offset: UInt16
    public var length: UInt16
    public var local: UnsafeMutableRawPointer
    /// The outcome, kept as plain numbers so that a segment is copied (a batch of them per ring
    /// sweep) without reference counting: `failure` 0 is success, else a `GrantError` case.
    private var failure: UInt8 = 0
    private var failureErrno: Int32 = 0
    /// A failed system call's description, as an index into ``GrantCopyFailureOperations``.
    private var failureOperation: UInt16 = 0
    public init(direction: Direction, domain: DomainID, ref: GrantRef, offset: UInt16, length: UInt16, local: UnsafeMutableRawPointer) {
        self.direction = direction; self.domain = domain; self.ref = ref; self.offset = offset; self.length = length; self.local = local
    }

    /// Set by `copy`: nil on success. (A system call's failure reads back as a failed grant copy.)
    public var error: GrantError? {
        get {
            switch failure {
            case 0: return nil
            case 1: return .badReference(domain: domain, ref: ref)
            case 2: return .permissionDenied(domain: domain, ref: ref)
            case 3: return .noSuchDomain(domain)
            case 4: return .badFrame(domain: domain, ref: ref)
            case 5: return .tooManyMappings(domain: domain, ref: ref)
            default: return .system(operation: GrantCopyFailureOperations.name(failureOperation), errno: failureErrno)
            }
        }
        set {
            switch newValue {
            case nil: failure = 0
            case .badReference: failure = 1
            case .permissionDenied: failure = 2
            case .noSuchDomain: failure = 3
            case .badFrame: failure = 4
            case .tooManyMappings: failure = 5
            case .system(let operation, let e):
                failure = 6; failureErrno = e; failureOperation = GrantCopyFailureOperations.index(operation)
            }
        }
    }
    /// Whether the copy failed (no error value built).
    @inlinable public var failed: Bool { failedCode != 0 }
    @usableFromInline var failedCode: UInt8 { failure }
}

/// The descriptions of the system calls whose failure a grant copy segment reports, kept once
/// each so that a segment holds a number, not a string (a segment is plain data). Few exist (a
/// backend's mapping calls, per domain); past 1024 a generic one stands in.
enum GrantCopyFailureOperations {
    private static let table = Mutex<[String]>(["grant copy"])

    static func index(_ operation: String) -> UInt16 {
        table.withLock { t in
            if let i = t.firstIndex(of: operation) { return UInt16(i) }
            guard t.count < 1024 else { return 0 }
            t.append(operation)
            return UInt16(t.count - 1)
        }
    }

    static func name(_ index: UInt16) -> String {
        table.withLock { Int(index) < $0.count ? $0[Int(index)] : $0[0] }
    }
}

/// The grant table as a backend sees it: map another domain's granted pages, or copy to and
/// from them. Every reference comes from an untrusted guest; every failure is a ``GrantError``.
public protocol GrantTable: AnyObject, Sendable {
    /// Maps the pages granted as `refs` by `domain` into one contiguous range (rings, persistent
    /// grants). If any reference is bad, nothing stays mapped and the first error is thrown.
    func mapContiguous(domain: DomainID, refs: [GrantRef], writable: Bool) throws(GrantError) -> GrantMapping

    /// Maps a batch of data pages for one I/O without allocating: `pages[i]` receives where
    /// `refs[i]` is mapped. All or nothing, as `mapContiguous`.
    func mapBatch(domain: DomainID, refs: UnsafeBufferPointer<GrantRef>, writable: Bool,
                  pages: UnsafeMutableBufferPointer<UnsafeMutableRawPointer>) throws(GrantError) -> GrantMapping

    /// Unmaps what `mapContiguous` or `mapBatch` mapped; `refs` are the references it mapped.
    func unmap(_ mapping: GrantMapping, refs: UnsafeBufferPointer<GrantRef>)

    /// Copies each segment; a failed segment gets its `error` set and the others still happen.
    func copy(_ segments: UnsafeMutableBufferPointer<GrantCopySegment>)

    /// `domain` was destroyed and its devices are unplugged: forget what is kept of it (the
    /// emulator keeps each guest's memory mapped; Xen's gntdev needs nothing).
    func domainDestroyed(_ domain: DomainID)
}

extension GrantTable {
    public func domainDestroyed(_ domain: DomainID) {}

    public func unmap(_ mapping: GrantMapping, refs: [GrantRef]) {
        refs.withUnsafeBufferPointer { unmap(mapping, refs: $0) }
    }

    /// Maps one page (an indirect segment list, a persistent grant): where it is, and the mapping.
    public func mapPage(domain: DomainID, ref: GrantRef, writable: Bool) throws(GrantError) -> (UnsafeMutableRawPointer, GrantMapping) {
        var r = ref
        var page = UnsafeMutableRawPointer(bitPattern: 1)!
        let mapping = try withUnsafePointer(to: &r) { (rp) throws(GrantError) in
            try withUnsafeMutablePointer(to: &page) { (pp) throws(GrantError) in
                try mapBatch(domain: domain, refs: UnsafeBufferPointer(start: rp, count: 1), writable: writable,
                             pages: UnsafeMutableBufferPointer(start: pp, count: 1))
            }
        }
        return (page, mapping)
    }

    /// Unmaps what `mapPage` mapped.
    public func unmapPage(_ mapping: GrantMapping, ref: GrantRef) {
        var r = ref
        withUnsafePointer(to: &r) { unmap(mapping, refs: UnsafeBufferPointer(start: $0, count: 1)) }
    }
}

#if canImport(Glibc)
import Glibc
#endif
