import CXen
import Core
import Glibc
import Synchronization

typealias UsbifFatalHandler = @Sendable (String) -> Void

/// What other threads hand to a controller's ring thread.
enum UsbifEvent {
    /// A device finished a URB.
    case urb(URB)
    /// A device was plugged into a port (opened on the xenbus thread).
    case plug(port: Int, device: any USBDevice)
    /// A port's device goes.
    case unplug(port: Int)
    /// A device reported its own removal (a host device pulled out).
    case removed(port: Int, device: ObjectIdentifier)
    /// The controller disconnects: cancel what is in flight.
    case cancelAll
}

/// Counters of one controller, read from any thread.
final class UsbifCounters: Sendable {
    let urbs = Atomic<UInt64>(0), bytes = Atomic<UInt64>(0), errors = Atomic<UInt64>(0)
}

/// A virtual USB host controller's rings (the URB ring and the connection ring, one event
/// channel) served on a ``RingServiceLoop`` thread, with the devices plugged into its ports.
/// Each request is copied once out of the ring and checked (port, device address, segments,
/// lengths); OUT data comes in by grant copy, the standard requests pass down the device's
/// stack and are answered here (``USBStandardRequests``, with the guest's addresses translated
/// per port), the rest goes to
/// the device; when it completes, IN data and isochronous results go back by grant copy
/// before the response is pushed (xen-hcd fails the controller if a grant is still in use).
/// Unlink answers both the unlink and (when the device lets go) the URB it names.
final class UsbifQueue: RingService, URBCompletionSink, USBPortEventsFactory, @unchecked Sendable {
    typealias Completion = UsbifEvent

    @exclusivity(unchecked) private var urbRing: BackRing<UsbifURBRing>
    @exclusivity(unchecked) private var connRing: BackRing<UsbifConnRing>
    private let urbMapping: GrantMapping, connMapping: GrantMapping
    private let urbRef: GrantRef, connRef: GrantRef
    private let channel: any EventChannel
    private let grants: any GrantTable
    private let domain: DomainID
    private let portCount: Int
    private let onFatal: UsbifFatalHandler
    private let log: @Sendable (String) -> Void
    private(set) var loop: RingServiceLoop<UsbifQueue>!
    let counters = UsbifCounters()

    /// One plugged device.
    private struct Port {
        var device: any USBDevice
        var standard = USBStandardRequests()
        var inFlight = 0
    }
    @exclusivity(unchecked) private var ports: [Port?]
    /// Devices unplugged with URBs still in flight: closed when the last completes.
    @exclusivity(unchecked) private var retiring: [ObjectIdentifier: (device: any USBDevice, inFlight: Int)] = [:]
    /// Connection events waiting for a request on the connection ring.
    @exclusivity(unchecked) private var connEvents: [(port: Int, speed: UInt8)] = []

    /// One URB ring slot's state while its URB is with a device.
    private struct Slot {
        var id: UInt16 = 0
        var urb: URB?
        var port = 0
        var device: ObjectIdentifier?
        var request = usbif_urb_request()
        var bufferSegments = 0
        var isoSegments = 0
    }
    @exclusivity(unchecked) private var slots: [Slot]
    private let buffers: UnsafeMutableRawPointer
    private static let slotBytes = Usbif.maxSegments * xenPageSize
    @exclusivity(unchecked) private var copies: [GrantCopySegment] = []
    @exclusivity(unchecked) private(set) var inFlight = 0
    @exclusivity(unchecked) private var broken = false
    @exclusivity(unchecked) private var responsesWritten = false

