import Core
import Glibc

/// Persistent grants (feature-persistent): a frontend that offers them reuses a pool of granted
/// pages, so the backend maps each reference once, writable, and keeps it until disconnect
/// instead of mapping and unmapping per request. Owned by one ring thread: no locks.
/// Like Linux blkback, it holds at most `capacity` mappings; references beyond that are mapped
/// per request by the caller.
///
/// Every segment of every request is looked up here, so the lookup is one load from a table
/// indexed by the reference itself, as the C reference backend does: a guest's pool is a run of
/// consecutive references, which then sit in a few consecutive cache lines (a hash table scatters
/// them, and each lookup missed the cache). The table covers references below 2^16 (Xen's v1
/// tables hold 32768 with the default 64 frames); it is anonymous memory, so only the pages
/// around the references in use become resident. A reference beyond it is simply not kept.
final class PersistentGrantCache {
    static let tableEntries = 1 << 16
    private let grants: any GrantTable
    private let domain: DomainID
    let capacity: Int
    /// Indexed by reference: the kept page, or nil. Read directly by the ring thread
    /// (`BlkifQueue.persistentPage`), so a hit touches no object.
    let pages: UnsafeMutablePointer<UnsafeMutableRawPointer?>
    /// What is mapped, for unmapAll (touched only when a reference is first mapped).
    private var mapped: [(ref: GrantRef, mapping: GrantMapping)] = []

    /// Throws when the table cannot be mapped (address space or memory exhausted): that one
    /// device fails to connect, with the reason in its `error` node; the daemon goes on.
    init(grants: any GrantTable, domain: DomainID, capacity: Int) throws(BlkifConnectError) {
        self.grants = grants; self.domain = domain; self.capacity = capacity
        let bytes = Self.tableEntries * MemoryLayout<UnsafeMutableRawPointer?>.stride
        guard let area = Self.mapTable(bytes) else {
            throw BlkifConnectError("persistent grant table: mmap of \(bytes) bytes failed: \(String(cString: strerror(errno)))")
        }
        pages = area.bindMemory(to: UnsafeMutableRawPointer?.self, capacity: Self.tableEntries)   // zero: nothing kept
        mapped.reserveCapacity(capacity)
    }

    /// Maps anonymous zeroed memory for the table, or returns nil with errno set. A variable
    /// so that a test can make it fail as an exhausted address space would.
    nonisolated(unsafe) static var mapTable: (Int) -> UnsafeMutableRawPointer? = { bytes in
        guard let area = mmap(nil, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0), area != MAP_FAILED else { return nil }
        return area
    }

    deinit {
        unmapAll()
        munmap(pages, Self.tableEntries * MemoryLayout<UnsafeMutableRawPointer?>.stride)
    }

    var count: Int { mapped.count }

    /// Maps `ref`, which `pages` does not hold, and keeps it if there is room; nil if the cache
    /// is full, the reference is beyond the table, or it cannot be mapped writable (the caller
    /// then maps it for this request only).
    func keep(_ ref: GrantRef) -> UnsafeMutableRawPointer? {
        guard ref < Self.tableEntries, mapped.count < capacity else { return nil }
        guard let (page, m) = try? grants.mapPage(domain: domain, ref: ref, writable: true) else { return nil }
        pages[Int(ref)] = page
        mapped.append((ref, m))
        return page
    }

    func unmapAll() {
        for (ref, m) in mapped {
            grants.unmapPage(m, ref: ref)
            pages[Int(ref)] = nil
        }
        mapped.removeAll(keepingCapacity: true)
    }
}
