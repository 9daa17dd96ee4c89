import Glibc
import Synchronization
import XenStore

/// Serves every device of one backend type for every guest: watches
/// `/local/domain/<me>/backend/<type>`, starts a ``XenbusBackendDevice`` for each device the
/// toolstack creates there, and tears a device down when it is detached or when its guest
/// shuts down, crashes or is destroyed (`@releaseDomain`). One guest's failure never stops the
/// others: a device that cannot start is reported in its own `error` node and closed.
public final class XenbusBackendService: @unchecked Sendable {
    public let hypervisor: any Hypervisor
    public let backendType: String
    public let dispatcher: WatchDispatcher
    private let makeDriver: (XenbusBackendService, String) throws -> any XenbusBackendDriver
    private var devices: [String: XenbusBackendDevice] = [:]   // only touched on the dispatcher thread
    /// Guests we have served since they were born (dispatcher thread): told to the grant
    /// table when they die, even if their devices were unplugged before @releaseDomain.
    private var servedDomains = Set<DomainID>()
    private let deviceCount = Atomic<Int>(0)
    public let log: (String) -> Void

    /// `makeDriver(service, backendPath)` builds the driver for a new device (e.g. opens the
    /// device stack its `params` node names).
    public init(hypervisor: any Hypervisor, backendType: String, log: @escaping (String) -> Void = { _ in },
                makeDriver: @escaping (XenbusBackendService, String) throws -> any XenbusBackendDriver) {
        self.hypervisor = hypervisor; self.backendType = backendType; self.makeDriver = makeDriver; self.log = log
        dispatcher = WatchDispatcher(store: hypervisor.store)
    }

    public var root: String { "/local/domain/\(hypervisor.domainID)/backend/\(backendType)" }

    public func start() throws {
        dispatcher.start()
        try dispatcher.watch(root, token: "service:" + root) { [weak self] _ in self?.scan() }
        try dispatcher.watch("@releaseDomain", token: "service:release:" + root) { [weak self] _ in self?.reapDeadGuests() }
    }

    /// Unplugs every device and stops watching.
    public func stop() {
        let done = Atomic<Bool>(false)
        dispatcher.async { [self] in
            for d in devices.values { d.unplug() }
            devices.removeAll()
            done.store(true, ordering: .sequentiallyConsistent)
        }
        for _ in 0..<2000 where !done.load(ordering: .sequentiallyConsistent) { usleep(5000) }
        dispatcher.unwatch(root, token: "service:" + root)
        dispatcher.unwatch("@releaseDomain", token: "service:release:" + root)
        dispatcher.stop()
    }

    /// Devices being served now.
    public var count: Int { deviceCount.load(ordering: .relaxed) }

    /// The driver of the device at `backendPath`, if served (call from the dispatcher thread,
    /// or use `inspect`).
    public func inspect<T>(_ body: @escaping ([String: XenbusBackendDevice]) -> T) -> T {
        let result = Mutex<T?>(nil)
        dispatcher.async { [self] in result.withLock { $0 = body(devices) } }
        while true {
            if let r = result.withLock({ $0 }) { return r }
            usleep(1000)
        }
    }

    private func scan() {
        let store = hypervisor.store
        let guests = (try? store.directory(root, transaction: .none)) ?? []
        var present = Set<String>()
        for g in guests {
            for d in (try? store.directory(root + "/" + g, transaction: .none)) ?? [] {
                let path = root + "/" + g + "/" + d
                present.insert(path)
                guard devices[path] == nil, (try? store.readString(path + "/state")).flatMap({ $0 }) != nil else { continue }
                add(path)
            }
        }
        for (path, d) in devices where !present.contains(path) {
            log("\(path): nodes removed, unplugging")
            d.unplug()
        }
    }

    private func add(_ path: String) {
        do {
            let driver = try makeDriver(self, path)
            let device = try XenbusBackendDevice(hypervisor: hypervisor, backendPath: path, driver: driver, dispatcher: dispatcher,
                                                 log: log) { [weak self] d in self?.removed(d) }
            devices[path] = device
            servedDomains.insert(device.frontendDomain)
            deviceCount.store(devices.count, ordering: .relaxed)
            try device.start()
            log("\(path): serving domain \(device.frontendDomain)")
        } catch {
            log("\(path): cannot start: \(error)")
            try? hypervisor.store.write(path + "/error", "\(error)")
            try? hypervisor.store.write(path + "/state", "\(XenbusDeviceState.closed.rawValue)")
            if let d = devices.removeValue(forKey: path) { d.unplug() }
            deviceCount.store(devices.count, ordering: .relaxed)
        }
    }

    private func removed(_ d: XenbusBackendDevice) {
        devices.removeValue(forKey: d.backendPath)
        deviceCount.store(devices.count, ordering: .relaxed)
        // Our backend directory is our own: no other toolstack cleans it, so we do once the
        // device is closed and unplugged.
        try? hypervisor.store.remove(d.backendPath, transaction: .none)
        let parent = String(d.backendPath[..<d.backendPath.lastIndex(of: "/")!])
        if ((try? hypervisor.store.directory(parent, transaction: .none)) ?? []).isEmpty {
            try? hypervisor.store.remove(parent, transaction: .none)
        }
        log("\(d.backendPath): unplugged")
    }

    /// A guest went away: its home in xenstore is gone; unplug what served it.
    private func reapDeadGuests() {
        // Every device's guest is among those served: each home is read once.
        let dead = servedDomains.filter { (try? hypervisor.store.readString("/local/domain/\($0)")).flatMap({ $0 }) == nil }
        for (_, d) in devices where dead.contains(d.frontendDomain) {
            log("\(d.backendPath): domain \(d.frontendDomain) is gone")
            try? hypervisor.store.remove(d.frontendPath, transaction: .none)
            d.unplug()
        }
        // Their devices are unplugged (now, or earlier when their nodes vanished): nothing of
        // theirs is mapped any more.
        for domain in dead {
            servedDomains.remove(domain)
            hypervisor.grants.domainDestroyed(domain)
        }
    }
}
