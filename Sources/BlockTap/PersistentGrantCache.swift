import Core

/// Persistent grants (feature-persistent): a frontend that offers them reuses a pool of granted
/// pages, so the backend maps each reference once, writable, and keeps it until disconnect
/// instead of mapping and unmapping per request. Owned by one ring thread: no locks.
/// Like Linux blkback, it holds at most `capacity` mappings; references beyond that are mapped
/// per request by the caller.
final class PersistentGrantCache {
    private let grants: any GrantTable
    private let domain: DomainID
    let capacity: Int
    private var pages: [GrantRef: (UnsafeMutableRawPointer, GrantMapping)] = [:]

    init(grants: any GrantTable, domain: DomainID, capacity: Int) {
        self.grants = grants; self.domain = domain; self.capacity = capacity
        pages.reserveCapacity(capacity)
    }

    var count: Int { pages.count }

    /// The page of `ref`, mapping it now if there is room; nil if the cache is full or the
    /// reference cannot be mapped writable (the caller then maps it for this request only).
    @inline(__always) func lookupOrMap(_ ref: GrantRef) -> UnsafeMutableRawPointer? {
        if let hit = pages[ref] { return hit.0 }
        guard pages.count < capacity else { return nil }
        guard let (page, m) = try? grants.mapPage(domain: domain, ref: ref, writable: true) else { return nil }
        pages[ref] = (page, m)
        return page
    }

    func unmapAll() {
        for (ref, (_, m)) in pages { grants.unmapPage(m, ref: ref) }
        pages.removeAll()
    }
}
