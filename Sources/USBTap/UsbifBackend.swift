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
public final class UsbifBackend: XenbusBackendDriver, @unchecked Sendable {
    public let options: UsbifBackendOptions
    private let open: @Sendable (_ spec: String) throws -> any USBDevice
    private let log: @Sendable (String) -> Void
    private var queue: UsbifQueue?
    /// The spec each port was last seen with (dispatcher thread).
    private var portSpecs: [Int: String] = [:]
    /// The device plugged into each port, for the daemon's control requests (typing into a
    /// soft keyboard); any thread.
    private let plugged = Mutex<[Int: any USBDevice]>([:])

    /// The device on `port`, if one is plugged.
    public func device(onPort port: Int) -> (any USBDevice)? { plugged.withLock { $0[port] } }
    public private(set) var portCount = 0
    public private(set) var usbVersion = 2

    public init(options: UsbifBackendOptions = UsbifBackendOptions(), log: @escaping @Sendable (String) -> Void = { _ in },
                open: @escaping @Sendable (_ spec: String) throws -> any USBDevice) {
        self.options = options; self.log = log; self.open = open
    }

    /// URBs answered, bytes moved and errors since the controller connected.
    public var counters: (urbs: UInt64, bytes: UInt64, errors: UInt64) {
        guard let c = queue?.counters else { return (0, 0, 0) }
        return (c.urbs.load(ordering: .relaxed), c.bytes.load(ordering: .relaxed), c.errors.load(ordering: .relaxed))
    }

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
        // Every occupied port is plugged now, each announced on the conn ring (as QEMU does).
        portSpecs = [:]
        portsChanged(dev)
        log("\(dev.backendPath): connected to domain \(dev.frontendDomain): \(portCount) ports, USB \(usbVersion).0")
    }

    /// Compares the `port/N` nodes with what is plugged and plugs or unplugs (dispatcher thread).
    private func portsChanged(_ dev: XenbusBackendDevice) {
        guard let queue else { return }
        for port in 1...max(1, portCount) {
            let spec = ((try? dev.store.readString(dev.backendPath + "/port/\(port)")) ?? nil) ?? ""
            guard spec != (portSpecs[port] ?? "") else { continue }
            // A stack that was refused (port-error) was never plugged: nothing to unplug.
            if portSpecs[port].map({ !$0.isEmpty }) ?? false, plugged.withLock({ $0.removeValue(forKey: port) }) != nil {
                queue.post(.unplug(port: port))
                log("\(dev.backendPath): port \(port): unplugged \(portSpecs[port]!)")
            }
            // The last refusal's reason goes with the spec it was about.
            do throws(XenStoreError) { try dev.store.remove(dev.backendPath + "/port-error/\(port)", transaction: .none) } catch {}
            portSpecs[port] = spec
            guard !spec.isEmpty else { continue }
            do {
                let device = try open(spec)
                if usbVersion == 1 && device.speed == .high {
                    device.close()
                    throw UsbifConnectError("a high-speed device on a USB 1.1 controller (usb-ver=1)")
                }
                plugged.withLock { $0[port] = device }
                queue.post(.plug(port: port, device: device))
                log("\(dev.backendPath): port \(port): plugged \(spec) (\(device.speed) speed, \(hex4(device.descriptors.vendorID)):\(hex4(device.descriptors.productID)))")
            } catch {
                log("\(dev.backendPath): port \(port): cannot plug \(spec): \(error)")
                try? dev.store.write(dev.backendPath + "/port-error/\(port)", "\(error)")
            }
        }
    }

    public func disconnect(_ dev: XenbusBackendDevice) {
        guard let queue else { return }
        self.queue = nil
        plugged.withLock { $0 = [:] }
        _ = queue.stop(timeout: .infinity)
        let c = queue.counters
        log("\(dev.backendPath): disconnected (\(c.urbs.load(ordering: .relaxed)) URBs, \(c.errors.load(ordering: .relaxed)) failed)")
    }
}

/// "046d", as lsusb prints an id.
func hex4(_ v: UInt16) -> String {
    let s = String(v, radix: 16)
    return String(repeating: "0", count: max(0, 4 - s.count)) + s
}

public struct UsbifConnectError: Error, CustomStringConvertible {
    public let description: String
    public init(_ d: String) { description = d }
}
