import CAio
import Core
import Glibc
import Synchronization

/// `tap(name=IFNAME, queues=N)`: an endpoint on a Linux TAP interface. Frames from the guest
/// are written to it with a `virtio_net_hdr` carrying their offloads (``VirtioNetHeader``), so
/// the kernel finishes checksums and cuts TCP segments; frames the kernel sends come back up
/// with theirs. The interface is created if missing (or attached to, if it exists as a TAP
/// with the same flags) and brought up. With `queues` > 1 it is multi-queue: one descriptor
/// and one reader thread per queue, a frame going out on `frame.queue % queues` and coming in
/// with the index of the descriptor it was read from.
///
/// The kernel's offloads toward the guest (`TUNSETOFFLOAD`) are set in `connect` from what the
/// receiver accepts: checksum offload if it takes `.checksum`, TSO4/TSO6 only if it also takes
/// `.largeFrames`; never UFO/USO. Writes never block: a full queue drops the frame and counts it.
///
/// Under a vif, the vif's ring threads read the queues themselves, only while the guest has
/// buffers (``handOverReading()``): frames wait in the kernel's queue meanwhile, as they do
/// for QEMU's tap backend. Elsewhere (a link, a switch) a reader thread per queue reads them.
public final class TapDevice: NetDevice, @unchecked Sendable {
    public let name = "tap"
    /// The interface's name as the kernel gave it.
    public let interfaceName: String
    /// The kernel takes every offload a virtio_net_hdr can carry.
    public let offloads: NetOffloads = .all
    /// The `TUN_F_*` bits `connect` enabled.
    public private(set) var kernelOffloads: UInt32 = 0

    private let fds: [Int32]
    private let stopEvent: Int32
    /// Each queue's reading state, used by its reader thread or by the thread that took the
    /// reading over.
    private let queueReaders: [TapQueueReader]
    private var readers: [PosixThread] = []
    private var receiver: (any NetFrameReceiver)?
    private let closed = Atomic<Bool>(false)
    /// The reading was handed over (``handOverReading()``): no reader thread starts.
    private var handedOver = false
    /// Threads inside ``readFrames(queue:buffers:)``: `close` waits for them before it closes
    /// the descriptors they read.
    private let reading = Atomic<Int>(0)
    private let counters = NetDirectionCounters()

    // if_tun.h
    static let TUNSETIFF: UInt = 0x4004_54ca
    static let TUNSETOFFLOAD: UInt = 0x4004_54d0
    static let TUNSETVNETHDRSZ: UInt = 0x4004_54d8
    static let IFF_TAP: Int16 = 0x0002, IFF_NO_PI: Int16 = 0x1000, IFF_VNET_HDR: Int16 = 0x4000, IFF_MULTI_QUEUE: Int16 = 0x0100
    static let TUN_F_CSUM: UInt32 = 0x01, TUN_F_TSO4: UInt32 = 0x02, TUN_F_TSO6: UInt32 = 0x04
    /// The largest frame the kernel hands a TAP (64 KiB of GSO plus headers), with room to spare.
    static let readBufferSize = VirtioNetHeader.size + 65536 + 1024