    /// Takes over the mappings and the channel even when it throws.
    init(urb urbMapping: GrantMapping, urbRef: GrantRef, conn connMapping: GrantMapping, connRef: GrantRef, channel: any EventChannel,
         grants: any GrantTable, domain: DomainID, portCount: Int, poller: AdaptivePoller,
         log: @escaping @Sendable (String) -> Void, onFatal: @escaping UsbifFatalHandler) throws {
        self.urbMapping = urbMapping; self.urbRef = urbRef; self.connMapping = connMapping; self.connRef = connRef
        urbRing = BackRing(shared: urbMapping.base!, bytes: xenPageSize)
        connRing = BackRing(shared: connMapping.base!, bytes: xenPageSize)
        self.channel = channel; self.grants = grants; self.domain = domain; self.portCount = portCount
        self.onFatal = onFatal; self.log = log
        ports = Array(repeating: nil, count: portCount + 1)
        slots = Array(repeating: Slot(), count: Int(urbRing.size))
        buffers = .allocate(byteCount: Int(urbRing.size) * Self.slotBytes, alignment: xenPageSize)
        do {
            loop = try RingServiceLoop(purpose: "usbif controller of domain \(domain)", channels: [channel], poller: poller,
                                       completionCapacity: Int(urbRing.size) + 64)
        } catch {
            buffers.deallocate()
            grants.unmap(urbMapping, refs: [urbRef]); grants.unmap(connMapping, refs: [connRef])
            channel.close()
            throw error
        }
    }

    deinit { buffers.deallocate() }

    private var started = false
    func start() throws(ThreadStartError) {
        started = true
        try loop.start(self)
    }

    /// Cancels what devices hold (an interrupt IN may wait for ever) and waits for the thread.
    @discardableResult
    func stop(timeout seconds: Double = .infinity) -> Bool {
        if !started { started = true; ended(); return loop.stop(timeout: seconds) }
        loop.post(.cancelAll)
        return loop.stop(timeout: seconds)
    }

    /// From any thread: hands an event to the ring thread.
    func post(_ event: UsbifEvent) { loop.post(event) }

    // MARK: Device callbacks (any thread)

    func completed(_ urb: URB) {
        if loop.isLoopThread { finishURB(urb) } else { loop.post(.urb(urb)) }
    }

    func portEvents(port: Int, device: any USBDevice) -> any USBPortEvents {
        PortEvents(queue: self, port: port, device: ObjectIdentifier(device))
    }

    private final class PortEvents: USBPortEvents, @unchecked Sendable {
        weak var queue: UsbifQueue?
        let port: Int
        let device: ObjectIdentifier
        init(queue: UsbifQueue, port: Int, device: ObjectIdentifier) { self.queue = queue; self.port = port; self.device = device }
        func deviceRemoved() { queue?.post(.removed(port: port, device: device)) }
    }

    // MARK: The ring thread (RingService)

    var awaitsWork: Bool { !broken }

    func takeWork() {
        if !broken { takeURBs() }
    }

    func finish(_ event: UsbifEvent) {
        switch event {
        case .urb(let urb): finishURB(urb)
        case .plug(let port, let device): plug(port, device)
        case .unplug(let port): unplug(port)
        case .removed(let port, let id):
            if let p = ports[port], ObjectIdentifier(p.device) == id { unplug(port) }
        case .cancelAll:
            for s in slots { if let urb = s.urb, let port = ports[s.port] { port.device.cancel(urb) } }
            for s in slots { if let urb = s.urb, let id = s.device, let r = retiring[id] { r.device.cancel(urb) } }
        }
    }

    func publish() {
        if responsesWritten {
            responsesWritten = false
            if urbRing.pushResponses() { channel.notify() }
        }
        deliverConnEvents()
    }

    func hasWork() -> Bool {
        guard let n = urbRing.unconsumedRequests() else { return true }
        return n > 0 || (!connEvents.isEmpty && (connRing.unconsumedRequests() ?? 1) > 0)
    }

    /// URBs, and connection-ring buffers taken for port events.
    func requestsTaken(channel index: Int) -> UInt32 { urbRing.requestConsumer &+ connRing.requestConsumer }

    func prepareToSleep() -> Bool {
        guard let n = urbRing.finalCheckForRequests() else { fatal("the frontend published an impossible URB ring producer index"); return true }
        if n > 0 { return true }
        if !connEvents.isEmpty {
            guard let c = connRing.finalCheckForRequests() else { fatal("the frontend published an impossible connection ring producer index"); return true }
            if c > 0 { return true }
        }
        return false
    }

