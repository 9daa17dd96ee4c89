import Glibc
import Synchronization
import XenStore

/// What a backend (blkif, netif, usbif) does at the points of the xenbus handshake; the state
/// machine itself lives in ``XenbusBackendDevice`` so every backend behaves the same.
public protocol XenbusBackendDriver: AnyObject {
    /// Writes the features the backend offers, before it switches to InitWait.
    func advertise(_ device: XenbusBackendDevice) throws
    /// The frontend is Initialised (or Connected): read its nodes, map its rings, bind its
    /// event channels, start serving, and write what the frontend reads once connected.
    /// Throwing fails the device: the error goes to xenstore and the device closes.
    func connect(_ device: XenbusBackendDevice) throws
    /// Stops serving and unmaps everything; waits for requests in flight. Idempotent. Runs on
    /// a teardown thread of its own (a device may take long to finish what is in flight), never
    /// at the same time as `connect`.
    func disconnect(_ device: XenbusBackendDevice)
    /// A daemon before this one served the device and was killed while the frontend was
    /// connected (both `state` nodes say so when the device is found): pick its rings up where
    /// it left them, with no state change the frontend would see (Linux's blkfront reconnects
    /// only on resume from suspend). Throwing closes the device; a ring found broken must not
    /// be written to.
    func resume(_ device: XenbusBackendDevice) throws
    /// The device is gone for good (detached, its guest dead, the daemon stopping): release
    /// what `connect` cannot reuse, such as the device stack. Called once, after `disconnect`
    /// has returned, on the teardown thread or the dispatcher's.
    func unplugged(_ device: XenbusBackendDevice)
}

extension XenbusBackendDriver {
    public func unplugged(_ device: XenbusBackendDevice) {}
    /// A backend that cannot resume exactly does not pretend to: the device closes.
    public func resume(_ device: XenbusBackendDevice) throws {
        throw XenStoreError.invalid("this backend cannot pick up a connected frontend after a restart")
    }
}

/// One backend device's xenbus state machine (Linux's xenbus backend and blkback's
/// frontend_changed, QEMU's xen-bus): InitWait, connect when the frontend is ready, Closing and
/// Closed when it goes, back to InitWait when it re-initialises, and unplug when the toolstack
/// sets `online` to 0 or the nodes vanish. The state machine runs on the dispatcher's thread.
///
/// Disconnecting waits for the device's requests in flight, which a slow or stuck device may
/// hold for ever, so it runs on a teardown thread of its own: the watch thread goes on serving
/// every other device. The state machine moves on (Closed, unplugged) when the teardown ends or
/// after `teardownTimeout`, whichever comes first; a device still stuck then is reported, keeps
/// what it holds until it completes, and is not connected again before its teardown ends.
public final class XenbusBackendDevice: @unchecked Sendable {
    public let hypervisor: any Hypervisor
    public var store: any XenStoreClient { hypervisor.store }
    /// e.g. /local/domain/0/backend/softdev-vbd/3/51712
    public let backendPath: String
    public let frontendPath: String
    public let frontendDomain: DomainID
    public private(set) var state: XenbusDeviceState = .unknown
    public let driver: any XenbusBackendDriver
    private let dispatcher: WatchDispatcher
    private let onUnplug: (XenbusBackendDevice) -> Void
    private let teardownTimeout: Double
    private var token: String { "xenbus:" + backendPath }
    private var unplugged = false
    /// The driver is connected (its rings are served): a teardown is needed before anything else.
    private var driverConnected = false
    /// A teardown thread runs `driver.disconnect`.
    private var tearingDown = false
    /// What waits for the teardown (or its timeout), in order.
    private var afterTeardown: [() -> Void] = []
    /// `driver.unplugged` is due once the teardown really ends.
    private var releaseDue = false
    /// The frontend asked to connect during a teardown: look at it again when the teardown ends.
    private var connectDeferred = false
    private let log: (String) -> Void

    /// Reads the backend node's `frontend` and `frontend-id` (written by the toolstack).
    public init(hypervisor: any Hypervisor, backendPath: String, driver: any XenbusBackendDriver,
                dispatcher: WatchDispatcher, teardownTimeout: Double = 5, log: @escaping (String) -> Void = { _ in },
                onUnplug: @escaping (XenbusBackendDevice) -> Void) throws {
        self.hypervisor = hypervisor; self.backendPath = backendPath; self.driver = driver
        self.dispatcher = dispatcher; self.onUnplug = onUnplug; self.log = log; self.teardownTimeout = teardownTimeout
        guard let fe = try hypervisor.store.readString(backendPath + "/frontend"), fe.hasPrefix("/") else {
            throw XenStoreError.invalid("\(backendPath)/frontend is missing")
        }
        guard let id = try hypervisor.store.readInt(backendPath + "/frontend-id"), id < 0x7ff0 else {
            throw XenStoreError.invalid("\(backendPath)/frontend-id is missing or invalid")
        }
        frontendPath = fe; frontendDomain = DomainID(id)
    }

