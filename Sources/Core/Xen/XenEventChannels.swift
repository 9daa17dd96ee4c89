import CXen
import Glibc
import Synchronization

/// Event channels of a real Xen through libxenevtchn (/dev/xen/evtchn). Each channel gets its
/// own xenevtchn handle, so each has its own descriptor that is readable only for its port and
/// a ring thread can poll it beside its other descriptors.
final class XenEventChannels: EventChannels, @unchecked Sendable {
    func bindInterdomain(remote: DomainID, remotePort: EventPort) throws(EventChannelError) -> any EventChannel {
        try channel(remote: remote, port: remotePort) { xenevtchn_bind_interdomain($0, UInt32(remote), remotePort) }
    }

    func allocateUnbound(remote: DomainID) throws(EventChannelError) -> any EventChannel {
        try channel(remote: remote, port: 0) { xenevtchn_bind_unbound_port($0, UInt32(remote)) }
    }

    private func channel(remote: DomainID, port: EventPort,
                         bind: (OpaquePointer) -> xenevtchn_port_or_error_t) throws(EventChannelError) -> any EventChannel {
        guard let handle = xenevtchn_open(nil, 0) else { throw .system(operation: "xenevtchn_open", errno: errno) }
        let local = bind(handle)
        guard local >= 0 else {
            let e = errno
            xenevtchn_close(handle)
            switch e {
            case ESRCH: throw .noSuchDomain(remote)
            case EBUSY: throw .portInUse(domain: remote, port: port)
            case EINVAL, ENOENT: throw .noSuchPort(domain: remote, port: port)
            default: throw .system(operation: "bind event channel", errno: e)
            }
        }
        return XenEventChannel(handle: handle, port: EventPort(local))
    }
}

/// One bound port and the xenevtchn handle that owns it. The kernel masks the port when it
/// delivers an event to the descriptor; `takePending` reads the pending port, `unmask` lets
/// the next event through.
final class XenEventChannel: EventChannel, @unchecked Sendable {
    let localPort: EventPort
    let fileDescriptor: Int32
    private let handle: OpaquePointer
    private let closed = Atomic<Bool>(false)

    init(handle: OpaquePointer, port: EventPort) {
        self.handle = handle
        localPort = port
        fileDescriptor = xenevtchn_fd(handle)
        // consume() may be called with nothing pending: a read must never block.
        _ = fcntl(fileDescriptor, F_SETFL, fcntl(fileDescriptor, F_GETFL) | O_NONBLOCK)
    }
    deinit { close() }

    func notify() {
        guard !closed.load(ordering: .relaxed) else { return }
        _ = xenevtchn_notify(handle, localPort)
    }

    @discardableResult func takePending() -> Bool {
        // The handle holds only our port, and the kernel queues it once until it is unmasked
        // (the evtchn device binds with lateeoi: the port stays masked until our write):
        // one read says all there is to say.
        guard !closed.load(ordering: .relaxed) else { return false }
        return xenevtchn_pending(handle) >= 0
    }

    /// xenevtchn_unmask: the kernel's late EOI; a notification that came while the port was
    /// masked is delivered again now.
    func unmask() {
        guard !closed.load(ordering: .relaxed) else { return }
        _ = xenevtchn_unmask(handle, localPort)
    }

    func wait(timeoutMilliseconds: Int32) -> Bool {
        var p = pollfd(fd: fileDescriptor, events: Int16(POLLIN), revents: 0)
        while true {
            let r = poll(&p, 1, timeoutMilliseconds)
            if r < 0 && errno == EINTR { continue }
            return r > 0 && consume()
        }
    }

    /// Unbinds the port and closes the handle. Call it when no other thread uses the channel.
    func close() {
        guard !closed.exchange(true, ordering: .sequentiallyConsistent) else { return }
        _ = xenevtchn_unbind(handle, localPort)
        xenevtchn_close(handle)
    }
}
