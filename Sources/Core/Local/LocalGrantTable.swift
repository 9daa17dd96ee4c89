import CXen
import Glibc
import Synchronization

/// The backend side of the emulated grant table. Mapping a reference does what Xen does: check
/// the entry (type, grantee, read-only), mark it in use (GTF_reading, GTF_writing) with a
/// compare-and-swap so the granter sees it busy, and hand out the page. The pages are already
/// mapped (the guest's whole memory is), so a single-page map costs no system call; a
/// contiguous map of scattered frames (a multi-page ring) remaps them side by side.
public final class LocalGrantTable: GrantTable, @unchecked Sendable {
    private let me: DomainID
    private let openMemory: (DomainID) throws(GrantError) -> LocalDomainMemory
    /// Per guest: its memory and our pin counts (low 16 bits read pins, high 16 write pins).
    /// Pins live here, not in the guest's memory, so a guest cannot forge them.
    private final class Peer: @unchecked Sendable {
        let memory: LocalDomainMemory
        let pins: UnsafeMutablePointer<UInt32>
        let lock = Mutex<Void>(())
        /// Pins held in all (under `lock`): the memory is let go only when none remain.
        @exclusivity(unchecked) var pinCount = 0
        /// The guest is gone (under `lock`): nothing more may be mapped.
        @exclusivity(unchecked) var destroyed = false
        init(memory: LocalDomainMemory) {
            self.memory = memory
            pins = .allocate(capacity: Int(LocalDomainMemory.grantEntryCount))
            pins.initialize(repeating: 0, count: Int(LocalDomainMemory.grantEntryCount))
        }
        deinit { pins.deallocate() }
    }
    private let peers = Mutex<[DomainID: Peer]>([:])
    private let contiguousMaps = Mutex<[UInt: Int]>([:])

    init(me: DomainID, openMemory: @escaping (DomainID) throws(GrantError) -> LocalDomainMemory) {
        self.me = me; self.openMemory = openMemory
    }

    private func peer(_ domain: DomainID) throws(GrantError) -> Peer {
        if let p = peers.withLock({ $0[domain] }) { return p }
        let memory = try openMemory(domain)
        return peers.withLock { table in
            if let p = table[domain] { return p }
            let p = Peer(memory: memory)
            table[domain] = p
            return p
        }
    }

    /// The guests whose memory this table keeps mapped now (for diagnostics and tests).
    public var domainsHeld: [DomainID] { peers.withLock { $0.keys.sorted() } }

    /// `domain` was destroyed: refuse new maps of it and let go of its memory (this process
    /// keeps each guest's whole memory mapped) as soon as nothing of it stays pinned.
    public func domainDestroyed(_ domain: DomainID) {
        guard let peer = peers.withLock({ $0[domain] }) else { return }
        peer.lock.withLock { _ in
            peer.destroyed = true
            if peer.pinCount == 0 { release(peer) }
        }
    }

    /// Drops a destroyed peer from the table (its memory is unmapped with it). Caller holds
    /// the peer's lock.
    private func release(_ peer: Peer) {
        peers.withLock { table in
            if let p = table[peer.memory.domain], p === peer { table.removeValue(forKey: peer.memory.domain) }
        }
    }

    /// Validates `ref` and pins it; returns the frame. Caller holds the peer's lock.
    @inline(__always) private func pin(_ peer: Peer, _ ref: GrantRef, writable: Bool) throws(GrantError) -> UInt32 {
        let mem = peer.memory
        guard !peer.destroyed else { throw .noSuchDomain(mem.domain) }
        guard ref < LocalDomainMemory.grantEntryCount else { throw .badReference(domain: mem.domain, ref: ref) }
        // Each half of the pin count is 16 bits: refuse before it would carry or trap, as Xen
        // refuses a map that risks overflowing its counters.
        let held = peer.pins[Int(ref)]
        guard (writable ? held >> 16 : held & 0xFFFF) < 0xFFFF else { throw .tooManyMappings(domain: mem.domain, ref: ref) }
        let flagsP = mem.flagsPointer(ref)
        while true {
            let flags = cxen_load16(flagsP)
            guard UInt32(flags) & UInt32(GTF_type_mask) == UInt32(GTF_permit_access) else {
                throw .badReference(domain: mem.domain, ref: ref)
            }
            guard cxen_load16(mem.domidPointer(ref)) == me else { throw .permissionDenied(domain: mem.domain, ref: ref) }
            if writable && UInt32(flags) & UInt32(GTF_readonly) != 0 { throw .permissionDenied(domain: mem.domain, ref: ref) }
            var busy = UInt16(GTF_reading)
            if writable { busy |= UInt16(GTF_writing) }
            if cxen_cmpxchg16(flagsP, flags, flags | busy) != 0 { break }
        }
        // Read the frame only once the entry is marked busy: the granter may not change it now.
        let frame = cxen_load32(mem.framePointer(ref))
        guard frame >= LocalDomainMemory.firstDataFrame, frame < mem.totalFrames else {
            unpinFlags(peer, ref)
            throw .badFrame(domain: mem.domain, ref: ref)
        }
        peer.pins[Int(ref)] += writable ? 0x1_0000 : 1
        peer.pinCount += 1
        return frame
    }

