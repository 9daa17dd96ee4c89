// xen-lab-probe DOMID: checks the Xen hypervisor implementation against a real Xen where a
// Linux guest can never lead it (its blkfront sends no bad references): map and copy with bad
// references and a dead domain, event channels bound to nothing, and a loopback channel's
// notify/wait/consume and late unmask. Run by the lab in dom0 (tests/softdev.sh) while guest DOMID has a
// connected vbd served by softdev; it reads that vbd's ring-ref (and never writes the ring).
// Prints PASS/FAIL lines; exits 1 if any check failed.
import Core
import Glibc

setvbuf(stdout, nil, _IOLBF, 0)
var failed = 0
func check(_ what: String, _ ok: Bool, _ detail: String = "") {
    print("\(ok ? "PASS" : "FAIL"): probe: \(what)\(ok || detail.isEmpty ? "" : " (\(detail))")")
    if !ok { failed += 1 }
}
/// What `body` threw, as text ("no error" if it returned).
func outcome<T>(_ body: () throws -> T) -> (T?, String) {
    do { return (try body(), "no error") } catch { return (nil, "\(error)") }
}

guard CommandLine.arguments.count == 2, let guest = DomainID(CommandLine.arguments[1]) else {
    fputs("usage: xen-lab-probe DOMID (a guest with a vbd served by softdev)\n", stderr); exit(2)
}
let missing: DomainID = 32000   // no such domain in the lab
let badRef: GrantRef = 0x0fff_ffff

check("XenHypervisor.isPresent in dom0", XenHypervisor.isPresent)
let hv: XenHypervisor
do { hv = try XenHypervisor.open() } catch { check("XenHypervisor.open()", false, "\(error)"); exit(1) }
check("open(): kind xen, domain 0", hv.kind == "xen" && hv.domainID == 0, "\(hv.kind) \(hv.domainID)")

// A page the guest granted us: its first vbd's ring (read only here: the ring is live).
let vbds = (try? hv.store.directory("/local/domain/\(guest)/device/vbd", transaction: .none)) ?? []
guard let vbd = vbds.first, let ref = (try? hv.store.readInt("/local/domain/\(guest)/device/vbd/\(vbd)/ring-ref")).flatMap({ $0 }) else {
    check("guest \(guest) has a vbd with a single ring-ref", false); exit(1)
}
let ringRef = GrantRef(ref)
let (mapping, e1) = outcome { try hv.grants.mapContiguous(domain: guest, refs: [ringRef], writable: false) }
check("map the guest's ring-ref \(ringRef) read-only", mapping != nil, e1)
if let mapping { hv.grants.unmap(mapping, refs: [ringRef]) }

let (_, e2) = outcome { try hv.grants.mapContiguous(domain: guest, refs: [ringRef, badRef], writable: false) }
check("a batch with a bad reference fails as .badReference of that reference",
      e2 == "\(GrantError.badReference(domain: guest, ref: badRef))", e2)
// Linux keeps references 2-7 reserved and never grants them: in the table, granting nothing.
let unused: GrantRef = 5
let (_, e2b) = outcome { try hv.grants.mapContiguous(domain: guest, refs: [unused], writable: true) }
check("a reference that grants nothing fails as .badReference", e2b == "\(GrantError.badReference(domain: guest, ref: unused))", e2b)
let (again, e3) = outcome { try hv.grants.mapContiguous(domain: guest, refs: [ringRef], writable: false) }
check("after the failed batch the good reference maps again", again != nil, e3)
if let again { hv.grants.unmap(again, refs: [ringRef]) }
let (_, e4) = outcome { try hv.grants.mapPage(domain: missing, ref: 1, writable: true) }
check("a map from a missing domain fails as .noSuchDomain", e4 == "\(GrantError.noSuchDomain(missing))", e4)

