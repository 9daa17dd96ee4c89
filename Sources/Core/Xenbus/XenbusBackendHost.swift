import Glibc
import Synchronization
import XenStore

/// A kind of backend the host serves: the directory it owns under
/// `/local/domain/<me>/backend/` and how to build the driver of one new device there.
public struct XenbusBackendType: Sendable {
    /// The backend directory, e.g. `softdev-vbd` (no kernel backend claims it).
    public let name: String
    /// Builds the driver of the device at `backendPath` (e.g. opens the device stack its
    /// `params` node names). Runs on a set-up thread of its own, so it may block (a remote
    /// server, a slow disk); throwing fails that device alone, reported in its `error` node.
    public let makeDriver: @Sendable (_ hypervisor: any Hypervisor, _ backendPath: String) throws -> any XenbusBackendDriver

    public init(name: String,
                makeDriver: @escaping @Sendable (_ hypervisor: any Hypervisor, _ backendPath: String) throws -> any XenbusBackendDriver) {
        self.name = name; self.makeDriver = makeDriver
    }
}

/// The xenbus side of a backend domain (QEMU's xen-bus): one per xenstore connection, with one
/// watch dispatcher, serving every registered backend type (`softdev-vbd` now, `softdev-vif`
/// and `softdev-vusb` beside it) for every guest. It starts a ``XenbusBackendDevice`` for each
/// device a toolstack creates in a registered directory, and unplugs a device when it is
/// detached or when its guest shuts down, crashes or is destroyed (`@releaseDomain`).
///
/// One guest's trouble never stops the others: a device that cannot start is reported in its
/// own `error` node and closed, and opening or tearing down a device happens on threads of its
/// own, so the watch thread never waits for a device.
public final class XenbusBackendHost: @unchecked Sendable {
    public let hypervisor: any Hypervisor
    public let dispatcher: WatchDispatcher
    /// How long a device's teardown may take before the host closes it anyway (and reports it).
    public let teardownTimeout: Double
    public let log: (String) -> Void
    private var types: [String: XenbusBackendType] = [:]   // set before start
    private var started = false
    // Only touched on the dispatcher thread:
    private var devices: [String: XenbusBackendDevice] = [:]
    /// Devices whose driver is being built on a set-up thread.
    private var opening = Set<String>()
    /// Guests we have served since they were born: told to the grant table when they die, even
    /// if their devices were unplugged before @releaseDomain.
    private var servedDomains = Set<DomainID>()
    private let deviceCount = Atomic<Int>(0)

    public init(hypervisor: any Hypervisor, teardownTimeout: Double = 5, log: @escaping (String) -> Void = { _ in }) {
        self.hypervisor = hypervisor; self.teardownTimeout = teardownTimeout; self.log = log
        dispatcher = WatchDispatcher(store: hypervisor.store)
    }

    /// Serves `type` too; call before `start`.
    public func register(_ type: XenbusBackendType) {
        precondition(!started, "register backend types before starting the host")
        precondition(types[type.name] == nil, "backend type \(type.name) registered twice")
        types[type.name] = type
    }

    /// The registered backend types, by name.
    public var backendTypes: [String] { types.keys.sorted() }

    /// `/local/domain/<me>/backend/<type>`.
    public func root(_ type: String) -> String { "/local/domain/\(hypervisor.domainID)/backend/\(type)" }

    public func start() throws {
        started = true
        try dispatcher.start()
        for name in types.keys.sorted() {
            let root = root(name)
            try dispatcher.watch(root, token: "host:" + root) { [weak self] _ in self?.scan(name) }
        }
        try dispatcher.watch("@releaseDomain", token: "host:release") { [weak self] _ in self?.reapDeadGuests() }
    }

    /// Unplugs every device (each teardown bounded by `teardownTimeout`) and stops watching.
    public func stop() {
        guard dispatcher.isRunning else { return }
        let done = ConditionLock()
        var finished = false
        dispatcher.async { [self] in
            for d in devices.values { d.unplug() }
            // Devices leave `devices` as they are unplugged, at once or at their timeout.
            func check() {
                if devices.isEmpty {
                    done.withLock { finished = true; done.broadcast() }
                } else {
                    dispatcher.after(0.005, check)
                }
            }
            check()
        }
        let deadline = monotonicSeconds() + teardownTimeout + 2
        done.withLock {
            while !finished && monotonicSeconds() < deadline { done.wait(timeout: deadline - monotonicSeconds()) }
        }
        for name in types.keys { dispatcher.unwatch(root(name), token: "host:" + root(name)) }
        dispatcher.unwatch("@releaseDomain", token: "host:release")
        dispatcher.stop()
    }

