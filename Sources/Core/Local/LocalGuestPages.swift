import CXen
import Glibc
import Synchronization

/// A local guest's view of its own memory, as a frontend driver uses it: allocate pages, grant
/// them to a backend domain (gnttab_grant_foreign_access) and revoke the grants
/// (gnttab_end_foreign_access). Thread-safe.
public final class LocalGuestPages: @unchecked Sendable {
    public let memory: LocalDomainMemory
    private struct State {
        var nextFrame: UInt32
        var freeRuns: [(frame: UInt32, count: UInt32)] = []
        var nextRef: GrantRef = 8   // Xen reserves the first entries (GNTTAB_NR_RESERVED_ENTRIES)
        var freeRefs: [GrantRef] = []
    }
    private let state: Mutex<State>

    public init(memory: LocalDomainMemory) {
        self.memory = memory
        state = Mutex(State(nextFrame: LocalDomainMemory.firstDataFrame))
    }

    public enum Failure: Error, CustomStringConvertible {
        case outOfMemory(pages: Int)
        case outOfGrants
        case grantInUse(GrantRef)
        public var description: String {
            switch self {
            case let .outOfMemory(n): return "guest memory exhausted allocating \(n) pages"
            case .outOfGrants: return "grant table full"
            case let .grantInUse(r): return "grant \(r) is still mapped by the backend"
            }
        }
    }

    /// Allocates `count` contiguous zeroed pages; returns the first frame.
    public func allocate(pages count: Int) throws -> UInt32 {
        let frame: UInt32? = state.withLock { s in
            if let i = s.freeRuns.firstIndex(where: { $0.count == UInt32(count) }) {
                return s.freeRuns.remove(at: i).frame
            }
            guard Int(s.nextFrame) + count <= Int(memory.totalFrames) else { return nil }
            defer { s.nextFrame += UInt32(count) }
            return s.nextFrame
        }
        guard let frame else { throw Failure.outOfMemory(pages: count) }
        memset(memory.frame(frame), 0, count * xenPageSize)
        return frame
    }

    public func free(frame: UInt32, pages count: Int) {
        state.withLock { $0.freeRuns.append((frame, UInt32(count))) }
    }

    public func pointer(_ frame: UInt32) -> UnsafeMutableRawPointer { memory.frame(frame) }

    /// Grants `domain` access to `frame`; returns the reference to pass it.
    public func grant(frame: UInt32, to domain: DomainID, readOnly: Bool) throws -> GrantRef {
        let ref: GrantRef? = state.withLock { s in
            if let r = s.freeRefs.popLast() { return r }
            guard s.nextRef < LocalDomainMemory.grantEntryCount else { return nil }
            defer { s.nextRef += 1 }
            return s.nextRef
        }
        guard let ref else { throw Failure.outOfGrants }
        setEntry(ref, frame: frame, domain: domain, readOnly: readOnly)
        return ref
    }

    /// Writes a grant entry as a guest kernel does: domid and frame first, then (after a write
    /// barrier) the flags that make it valid.
    public func setEntry(_ ref: GrantRef, frame: UInt32, domain: DomainID, readOnly: Bool) {
        memory.domidPointer(ref).pointee = domain
        memory.framePointer(ref).pointee = frame
        cxen_wmb()
        memory.flagsPointer(ref).pointee = UInt16(GTF_permit_access) | (readOnly ? UInt16(GTF_readonly) : 0)
    }

    /// Revokes a grant; fails (and keeps it) while the backend still has it mapped.
    public func endAccess(_ ref: GrantRef) throws {
        let flagsP = memory.flagsPointer(ref)
        while true {
            let flags = cxen_load16(flagsP)
            if flags & UInt16(GTF_reading | GTF_writing) != 0 { throw Failure.grantInUse(ref) }
            if cxen_cmpxchg16(flagsP, flags, 0) != 0 { break }
        }
        state.withLock { $0.freeRefs.append(ref) }
    }
}
