import Core

/// `readonly`: the device below, read-only. Writes, discards and write-zeroes fail with
/// `BlockError(.readOnly)` before they reach it, and the filter advertises none of the write
/// capabilities, so that transports tell their clients (blkif's `mode=r`, NBD's READ_ONLY flag).
/// A flush succeeds at once: nothing written through this filter can need one.
///
/// ```swift
/// let iso = try DeviceRegistry.open("readonly | file(path=install.iso)")
/// ```
public final class ReadOnlyFilter: BlockFilter, @unchecked Sendable {
    public override var name: String { "readonly" }
    public override var capabilities: BlockCapabilities {
        next.capabilities.subtracting([.write, .flush, .fua, .discard, .writeZeroes])
    }

    private func refuse(_ operation: BlockOperation) -> BlockError {
        BlockError(.readOnly, "readonly: \(operation) refused, the device is read-only")
    }

    public override func submit(_ request: BlockRequest, completion: BlockCompletion) {
        switch request.operation {
        case .read: next.submit(request, completion: completion)
        case .flush: completion.complete(.success)
        case .write, .discard, .writeZeroes: completion.complete(.failure(refuse(request.operation)))
        }
    }
}

extension ReadOnlyFilter {
    public static let descriptor = DeviceDescriptor(
        name: "readonly", kind: .filter,
        summary: "Makes the device below read-only: writes, discards and zeroes fail with EROFS.",
        parameters: [],
        open: { _, next throws(DeviceSpecError) in ReadOnlyFilter(next: next!) })
}
