import CLibUSB
import Core
import Glibc

/// Which host device `host` takes: by vendor and product id, by where it is plugged, or both.
public struct USBHostMatch: Equatable, Sendable, CustomStringConvertible {
    public var id: USBDeviceIDPattern?
    public var bus: UInt8?
    /// Port numbers from the root hub down: "2" is [2], "1.4" is [1, 4].
    public var portPath: [UInt8]?

    /// From `id=VID:PID` (hex) and/or `bus=B, port=P[.P...]`.
    public static func parse(id: String?, bus: String?, port: String?) throws(DeviceSpecError) -> USBHostMatch {
        var match = USBHostMatch()
        if let id {
            let parts = id.split(separator: ":", omittingEmptySubsequences: false)
            guard parts.count == 2, let v = hex16(parts[0]), let p = hex16(parts[1]) else {
                throw DeviceSpecError("host: id=\(id) is not VID:PID in hex (e.g. id=0781:5567, as lsusb prints it)")
            }
            match.id = USBDeviceIDPattern(vendor: v, product: p)
        }
        switch (bus, port) {
        case (nil, nil): break
        case (let bus?, let port?):
            guard let b = UInt8(bus), b > 0 else { throw DeviceSpecError("host: bus=\(bus) is not a bus number (1 to 255)") }
            let path = port.split(separator: ".", omittingEmptySubsequences: false).map { UInt8($0) }
            guard !path.isEmpty, path.count <= 7, path.allSatisfy({ ($0 ?? 0) > 0 }) else {
                throw DeviceSpecError("host: port=\(port) is not a port path (e.g. port=2, or port=1.4 behind a hub; at most 7 levels)")
            }
            match.bus = b
            match.portPath = path.map { $0! }
        default:
            throw DeviceSpecError("host: bus= and port= go together (the device at 1-2 is bus=1, port=2)")
        }
        guard match.id != nil || match.bus != nil else {
            throw DeviceSpecError("host: name the device by id=VID:PID or by bus=B, port=P")
        }
        return match
    }

    private static func hex16(_ s: Substring) -> UInt16? {
        guard (1...4).contains(s.count), s.allSatisfy(\.isHexDigit) else { return nil }
        return UInt16(s, radix: 16)
    }

    public func matches(_ d: LibUSBDeviceInfo) -> Bool {
        (id.map { $0.matches(vendor: d.vendorID, product: d.productID) } ?? true)
            && (bus.map { $0 == d.bus } ?? true) && (portPath.map { $0 == d.portPath } ?? true)
    }

    public var description: String {
        var parts: [String] = []
        if let id { parts.append("id=\(id)") }
        if let bus, let portPath { parts += ["bus=\(bus)", "port=" + portPath.map { String(Int($0)) }.joined(separator: ".")] }
        return "host(" + parts.joined(separator: ", ") + ")"
    }

    /// Picks the one device that matches among `present` (hubs are never passed through), or
    /// says why none can be: nothing matches (listing what is there) or several do.
    public func select(from present: [LibUSBDeviceInfo]) throws(DeviceSpecError) -> LibUSBDeviceInfo {
        let candidates = present.filter { $0.deviceClass != 9 }
        let found = candidates.filter(matches)
        guard found.count == 1 else {
            if found.isEmpty {
                let seen = candidates.isEmpty
                    ? "libusb sees none (no USB controller, or no sysfs at /sys/bus/usb and usbfs at /dev/bus/usb)"
                    : "present: " + candidates.map(\.description).joined(separator: ", ")
                throw DeviceSpecError("\(self): no USB device matches; \(seen)")
            }
            throw DeviceSpecError("\(self): \(found.count) devices match (\(found.map(\.busPort).joined(separator: ", "))); add bus= and port=")
        }
        return found[0]
    }
}

/// A real device of this host at the bottom of a USB stack: what a policy judges it by, read
/// before anything claims it (``USBPolicy/admit(_:)``).
public protocol USBPassthroughDevice: USBDevice {
    /// What a USBGuard policy sees of the device.
    var attributes: USBDeviceAttributes { get }
    /// Where the device is plugged on this host: "1-2" (sysfs's name, USBGuard's via-port).
    var busPort: String { get }
}

