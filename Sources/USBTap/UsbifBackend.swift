import CXen
import Core
import Glibc
import Synchronization
import XenStore

/// Options of the usbif backend.
public struct UsbifBackendOptions: Sendable {
    /// How long an idle ring thread watches its rings before it sleeps, in microseconds.
    public var pollMicroseconds = AdaptivePoller.defaultMicroseconds
    public init() {}
}

/// The usbif backend (QEMU's qusb; Linux has none): a virtual host controller for one guest,
/// whose ports are the backend's `port/N` nodes, each naming the USB device stack plugged into
/// it (empty: no device). `num-ports` and `usb-ver` are in the backend's directory before the
/// frontend (Linux's xen-hcd) appears. Ports are watched: a device plugged or unplugged while
/// the guest runs becomes a connection event on the conn ring.
///
/// A port's stack is opened when its node names it, whether or not the frontend is there yet
/// (a guest created paused), so that the toolstack hears at once whether it is served: `open`
/// (which may judge it by a policy), then ``USBDevice/claim()``, then the port serves it and says
/// so in `port-device/N` ("46f4:0001 high speed"); a stack refused at any step is closed and the
/// reason goes to `port-error/N` (what `softdev attach` waits for). A device opened before the
/// frontend connects is plugged when it does; one connection's devices go with it (the queue
/// closes them) and are opened again for the next.
public final class UsbifBackend: XenbusBackendDriver, @unchecked Sendable {
    public let options: UsbifBackendOptions
    private let open: @Sendable (_ spec: String) throws -> any USBDevice
    private let log: @Sendable (String) -> Void
    private var queue: UsbifQueue?
    /// The spec each port was last seen with (dispatcher thread).
    private var portSpecs: [Int: String] = [:]
    /// One opened stack: handed to the queue (which closes it), or waiting for the frontend.
    private struct Opened {
        var device: any USBDevice
        var inQueue: Bool
    }
    /// The stack opened for each port, for the daemon's control requests (typing into a soft
    /// keyboard); any thread.
    private let plugged = Mutex<[Int: Opened]>([:])
    /// Ports whose stacks a connection took with it (its queue closed them): opened again at
    /// the next connect. A refused port is not retried until its node changes.
    private let closedWithQueue = Mutex<Set<Int>>([])

    /// The device on `port`, if one is plugged.
    public func device(onPort port: Int) -> (any USBDevice)? { plugged.withLock { $0[port]?.device } }
    public private(set) var portCount = 0
    public private(set) var usbVersion = 2

    public init(options: UsbifBackendOptions = UsbifBackendOptions(), log: @escaping @Sendable (String) -> Void = { _ in },
                open: @escaping @Sendable (_ spec: String) throws -> any USBDevice) {
        self.options = options; self.log = log; self.open = open
    }

    /// URBs answered, bytes moved and errors since the controller connected.
    public var counters: (urbs: UInt64, bytes: UInt64, errors: UInt64) {
        guard let queue else { return (0, 0, 0) }
        let c = UsbifStatistics().adding(queue)
        return (c.urbs, c.bytes, c.errors)
    }
    /// The earlier connections' counters; the connected queue's are added at disconnect.
    private let totals = Mutex(UsbifStatistics())

    public func advertise(_ dev: XenbusBackendDevice) throws {
        // num-ports and usb-ver were written with the device (xen-hcd reads them at probe).
        guard let ports = try dev.store.readInt(dev.backendPath + "/num-ports"), ports >= 1, ports <= UInt64(Usbif.maxPorts) else {
            throw UsbifConnectError("\(dev.backendPath)/num-ports must be 1 to \(Usbif.maxPorts)")
        }
        let version = try dev.store.readInt(dev.backendPath + "/usb-ver") ?? 2
        guard version == 1 || version == 2 else { throw UsbifConnectError("\(dev.backendPath)/usb-ver must be 1 or 2 (xen-hcd has no USB 3)") }
        portCount = Int(ports)
        usbVersion = Int(version)
        try dev.watchBackend("port") { [weak self, weak dev] in
            guard let self, let dev else { return }
            self.portsChanged(dev)
        }
    }

