import Core

/// `null(size=...)`: a device that holds nothing. Reads return zeroes, writes and every other
/// operation succeed at once and are forgotten. It measures the cost of the layers above it,
/// so its operations allocate nothing and take no lock.
public final class NullDevice: SynchronousBlockDevice {
    public let name = "null"
    public let geometry: BlockGeometry
    public let capabilities: BlockCapabilities = .all

    public init(size: UInt64) {
        geometry = BlockGeometry(size: size)
    }

    public func submit(_ request: BlockRequest, completion: BlockCompletion) { completion.complete(serve(request)) }
    public func immediateResult(of request: BlockRequest) -> BlockResult? { serve(request) }
    @inline(__always) private func serve(_ request: BlockRequest) -> BlockResult {
        if request.operation == .read { request.buffers.zero() }
        return .success
    }
    public func read(into buffers: IOBuffers, at offset: UInt64) throws(BlockError) { buffers.zero() }
    public func write(from buffers: IOBuffers, at offset: UInt64, fua: Bool) throws(BlockError) {}
    public func discard(at offset: UInt64, length: UInt64) throws(BlockError) {}
    public func writeZeroes(at offset: UInt64, length: UInt64, mayDiscard: Bool) throws(BlockError) {}
    public func extents(at offset: UInt64, length: UInt64) throws(BlockError) -> [BlockExtent] {
        [BlockExtent(offset: offset, length: length, isHole: true, isZero: true)]
    }
}

extension NullDevice {
    public static let descriptor = DeviceDescriptor(
        name: "null", kind: .device,
        summary: "Reads return zeroes, writes are discarded: for benchmarks of the layers above.",
        parameters: [
            DeviceParameter("size", required: true, "Size of the device, e.g. 64M or 1T (a multiple of 512)."),
        ],
        open: { parameters, _ throws(DeviceSpecError) in
            NullDevice(size: try parameters.requiredSize("size"))
        })
}