/// `host(id=VID:PID)` or `host(bus=B, port=P)`: a real USB device of this host passed through
/// libusb-1.0. Opening it finds the device and describes it: its usbfs node is opened and its
/// descriptors are read once, as `lsusb -v` reads them (the tap answers GET_DESCRIPTOR from
/// them, a policy judges them); the kernel's drivers keep it. Only ``claim()``, once the stack
/// is admitted, detaches those drivers and claims every interface of the active configuration,
/// and starts the event thread. The device-level requests map as QEMU's host-libusb maps them: SET_CONFIGURATION
/// releases, sets and claims again, SET_INTERFACE and CLEAR_FEATURE(HALT) go to libusb, a port
/// reset resets the device. Every other URB is one asynchronous libusb transfer, completed
/// from this device's event thread. Removal is noticed without udevd: a transfer that ends
/// with NO_DEVICE, or the device's sysfs directory gone (polled each second); either tells the
/// port once. Closing cancels what is in flight, waits for it, releases the interfaces (the
/// kernel's drivers come back) and closes the device.
public final class USBHostDevice: USBPassthroughDevice, @unchecked Sendable {
    public let name = "host"
    public let speed: USBSpeed
    public let descriptors: USBDescriptors
    /// Where the device is plugged on this host: "1-2" (sysfs's name, USBGuard's via-port).
    public let busPort: String
    /// What a USBGuard policy sees of the device.
    public let attributes: USBDeviceAttributes

    private let context: LibUSBContext
    private let handle: OpaquePointer
    /// "host(id=46f4:0001): 46f4:0001 at 1-1", for errors.
    private let what: String
    /// Its usbfs node, /dev/bus/usb/BBB/DDD.
    private let node: String
    private let address: UInt8
    private let sysfs: String?
    private var events: PosixThread?
    /// Everything below, and the transfers' lifetimes: a transfer is freed only under it.
    private let lock = ConditionLock()
    private var transfers: [ObjectIdentifier: HostTransfer] = [:]
    private var claimed: [Int32] = []
    /// `claim()` succeeded: the interfaces are ours and the event thread runs.
    private var held = false
    private var port: (any USBPortEvents)?
    private var gone = false
    private var goneReported = false
    private var closed = false
    private var stopEvents = false

    /// Control transfers time out as in QEMU (10 s); bulk, interrupt and isochronous wait.
    static let controlTimeoutMilliseconds: UInt32 = 10_000

    /// Finds the device `match` names, opens it and reads what it is; claims nothing.
    public convenience init(_ match: USBHostMatch) throws(DeviceSpecError) {
        let context: LibUSBContext
        do throws(LibUSBError) { context = try LibUSBContext() } catch { throw DeviceSpecError("\(match): \(error)") }
        try self.init(match, context: context)
    }

    init(_ match: USBHostMatch, context: LibUSBContext) throws(DeviceSpecError) {
        self.context = context
        var opened: (OpaquePointer, LibUSBDeviceInfo, Int32)?
        do {
            try context.withDevices { present in
                let info = try match.select(from: present.map(\.info))
                let device = present.first { $0.info == info }!.device
                var handle: OpaquePointer?
                let rc = libusb_open(device, &handle)
                guard rc == 0, let handle else {
                    let why = rc == LibUSBError.access
                        ? Self.permissionDenied(info.node)
                        : LibUSBError("libusb_open", rc).description
                    throw DeviceSpecError("\(match): cannot open \(info): \(why)")
                }
                opened = (handle, info, libusb_get_device_speed(device))
            }
        } catch let error as DeviceSpecError {
            throw error
        } catch {
            throw DeviceSpecError("\(match): cannot list the USB devices: \(error)")
        }
        let (handle, info, rawSpeed) = opened!
        let sysfs = "/sys/bus/usb/devices/" + info.busPort
        let sysfsPath = access(sysfs, F_OK) == 0 ? sysfs : nil
        let descriptors: USBDescriptors
        do throws(LibUSBError) {
            descriptors = try LibUSBDescriptorReader.read(device: libusb_get_device(handle), handle: handle, sysfs: sysfsPath)
        } catch {
            libusb_close(handle)
            throw DeviceSpecError("\(match): cannot read the descriptors of \(info): \(error)")
        }
        guard let speed = LibUSBStatus.speed(rawSpeed) else {
            libusb_close(handle)
            throw DeviceSpecError("\(match): \(info) runs at \(rawSpeed >= 4 ? "SuperSpeed" : "an unknown speed"), which usbif cannot carry "
                                  + "(plug it into a USB 2 port, or give it a USB 2 controller)")
        }
        self.handle = handle
        what = "\(match): \(info)"
        node = info.node
        self.speed = speed
        self.descriptors = descriptors
        self.sysfs = sysfsPath
        address = info.address
        busPort = info.busPort
        attributes = USBDeviceAttributes(descriptors: descriptors, viaPort: info.busPort,
                                         connectType: sysfsPath.flatMap { Self.readLine($0 + "/port/connect_type") } ?? "")
    }

