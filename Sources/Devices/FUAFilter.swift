import Core

/// `fua(fuamode=...)`: changes how forced unit access reaches the device below (nbdkit's fua
/// filter, with its parameter): `none` advertises no FUA and strips it from writes, so clients
/// flush instead; `force` sends every write with FUA, so each is durable when acknowledged and
/// a flush has nothing left to do; `pass` (the default) changes nothing.
///
/// ```swift
/// // Every write durable when acknowledged, whatever the guest asks.
/// let disk = try DeviceRegistry.open("fua(fuamode=force) | file(path=disk.img)")
/// ```
public final class FUAFilter: BlockFilter, @unchecked Sendable {
    public enum Mode: String, CaseIterable, Sendable { case none, force, pass }
    public let mode: Mode

    public init(next: any BlockDevice, mode: Mode) {
        self.mode = mode
        super.init(next: next)
    }

    public override var name: String { "fua" }
    public override var capabilities: BlockCapabilities {
        switch mode {
        case .none: return next.capabilities.subtracting(.fua)
        case .force, .pass: return next.capabilities
        }
    }

    public override func submit(_ request: BlockRequest, completion: BlockCompletion) {
        var request = request
        switch (mode, request.operation) {
        case (.none, .write): request.fua = false
        case (.force, .write): request.fua = true
        case (.force, .flush): return completion.complete(.success)   // every write was durable already
        default: break
        }
        next.submit(request, completion: completion)
    }
}

extension FUAFilter {
    public static let descriptor = DeviceDescriptor(
        name: "fua", kind: .filter,
        summary: "Changes how forced unit access reaches the device below: none, force, or pass.",
        parameters: [
            DeviceParameter("fuamode", "none (advertise no FUA, strip it), force (every write FUA, flush a no-op) or pass (default)."),
        ],
        open: { parameters, next throws(DeviceSpecError) in
            let mode = FUAFilter.Mode(rawValue: try parameters.choice("fuamode", FUAFilter.Mode.allCases.map(\.rawValue), default: "pass"))!
            if mode == .force && !next!.capabilities.contains(.fua) && next!.capabilities.contains(.flush) {
                throw DeviceSpecError("fua: fuamode=force needs a device below that makes a write durable by itself (FUA), and \(next!.name) does not")
            }
            return FUAFilter(next: next!, mode: mode)
        })
}