    /// True while `driver.resume` runs.
    public private(set) var isResuming = false

    /// Advertises, switches to InitWait and starts following the frontend; or, for a device a
    /// killed daemon left Connected, resumes it as it is.
    public func start() throws {
        let fe = frontendState()
        if XenbusDeviceState.read(store, backendPath + "/state") == .connected && (fe == .connected || fe == .initialised) {
            state = .connected
            driverConnected = true
            isResuming = true
            defer { isResuming = false }
            do {
                try driver.resume(self)
                log("\(backendPath): resumed after a restart")
            } catch {
                fail("cannot resume after a restart: \(error)")
            }
        } else {
            try driver.advertise(self)
            try switchState(.initWait)
        }
        try dispatcher.watch(frontendPath + "/state", token: token + ":fe") { [weak self] _ in self?.frontendChanged() }
        try dispatcher.watch(backendPath + "/online", token: token + ":online") { [weak self] _ in self?.onlineChanged() }
    }

    /// The frontend's state, or Unknown if its node is gone or garbage.
    public func frontendState() -> XenbusDeviceState {
        XenbusDeviceState.read(store, frontendPath + "/state")
    }

    private var online: Bool {
        (try? store.readInt(backendPath + "/online")).flatMap { $0 } != 0
    }

    /// True while a teardown runs (or outlived its timeout): `softdev list` shows it.
    public var isTearingDown: Bool { tearingDown }

    public func switchState(_ new: XenbusDeviceState) throws {
        guard new != state || new == .initWait else { return }
        // Only while the device's nodes are there (see `writeBackend`).
        try writeBackend(["state": "\(new.rawValue)"])
        log("\(backendPath): \(state) -> \(new)")
        state = new
    }

    func frontendChanged() {
        guard !unplugged else { return }
        let fe = frontendState()
        switch fe {
        case .initialising:
            if state == .closed {
                log("\(backendPath): frontend re-initialising, prepare for reconnect")
                try? switchState(.initWait)
            }
        case .initialised, .connected:
            // Connect from InitWait only (the first time, or after a re-init): two watch events
            // may collapse into one, and a device that failed stays Closing until the frontend
            // starts over, rather than fail again over its own error node.
            guard state == .initWait else { return }
            // A teardown still running: the frontend is looked at again when it ends.
            guard !tearingDown else { connectDeferred = true; return }
            // The frontend must point back at us: a toolstack that re-created the frontend
            // directory for another backend (libxl removes it unconditionally on attach) would
            // otherwise have two backends serving one ring.
            let backendOfFrontend = (try? store.readString(frontendPath + "/backend")).flatMap { $0 }
            guard backendOfFrontend == backendPath else {
                fail("\(frontendPath)/backend is \(backendOfFrontend ?? "missing"), not this backend")
                return
            }
            do {
                driverConnected = true
                try driver.connect(self)
                try switchState(.connected)
            } catch {
                fail("connecting to the frontend: \(error)")
            }
        case .closing:
            try? switchState(.closing)
        case .closed:
            disconnect { [self] in
                try? switchState(.closed)
                if !online { unplug() }
            }
        case .unknown:
            disconnect { [self] in
                try? switchState(.closed)
                unplug()
            }
        default:
            fail("saw state \(fe.rawValue) at frontend")
        }
    }

    func onlineChanged() {
        guard !unplugged else { return }
        if (try? store.readString(backendPath)) == nil {
            // The toolstack removed the backend nodes: unplug at once.
            unplug()
            return
        }
        guard !online else { return }
        // Detach: ask the frontend to close; it answers by going to Closed.
        let fe = frontendState()
        if fe == .closed || fe == .unknown || fe == .initialising || fe == .initWait {
            disconnect { [self] in
                try? switchState(.closed)
                unplug()
            }
        } else {
            try? switchState(.closing)
        }
    }

    /// Reports a fatal error (as xenbus_dev_fatal) and closes.
    public func fail(_ message: String) {
        log("\(backendPath): error: \(message)")
        try? writeBackend(["error": message])
        disconnect { [self] in try? switchState(.closing) }
    }

    /// Writes nodes under the backend's directory (relative path, value) in one transaction,
    /// only while its `state` node is there: a toolstack that took the device away (a detach,
    /// `softdev attach` removing a device the daemon refused) must not see the directory
    /// written again after it.
    public func writeBackend(_ nodes: KeyValuePairs<String, String>) throws {
        try store.writeWhilePresent(backendPath + "/state", nodes.map { (backendPath + "/" + $0.key, $0.value) })
    }