    @inline(__always) private func unpin(_ peer: Peer, _ ref: GrantRef, writable: Bool) {
        guard ref < LocalDomainMemory.grantEntryCount else { return }
        let p = peer.pins + Int(ref)
        let dec: UInt32 = writable ? 0x1_0000 : 1
        guard p.pointee >= dec else { return }
        p.pointee -= dec
        unpinFlags(peer, ref)
        peer.pinCount -= 1
        if peer.destroyed && peer.pinCount == 0 { release(peer) }
    }

    /// Clears GTF_writing when no writable pin remains, GTF_reading when no pin remains.
    @inline(__always) private func unpinFlags(_ peer: Peer, _ ref: GrantRef) {
        let pins = peer.pins[Int(ref)]
        var clear: UInt16 = 0
        if pins >> 16 == 0 { clear |= UInt16(GTF_writing) }
        if pins == 0 { clear |= UInt16(GTF_reading) }
        if clear != 0 { _ = cxen_fetch_and16(peer.memory.flagsPointer(ref), ~clear) }
    }

    public func mapBatch(domain: DomainID, refs: UnsafeBufferPointer<GrantRef>, writable: Bool,
                         pages: UnsafeMutableBufferPointer<UnsafeMutableRawPointer>) throws(GrantError) -> GrantMapping {
        let peer = try peer(domain)
        try peer.lock.withLock { _ throws(GrantError) in
            for i in 0..<refs.count {
                do throws(GrantError) {
                    pages[i] = peer.memory.frame(try pin(peer, refs[i], writable: writable))
                } catch {
                    for j in 0..<i { unpin(peer, refs[j], writable: writable) }
                    throw error
                }
            }
        }
        return GrantMapping(base: refs.count > 0 ? pages[0] : nil, pageCount: refs.count, domain: domain, writable: writable, token: 0)
    }

    public func mapContiguous(domain: DomainID, refs: [GrantRef], writable: Bool) throws(GrantError) -> GrantMapping {
        guard !refs.isEmpty else { throw .badReference(domain: domain, ref: 0) }
        let pages = UnsafeMutableBufferPointer<UnsafeMutableRawPointer>.allocate(capacity: refs.count)
        defer { pages.deallocate() }
        let batch = try refs.withUnsafeBufferPointer { (r) throws(GrantError) in
            try mapBatch(domain: domain, refs: r, writable: writable, pages: pages)
        }
        if refs.count == 1 || (1..<refs.count).allSatisfy({ pages[$0] == pages[0] + $0 * xenPageSize }) {
            return batch   // already side by side in the guest's memory
        }
        // Scattered frames: reserve a range and map each frame of the memfd into it.
        let peer = try peer(domain)
        let length = refs.count * xenPageSize
        guard let area = mmap(nil, length, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0), area != MAP_FAILED else {
            unmap(batch, refs: refs)
            throw .system(operation: "mmap", errno: errno)
        }
        let prot = PROT_READ | (writable ? PROT_WRITE : 0)
        for i in 0..<refs.count {
            let offset = off_t(pages[i] - peer.memory.base)
            if mmap(area + i * xenPageSize, xenPageSize, prot, MAP_SHARED | MAP_FIXED, peer.memory.fd, offset) == MAP_FAILED {
                let e = errno
                munmap(area, length)
                unmap(batch, refs: refs)
                throw .system(operation: "mmap grant", errno: e)
            }
        }
        contiguousMaps.withLock { $0[UInt(bitPattern: area)] = length }
        return GrantMapping(base: area, pageCount: refs.count, domain: domain, writable: writable, token: 1)
    }

    public func unmap(_ mapping: GrantMapping, refs: UnsafeBufferPointer<GrantRef>) {
        if mapping.token == 1, let base = mapping.base,
           let length = contiguousMaps.withLock({ $0.removeValue(forKey: UInt(bitPattern: base)) }) {
            munmap(base, length)
        }
        guard let peer = peers.withLock({ $0[mapping.domain] }) else { return }
        peer.lock.withLock { _ in
            for r in refs { unpin(peer, r, writable: mapping.writable) }
        }
    }

    /// Each segment is checked and marked busy as Xen's grant copy does; a run of segments of
    /// one domain (a ring sweep's) takes that domain's lock once.
    public func copy(_ segments: UnsafeMutableBufferPointer<GrantCopySegment>) {
        var i = 0
        while i < segments.count {
            let domain = segments[i].domain
            var end = i + 1
            while end < segments.count && segments[end].domain == domain { end += 1 }
            let peer: Peer
            do { peer = try self.peer(domain) } catch {
                for k in i..<end { segments[k].error = error }
                i = end
                continue
            }
            peer.lock.withLock { _ in
                for k in i..<end {
                    let s = segments[k]
                    guard Int(s.offset) + Int(s.length) <= xenPageSize else {
                        segments[k].error = .badReference(domain: s.domain, ref: s.ref)
                        continue
                    }
                    let toGuest = s.direction == .toGuest
                    do throws(GrantError) {
                        let page = peer.memory.frame(try pin(peer, s.ref, writable: toGuest))
                        if toGuest { memcpy(page + Int(s.offset), s.local, Int(s.length)) }
                        else { memcpy(s.local, page + Int(s.offset), Int(s.length)) }
                        unpin(peer, s.ref, writable: toGuest)
                        segments[k].error = nil
                    } catch {
                        segments[k].error = error
                    }
                }
            }
            i = end
        }
    }
}
