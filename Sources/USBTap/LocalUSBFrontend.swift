import CXen
import Core
import Glibc
import XenStore

/// A usbfront written in Swift for a guest of the local hypervisor: what Linux's xen-hcd does on
/// the wire (a URB ring of 16 slots and a connection ring with every request pre-posted, one
/// event channel, a grant per page of each buffer, unlink as a request of its own), plus the
/// enumeration the USB core does after a connection event, so that the demo, the tests and
/// the benchmark drive the backend as a guest would.
public final class LocalUSBFrontend: @unchecked Sendable {
    public let connection: LocalFrontend
    public var urbRing: FrontRing<UsbifURBRing>
    public var connRing: FrontRing<UsbifConnRing>
    public let channel: any EventChannel
    /// Each URB slot's 16 pages and their grants (writable: the backend copies both ways).
    let pages: UnsafeMutableRawPointer
    let refs: [GrantRef]
    private var freeIDs: [UInt16]
    /// Responses that arrived for ids nobody waited for yet.
    private var responses: [UInt16: usbif_urb_response] = [:]
    /// Each port's speed from the connection events (absent: nothing plugged).
    public private(set) var portSpeeds: [Int: USBSpeed] = [:]
    /// Connection events in the order they came: (port, speed; 0 unplugged).
    public private(set) var connectionEvents: [(port: Int, speed: UInt8)] = []
    public let portCount: Int
    public var backendPath: String { connection.backendPath }

    public struct Failure: Error, CustomStringConvertible {
        public let description: String
        init(_ d: String) { description = d }
    }

    /// What a URB came back with.
    public struct Result: Equatable, Sendable {
        public var status: USBStatus
        public var data: [UInt8]
        public var actualLength: Int
        public var isoPackets: [USBIsoPacket]
        public var errorCount: Int32
    }

    public init(hypervisor: LocalHypervisor, frontendPath: String, timeoutSeconds: Double = 10) throws {
        connection = try LocalFrontend(hypervisor: hypervisor, frontendPath: frontendPath, timeoutSeconds: timeoutSeconds)
        let features = try connection.backendNodes(["num-ports", "usb-ver"])
        guard let ports = features["num-ports"].flatMap({ Int($0) }), (1...Usbif.maxPorts).contains(ports) else {
            throw Failure("the backend has no valid num-ports")
        }
        portCount = ports
        let urb = try connection.makeRing(UsbifURBRing.self, pageOrder: 0)
        let conn = try connection.makeRing(UsbifConnRing.self, pageOrder: 0)
        urbRing = urb.ring; connRing = conn.ring
        channel = try connection.makeChannel()
        let slots = Int(urbRing.size)
        let frame = try connection.pages.allocate(pages: slots * Usbif.maxSegments)
        pages = connection.pages.pointer(frame)
        refs = try connection.grant(frame: frame, count: slots * Usbif.maxSegments, readOnly: false)
        freeIDs = (0..<UInt16(slots)).reversed()
        // Every connection request posted at once, as xen-hcd does.
        for i in 0..<connRing.size { connRing.putRequest(usbif_conn_request(id: UInt16(i))) }
        _ = connRing.pushRequests()
        try connection.connect(nodes: urb.nodes(name: "urb-ring-ref") + conn.nodes(name: "conn-ring-ref")
                               + [("event-channel", "\(channel.localPort)")], timeoutSeconds: timeoutSeconds)
    }

    // MARK: Connection events

    /// Takes the connection events that arrived, reposting their requests.
    public func collectConnectionEvents() {
        var reposted = 0
        repeat {
            while connRing.unconsumedResponses() > 0 {
                let r = connRing.takeResponse()
                connectionEvents.append((Int(r.portnum), r.speed))
                if r.speed == Usbif.speedNone { portSpeeds[Int(r.portnum)] = nil } else { portSpeeds[Int(r.portnum)] = USBSpeed(rawValue: r.speed) }
                connRing.putRequest(usbif_conn_request(id: r.id))
                reposted += 1
            }
        } while connRing.finalCheckForResponses() > 0
        if reposted > 0, connRing.pushRequests() { channel.notify() }
    }

    /// Waits until port `port` has a device (or, with `plugged: false`, none).
    public func waitForPort(_ port: Int, plugged: Bool = true, timeoutSeconds: Double = 5) throws {
        let deadline = monotonicSeconds() + timeoutSeconds
        while true {
            collectConnectionEvents()
            if (portSpeeds[port] != nil) == plugged { return }
            guard monotonicSeconds() < deadline else { throw Failure("port \(port) is still \(plugged ? "empty" : "occupied") after \(timeoutSeconds) s") }
            _ = channel.wait(timeoutMilliseconds: 10)
        }
    }

    // MARK: URBs

