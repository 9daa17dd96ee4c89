import Glibc

/// The end-of-batch hint (Linux's `blk_plug`): a transport that takes several requests at once
/// (a ring sweep, a burst of NBD requests read in one `recv`) plugs its thread around them. A
/// device with a queue of its own (libaio) then holds what it is handed on that thread and
/// starts it all in one call (one `io_submit`) when the plug is flushed, instead of one system
/// call per request. Without a plug, a device starts every request at once.
///
/// A plugged thread must flush before it waits for anything a held request could be part of:
/// `end()` flushes, `flush()` flushes and stays plugged (the NBD reader flushes before it
/// blocks on its socket or on a full queue), and ``BlockCompletionWaiter/wait()`` flushes
/// first, so a filter that waits for its own read below (`submitAndWait`) never waits for a
/// request that sits in the plug.
///
/// ```swift
/// BlockPlug.begin()
/// for request in sweep { device.submit(request, completion: ...) }
/// BlockPlug.end()          // one io_submit for the whole sweep
/// ```
public final class BlockPlug {
    // The counters are the thread's own and only ever read or bumped in place, so they go
    // without the runtime's exclusivity checks (two calls and a TLS lookup each, on every ring
    // sweep). The arrays keep theirs: a device that waited inside `startHeld` (and so flushed
    // again) would trip them rather than corrupt the set being started.
    @exclusivity(unchecked) private var depth = 0
    /// Items held since the last flush: a sweep that held nothing (any device but libaio's)
    /// flushes without touching the arrays.
    @exclusivity(unchecked) private var held = 0
    /// What devices hold while the thread is plugged: `items[k]` belongs to `targets[owners[k]]`.
    /// The arrays keep their capacity, and a flush swaps them with the `flushing` set, so a
    /// sweep allocates nothing and a device may hold more while its held items start.
    private var targets: [any BlockPlugTarget] = []
    private var items: [UnsafeMutableRawPointer] = []
    private var owners: [Int] = []
    private var flushingTargets: [any BlockPlugTarget] = []
    private var flushingItems: [UnsafeMutableRawPointer] = []
    private var flushingOwners: [Int] = []
    private var scratch: [UnsafeMutableRawPointer] = []

    private init() {}

    /// The calling thread's plug, made on first use and kept with the thread.
    private static func own() -> BlockPlug {
        if let p = pthread_getspecific(key) { return Unmanaged<BlockPlug>.fromOpaque(p).takeUnretainedValue() }
        let plug = BlockPlug()
        pthread_setspecific(key, Unmanaged.passRetained(plug).toOpaque())
        return plug
    }

    nonisolated(unsafe) private static let key: pthread_key_t = {
        var key = pthread_key_t()
        let made = pthread_key_create(&key) { p in
            if let p { Unmanaged<BlockPlug>.fromOpaque(p).release() }
        }
        precondition(made == 0, "BlockPlug: pthread_key_create failed (\(made))")
        return key
    }()

    /// The calling thread's plug while it is plugged, for devices deciding whether to hold a
    /// request; nil when the thread is not plugged.
    @inline(__always) public static var current: BlockPlug? {
        guard let p = pthread_getspecific(key) else { return nil }
        let plug = Unmanaged<BlockPlug>.fromOpaque(p).takeUnretainedValue()
        return plug.depth > 0 ? plug : nil
    }

    /// Plugs the calling thread (nested plugs flush at the outermost `end`).
    public static func begin() { own().depth += 1 }

    /// Ends the calling thread's plug; the outermost end flushes.
    public static func end() {
        let plug = own()
        precondition(plug.depth > 0, "BlockPlug.end without begin")
        plug.depth -= 1
        if plug.depth == 0 { plug.release() }
    }

    /// Starts everything held on the calling thread now and stays plugged: call it before the
    /// thread blocks. `callerMayWait`: the thread is about to wait for its peer (an NBD reader
    /// for its client's next request) and has nothing else to do until then, so a target may
    /// run what it holds that blocks here (``flushCallerMayWait``) instead of on a worker,
    /// as ``BlockRequest/callerMayWait`` lets a device run one request.
    public static func flush(callerMayWait: Bool = false) {
        guard let p = pthread_getspecific(key) else { return }
        let plug = Unmanaged<BlockPlug>.fromOpaque(p).takeUnretainedValue()
        let outer = plug.flushCallerMayWait
        plug.flushCallerMayWait = callerMayWait
        defer { plug.flushCallerMayWait = outer }
        plug.release()
    }

    /// For a target's `startHeld`: whether the thread flushing may wait (``flush(callerMayWait:)``).
    public static var flushCallerMayWait: Bool {
        guard let p = pthread_getspecific(key) else { return false }
        return Unmanaged<BlockPlug>.fromOpaque(p).takeUnretainedValue().flushCallerMayWait
    }
    @exclusivity(unchecked) private var flushCallerMayWait = false

    /// Runs `body` plugged.
    public static func batch<T>(_ body: () throws -> T) rethrows -> T {
        begin()
        defer { end() }
        return try body()
    }

    /// For devices: holds `item` (whatever the device needs to start it later, e.g. its iocb)
    /// until the flush, when `target.startHeld` receives every item it was given on this thread.
    public func hold(_ item: UnsafeMutableRawPointer, for target: any BlockPlugTarget) {
        var owner = targets.count
        for t in targets.indices where targets[t] === target { owner = t; break }
        if owner == targets.count { targets.append(target) }
        items.append(item)
        owners.append(owner)
        held += 1
    }

    /// Hands each target what it holds, in the order it was held. A target's start may submit
    /// more on this thread (a completion that resubmits): while plugged, that is held for the
    /// next round of this loop; once the plug has ended, it starts at once.
    private func release() {
        guard held > 0 else { return }
        held = 0
        while !items.isEmpty {
            swap(&items, &flushingItems)
            swap(&owners, &flushingOwners)
            swap(&targets, &flushingTargets)
            if flushingTargets.count == 1 {
                flushingItems.withUnsafeBufferPointer { flushingTargets[0].startHeld($0) }
            } else {
                for (t, target) in flushingTargets.enumerated() {
                    scratch.removeAll(keepingCapacity: true)
                    for k in flushingItems.indices where flushingOwners[k] == t { scratch.append(flushingItems[k]) }
                    scratch.withUnsafeBufferPointer { target.startHeld($0) }
                }
            }
            flushingItems.removeAll(keepingCapacity: true)
            flushingOwners.removeAll(keepingCapacity: true)
            flushingTargets.removeAll(keepingCapacity: true)
        }
    }
}

/// A device that holds requests while its caller's thread is plugged (``BlockPlug``).
public protocol BlockPlugTarget: AnyObject {
    /// Starts the items `hold` was given, in order, on the calling thread.
    func startHeld(_ items: UnsafeBufferPointer<UnsafeMutableRawPointer>)
}