    /// Opens (creating if needed) the TAP interface `name` with `queues` queues and brings it up.
    public init(name: String, queues: Int = 1) throws(DeviceSpecError) {
        let label = "tap(name=\(name))"
        guard !name.isEmpty, name.utf8.count < Int(IFNAMSIZ), !name.contains("/"), !name.contains(" ") else {
            throw DeviceSpecError("\(label): an interface name is 1 to \(Int(IFNAMSIZ) - 1) characters without '/' or spaces: choose a shorter name")
        }
        guard (1...256).contains(queues) else { throw DeviceSpecError("\(label): queues must be from 1 to 256") }
        var opened: [Int32] = []
        func fail(_ what: String, _ code: Int32) -> DeviceSpecError {
            for fd in opened { Glibc.close(fd) }
            return DeviceSpecError("\(label): \(what): \(String(cString: strerror(code)))\(Self.advice(code))")
        }
        var kernelName = name
        var flags = Self.IFF_TAP | Self.IFF_NO_PI | Self.IFF_VNET_HDR
        if queues > 1 { flags |= Self.IFF_MULTI_QUEUE }
        for _ in 0..<queues {
            let fd = open("/dev/net/tun", O_RDWR | O_NONBLOCK | O_CLOEXEC)
            guard fd >= 0 else { throw fail("cannot open /dev/net/tun", errno) }
            opened.append(fd)
            var request = Self.interfaceRequest(name, flags: flags)
            guard ioctl(fd, Self.TUNSETIFF, &request) == 0 else { throw fail("cannot create or attach the TAP interface (TUNSETIFF)", errno) }
            kernelName = Self.name(of: request)
            var size: Int32 = Int32(VirtioNetHeader.size)
            guard ioctl(fd, Self.TUNSETVNETHDRSZ, &size) == 0 else { throw fail("TUNSETVNETHDRSZ", errno) }
        }
        let socket = Glibc.socket(AF_INET, Int32(SOCK_DGRAM.rawValue), 0)
        guard socket >= 0 else { throw fail("cannot open a socket to bring the interface up", errno) }
        defer { Glibc.close(socket) }
        var request = Self.interfaceRequest(kernelName, flags: 0)
        guard ioctl(socket, UInt(SIOCGIFFLAGS), &request) == 0 else { throw fail("SIOCGIFFLAGS", errno) }
        request.ifr_ifru.ifru_flags |= Int16(IFF_UP)
        guard ioctl(socket, UInt(SIOCSIFFLAGS), &request) == 0 else { throw fail("cannot bring \(kernelName) up (SIOCSIFFLAGS)", errno) }
        let event = caio_eventfd()
        guard event >= 0 else { throw fail("eventfd", errno) }
        stopEvent = event
        fds = opened
        queueReaders = opened.enumerated().map { TapQueueReader(fd: $1, queue: $0) }
        interfaceName = kernelName
    }

    /// What to do about `code`, after its message.
    static func advice(_ code: Int32) -> String {
        switch code {
        case ENOENT, ENODEV: return " (load the tun module: modprobe tun; in a container, pass /dev/net/tun in)"
        case EPERM, EACCES: return " (a TAP interface needs root or CAP_NET_ADMIN)"
        case EBUSY: return " (the interface exists with other flags or its queues are taken: pick another name or delete it with ip link del)"
        case EINVAL: return " (the interface exists and is not a TAP with these flags: pick another name)"
        default: return ""
        }
    }

    static func interfaceRequest(_ name: String, flags: Int16) -> ifreq {
        var request = ifreq()
        withUnsafeMutableBytes(of: &request.ifr_ifrn.ifrn_name) { b in
            for (i, c) in name.utf8.prefix(b.count - 1).enumerated() { b[i] = c }
        }
        request.ifr_ifru.ifru_flags = flags
        return request
    }

    static func name(of request: ifreq) -> String {
        withUnsafeBytes(of: request.ifr_ifrn.ifrn_name) { b in
            String(decoding: b.prefix { $0 != 0 }, as: UTF8.self)
        }
    }

    /// The queues (descriptors) of the interface.
    public var queues: Int { fds.count }

    /// Frames, bytes and drops each way so far.
    public var counts: NetCounters { NetCounters(counters) }

    // MARK: Guest → TAP

    /// A TCP segment goes in whole whatever `TUNSETOFFLOAD` enabled: that sets what the kernel
    /// hands our reader, while tun_get_user takes GSO from user space always and the kernel
    /// cuts it where it must (no ``GSOSegmenter`` here).
    public func fromGuest(_ frame: EthernetFrame) {
        guard !closed.load(ordering: .relaxed) else { counters.fromGuest.drop(); return }
        var frame = frame
        guard let header = VirtioNetHeader.fromGuest(&frame) else { counters.fromGuest.drop(); return }
        let fd = fds[frame.queue % fds.count]
        let written = withUnsafeTemporaryAllocation(byteCount: VirtioNetHeader.size, alignment: 8) { raw in
            header.write(to: raw)
            return frame.withUnsafeBytes { body in
                var vectors = (iovec(iov_base: raw.baseAddress, iov_len: VirtioNetHeader.size),
                               iovec(iov_base: UnsafeMutableRawPointer(mutating: body.baseAddress), iov_len: body.count))
                return withUnsafePointer(to: &vectors) {
                    $0.withMemoryRebound(to: iovec.self, capacity: 2) { writev(fd, $0, 2) }
                }
            }
        }
        // EAGAIN (the queue is full), EIO (the interface is down), EINVAL (the kernel refused
        // the header): the frame is lost either way, and counted.
        if written < 0 { counters.fromGuest.drop() } else { counters.fromGuest.count(frame) }
    }