    /// Runs `task` on the dispatcher's thread `seconds` from now (a driver's periodic report);
    /// never after the host stopped.
    public func after(_ seconds: Double, _ task: @escaping () -> Void) {
        dispatcher.after(seconds, task)
    }

    /// Writes what `statistics` gives to the backend's `statistics` node now and every
    /// `seconds` on the dispatcher's thread, until `endStatistics` (a driver reports its
    /// counters so while a frontend is connected; `softdev list` shows them for every class).
    public func reportStatistics(every seconds: Double, _ statistics: @escaping () -> String) {
        let generation = statisticsGeneration.withLock { g in g += 1; return g }
        reportStatistics(generation, every: seconds, statistics)
    }

    private func reportStatistics(_ generation: Int, every seconds: Double, _ statistics: @escaping () -> String) {
        // Under the lock, so that a report never lands after (or counts twice beside) the last.
        let current = statisticsGeneration.withLock { g -> Bool in
            guard g == generation else { return false }
            try? writeBackend(["statistics": statistics()])
            return true
        }
        guard current else { return }
        after(seconds) { [weak self] in self?.reportStatistics(generation, every: seconds, statistics) }
    }

    /// Stops the periodic report (from any thread) and writes what `final` gives, the counters
    /// as the connection left them (`final` may fold them into the driver's totals: no report
    /// runs meanwhile).
    public func endStatistics(_ final: () -> String) {
        statisticsGeneration.withLock { g in
            g += 1
            try? writeBackend(["statistics": final()])
        }
    }
    private let statisticsGeneration = Mutex<Int>(0)

    /// Watches `relativePath` under the backend's directory for the driver (a USB controller's
    /// `port/N` nodes): `handler` runs on the dispatcher's thread, once at once and on every
    /// change, until the device is unplugged.
    public func watchBackend(_ relativePath: String, _ handler: @escaping () -> Void) throws {
        let path = backendPath + "/" + relativePath
        driverWatches.append(path)
        try dispatcher.watch(path, token: token + ":driver:" + relativePath) { _ in handler() }
    }
    private var driverWatches: [String] = []

    /// `fail`, from any thread: runs on the dispatcher thread that owns the state machine.
    public func failAsync(_ message: String) {
        dispatcher.async { [weak self] in self?.fail(message) }
    }

    /// Stops everything for this device (guest gone, detach done, daemon stopping).
    public func unplug() {
        guard !unplugged else { return }
        unplugged = true
        dispatcher.unwatch(frontendPath + "/state", token: token + ":fe")
        dispatcher.unwatch(backendPath + "/online", token: token + ":online")
        for path in driverWatches { dispatcher.unwatch(path, token: token + ":driver:" + String(path.dropFirst(backendPath.count + 1))) }
        driverWatches = []
        releaseDue = true
        disconnect { [self] in
            // The stack is released only once the teardown really ended (now, or later for a
            // stuck device); the nodes go now.
            if !tearingDown { releaseDriver() }
            onUnplug(self)
        }
    }

    private func releaseDriver() {
        guard releaseDue else { return }
        releaseDue = false
        driver.unplugged(self)
    }

    /// Disconnects the driver on a teardown thread, then runs `next` on the dispatcher thread:
    /// at once if nothing is connected, when the teardown ends, or after `teardownTimeout`.
    private func disconnect(then next: @escaping () -> Void) {
        guard driverConnected || tearingDown else { next(); return }
        afterTeardown.append(next)
        guard !tearingDown else { return }
        driverConnected = false
        tearingDown = true
        let started = monotonicSeconds()
        do {
            try PosixThread.detached("tearing down \(backendPath)") { [self] in
                driver.disconnect(self)
                dispatcher.async { [self] in teardownEnded(after: monotonicSeconds() - started) }
            }
        } catch {
            // No thread: tear down here, late rather than never.
            log("\(backendPath): \(error); tearing down on the watch thread")
            driver.disconnect(self)
            teardownEnded(after: monotonicSeconds() - started)
            return
        }
        dispatcher.after(teardownTimeout) { [weak self] in
            guard let self, tearingDown, !afterTeardown.isEmpty else { return }
            log("\(backendPath): device still busy after \(teardownTimeout) s (requests in flight): closing anyway; "
                + "its resources are released when it completes")
            runAfterTeardown()
        }
    }

    private func teardownEnded(after seconds: Double) {
        tearingDown = false
        if seconds > teardownTimeout { log("\(backendPath): teardown ended after \(Int(seconds)) s") }
        runAfterTeardown()
        if unplugged {
            releaseDriver()
        } else if connectDeferred {
            connectDeferred = false
            frontendChanged()
        }
    }

    private func runAfterTeardown() {
        let waiting = afterTeardown
        afterTeardown = []
        for next in waiting { next() }
    }
}