    /// Devices being served now, of every type.
    public var count: Int { deviceCount.load(ordering: .relaxed) }

    /// Runs `body` with the devices being served (by backend path) on the dispatcher thread,
    /// and returns its result; at once when called on that thread or when the host is stopped.
    public func inspect<T>(_ body: @escaping ([String: XenbusBackendDevice]) -> T) -> T {
        if dispatcher.isCurrent || !dispatcher.isRunning { return body(devices) }
        let done = ConditionLock()
        var result: T?
        dispatcher.async { [self] in
            let r = body(devices)
            done.withLock { result = r; done.broadcast() }
        }
        return done.withLock {
            while result == nil { done.wait() }
            return result!
        }
    }

    private func scan(_ type: String) {
        let store = hypervisor.store
        let root = root(type)
        let guests = (try? store.directory(root, transaction: .none)) ?? []
        var present = Set<String>()
        for g in guests {
            for d in (try? store.directory(root + "/" + g, transaction: .none)) ?? [] {
                let path = root + "/" + g + "/" + d
                present.insert(path)
                guard devices[path] == nil, !opening.contains(path),
                      (try? store.readString(path + "/state")).flatMap({ $0 }) != nil else { continue }
                open(path, type: types[type]!)
            }
        }
        for (path, d) in devices where path.hasPrefix(root + "/") && !present.contains(path) {
            log("\(path): nodes removed, unplugging")
            d.unplug()
        }
    }

    /// Builds the driver on a set-up thread, then starts the device on the dispatcher thread.
    private func open(_ path: String, type: XenbusBackendType) {
        opening.insert(path)
        let hypervisor = hypervisor
        do {
            try PosixThread.detached("setting up \(path)") { [self] in
                let driver = Result { try type.makeDriver(hypervisor, path) }
                dispatcher.async { [self] in
                    opening.remove(path)
                    add(path, driver)
                }
            }
        } catch {
            opening.remove(path)
            add(path, .failure(error))
        }
    }

    private func add(_ path: String, _ made: Result<any XenbusBackendDriver, any Error>) {
        let store = hypervisor.store
        // The nodes may have gone while the driver was being built.
        guard (try? store.readString(path + "/state")).flatMap({ $0 }) != nil else {
            if case .success(let driver) = made { releaseUnstarted(driver, path) }
            return
        }
        do {
            let driver = try made.get()
            let device: XenbusBackendDevice
            do {
                device = try XenbusBackendDevice(hypervisor: hypervisor, backendPath: path, driver: driver, dispatcher: dispatcher,
                                                 teardownTimeout: teardownTimeout, log: log) { [weak self] d in self?.removed(d) }
            } catch {
                releaseUnstarted(driver, path)
                throw error
            }
            devices[path] = device
            servedDomains.insert(device.frontendDomain)
            deviceCount.store(devices.count, ordering: .relaxed)
            do { try device.start() } catch {
                devices.removeValue(forKey: path)
                deviceCount.store(devices.count, ordering: .relaxed)
                device.unplug()
                throw error
            }
            log("\(path): serving domain \(device.frontendDomain)")
        } catch {
            log("\(path): cannot start: \(error)")
            // One transaction, and only while the nodes are there: a toolstack that reads the
            // error (softdev attach) and takes the device away must not see the state node
            // written again after it.
            _ = try? store.transaction { (tx) throws(XenStoreError) in
                guard (try? store.read(path + "/state", transaction: tx)) != nil else { return }
                try store.write(path + "/error", "\(error)", transaction: tx)
                try store.write(path + "/state", "\(XenbusDeviceState.closed.rawValue)", transaction: tx)
            }
        }
    }

    /// A driver built for a device that never started: its stack is closed all the same.
    private func releaseUnstarted(_ driver: any XenbusBackendDriver, _ path: String) {
        guard let device = try? XenbusBackendDevice(hypervisor: hypervisor, backendPath: path, driver: driver,
                                                    dispatcher: dispatcher, onUnplug: { _ in }) else {
            return
        }
        device.unplug()
    }

    private func removed(_ d: XenbusBackendDevice) {
        guard devices[d.backendPath] === d else { return }
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
        // theirs is mapped any more, except by a device still stuck in its teardown.
        for domain in dead {
            servedDomains.remove(domain)
            hypervisor.grants.domainDestroyed(domain)
        }
    }
}