    // MARK: TAP → guest

    public func connect(_ receiver: any NetFrameReceiver, accepting offloads: NetOffloads) {
        // Connected again (the guest's netfront reconnected, perhaps with other features): the
        // same receiver, the kernel's offloads set anew, the readers already running.
        guard !closed.load(ordering: .relaxed) else { return }
        self.receiver = receiver
        var bits: UInt32 = 0
        if offloads.contains(.checksum) {
            bits |= Self.TUN_F_CSUM
            if offloads.contains(.largeFrames) {
                if offloads.contains(.tso4) { bits |= Self.TUN_F_TSO4 }
                if offloads.contains(.tso6) { bits |= Self.TUN_F_TSO6 }
            }
        }
        if ioctl(fds[0], Self.TUNSETOFFLOAD, Int32(bitPattern: bits)) != 0 {
            fputs("tap(name=\(interfaceName)): TUNSETOFFLOAD \(bits): \(String(cString: strerror(errno))); the kernel finishes every offload itself\n", stderr)
            bits = 0
            _ = ioctl(fds[0], Self.TUNSETOFFLOAD, Int32(0))
        }
        kernelOffloads = bits
        guard readers.isEmpty, !handedOver else { return }
        for (queue, fd) in fds.enumerated() {
            do throws(ThreadStartError) {
                readers.append(try PosixThread("tap(name=\(interfaceName)) queue \(queue)") { [self] in read(fd, queue: queue, to: receiver) })
            } catch {
                fputs("tap(name=\(interfaceName)): \(error); queue \(queue) is not read\n", stderr)
            }
        }
    }

    /// One queue's reader: waits for frames or the stop event, reads until the queue is empty.
    private func read(_ fd: Int32, queue: Int, to receiver: any NetFrameReceiver) {
        let reader = queueReaders[queue]
        var polled = [pollfd(fd: fd, events: Int16(POLLIN), revents: 0), pollfd(fd: stopEvent, events: Int16(POLLIN), revents: 0)]
        while true {
            polled[0].revents = 0; polled[1].revents = 0
            let n = poll(&polled, 2, -1)
            if n < 0 { if errno == EINTR { continue } else { return } }
            if polled[1].revents != 0 { return }
            if polled[0].revents & Int16(POLLERR | POLLHUP | POLLNVAL) != 0 && polled[0].revents & Int16(POLLIN) == 0 { return }
            // A burst at most, then look at the stop event again.
            _ = reader.readBurst(to: receiver, buffers: .max, counters: counters.toGuest)
        }
    }

    // MARK: Reading handed over (a vif's ring threads)

    public func handOverReading() -> [Int32]? {
        guard !closed.load(ordering: .relaxed), readers.isEmpty else { return nil }
        handedOver = true
        return fds
    }

    public func readFrames(queue: Int, buffers: Int) -> NetFramesRead {
        let nothing = NetFramesRead(frames: 0, buffers: 0, empty: true)
        reading.add(1, ordering: .sequentiallyConsistent)
        defer { reading.subtract(1, ordering: .sequentiallyConsistent) }
        guard !closed.load(ordering: .sequentiallyConsistent), let receiver, queueReaders.indices.contains(queue) else { return nothing }
        return queueReaders[queue].readBurst(to: receiver, buffers: buffers, counters: counters.toGuest)
    }

    /// Stops and joins the readers, then closes the interface's descriptors (a TAP this device
    /// created goes with the last one).
    public func close() {
        guard !closed.exchange(true, ordering: .acquiringAndReleasing) else { return }
        var one: UInt64 = 1
        _ = write(stopEvent, &one, 8)
        for reader in readers { reader.join() }
        readers = []
        // A thread that took the reading over is inside readFrames for one burst at most.
        while reading.load(ordering: .sequentiallyConsistent) > 0 { sched_yield() }
        receiver = nil
        for fd in fds { Glibc.close(fd) }
        Glibc.close(stopEvent)
    }
}

