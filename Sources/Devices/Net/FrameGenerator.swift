import Core
import Glibc
import Synchronization

/// `generator` (net): an endpoint that fills every rx buffer the guest posts with a TCP/IPv4
/// frame of `size` bytes (a 64 KiB segment with a GSO extra when `mss` is set), as Linux's
/// pktgen floods an interface: a guest's receive path driven as hard as it can take, with no
/// host and no other thread involved. Frames from the guest are dropped (the vif's statistics
/// count them, once a sweep; a count here would cost two atomic operations a frame).
///
/// It makes frames on demand (``NetDevice/makesFramesOnDemand``): on each queue's ring
/// thread, as many as the buffers the guest posted hold. A frame is a value: each queue hands
/// up its own copy of the frame as a run of copies (``NetFrameReceiver/toGuest(_:repeating:)``:
/// nothing allocated, written or counted per frame, and no reference count shared between two
/// queues' threads), as the C reference backend copies from one template. At the end of a
/// `--link` (no guest, so no buffers), the link asks for frames as fast as the other side
/// takes them, until `count` is reached.
///
/// With a `rate` (pktgen's `ratep`), it is paced instead: a thread of its own hands up the
/// frames due every millisecond (on queue 0), whether or not the guest has room for them; a
/// vif's backlog keeps what it can and counts the rest as dropped, as for any host's traffic.
/// A thread held up catches up at most 50 ms of frames.
///
/// The frames go from 192.0.2.1 to 192.0.2.2 (TEST-NET-1), TCP port 9 to 9 (discard), with
/// correct IPv4 and TCP checksums; a GSO frame's TCP checksum is partial, as a host's is.
public final class FrameGenerator: NetDevice, Sendable {
    public let name = "generator"
    public let offloads: NetOffloads = .all
    /// Frames per second when paced; nil: as many as the guest's buffers hold.
    public let rate: Double?
    public var makesFramesOnDemand: Bool { rate == nil }

    /// One queue's frame, its own copy (its reference count touched by that queue's thread
    /// alone), and the buffers posted but not yet filled (fewer than a frame takes).
    private struct QueueSource {
        let frame: EthernetFrame
        /// Ring slots a frame takes (its data slots as a backend cuts them, and the GSO extra).
        let slots: Int
        var credit = 0
        init(template: EthernetFrame, queue: Int) {
            let own = template.withUnsafeBytes { bytes in
                EthernetFrame(count: bytes.count, offload: template.offload, queue: queue) { $0.copyMemory(from: bytes) }
            }
            frame = own
            slots = RxSlotLayout.slots(of: own)
        }
    }
    private struct State {
        var receiver: (any NetFrameReceiver)?
        var template: EthernetFrame
        var sources: [Int: QueueSource] = [:]
        /// Frames still to make (nil: no end).
        var remaining: UInt64?
    }
    private let state: Mutex<State>
    private let counters = NetTrafficCounter()
    /// The pacing thread (with a `rate`), and whether it must stop.
    private let pacer = Mutex<PosixThread?>(nil)
    private let stopping = Atomic<Bool>(false)

    /// Frames of `size` bytes (54 to 65535; with `mss`, a TCP segment the guest cuts in `mss`
    /// pieces, which needs the guest's GSO and scatter-gather), `count` of them in all (nil:
    /// no end), to `destination`; `rate` frames a second (nil: as fast as they are taken).
    public init(size: Int, mss: UInt16? = nil, count: UInt64? = nil, destination: MACAddress = .broadcast,
                rate: Double? = nil) throws(DeviceSpecError) {
        if let rate, !(rate > 0 && rate <= 1e9) { throw DeviceSpecError("generator: rate \(rate) is not above 0 and at most 1G frames a second") }
        self.rate = rate
        state = Mutex(State(template: try Self.frame(size: size, mss: mss, destination: destination), remaining: count))
        guard let rate else { return }
        do throws(ThreadStartError) {
            let thread = try PosixThread("generator pacing") { [unowned(unsafe) self] in pace(rate) }
            pacer.withLock { $0 = thread }
        } catch {
            throw DeviceSpecError("generator: no thread to pace the frames: \(error)")
        }
    }