    /// Puts a URB on the ring and pushes it; returns its id. `data` is OUT data; `length` the IN
    /// buffer size. Isochronous URBs carry `isoPackets` (offsets and lengths).
    public func put(port: Int, device: UInt8, endpoint: UInt8, type: USBTransferType, isIn: Bool, setup: USBSetup? = nil,
                    data: [UInt8] = [], length: Int = 0, isoPackets: [USBIsoPacket] = [], shortNotOK: Bool = false,
                    interval: UInt16 = 0) throws -> UInt16 {
        guard let id = freeIDs.popLast() else { throw Failure("all 16 URB slots are in use") }
        let count = isIn ? length : data.count
        let base = pages + Int(id) * Usbif.maxSegments * xenPageSize
        let dataPages = (count + xenPageSize - 1) / xenPageSize
        let isoPages = isoPackets.isEmpty ? 0 : (isoPackets.count * 16 + xenPageSize - 1) / xenPageSize
        guard dataPages + isoPages <= Usbif.maxSegments else { freeIDs.append(id); throw Failure("\(count) bytes do not fit 16 pages") }
        if !isIn { data.withUnsafeBytes { base.copyMemory(from: $0.baseAddress!, byteCount: count) } }
        var request = usbif_urb_request()
        request.id = id
        request.pipe = Usbif.Pipe(port: port, isIn: isIn, device: device, endpoint: endpoint, type: type).rawValue
        request.transfer_flags = shortNotOK ? Usbif.shortNotOK : 0
        request.buffer_length = UInt16(truncatingIfNeeded: count)
        request.nr_buffer_segs = UInt16(dataPages)
        withUnsafeMutableBytes(of: &request.seg) { raw in
            let segs = raw.bindMemory(to: usbif_request_segment.self)
            for p in 0..<dataPages {
                segs[p] = usbif_request_segment(gref: refs[Int(id) * Usbif.maxSegments + p], offset: 0,
                                                length: UInt16(min(xenPageSize, count - p * xenPageSize)))
            }
            // ISO descriptors in the pages after the data.
            let isoBase = base + dataPages * xenPageSize
            for (i, packet) in isoPackets.enumerated() {
                isoBase.storeBytes(of: packet.offset, toByteOffset: i * 16, as: UInt32.self)
                isoBase.storeBytes(of: packet.length, toByteOffset: i * 16 + 4, as: UInt32.self)
                isoBase.storeBytes(of: UInt64(0), toByteOffset: i * 16 + 8, as: UInt64.self)
            }
            for p in 0..<isoPages {
                segs[dataPages + p] = usbif_request_segment(gref: refs[Int(id) * Usbif.maxSegments + dataPages + p], offset: 0,
                                                            length: UInt16(min(xenPageSize, isoPackets.count * 16 - p * xenPageSize)))
            }
        }
        if let setup {
            let b = setup.bytes
            withUnsafeMutableBytes(of: &request.u.ctrl) { $0.copyBytes(from: b) }
        } else if type == .isochronous {
            request.u.isoc.interval = interval
            request.u.isoc.number_of_packets = UInt16(isoPackets.count)
            request.u.isoc.nr_frame_desc_segs = UInt16(isoPages)
        } else if type == .interrupt {
            request.u.intr.interval = interval
        }
        putRaw(request)
        return id
    }

    /// Puts any request a hostile test made under a free id (written into it) and pushes it;
    /// returns the id, for `wait`.
    public func putHostile(_ request: usbif_urb_request) throws -> UInt16 {
        guard let id = freeIDs.popLast() else { throw Failure("all 16 URB slots are in use") }
        var request = request
        request.id = id
        putRaw(request)
        return id
    }

    /// Puts any request and pushes it.
    public func putRaw(_ request: usbif_urb_request) {
        urbRing.putRequest(request)
        if urbRing.pushRequests() { channel.notify() }
    }

    /// Asks the backend to cancel URB `id` (its own response comes separately); returns the
    /// unlink request's id.
    public func unlink(_ id: UInt16, port: Int) throws -> UInt16 {
        guard let unlinkID = freeIDs.popLast() else { throw Failure("all 16 URB slots are in use") }
        var request = usbif_urb_request()
        request.id = unlinkID
        request.pipe = Usbif.Pipe(port: port, isIn: false, device: 0, endpoint: 0, type: .control, isUnlink: true).rawValue
        request.u.unlink.unlink_id = id
        putRaw(request)
        return unlinkID
    }