    public func connect(_ dev: XenbusBackendDevice) throws {
        let store = dev.store
        let fe = dev.frontendPath
        func number(_ key: String) throws -> UInt64 {
            guard let v = try store.readInt(fe + "/" + key) else { throw UsbifConnectError("\(fe)/\(key) is missing") }
            guard v <= UInt64(UInt32.max) else { throw UsbifConnectError("\(fe)/\(key) = \(v) is out of range") }
            return v
        }
        let urbRef = GrantRef(try number("urb-ring-ref")), connRef = GrantRef(try number("conn-ring-ref"))
        let port = EventPort(try number("event-channel"))
        let hv = dev.hypervisor
        let urbMapping = try hv.grants.mapContiguous(domain: dev.frontendDomain, refs: [urbRef], writable: true)
        let connMapping: GrantMapping
        do { connMapping = try hv.grants.mapContiguous(domain: dev.frontendDomain, refs: [connRef], writable: true) }
        catch { hv.grants.unmap(urbMapping, refs: [urbRef]); throw error }
        let channel: any EventChannel
        do { channel = try hv.events.bindInterdomain(remote: dev.frontendDomain, remotePort: port) }
        catch { hv.grants.unmap(urbMapping, refs: [urbRef]); hv.grants.unmap(connMapping, refs: [connRef]); throw error }
        let queue = try UsbifQueue(urb: urbMapping, urbRef: urbRef, conn: connMapping, connRef: connRef, channel: channel,
                                   grants: hv.grants, domain: dev.frontendDomain, portCount: portCount,
                                   poller: AdaptivePoller(microseconds: options.pollMicroseconds), log: log) { [weak dev] why in
            dev?.failAsync(why)
        }
        do { try queue.start() } catch {
            queue.stop()
            throw UsbifConnectError("\(error)")
        }
        self.queue = queue
        dev.reportStatistics(every: 2) { [weak self] in
            guard let self else { return "" }
            return totals.withLock { $0 }.adding(queue).description
        }
        // Every occupied port is plugged now, each announced on the conn ring (as QEMU does):
        // the stacks opened while no frontend was there, then those the last connection took
        // with it, opened again.
        let waiting: [(Int, any USBDevice)] = plugged.withLock { ports in
            var out: [(Int, any USBDevice)] = []
            for (port, opened) in ports where !opened.inQueue {
                ports[port]!.inQueue = true
                out.append((port, opened.device))
            }
            return out.sorted { $0.0 < $1.0 }
        }
        for (port, device) in waiting { queue.post(.plug(port: port, device: device)) }
        for port in closedWithQueue.withLock({ ports in defer { ports = [] }; return ports }) { portSpecs[port] = nil }
        portsChanged(dev)
        log("\(dev.backendPath): connected to domain \(dev.frontendDomain): \(portCount) ports, USB \(usbVersion).0")
    }