    /// Nothing is in flight: the devices close, the rings go.
    func ended() {
        for p in ports { p?.device.attach(to: nil); p?.device.close() }
        ports = Array(repeating: nil, count: portCount + 1)
        for r in retiring.values { r.device.close() }
        retiring = [:]
        grants.unmap(urbMapping, refs: [urbRef])
        grants.unmap(connMapping, refs: [connRef])
    }

    private func fatal(_ why: String) {
        guard !broken else { return }
        broken = true
        onFatal(why)
    }

    // MARK: Ports

    private func plug(_ port: Int, _ device: any USBDevice) {
        guard port >= 1, port <= portCount else { device.close(); return }
        if ports[port] != nil { unplug(port) }
        ports[port] = Port(device: device)
        device.attach(to: portEvents(port: port, device: device))
        connEvents.append((port, device.speed.rawValue))
    }

    private func unplug(_ port: Int) {
        guard port >= 1, port <= portCount, let p = ports[port] else { return }
        ports[port] = nil
        p.device.attach(to: nil)
        connEvents.append((port, Usbif.speedNone))
        if p.inFlight == 0 {
            p.device.close()
        } else {
            retiring[ObjectIdentifier(p.device)] = (p.device, p.inFlight)
            for s in slots where s.port == port { if let urb = s.urb { p.device.cancel(urb) } }
        }
    }

    /// Answers the frontend's posted connection requests with the waiting plug and unplug events.
    private func deliverConnEvents() {
        guard !connEvents.isEmpty, !broken else { return }
        guard var n = connRing.unconsumedRequests() else { return fatal("the frontend published an impossible connection ring producer index") }
        var sent = 0
        while n > 0 && sent < connEvents.count {
            let request = connRing.takeRequest()
            let event = connEvents[sent]
            connRing.putResponse(usbif_conn_response(id: request.id, portnum: UInt8(event.port), speed: event.speed))
            sent += 1; n -= 1
        }
        connEvents.removeFirst(sent)
        if sent > 0, connRing.pushResponses() { channel.notify() }
    }

    // MARK: URBs

    private func takeURBs() {
        guard let n = urbRing.unconsumedRequests() else {
            return fatal("the frontend published an impossible URB ring producer index (more than a ring ahead)")
        }
        for _ in 0..<n {
            let request = urbRing.takeRequest()   // the one copy out of shared memory
            dispatch(request)
        }
    }

    private func respond(id: UInt16, status: USBStatus, actualLength: Int = 0, startFrame: UInt16 = 0, errorCount: Int32 = 0) {
        urbRing.putResponse(usbif_urb_response(id: id, start_frame: startFrame, status: status.rawValue,
                                               actual_length: Int32(actualLength), error_count: errorCount))
        responsesWritten = true
        if status != .ok { counters.errors.add(1, ordering: .relaxed) }
    }