    /// Detaches the kernel's drivers, claims every interface of the active configuration and
    /// starts the event thread; once (again: nothing). Claiming detaches the kernel's driver of
    /// each interface in the same ioctl (USBDEVFS_DISCONNECT_CLAIM) and releasing binds it again.
    public func claim() throws {
        let state: (held: Bool, closed: Bool) = lock.withLock { (held, closed) }
        guard !state.held else { return }
        guard !state.closed else { throw DeviceSpecError("\(what): closed before it was claimed") }
        _ = libusb_set_auto_detach_kernel_driver(handle, 1)
        if let error = claimInterfaces() {
            releaseInterfaces(reattach: true)
            let why = error.code == LibUSBError.busy
                ? "it is busy (another program, such as QEMU's usb-host or another softdev, has claimed an interface): stop that user first"
                : error.code == LibUSBError.access ? Self.permissionDenied(node)
                : error.description
            throw DeviceSpecError("\(what): cannot claim it: \(why)")
        }
        do throws(ThreadStartError) {
            events = try PosixThread("the USB events of \(busPort)") { [self] in runEvents() }
        } catch {
            releaseInterfaces(reattach: true)
            throw DeviceSpecError("\(what): \(error)")
        }
        lock.withLock { held = true }
    }

    static func permissionDenied(_ node: String) -> String {
        "permission denied on \(node) (run as root, or give this user read-write access to the node)"
    }

    // MARK: USBDevice

    public func submit(_ urb: URB) {
        let transfer: HostTransfer
        do throws(USBStatusError) { transfer = try HostTransfer(urb: urb, device: self) } catch { return urb.complete(error.status) }
        let key = ObjectIdentifier(urb)
        lock.lock()
        guard held, !closed, !gone else {
            lock.unlock()
            transfer.discard()
            return urb.complete(.noDevice)
        }
        // In the table before it is submitted: its completion may come at once on the event thread.
        transfers[key] = transfer
        let rc = libusb_submit_transfer(transfer.transfer)
        if rc != 0 { transfers[key] = nil }
        lock.unlock()
        guard rc != 0 else { return }
        transfer.discard()
        if rc == LibUSBError.noDevice { removed() }
        urb.complete(LibUSBStatus.submitStatus(rc))
    }

    /// GET_STATUS(ENDPOINT) and SET_FEATURE(ENDPOINT_HALT) go to the device, as QEMU's
    /// host-libusb passes them: a halt is the device's own (a bulk endpoint that stalled stays
    /// halted until CLEAR_FEATURE), so only the device can say whether an endpoint is halted, and
    /// a halt the guest sets must halt the device's endpoint, not a copy in the tap. The other
    /// standard requests are the tap's (CLEAR_FEATURE(HALT) reaches `clearHalt`).
    public func submitStandard(_ urb: URB, tap: (URB) -> Bool) {
        if let setup = urb.setup, Self.deviceAnswers(setup) { return submit(urb) }
        if !tap(urb) { submit(urb) }
    }

    /// Whether the device, not the tap, answers the standard request `setup`.
    static func deviceAnswers(_ setup: USBSetup) -> Bool {
        guard setup.kind == .standard, setup.recipient == .endpoint, setup.index & 0x0f != 0 else { return false }
        return setup.request == USBStandardRequests.getStatus || (setup.request == USBStandardRequests.setFeature && setup.value == 0)
    }

    /// The completion reports `.cancelled`.
    public func cancel(_ urb: URB) {
        // Under the lock: the transfer cannot be freed meanwhile (a finished one answers NOT_FOUND).
        lock.withLock { if let t = transfers[ObjectIdentifier(urb)] { _ = libusb_cancel_transfer(t.transfer) } }
    }

    public func setConfiguration(_ value: UInt8) -> USBStatus {
        guard isHeld else { return .noDevice }
        releaseInterfaces(reattach: false)
        let rc = libusb_set_configuration(handle, value == 0 ? -1 : Int32(value))
        if rc != 0 { return failed(LibUSBError("libusb_set_configuration", rc)) }
        guard value != 0 else { return .ok }
        return claimInterfaces().map(failed) ?? .ok
    }