    deinit { stopPacing() }

    /// The pacing thread: every millisecond, the frames due since the receiver connected, as
    /// one run; until `count` is reached or the generator closes.
    private func pace(_ rate: Double) {
        var start: Double?
        var sent: UInt64 = 0
        var next = monotonicSeconds()
        while !stopping.load(ordering: .relaxed) {
            next += 0.001
            let wait = next - monotonicSeconds()
            if wait > 0 { usleep(UInt32(wait * 1e6)) } else if wait < -0.05 { next = monotonicSeconds() }
            let taken: (any NetFrameReceiver, EthernetFrame, Int)? = state.withLock { s in
                guard let receiver = s.receiver else { start = nil; return nil }
                let now = monotonicSeconds()
                let begun = start ?? now
                if start == nil { start = now; sent = 0 }
                let due = UInt64((now - begun) * rate)
                // A thread held up (a loaded host) catches up 50 ms of frames at most.
                let most = UInt64(rate * 0.05) + 1
                if due > sent + most { sent = due - most }
                var n = due - sent
                if let remaining = s.remaining {
                    n = min(n, remaining)
                    s.remaining = remaining - n
                }
                sent += n
                return (receiver, s.template, Int(n))
            }
            guard let (receiver, frame, count) = taken else { continue }
            if count > 0 {
                counters.count(frames: count, bytes: count * frame.count)
                receiver.toGuest(frame, repeating: count)
            }
            if state.withLock({ $0.remaining == 0 }) { return }
        }
    }

    private func stopPacing() {
        stopping.store(true, ordering: .relaxed)
        let thread = pacer.withLock { t in defer { t = nil }; return t }
        thread?.join()
    }

    /// Makes the frames `size` bytes with `mss` from now on (the bench's rows); the same
    /// limits as at init.
    public func use(size: Int, mss: UInt16?, destination: MACAddress = .broadcast) throws(DeviceSpecError) {
        let template = try Self.frame(size: size, mss: mss, destination: destination)
        state.withLock { $0.template = template; $0.sources = [:] }
    }

    public func fromGuest(_ frame: EthernetFrame) {}

    public func connect(_ receiver: any NetFrameReceiver, accepting offloads: NetOffloads) {
        state.withLock { $0.receiver = receiver }
    }

    public func close() {
        stopPacing()
        state.withLock { $0.receiver = nil }
    }

    @discardableResult
    public func guestPostedBuffers(_ buffers: Int, queue: Int) -> Int {
        guard rate == nil else { return 0 }   // paced: its own thread sends
        // One lock a sweep: the queue's frame and how many to make.
        let taken: (any NetFrameReceiver, EthernetFrame, Int)? = state.withLock { s in
            guard let receiver = s.receiver else { return nil }
            var source = s.sources[queue] ?? QueueSource(template: s.template, queue: queue)
            source.credit += buffers
            var n = source.credit / source.slots
            if let remaining = s.remaining {
                n = Int(min(UInt64(n), remaining))
                s.remaining = remaining - UInt64(n)
            }
            source.credit -= n * source.slots
            s.sources[queue] = source
            return (receiver, source.frame, n)
        }
        guard let (receiver, frame, count) = taken, count > 0 else { return 0 }
        // Handed up as one run: a queue keeps it as one entry of its backlog, so that a copy
        // costs no reference count (pktgen's clone_skb; the C reference copies from one template).
        counters.count(frames: count, bytes: count * frame.count)
        receiver.toGuest(frame, repeating: count)
        return count
    }

    /// Frames made for the guest.
    public var counts: NetTraffic { counters.snapshot }

