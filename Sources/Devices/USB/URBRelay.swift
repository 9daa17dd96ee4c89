import Core
import Synchronization

/// How a USB filter sees a URB complete: the URB goes down as a child over the same buffer, with
/// the relay as its sink; when the device below completes the child, `then` runs (to read the
/// result, log it, rewrite IN data in the buffer) and finishes the guest's URB with the child's
/// results. An unlink of the guest's URB cancels its child.
final class URBRelay: URBCompletionSink, @unchecked Sendable {
    typealias Completion = @Sendable (_ child: URB, _ parent: URB) -> Void
    private struct Entry {
        let parent: URB
        let then: Completion
    }
    private let inFlight = Mutex<[ObjectIdentifier: Entry]>([:])
    private let children = Mutex<[ObjectIdentifier: URB]>([:])
    private let nextTag = Atomic<Int>(1)

    /// Sends `urb` to `device` as a child; `then` sees the child completed, then the parent
    /// gets the child's status (unless `then` completed it already).
    func forward(_ urb: URB, to device: any USBDevice, then: @escaping Completion) {
        relay(urb, then: then) { device.submit($0) }
    }

    /// The same for a standard request on its way to the tap (``USBDevice/submitStandard(_:tap:)``).
    func forwardStandard(_ urb: URB, to device: any USBDevice, tap: (URB) -> Bool, then: @escaping Completion) {
        relay(urb, then: then) { device.submitStandard($0, tap: tap) }
    }

    private func relay(_ urb: URB, then: @escaping Completion, submit: (URB) -> Void) {
        let child = URB(endpoint: urb.endpoint, isIn: urb.isIn, type: urb.type, setup: urb.setup, buffer: urb.buffer,
                        isoPackets: urb.isoPackets, shortNotOK: urb.shortNotOK, interval: urb.interval,
                        tag: nextTag.wrappingAdd(1, ordering: .relaxed).oldValue, sink: self)
        inFlight.withLock { $0[ObjectIdentifier(child)] = Entry(parent: urb, then: then) }
        children.withLock { $0[ObjectIdentifier(urb)] = child }
        submit(child)
    }

    /// The guest unlinked `urb`: its child is cancelled below.
    func cancel(_ urb: URB, on device: any USBDevice) {
        if let child = children.withLock({ $0[ObjectIdentifier(urb)] }) { device.cancel(child) }
    }

    func completed(_ child: URB) {
        guard let entry = inFlight.withLock({ $0.removeValue(forKey: ObjectIdentifier(child)) }) else { return }
        children.withLock { _ = $0.removeValue(forKey: ObjectIdentifier(entry.parent)) }
        entry.then(child, entry.parent)
        Self.finish(entry.parent, like: child)
    }

    /// Completes `parent` with `child`'s results.
    static func finish(_ parent: URB, like child: URB) {
        parent.actualLength = child.actualLength
        parent.isoPackets = child.isoPackets
        parent.startFrame = child.startFrame
        parent.errorCount = child.errorCount
        parent.complete(child.status)
    }
}

/// A URB's fields as the `log` and `usbmon` filters record them.
extension URB {
    /// The endpoint address: the number, with 0x80 for IN.
    var endpointAddress: UInt8 { endpoint | (isIn ? 0x80 : 0) }
}