    public func setInterface(_ interface: UInt8, alternate: UInt8) -> USBStatus {
        guard isHeld else { return .noDevice }
        let rc = libusb_set_interface_alt_setting(handle, Int32(interface), Int32(alternate))
        return rc == 0 ? .ok : failed(LibUSBError("libusb_set_interface_alt_setting", rc))
    }

    public func clearHalt(endpoint: UInt8, isIn: Bool) -> USBStatus {
        guard isHeld else { return .noDevice }
        let rc = libusb_clear_halt(handle, endpoint | (isIn ? 0x80 : 0))
        return rc == 0 ? .ok : failed(LibUSBError("libusb_clear_halt", rc))
    }

    /// Cancels what is in flight, resets the device and claims its interfaces again; a device
    /// that comes back different (NOT_FOUND: libusb sees a new device) is reported removed.
    public func reset() {
        guard isHeld else { return }
        lock.withLock { for t in transfers.values { _ = libusb_cancel_transfer(t.transfer) } }
        let rc = libusb_reset_device(handle)
        if rc == LibUSBError.notFound || rc == LibUSBError.noDevice { return removed() }
        _ = claimInterfaces()
    }

    public func attach(to port: (any USBPortEvents)?) {
        let report: Bool = lock.withLock {
            self.port = port
            guard port != nil, gone, !goneReported else { return false }
            goneReported = true
            return true
        }
        if report { port?.deviceRemoved() }
    }

    public func close() {
        let already: Bool = lock.withLock {
            defer { closed = true }
            if !closed { for t in transfers.values { _ = libusb_cancel_transfer(t.transfer) } }
            return closed
        }
        guard !already else { return }
        // The cancelled transfers complete on the event thread: wait for them (a device
        // that never answers a cancel is left after 5 s rather than holding the caller).
        let deadline = monotonicSeconds() + 5
        lock.lock()
        while !transfers.isEmpty, monotonicSeconds() < deadline { lock.wait(timeout: deadline - monotonicSeconds()) }
        let drained = transfers.isEmpty
        stopEvents = true
        lock.unlock()
        context.interruptEvents()
        let stopped = events?.join(timeout: 5) ?? true
        releaseInterfaces(reattach: true)
        // Freeing the handle under transfers still in flight, or while the event thread still
        // runs, would be a use after free: leak it instead.
        if drained && stopped { libusb_close(handle) }
    }

    // MARK: Interfaces

    /// Claimed (and not closed): what the guest asks may reach the device. Before, the device
    /// is only described, and stays dom0's.
    private var isHeld: Bool { lock.withLock { held && !closed } }

    /// Claims every interface of the active configuration (detaching kernel drivers).
    private func claimInterfaces() -> LibUSBError? {
        var value: Int32 = 0
        let rc = libusb_get_configuration(handle, &value)
        guard rc == 0 else { return LibUSBError("libusb_get_configuration", rc) }
        guard value > 0 else { return nil }
        let numbers = Set(descriptors.interfaces(configuration: UInt8(value)).map(\.number)).sorted()
        for number in numbers where !lock.withLock({ claimed.contains(Int32(number)) }) {
            let rc = libusb_claim_interface(handle, Int32(number))
            guard rc == 0 else { return LibUSBError("libusb_claim_interface(\(number))", rc) }
            lock.withLock { claimed.append(Int32(number)) }
        }
        return nil
    }

    /// Releases the claimed interfaces; `reattach` gives them back to the kernel's drivers
    /// (closing), else they stay driverless (a configuration change, which the kernel refuses
    /// while a driver holds an interface).
    private func releaseInterfaces(reattach: Bool) {
        let numbers: [Int32] = lock.withLock { defer { claimed = [] }; return claimed }
        _ = libusb_set_auto_detach_kernel_driver(handle, reattach ? 1 : 0)
        for number in numbers { _ = libusb_release_interface(handle, number) }
        _ = libusb_set_auto_detach_kernel_driver(handle, 1)
    }

    private func failed(_ error: LibUSBError) -> USBStatus {
        if error.code == LibUSBError.noDevice { removed() }
        return error.usbStatus
    }

    // MARK: Events and removal

    /// The event thread: completions, and once a second a look at sysfs.
    private func runEvents() {
        var nextPoll = monotonicSeconds() + 1
        while !lock.withLock({ stopEvents }) {
            context.handleEvents(seconds: 1)
            let now = monotonicSeconds()
            guard now >= nextPoll else { continue }
            nextPoll = now + 1
            if let sysfs, !lock.withLock({ gone }) {
                // Gone, or another device at the same port (a different address).
                if Self.readLine(sysfs + "/devnum").flatMap({ UInt8($0) }) != address { removed() }
            }
        }
    }

