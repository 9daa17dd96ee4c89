import Core

/// Persistent grants (feature-persistent): a frontend that offers them reuses a pool of granted
/// pages, so the backend maps each reference once, writable, and keeps it until disconnect
/// instead of mapping and unmapping per request. Owned by one ring thread: no locks.
/// Like Linux blkback, it holds at most `capacity` mappings; references beyond that are mapped
/// per request by the caller.
///
/// Every segment of every request is looked up here, so the table is an open-addressing hash of
/// the references (a multiplicative hash with a random multiplier, linear probing, at most half
/// full) in raw memory:
/// Swift's Dictionary hashes with SipHash, several times the cost of the whole lookup here.
/// Entries are never removed one by one (only all at disconnect), so probing needs no tombstones.
final class PersistentGrantCache {
    private let grants: any GrantTable
    private let domain: DomainID
    let capacity: Int
    private let shift: UInt64
    /// A random odd multiplier per cache: a guest cannot choose references that all collide.
    private let multiplier = UInt64.random(in: 0...UInt64.max) | 1
    private let mask: Int
    private let keys: UnsafeMutablePointer<UInt64>                 // emptyKey: free
    private let pages: UnsafeMutablePointer<UnsafeMutableRawPointer?>
    private let mappings: UnsafeMutablePointer<GrantMapping?>
    private(set) var count = 0
    private static let emptyKey = UInt64.max

    init(grants: any GrantTable, domain: DomainID, capacity: Int) {
        self.grants = grants; self.domain = domain; self.capacity = capacity
        var bits: UInt64 = 1
        while (1 << bits) < 2 * max(capacity, 1) { bits += 1 }
        shift = 64 - bits
        let size = 1 << Int(bits)
        mask = size - 1
        keys = .allocate(capacity: size)
        keys.initialize(repeating: Self.emptyKey, count: size)
        pages = .allocate(capacity: size)
        pages.initialize(repeating: nil, count: size)
        mappings = .allocate(capacity: size)
        mappings.initialize(repeating: nil, count: size)
    }

    deinit {
        unmapAll()
        keys.deallocate()
        pages.deallocate()
        mappings.deinitialize(count: mask + 1)
        mappings.deallocate()
    }

    /// The page of `ref`, mapping it now if there is room; nil if the cache is full or the
    /// reference cannot be mapped writable (the caller then maps it for this request only).
    @inline(__always) func lookupOrMap(_ ref: GrantRef) -> UnsafeMutableRawPointer? {
        let key = UInt64(ref)
        var i = Int(truncatingIfNeeded: (key &* multiplier) >> shift)
        while true {
            let k = keys[i]
            if k == key { return pages[i] }
            if k == Self.emptyKey { break }
            i = (i + 1) & mask
        }
        guard count < capacity else { return nil }
        guard let (page, m) = try? grants.mapPage(domain: domain, ref: ref, writable: true) else { return nil }
        keys[i] = key
        pages[i] = page
        mappings[i] = m
        count += 1
        return page
    }

    func unmapAll() {
        guard count > 0 else { return }
        for i in 0...mask where keys[i] != Self.emptyKey {
            if let m = mappings[i] { grants.unmapPage(m, ref: GrantRef(keys[i])) }
            keys[i] = Self.emptyKey
            pages[i] = nil
            mappings[i] = nil
        }
        count = 0
    }
}