    /// The frame: Ethernet, IPv4 (checksummed), TCP and a payload pattern; with `mss`, a GSO
    /// TCPv4 segment with a partial checksum, else a complete one. `size` from 54 (the
    /// headers) to 65535, `mss` below the TCP payload.
    public static func frame(size: Int, mss: UInt16?, destination: MACAddress) throws(DeviceSpecError) -> EthernetFrame {
        guard (54...65535).contains(size) else { throw DeviceSpecError("generator: size \(size) is not from 54 to 65535 bytes") }
        if let mss {
            guard mss > 0, size > 54 + Int(mss) else {
                throw DeviceSpecError("generator: mss \(mss) must be at least 1 and below the frame's TCP payload (\(size - 54) bytes)")
            }
        }
        var frame = EthernetFrame(count: size) { b in
            b.initializeMemory(as: UInt8.self, repeating: 0)
            withUnsafeBytes(of: destination.value.bigEndian) { mac in
                for i in 0..<6 { b[i] = mac[2 + i] }
            }
            let head: [UInt8] = [0x02, 0, 0, 0, 0, 0x01, 0x08, 0x00,   // source (locally administered), IPv4
                                 0x45, 0, UInt8((size - 14) >> 8), UInt8((size - 14) & 0xff), 0, 0, 0x40, 0,   // DF
                                 64, 6, 0, 0, 192, 0, 2, 1, 192, 0, 2, 2,   // TTL, TCP, checksum, addresses
                                 0, 9, 0, 9, 0, 0, 0, 1, 0, 0, 0, 0, 0x50, 0x18, 0xff, 0xff]   // ports, seq, ack, PSH|ACK
            for (i, v) in head.enumerated() { b[6 + i] = v }
            let ipSum = ~FrameChecksum.fold(FrameChecksum.sum(UnsafeRawBufferPointer(rebasing: b[14..<34])))
            b[24] = UInt8(ipSum >> 8); b[25] = UInt8(ipSum & 0xff)
            for i in 54..<size { b[i] = UInt8(truncatingIfNeeded: i &* 7) }
        }
        guard let headers = FrameHeaders(frame) else { return frame }
        FrameChecksum.preparePartial(&frame, headers: headers)
        if let mss {
            frame.offload.segmentation = .init(kind: .tcpv4, size: mss)
        } else {
            FrameChecksum.complete(&frame)
            frame.offload.checksum = .none
        }
        return frame
    }
}

extension FrameGenerator {
    /// `rate`: a number of frames a second, with k, M or G (times 1000, a million, a billion).
    static func rate(_ parameters: DeviceParameters) throws(DeviceSpecError) -> Double? {
        guard let text = parameters.string("rate") else { return nil }
        let scales: [Character: Double] = ["k": 1e3, "K": 1e3, "m": 1e6, "M": 1e6, "g": 1e9, "G": 1e9]
        var number = Substring(text), scale = 1.0
        if let last = text.last, let s = scales[last] { number = number.dropLast(); scale = s }
        guard let value = Double(number), value > 0, value * scale >= 1, value * scale <= 1e9 else {
            throw DeviceSpecError("generator: rate '\(text)' is not a number of frames a second from 1 to 1G (use e.g. 1000, 100k or 1.5M)")
        }
        return value * scale
    }

    public static let descriptor = DeviceDescriptor(
        deviceClass: .net, name: "generator", kind: .device,
        summary: "Fills every rx buffer the guest posts with a TCP frame (pktgen for a guest); drops what the guest sends.",
        parameters: [
            DeviceParameter("size", "Frame size in bytes, 54 to 65535; default 1514."),
            DeviceParameter("mss", "Make each frame a TCP segment the guest cuts in pieces of this size (GSO); default none."),
            DeviceParameter("count", "Frames to send in all, then stop; default no end."),
            DeviceParameter("rate", "Frames a second (k, M and G multiply by 1000), sent whether or not the guest has room, as pktgen's ratep; default none: as many as the guest's buffers hold."),
            DeviceParameter("dst", "Destination MAC address; default ff:ff:ff:ff:ff:ff."),
        ],
        open: { parameters, _ throws(DeviceSpecError) in
            var destination = MACAddress.broadcast
            if let text = parameters.string("dst") {
                guard let mac = MACAddress(text) else { throw DeviceSpecError("generator: dst '\(text)' is not a MAC address (use e.g. 00:16:3e:00:00:01)") }
                destination = mac
            }
            return try FrameGenerator(size: parameters.integer("size", in: 54...65535) ?? 1514,
                                      mss: parameters.integer("mss", in: UInt16(1)...UInt16(65535)),
                                      count: parameters.integer("count", in: UInt64(1)...UInt64.max), destination: destination,
                                      rate: try FrameGenerator.rate(parameters))
        })
}
