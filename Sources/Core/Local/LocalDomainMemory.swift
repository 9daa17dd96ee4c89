import CXen
import Glibc
import Synchronization

/// A guest's memory as seen from this process: the whole sealed memfd mapped shared, plus its
/// grant table (the first frames, see localxen.h). Both frontends (granting) and backends
/// (mapping) use it; what each may do is decided by the grant entries, as on Xen.
public final class LocalDomainMemory: @unchecked Sendable {
    public let domain: DomainID
    public let base: UnsafeMutableRawPointer
    public let totalFrames: UInt32
    let fd: Int32

    /// Maps `fd` (a sealed memfd from the broker). Takes ownership of `fd`.
    init(domain: DomainID, fd: Int32) throws(GrantError) {
        var st = stat()
        guard fstat(fd, &st) == 0 else { Glibc.close(fd); throw .system(operation: "fstat domain memory", errno: errno) }
        let frames = UInt32(st.st_size / Int(LOCALXEN_PAGE_SIZE))
        guard frames > LOCALXEN_FIRST_DATA_FRAME else { Glibc.close(fd); throw .noSuchDomain(domain) }
        guard let p = mmap(nil, Int(st.st_size), PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0), p != MAP_FAILED else {
            Glibc.close(fd); throw .system(operation: "mmap domain memory", errno: errno)
        }
        self.domain = domain; self.base = p; self.totalFrames = frames; self.fd = fd
    }

    deinit {
        munmap(base, Int(totalFrames) * Int(LOCALXEN_PAGE_SIZE))
        Glibc.close(fd)
    }

    /// The grant table: `LOCALXEN_GRANT_ENTRIES` v1 entries.
    var grantEntries: UnsafeMutablePointer<grant_entry_v1> {
        (base + Int(LOCALXEN_PAGE_SIZE)).assumingMemoryBound(to: grant_entry_v1.self)
    }

    public static let grantEntryCount = UInt32(LOCALXEN_GRANT_ENTRIES)
    public static let firstDataFrame = UInt32(LOCALXEN_FIRST_DATA_FRAME)

    /// Where frame `frame` is in this mapping.
    @inline(__always) public func frame(_ frame: UInt32) -> UnsafeMutableRawPointer {
        base + Int(frame) * Int(LOCALXEN_PAGE_SIZE)
    }

    /// Pointers to a grant entry's fields, for atomic access (the peer writes them concurrently).
    @inline(__always) func flagsPointer(_ ref: GrantRef) -> UnsafeMutablePointer<UInt16> {
        UnsafeMutableRawPointer(grantEntries + Int(ref)).assumingMemoryBound(to: UInt16.self)
    }
    @inline(__always) func domidPointer(_ ref: GrantRef) -> UnsafeMutablePointer<UInt16> {
        (UnsafeMutableRawPointer(grantEntries + Int(ref)) + 2).assumingMemoryBound(to: UInt16.self)
    }
    @inline(__always) func framePointer(_ ref: GrantRef) -> UnsafeMutablePointer<UInt32> {
        (UnsafeMutableRawPointer(grantEntries + Int(ref)) + 4).assumingMemoryBound(to: UInt32.self)
    }
}
