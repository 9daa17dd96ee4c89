import CXen
import Glibc

/// The grant table of a real Xen through libxengnttab (/dev/xen/gntdev). One handle serves every
/// queue: libxengnttab's map, unmap and copy are one ioctl or mmap each and safe from any thread.
///
/// A map of several references is one `xengnttab_map_domain_grant_refs` call (one hypercall
/// batch), so the pages land side by side: `pages[i] = base + i * 4096`. The kernel reports a
/// failed map only as an errno; to name the guilty reference and the reason, the failure path
/// probes the references with a one-byte grant copy (which returns Xen's status per reference),
/// then, for a writable map of readable pages, maps them one by one (a read-only grant).
final class XenGrantTable: GrantTable, @unchecked Sendable {
    private let handle: OpaquePointer

    init(handle: OpaquePointer) { self.handle = handle }
    deinit { xengnttab_close(handle) }

    func mapContiguous(domain: DomainID, refs: [GrantRef], writable: Bool) throws(GrantError) -> GrantMapping {
        guard !refs.isEmpty else { throw .badReference(domain: domain, ref: 0) }
        return try refs.withUnsafeBufferPointer { (r) throws(GrantError) in try map(domain: domain, refs: r, writable: writable) }
    }

    func mapBatch(domain: DomainID, refs: UnsafeBufferPointer<GrantRef>, writable: Bool,
                  pages: UnsafeMutableBufferPointer<UnsafeMutableRawPointer>) throws(GrantError) -> GrantMapping {
        guard refs.count > 0 else { return GrantMapping(base: nil, pageCount: 0, domain: domain, writable: writable, token: 0) }
        let mapping = try map(domain: domain, refs: refs, writable: writable)
        for i in 0..<refs.count { pages[i] = mapping.base! + i * xenPageSize }
        return mapping
    }

    private func map(domain: DomainID, refs: UnsafeBufferPointer<GrantRef>, writable: Bool) throws(GrantError) -> GrantMapping {
        let prot = PROT_READ | (writable ? PROT_WRITE : 0)
        // libxengnttab copies the references into its ioctl; it never writes them.
        guard let base = xengnttab_map_domain_grant_refs(handle, UInt32(refs.count), UInt32(domain),
                                                          UnsafeMutablePointer(mutating: refs.baseAddress), prot) else {
            throw mapFailure(domain: domain, refs: refs, writable: writable, errno: errno)
        }
        return GrantMapping(base: base, pageCount: refs.count, domain: domain, writable: writable, token: 0)
    }

    func unmap(_ mapping: GrantMapping, refs: UnsafeBufferPointer<GrantRef>) {
        guard let base = mapping.base, mapping.pageCount > 0 else { return }
        // Fails only for an address we did not map; nothing to recover then.
        _ = xengnttab_unmap(handle, base, UInt32(mapping.pageCount))
    }

    func copy(_ segments: UnsafeMutableBufferPointer<GrantCopySegment>) {
        guard segments.count > 0 else { return }
        // gntdev refuses the whole batch if one segment crosses its page: check them first and
        // pass only the valid ones.
        withUnsafeTemporaryAllocation(of: xengnttab_grant_copy_segment_t.self, capacity: segments.count) { ops in
            withUnsafeTemporaryAllocation(of: Int.self, capacity: segments.count) { index in
                var n = 0
                for i in 0..<segments.count {
                    let s = segments[i]
                    guard s.length > 0, Int(s.offset) + Int(s.length) <= xenPageSize else {
                        segments[i].error = s.length == 0 ? nil : .badReference(domain: s.domain, ref: s.ref)
                        continue
                    }
                    cxen_grant_copy_segment(&ops[n], s.direction == .toGuest ? 1 : 0, s.domain, s.ref, s.offset, s.length, s.local)
                    index[n] = i
                    n += 1
                }
                guard n > 0 else { return }
                if xengnttab_grant_copy(handle, UInt32(n), ops.baseAddress) != 0 {
                    let e = errno
                    for k in 0..<n { segments[index[k]].error = .system(operation: "xengnttab_grant_copy", errno: e) }
                    return
                }
                for k in 0..<n {
                    let s = segments[index[k]]
                    var error = Self.error(status: ops[k].status, domain: s.domain, ref: s.ref)
                    // Xen says only "general error" for a write to a read-only grant: if we
                    // may read the page, that is what it was.
                    if ops[k].status == Int16(CXEN_GNTST_general_error), s.direction == .toGuest,
                       withUnsafePointer(to: s.ref, { readProbe(domain: s.domain, refs: UnsafeBufferPointer(start: $0, count: 1)) }) == nil {
                        error = .permissionDenied(domain: s.domain, ref: s.ref)
                    }
                    segments[index[k]].error = error
                }
            }
        }
    }