    private func dispatch(_ r: usbif_urb_request) {
        let pipe = Usbif.Pipe(r.pipe)
        if pipe.isUnlink {
            // Cancel the URB it names (its own response comes when the device lets go) and
            // answer the unlink itself now: xen-hcd needs both.
            let target = r.u.unlink.unlink_id
            for s in slots where s.urb != nil && s.id == target {
                if let urb = s.urb {
                    if let port = ports[s.port], let id = s.device, ObjectIdentifier(port.device) == id { port.device.cancel(urb) }
                    else if let id = s.device { retiring[id]?.device.cancel(urb) }
                }
            }
            return respond(id: r.id, status: .ok)
        }
        let bufferSegments = Int(r.nr_buffer_segs)
        let isoSegments = pipe.type == .isochronous ? Int(r.u.isoc.nr_frame_desc_segs) : 0
        guard bufferSegments <= Usbif.maxSegments, isoSegments <= Usbif.maxSegments - bufferSegments else {
            return respond(id: r.id, status: .invalid)
        }
        guard pipe.port >= 1, pipe.port <= portCount, var port = ports[pipe.port] else { return respond(id: r.id, status: .noDevice) }
        // Addresses: the guest's SET_ADDRESS stays here. A request to address 0 after the
        // device had one means the guest reset the port (xen-hcd resets it locally).
        if pipe.device == 0 {
            if port.standard.address != 0 {
                // The device may complete what it cancels here, on this thread (finishURB
                // counts the port's URBs down): read the port again rather than write back
                // the copy taken before.
                ports[pipe.port]!.standard.reset()
                port.device.reset()
                port = ports[pipe.port]!
            }
            guard pipe.type == .control, pipe.endpoint == 0 else { return respond(id: r.id, status: .invalid) }
        } else if pipe.device != port.standard.address {
            return respond(id: r.id, status: .noDevice)
        }
        let segments = Usbif.segments(r)
        var total = 0
        for i in 0..<(bufferSegments + isoSegments) {
            let s = segments[i]
            guard Int(s.offset) + Int(s.length) <= xenPageSize else { return respond(id: r.id, status: .invalid) }
            if i < bufferSegments { total += Int(s.length) }
        }
        // xen-hcd's segments cover the buffer exactly; buffer_length is 16 bits, so 64 KiB reads 0.
        guard UInt16(truncatingIfNeeded: total) == r.buffer_length, total <= Self.slotBytes else { return respond(id: r.id, status: .invalid) }
        var packets: [USBIsoPacket] = []
        if pipe.type == .isochronous {
            let count = Int(r.u.isoc.number_of_packets)
            let descriptorBytes = segments[bufferSegments..<(bufferSegments + isoSegments)].reduce(0) { $0 + Int($1.length) }
            guard count > 0, count * 16 <= descriptorBytes else { return respond(id: r.id, status: .invalid) }
            packets = Array(repeating: USBIsoPacket(offset: 0, length: 0), count: count)
        }
        let slot = freeSlot()
        let buffer = buffers + slot * Self.slotBytes
        // OUT data (and the ISO descriptors) in from the guest: one batched copy.
        copies.removeAll(keepingCapacity: true)
        var position = 0
        if !pipe.isIn {
            for i in 0..<bufferSegments where segments[i].length > 0 {
                copies.append(GrantCopySegment(direction: .fromGuest, domain: domain, ref: segments[i].gref, offset: segments[i].offset,
                                               length: segments[i].length, local: buffer + position))
                position += Int(segments[i].length)
            }
        }
        var descriptors = [UInt8](repeating: 0, count: packets.count * 16)
        if !packets.isEmpty {
            descriptors.withUnsafeMutableBytes { d in
                var at = 0
                for i in bufferSegments..<(bufferSegments + isoSegments) where at < d.count {
                    let n = min(Int(segments[i].length), d.count - at)
                    copies.append(GrantCopySegment(direction: .fromGuest, domain: domain, ref: segments[i].gref, offset: segments[i].offset,
                                                   length: UInt16(n), local: d.baseAddress! + at))
                    at += n
                }
                copyCopies()
            }
        } else {
            copyCopies()
        }
        guard copies.allSatisfy({ $0.error == nil }) else { return respond(id: r.id, status: .invalid) }
        for i in 0..<packets.count {
            descriptors.withUnsafeBytes { d in
                packets[i] = USBIsoPacket(offset: d.loadUnaligned(fromByteOffset: i * 16, as: UInt32.self),
                                          length: d.loadUnaligned(fromByteOffset: i * 16 + 4, as: UInt32.self))
            }
            guard Int(packets[i].offset) + Int(packets[i].length) <= total else { return respond(id: r.id, status: .invalid) }
        }
        let setup: USBSetup? = pipe.type == .control ? Usbif.setup(r) : nil
        let urb = URB(endpoint: pipe.endpoint, isIn: pipe.isIn, type: pipe.type, setup: setup,
                      buffer: UnsafeMutableRawBufferPointer(start: buffer, count: total), isoPackets: packets,
                      shortNotOK: r.transfer_flags & Usbif.shortNotOK != 0,
                      interval: pipe.type == .interrupt || pipe.type == .isochronous ? r.u.intr.interval : 0, tag: slot, sink: self)
        slots[slot] = Slot(id: r.id, urb: urb, port: pipe.port, device: ObjectIdentifier(port.device), request: r,
                           bufferSegments: bufferSegments, isoSegments: isoSegments)
        inFlight += 1
        port.inFlight += 1
        ports[pipe.port] = port
        if pipe.endpoint == 0, let setup, setup.kind == .standard {
            // Down the stack first (filters record it or refuse it), then answered here, on
            // this thread, against the stack's descriptors.
            let number = pipe.port, stack = port.device
            stack.submitStandard(urb) { request in
                guard var standard = self.ports[number]?.standard else { return false }
                let handled = standard.handle(request, device: stack)
                // The device may complete URBs meanwhile (finishURB counts the port's down):
                // write back only the standard state.
                if self.ports[number] != nil { self.ports[number]!.standard = standard }
                return handled
            }
            return
        }
        port.device.submit(urb)
    }