    /// The device went away: the port hears it once.
    private func removed() {
        let port: (any USBPortEvents)? = lock.withLock {
            gone = true
            guard !goneReported, let port = self.port else { return nil }
            goneReported = true
            return port
        }
        port?.deviceRemoved()
    }

    /// A transfer is over (on the event thread): its URB completes, then it leaves the table.
    fileprivate func finished(_ t: HostTransfer) {
        let status = t.complete()
        if status == .noDevice { removed() }
        lock.withLock {
            transfers[ObjectIdentifier(t.urb)] = nil
            lock.broadcast()
        }
        t.free()
    }

    static func readLine(_ path: String) -> String? {
        guard let f = fopen(path, "r") else { return nil }
        defer { fclose(f) }
        var buffer = [CChar](repeating: 0, count: 128)
        guard fgets(&buffer, Int32(buffer.count), f) != nil else { return nil }
        let line = String(cString: buffer)
        return line.hasSuffix("\n") ? String(line.dropLast()) : line
    }
}

/// A URB that cannot become a transfer, and the status it ends with.
struct USBStatusError: Error { let status: USBStatus }

/// One URB as one libusb transfer. Bulk and interrupt transfers use the tap's buffer in place
/// (it stays the tap's until the URB completes, which is after libusb is done with it);
/// control transfers need the setup packet in front of the data, and isochronous packets lie
/// back to back in libusb's buffer where the URB has them at offsets: those two copy.
final class HostTransfer: @unchecked Sendable {
    let urb: URB
    let transfer: UnsafeMutablePointer<libusb_transfer>
    /// Malloc'ed for control and isochronous transfers.
    private let ownBuffer: UnsafeMutablePointer<UInt8>?
    /// Retained while libusb holds the transfer (its user_data), released at completion.
    private let device: USBHostDevice

    init(urb: URB, device: USBHostDevice) throws(USBStatusError) {
        self.urb = urb
        self.device = device
        guard let t = libusb_alloc_transfer(Int32(urb.type == .isochronous ? urb.isoPackets.count : 0)) else {
            throw USBStatusError(status: .ioError)
        }
        transfer = t
        let callback: libusb_transfer_cb_fn = { t in
            guard let t, let data = t.pointee.user_data else { return }
            let transfer = Unmanaged<HostTransfer>.fromOpaque(data).takeRetainedValue()
            transfer.device.finished(transfer)
        }
        do throws(USBStatusError) {
            ownBuffer = try Self.prepare(t, for: urb, handle: device.handleForTransfers, callback: callback)
        } catch {
            libusb_free_transfer(t)
            throw error
        }
        t.pointee.user_data = Unmanaged.passRetained(self).toOpaque()
    }

    /// Fills `t` (allocated with the URB's iso packet count) for `urb`; returns the buffer it
    /// allocated (control, isochronous) with the OUT data copied in.
    static func prepare(_ t: UnsafeMutablePointer<libusb_transfer>, for urb: URB, handle: OpaquePointer?,
                        callback: libusb_transfer_cb_fn?) throws(USBStatusError) -> UnsafeMutablePointer<UInt8>? {
        let endpoint = urb.endpoint | (urb.isIn ? 0x80 : 0)
        switch urb.type {
        case .control:
            guard urb.endpoint == 0, let setup = urb.setup, Int(setup.length) <= urb.buffer.count else { throw USBStatusError(status: .invalid) }
            let b = UnsafeMutablePointer<UInt8>.allocate(capacity: 8 + Int(setup.length))
            libusb_fill_control_setup(b, setup.requestType, setup.request, setup.value, setup.index, setup.length)
            if !setup.isIn && setup.length > 0 {
                UnsafeMutableRawPointer(b + 8).copyMemory(from: urb.buffer.baseAddress!, byteCount: Int(setup.length))
            }
            libusb_fill_control_transfer(t, handle, b, callback, nil, USBHostDevice.controlTimeoutMilliseconds)
            return b
        case .bulk, .interrupt:
            let b = urb.buffer.baseAddress?.assumingMemoryBound(to: UInt8.self)
            if urb.type == .bulk {
                libusb_fill_bulk_transfer(t, handle, endpoint, b, Int32(urb.buffer.count), callback, nil, 0)
            } else {
                libusb_fill_interrupt_transfer(t, handle, endpoint, b, Int32(urb.buffer.count), callback, nil, 0)
            }
            return nil
        case .isochronous:
            let total = urb.isoPackets.reduce(0) { $0 + Int($1.length) }
            let b = UnsafeMutablePointer<UInt8>.allocate(capacity: max(1, total))
            libusb_fill_iso_transfer(t, handle, endpoint, b, Int32(total), Int32(urb.isoPackets.count), callback, nil, 0)
            var at = 0
            for (i, p) in urb.isoPackets.enumerated() {
                softdev_libusb_iso_packet(t, Int32(i)).pointee.length = p.length
                if !urb.isIn && p.length > 0 {
                    UnsafeMutableRawPointer(b + at).copyMemory(from: urb.buffer.baseAddress! + Int(p.offset), byteCount: Int(p.length))
                }
                at += Int(p.length)
            }
            return b
        }
    }