    /// Waits for URB `id`'s response and returns it with its IN data and ISO results.
    public func wait(_ id: UInt16, isIn: Bool = false, isoPackets: Int = 0, timeoutSeconds: Double = 5) throws -> Result {
        let deadline = monotonicSeconds() + timeoutSeconds
        while responses[id] == nil {
            collectResponses()
            collectConnectionEvents()
            if responses[id] != nil { break }
            guard monotonicSeconds() < deadline else { throw Failure("no response to URB \(id) after \(timeoutSeconds) s") }
            _ = channel.wait(timeoutMilliseconds: 10)
        }
        let r = responses.removeValue(forKey: id)!
        freeIDs.append(id)
        let base = pages + Int(id) * Usbif.maxSegments * xenPageSize
        let length = max(0, Int(r.actual_length))
        let data = isIn && length > 0 ? Array(UnsafeRawBufferPointer(start: base, count: min(length, Usbif.maxSegments * xenPageSize))) : []
        var packets: [USBIsoPacket] = []
        if isoPackets > 0 {
            // The descriptors follow the data pages: find them where `put` wrote them.
            let dataPages = isoDataPages[id] ?? 0
            let isoBase = base + dataPages * xenPageSize
            for i in 0..<isoPackets {
                packets.append(USBIsoPacket(offset: isoBase.load(fromByteOffset: i * 16, as: UInt32.self),
                                            length: isoBase.load(fromByteOffset: i * 16 + 4, as: UInt32.self),
                                            actualLength: isoBase.load(fromByteOffset: i * 16 + 8, as: UInt32.self),
                                            status: isoBase.load(fromByteOffset: i * 16 + 12, as: Int32.self)))
            }
        }
        return Result(status: USBStatus(rawValue: r.status), data: data, actualLength: length, isoPackets: packets, errorCount: r.error_count)
    }

    /// Data pages of each ISO URB in flight, so `wait` finds its descriptors.
    private var isoDataPages: [UInt16: Int] = [:]

    /// Responses taken, and those for an id that had an untaken response already (a backend
    /// answering a request twice).
    public private(set) var responsesTaken = 0, duplicateResponses = 0

    /// Takes every response that arrived.
    public func collectResponses() {
        repeat {
            while urbRing.unconsumedResponses() > 0 {
                let r = urbRing.takeResponse()
                if responses[r.id] != nil { duplicateResponses += 1 }
                responses[r.id] = r
                responsesTaken += 1
            }
        } while urbRing.finalCheckForResponses() > 0
    }

    /// A URB submitted and waited for.
    public func transfer(port: Int, device: UInt8, endpoint: UInt8, type: USBTransferType, isIn: Bool, setup: USBSetup? = nil,
                         data: [UInt8] = [], length: Int = 0, isoPackets: [USBIsoPacket] = [], timeoutSeconds: Double = 5) throws -> Result {
        let id = try put(port: port, device: device, endpoint: endpoint, type: type, isIn: isIn, setup: setup, data: data, length: length,
                         isoPackets: isoPackets)
        if !isoPackets.isEmpty { isoDataPages[id] = ((isIn ? length : data.count) + xenPageSize - 1) / xenPageSize }
        defer { isoDataPages[id] = nil }
        return try wait(id, isIn: isIn, isoPackets: isoPackets.count, timeoutSeconds: timeoutSeconds)
    }

    /// A control transfer on endpoint 0.
    public func control(port: Int, device: UInt8, _ setup: USBSetup, data: [UInt8] = []) throws -> Result {
        try transfer(port: port, device: device, endpoint: 0, type: .control, isIn: setup.isIn, setup: setup, data: data,
                     length: setup.isIn ? Int(setup.length) : 0)
    }

    /// What the USB core does after a connection event: the device descriptor at address 0,
    /// SET_ADDRESS, the configuration, SET_CONFIGURATION of the first. Returns the address and
    /// the descriptors read.
    public func enumerate(port: Int, address: UInt8) throws -> (device: [UInt8], configuration: [UInt8]) {
        func check(_ r: Result, _ what: String) throws -> Result {
            guard r.status == .ok else { throw Failure("\(what): \(r.status)") }
            return r
        }
        let device = try check(control(port: port, device: 0, USBSetup(requestType: 0x80, request: 6, value: 0x0100, index: 0, length: 64)),
                               "GET_DESCRIPTOR(DEVICE)").data
        _ = try check(control(port: port, device: 0, USBSetup(requestType: 0x00, request: 5, value: UInt16(address), index: 0, length: 0)),
                      "SET_ADDRESS")
        let head = try check(control(port: port, device: address, USBSetup(requestType: 0x80, request: 6, value: 0x0200, index: 0, length: 9)),
                             "GET_DESCRIPTOR(CONFIGURATION)").data
        guard head.count >= 9 else { throw Failure("a configuration descriptor of \(head.count) bytes") }
        let total = Int(head[2]) | Int(head[3]) << 8
        let configuration = try check(control(port: port, device: address,
                                              USBSetup(requestType: 0x80, request: 6, value: 0x0200, index: 0, length: UInt16(total))),
                                      "GET_DESCRIPTOR(CONFIGURATION)").data
        _ = try check(control(port: port, device: address, USBSetup(requestType: 0x00, request: 9, value: UInt16(head[5]), index: 0, length: 0)),
                      "SET_CONFIGURATION")
        return (device, configuration)
    }

    public func close(timeoutSeconds: Double = 10) throws {
        try connection.close(timeoutSeconds: timeoutSeconds)
    }
}