// Grant copy: each segment gets its own outcome; the good one still happens.
let buffer = UnsafeMutableRawPointer.allocate(byteCount: 3 * 64, alignment: 64)
defer { buffer.deallocate() }
var segments = [
    GrantCopySegment(direction: .fromGuest, domain: guest, ref: ringRef, offset: 0, length: 64, local: buffer),
    GrantCopySegment(direction: .fromGuest, domain: guest, ref: badRef, offset: 0, length: 64, local: buffer + 64),
    GrantCopySegment(direction: .fromGuest, domain: guest, ref: ringRef, offset: 4090, length: 64, local: buffer + 128),
    GrantCopySegment(direction: .fromGuest, domain: missing, ref: 1, offset: 0, length: 64, local: buffer + 128),
    GrantCopySegment(direction: .toGuest, domain: guest, ref: unused, offset: 0, length: 64, local: buffer + 128),
]
segments.withUnsafeMutableBufferPointer { hv.grants.copy($0) }
check("grant copy from the ring page succeeds beside bad segments", segments[0].error == nil, "\(segments[0].error.map { "\($0)" } ?? "")")
check("grant copy of a bad reference: .badReference", segments[1].error == .badReference(domain: guest, ref: badRef), "\(String(describing: segments[1].error))")
check("grant copy past the page's end: refused", segments[2].error == .badReference(domain: guest, ref: ringRef), "\(String(describing: segments[2].error))")
check("grant copy from a missing domain: .noSuchDomain", segments[3].error == .noSuchDomain(missing), "\(String(describing: segments[3].error))")
check("grant copy to a reference that grants nothing: .badReference", segments[4].error == .badReference(domain: guest, ref: unused), "\(String(describing: segments[4].error))")

// Event channels.
let (_, e5) = outcome { try hv.events.bindInterdomain(remote: guest, remotePort: 0x7ffff) }
check("binding a port the guest did not offer: .noSuchPort", e5 == "\(EventChannelError.noSuchPort(domain: guest, port: 0x7ffff))", e5)
let (_, e6) = outcome { try hv.events.bindInterdomain(remote: missing, remotePort: 1) }
check("binding to a missing domain: .noSuchDomain", e6 == "\(EventChannelError.noSuchDomain(missing))", e6)
// A loopback channel in dom0: each end its own handle and descriptor.
let (a, e7) = outcome { try hv.events.allocateUnbound(remote: hv.domainID) }
let (b, e8) = a.map { a in outcome { try hv.events.bindInterdomain(remote: hv.domainID, remotePort: a.localPort) } } ?? (nil, e7)
check("loopback channel: allocate unbound, bind to it", a != nil && b != nil, "\(e7) / \(e8)")
if let a, let b {
    check("two ends, two descriptors", a.fileDescriptor >= 0 && b.fileDescriptor >= 0 && a.fileDescriptor != b.fileDescriptor)
    check("nothing pending: wait times out, consume says false", !a.wait(timeoutMilliseconds: 50) && !a.consume())
    b.notify()
    check("notify one end: the other wakes", a.wait(timeoutMilliseconds: 5000))
    check("consumed: nothing pending after", !a.consume())
    // Xen coalesces notifies only while the event is still pending: one that comes after the
    // kernel took the first is delivered again once we unmask. So: one or two, then quiet.
    a.notify(); a.notify()
    let first = b.wait(timeoutMilliseconds: 5000)
    _ = b.wait(timeoutMilliseconds: 200)
    check("two notifies before a wait: woken, and quiet once drained", first && !b.wait(timeoutMilliseconds: 200))
    b.notify()
    check("unmasked after consume: the next notify wakes again", a.wait(timeoutMilliseconds: 5000))
    // Late unmask (XSA-332), as the ring loop uses it: an event taken leaves the port masked,
    // and a notify meanwhile waits, pending, until the unmask delivers it.
    func readable(_ c: any EventChannel, _ ms: Int32) -> Bool {
        var p = pollfd(fd: c.fileDescriptor, events: Int16(POLLIN), revents: 0)
        return poll(&p, 1, ms) > 0
    }
    b.notify()
    check("late unmask: the event taken, the port left masked", readable(a, 5000) && a.takePending())
    b.notify()
    check("late unmask: a notify while masked is not delivered", !readable(a, 200))
    a.unmask()
    check("late unmask: the pending notify delivered at unmask", readable(a, 5000) && a.takePending())
    a.unmask()
    b.close(); a.close()
}
print("probe: \(failed) failed")
exit(failed == 0 ? 0 : 1)