    /// Fills in the URB's results from the finished transfer `t` (IN data copied back from
    /// `ownBuffer`) and returns its status; the URB is not completed.
    static func results(of t: UnsafeMutablePointer<libusb_transfer>, ownBuffer: UnsafeMutablePointer<UInt8>?, into urb: URB) -> USBStatus {
        var status = LibUSBStatus.urbStatus(t.pointee.status)
        switch urb.type {
        case .control:
            let n = min(Int(max(0, t.pointee.actual_length)), urb.buffer.count)
            if urb.isIn && n > 0 { urb.buffer.baseAddress!.copyMemory(from: ownBuffer! + 8, byteCount: n) }
            urb.actualLength = n
        case .bulk, .interrupt:
            urb.actualLength = Int(max(0, t.pointee.actual_length))
        case .isochronous:
            var at = 0, end = 0, sum = 0
            var errors: Int32 = 0
            for i in 0..<urb.isoPackets.count {
                let d = softdev_libusb_iso_packet(t, Int32(i)).pointee
                let n = min(Int(d.actual_length), Int(urb.isoPackets[i].length))
                let packetStatus = LibUSBStatus.urbStatus(d.status)
                if packetStatus != .ok { errors += 1 }
                if urb.isIn && n > 0 {
                    (urb.buffer.baseAddress! + Int(urb.isoPackets[i].offset)).copyMemory(from: ownBuffer! + at, byteCount: n)
                }
                urb.isoPackets[i].actualLength = UInt32(n)
                urb.isoPackets[i].status = packetStatus.rawValue
                at += Int(urb.isoPackets[i].length)
                sum += n
                if n > 0 { end = max(end, Int(urb.isoPackets[i].offset) + n) }
            }
            urb.errorCount = errors
            // IN: the tap copies bytes 0..<actualLength back, so it must reach the end of
            // the last packet's data (the packets sit at their offsets, not back to back).
            urb.actualLength = urb.isIn ? end : sum
            if status == .ok && errors > 0 && errors == Int32(urb.isoPackets.count) { status = .ioError }
        }
        return status
    }

    /// Fills in the URB's results and completes it; returns the status.
    func complete() -> USBStatus {
        let status = Self.results(of: transfer, ownBuffer: ownBuffer, into: urb)
        urb.complete(status)
        return status
    }

    func free() {
        ownBuffer?.deallocate()
        libusb_free_transfer(transfer)
    }

    /// Frees a transfer that was never submitted (its user_data still holds a reference).
    func discard() {
        if let data = transfer.pointee.user_data { Unmanaged<HostTransfer>.fromOpaque(data).release() }
        free()
    }
}

extension USBHostDevice {
    fileprivate var handleForTransfers: OpaquePointer { handle }

    public static let descriptor = DeviceDescriptor(
        deviceClass: .usb, name: "host", kind: .device,
        summary: "A real USB device of this host, passed through libusb (its kernel drivers detached while it is served).",
        parameters: [
            DeviceParameter("id", "VID:PID in hex, as lsusb prints it (e.g. 0781:5567); with bus and port, all must match."),
            DeviceParameter("bus", "The bus number (the B of sysfs's B-P), with port."),
            DeviceParameter("port", "The port path on that bus, e.g. 2, or 1.4 behind a hub (the P of B-P)."),
        ],
        open: { parameters, _ throws(DeviceSpecError) in
            try USBHostDevice(USBHostMatch.parse(id: parameters.string("id"), bus: parameters.string("bus"), port: parameters.string("port")))
        })
}