extension TapDevice {
    public static let descriptor = DeviceDescriptor(
        deviceClass: .net, name: "tap", kind: .device,
        summary: "A Linux TAP interface (created if missing, brought up), with checksum and TSO offloads both ways.",
        parameters: [
            DeviceParameter("name", required: true, "The interface's name (at most 15 characters), e.g. sd-vif1."),
            DeviceParameter("queues", "Queues (one descriptor and reader thread each), 1 to 256; default 1."),
        ],
        open: { parameters, _ throws(DeviceSpecError) in
            try TapDevice(name: parameters.required("name"), queues: parameters.integer("queues", in: 1...256) ?? 1)
        })
}

/// One TAP queue's reading state: the buffer a frame is read into, the pool small frames are
/// copied to. Used by one thread at a time: the queue's reader thread, or the thread that took
/// the reading over.
final class TapQueueReader: @unchecked Sendable {
    let fd: Int32
    let queue: Int
    private let header = UnsafeMutableRawPointer.allocate(byteCount: VirtioNetHeader.size, alignment: 16)
    private var spare: EthernetFrame
    private var bytes: UnsafeMutableRawPointer
    private var pool = FramePool(frames: 512, frameCapacity: TapQueueReader.copyLimit)
    private static let capacity = TapDevice.readBufferSize - VirtioNetHeader.size

    /// Frames up to this long are copied out of the read buffer into a frame of the pool;
    /// longer ones (TSO segments) are read straight into a frame's bytes, which are read into
    /// again when the receiver kept no copy (a TAP on the other side writes it at once).
    static let copyLimit = 2048

    init(fd: Int32, queue: Int) {
        self.fd = fd
        self.queue = queue
        (spare, bytes) = EthernetFrame.allocate(count: Self.capacity)
    }

    deinit { header.deallocate() }

    enum Outcome {
        /// A frame went up; the page-sized guest buffers it takes (``RxSlotLayout``).
        case frame(buffers: Int)
        /// A frame was read and dropped (too short, a header the kernel should not send).
        case dropped
        /// Nothing to read now (EAGAIN), or the descriptor failed: poll before reading again.
        case empty
    }

    /// Reads frames and hands them to `receiver` until they take `buffers` page-sized guest
    /// buffers, the queue is empty, or a burst of 256 is read (frames dropped as malformed take
    /// no buffers, and the reading thread has other work: a stop event, a ring).
    func readBurst(to receiver: any NetFrameReceiver, buffers: Int, counters: NetTrafficCounter) -> NetFramesRead {
        var read = NetFramesRead(frames: 0, buffers: 0, empty: false)
        for _ in 0..<256 {
            if read.buffers >= buffers { break }
            switch readOne(to: receiver, counters: counters) {
            case .frame(let taken):
                read.frames += 1
                read.buffers += taken
            case .dropped: continue
            case .empty: read.empty = true; return read
            }
        }
        return read
    }

    /// Reads one frame and hands it to `receiver`.
    private func readOne(to receiver: any NetFrameReceiver, counters: NetTrafficCounter) -> Outcome {
        var vectors = (iovec(iov_base: header, iov_len: VirtioNetHeader.size), iovec(iov_base: bytes, iov_len: Self.capacity))
        var read = -1
        repeat {
            read = withUnsafeMutablePointer(to: &vectors) {
                $0.withMemoryRebound(to: iovec.self, capacity: 2) { readv(fd, $0, 2) }
            }
        } while read < 0 && errno == EINTR
        if read < 0 { return .empty }
        let length = read - VirtioNetHeader.size
        guard length >= 14,
              let offload = VirtioNetHeader(UnsafeRawBufferPointer(start: header, count: VirtioNetHeader.size)).offload(frameLength: length) else {
            counters.drop(); return .dropped
        }
        if length <= Self.copyLimit {
            let (frame, copy, _) = pool.allocate(count: length, offload: offload, queue: queue)
            copy.copyMemory(from: bytes, byteCount: length)
            counters.count(frame)
            let taken = RxSlotLayout.slots(of: frame)
            receiver.toGuest(frame)
            return .frame(buffers: taken)
        }
        let taken: Int
        do {   // our copy goes at the end of the block, before we ask who else holds the bytes
            var frame = spare
            frame.truncate(to: length)
            frame.offload = offload
            frame.queue = queue
            counters.count(frame)
            taken = RxSlotLayout.slots(of: frame)
            receiver.toGuest(frame)
        }
        // Kept (queued for a guest): the next frame gets bytes of its own.
        if !spare.isUniquelyReferenced() { (spare, bytes) = EthernetFrame.allocate(count: Self.capacity) }
        return .frame(buffers: taken)
    }
}