    /// Compares the `port/N` nodes with what is opened, and opens (plugging it if the frontend
    /// is connected) or unplugs (dispatcher thread).
    private func portsChanged(_ dev: XenbusBackendDevice) {
        let queue = self.queue
        for port in 1...max(1, portCount) {
            let spec = ((try? dev.store.readString(dev.backendPath + "/port/\(port)")) ?? nil) ?? ""
            guard spec != (portSpecs[port] ?? "") else { continue }
            // A stack that was refused (port-error) was never opened: nothing to unplug.
            if let old = plugged.withLock({ $0.removeValue(forKey: port) }) {
                // The queue closes what it has; one that is gone closed it already.
                if old.inQueue { queue?.post(.unplug(port: port)) } else { old.device.close() }
                log("\(dev.backendPath): port \(port): unplugged \(portSpecs[port] ?? "")")
            }
            // The last outcome goes with the spec it was about.
            for node in ["port-error", "port-device"] {
                do throws(XenStoreError) { try dev.store.remove(dev.backendPath + "/\(node)/\(port)", transaction: .none) } catch {}
            }
            portSpecs[port] = spec
            guard !spec.isEmpty else { continue }
            do {
                let device = try open(spec)
                do {
                    if usbVersion == 1 && device.speed == .high {
                        throw UsbifConnectError("a high-speed device on a USB 1.1 controller (usb-ver=1): attach it with --usb-version 2")
                    }
                    // Admitted (open judged it): only now may a host device leave its drivers.
                    try device.claim()
                } catch {
                    device.close()
                    throw error
                }
                let id = "\(hex4(device.descriptors.vendorID)):\(hex4(device.descriptors.productID))"
                plugged.withLock { $0[port] = Opened(device: device, inQueue: queue != nil) }
                queue?.post(.plug(port: port, device: device))
                try? dev.writeBackend(["port-device/\(port)": "\(id) \(device.speed) speed"])
                log("\(dev.backendPath): port \(port): \(queue == nil ? "opened" : "plugged") \(spec) (\(device.speed) speed, \(id))")
            } catch {
                log("\(dev.backendPath): port \(port): cannot plug \(spec): \(error)")
                try? dev.writeBackend(["port-error/\(port)": "\(error)"])
            }
        }
    }

    public func disconnect(_ dev: XenbusBackendDevice) {
        guard let queue else { return }
        self.queue = nil
        // The queue closes the devices it has; those opened since (none connected) stay.
        let taken = plugged.withLock { ports in
            defer { ports = ports.filter { !$0.value.inQueue } }
            return ports.filter { $0.value.inQueue }.keys
        }
        closedWithQueue.withLock { $0.formUnion(taken) }
        _ = queue.stop(timeout: .infinity)
        // Those devices are closed now: their ports serve nothing until a frontend connects
        // again and they are opened anew (then `port-device/N` is written again).
        for port in taken {
            do throws(XenStoreError) { try dev.store.remove(dev.backendPath + "/port-device/\(port)", transaction: .none) } catch {}
        }
        let c = UsbifStatistics().adding(queue)
        dev.endStatistics { totals.withLock { t in t = t.adding(queue); return t }.description }
        log("\(dev.backendPath): disconnected (\(c.urbs) URBs, \(c.errors) failed)")
    }

    /// The controller is gone: the stacks no frontend ever took are closed here.
    public func unplugged(_ dev: XenbusBackendDevice) {
        let left = plugged.withLock { ports in
            defer { ports = [:] }
            return ports.values.filter { !$0.inQueue }.map(\.device)
        }
        for device in left { device.close() }
    }
}

/// "046d", as lsusb prints an id.
func hex4(_ v: UInt16) -> String {
    let s = String(v, radix: 16)
    return String(repeating: "0", count: max(0, 4 - s.count)) + s
}

/// A virtual USB controller's URBs answered, bytes moved, URBs failed, and its ring's events:
/// what its `statistics` node holds ("urbs=40 bytes=655360 errors=0 events=9 spurious-events=0"),
/// over every connection so far.
public struct UsbifStatistics: Sendable, Equatable, CustomStringConvertible {
    public var urbs: UInt64 = 0, bytes: UInt64 = 0, errors: UInt64 = 0
    public var events = RingEventStatistics()
    public init() {}
    public var description: String { "urbs=\(urbs) bytes=\(bytes) errors=\(errors) \(events)" }
    func adding(_ queue: UsbifQueue) -> Self {
        var s = self
        let c = queue.counters
        s.urbs += c.urbs.load(ordering: .relaxed); s.bytes += c.bytes.load(ordering: .relaxed)
        s.errors += c.errors.load(ordering: .relaxed)
        s.events = s.events + queue.loop.eventStatistics
        return s
    }
}

public struct UsbifConnectError: Error, CustomStringConvertible {
    public let description: String
    public init(_ d: String) { description = d }
}