    /// Xen's per-operation status as a ``GrantError`` (nil for GNTST_okay). Xen answers
    /// GNTST_bad_gntref only for a reference past the end of the table; an entry that grants
    /// nothing, or grants to another domain, is GNTST_general_error ("Bad flags or dom"), which
    /// is also what a write to a read-only grant gets (callers that know tell them apart).
    static func error(status: Int16, domain: DomainID, ref: GrantRef) -> GrantError? {
        switch Int32(status) {
        case Int32(CXEN_GNTST_okay): return nil
        case Int32(CXEN_GNTST_bad_domain): return .noSuchDomain(domain)
        case Int32(CXEN_GNTST_bad_gntref), Int32(CXEN_GNTST_general_error), Int32(CXEN_GNTST_bad_copy_arg),
             Int32(CXEN_GNTST_address_too_big):
            return .badReference(domain: domain, ref: ref)
        case Int32(CXEN_GNTST_permission_denied): return .permissionDenied(domain: domain, ref: ref)
        case Int32(CXEN_GNTST_bad_page): return .badFrame(domain: domain, ref: ref)
        default: return .system(operation: "grant operation (GNTST \(status))", errno: EIO)
        }
    }

    /// Why a map failed: the first reference Xen refuses to let us read (bad, foreign, or of a
    /// dead domain), else the first one it refuses to map writable (a read-only grant), else
    /// the system error itself (out of memory, gntdev's limit).
    private func mapFailure(domain: DomainID, refs: UnsafeBufferPointer<GrantRef>, writable: Bool, errno e: Int32) -> GrantError {
        if let probe = readProbe(domain: domain, refs: refs) { return probe }
        if writable {
            for i in 0..<refs.count {
                var r = refs[i]
                guard let page = xengnttab_map_domain_grant_refs(handle, 1, UInt32(domain), &r, PROT_READ | PROT_WRITE) else {
                    return .permissionDenied(domain: domain, ref: refs[i])
                }
                _ = xengnttab_unmap(handle, page, 1)
            }
        }
        return .system(operation: "xengnttab_map_domain_grant_refs", errno: e)
    }

    /// Reads one byte of each reference's page with a grant copy: the first reference Xen will
    /// not let us read, and why; nil if all are readable (or the probe itself failed).
    private func readProbe(domain: DomainID, refs: UnsafeBufferPointer<GrantRef>) -> GrantError? {
        var scratch: UInt8 = 0
        return withUnsafeMutablePointer(to: &scratch) { byte in
            withUnsafeTemporaryAllocation(of: xengnttab_grant_copy_segment_t.self, capacity: refs.count) { ops -> GrantError? in
                for i in 0..<refs.count { cxen_grant_copy_segment(&ops[i], 0, domain, refs[i], 0, 1, byte) }
                guard xengnttab_grant_copy(handle, UInt32(refs.count), ops.baseAddress) == 0 else { return nil }
                for i in 0..<refs.count {
                    if let error = Self.error(status: ops[i].status, domain: domain, ref: refs[i]) { return error }
                }
                return nil
            }
        }
    }
}