    private func copyCopies() {
        guard !copies.isEmpty else { return }
        copies.withUnsafeMutableBufferPointer { grants.copy($0) }
    }

    private func freeSlot() -> Int {
        // A ring holds at most `size` unanswered requests, so a slot is always free.
        slots.firstIndex { $0.urb == nil }!
    }

    /// A URB is done: IN data and ISO results back to the guest, then the response.
    private func finishURB(_ urb: URB) {
        let slotIndex = urb.tag
        guard slotIndex >= 0, slotIndex < slots.count, let current = slots[slotIndex].urb, current === urb else { return }
        let slot = slots[slotIndex]
        slots[slotIndex] = Slot()
        inFlight -= 1
        if let p = ports[slot.port], let id = slot.device, ObjectIdentifier(p.device) == id {
            ports[slot.port]!.inFlight -= 1
        } else if let id = slot.device, var r = retiring[id] {
            r.inFlight -= 1
            if r.inFlight == 0 { retiring[id] = nil; r.device.close() } else { retiring[id] = r }
        }
        var status = urb.status
        var length = min(max(0, urb.actualLength), urb.buffer.count)
        if status == .ok && urb.isIn && urb.shortNotOK && length < urb.buffer.count && urb.type != .isochronous { status = USBStatus(rawValue: -121) }   // -EREMOTEIO
        let segments = Usbif.segments(slot.request)
        copies.removeAll(keepingCapacity: true)
        if urb.isIn && length > 0 {
            var position = 0
            for i in 0..<slot.bufferSegments where position < length {
                let n = min(Int(segments[i].length), length - position)
                guard n > 0 else { continue }
                copies.append(GrantCopySegment(direction: .toGuest, domain: domain, ref: segments[i].gref, offset: segments[i].offset,
                                               length: UInt16(n), local: urb.buffer.baseAddress! + position))
                position += n
            }
        }
        var descriptors = [UInt8](repeating: 0, count: urb.isoPackets.count * 16)
        descriptors.withUnsafeMutableBytes { d in
            for (i, p) in urb.isoPackets.enumerated() {
                d.storeBytes(of: p.offset, toByteOffset: i * 16, as: UInt32.self)
                d.storeBytes(of: p.length, toByteOffset: i * 16 + 4, as: UInt32.self)
                d.storeBytes(of: p.actualLength, toByteOffset: i * 16 + 8, as: UInt32.self)
                d.storeBytes(of: p.status, toByteOffset: i * 16 + 12, as: Int32.self)
            }
            var at = 0
            for i in slot.bufferSegments..<(slot.bufferSegments + slot.isoSegments) where at < d.count {
                let n = min(Int(segments[i].length), d.count - at)
                copies.append(GrantCopySegment(direction: .toGuest, domain: domain, ref: segments[i].gref, offset: segments[i].offset,
                                               length: UInt16(n), local: d.baseAddress! + at))
                at += n
            }
            copyCopies()
        }
        if copies.contains(where: { $0.error != nil }) { status = .invalid; length = 0 }
        counters.urbs.add(1, ordering: .relaxed)
        counters.bytes.add(UInt64(length), ordering: .relaxed)
        // Every copy is done: no grant of this request is held when the guest sees the response.
        respond(id: slot.id, status: status, actualLength: length, startFrame: urb.startFrame, errorCount: urb.errorCount)
    }
}

/// Makes the object a device reports its own events to (the port it is plugged into).
protocol USBPortEventsFactory {
    func portEvents(port: Int, device: any USBDevice) -> any USBPortEvents
}
