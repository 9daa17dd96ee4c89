import Core

/// `offset(offset=..., range=...)`: a window `[offset, offset + range)` of the device below,
/// served as a whole device that starts at 0 (nbdkit's offset filter). The `partition` filter
/// is this window over one partition.
///
/// Every request is checked against the window before it is moved into it, even though
/// transports check requests against the geometry already: a slice is a boundary, and a
/// request that strays out of it would reach data that is not this device's.
///
/// ```swift
/// // The second GiB of a disk image, as a 1 GiB device.
/// let slice = try DeviceRegistry.open("offset(offset=1G, range=1G) | file(path=disk.img)")
/// ```
public final class OffsetFilter: BlockFilter, @unchecked Sendable {
    private let filterName: String
    /// Where the window starts on the device below, in bytes.
    public let start: UInt64
    private let window: BlockGeometry

    public override var name: String { filterName }
    public override var geometry: BlockGeometry { window }

    /// A window of `length` bytes at `start`; both must be multiples of the device's logical
    /// block size and the window must lie inside it.
    public init(next: any BlockDevice, start: UInt64, length: UInt64, name: String = "offset") throws(BlockError) {
        let below = next.geometry
        let block = UInt64(below.logicalBlockSize)
        guard start < below.size, length <= below.size - start else {
            throw BlockError(.outOfRange,
                             "\(name): the window \(start)+\(length) goes past the end of the \(below.size)-byte device below")
        }
        guard start % block == 0, length % block == 0, length > 0 else {
            throw BlockError(.invalid, "\(name): the window (\(start), \(length) bytes) must be made of whole \(block)-byte blocks")
        }
        self.start = start
        self.filterName = name
        window = BlockGeometry(size: length, logicalBlockSize: below.logicalBlockSize, physicalBlockSize: below.physicalBlockSize)
        super.init(next: next)
    }

    /// `offset` moved into the window, or an error if `[offset, offset + length)` leaves it.
    private func moved(_ offset: UInt64, _ length: UInt64) throws(BlockError) -> UInt64 {
        guard offset <= window.size, length <= window.size - offset else {
            throw BlockError(.outOfRange, "\(filterName): \(offset)+\(length) is past the end of the \(window.size)-byte window")
        }
        return start + offset
    }

    public override func submit(_ request: BlockRequest, completion: BlockCompletion) {
        var moved = request
        do {
            moved.offset = try self.moved(request.offset, request.length)
        } catch {
            return completion.complete(.failure(error))
        }
        next.submit(moved, completion: completion)
    }

    /// The extents below, clipped to the window and moved back to start at 0.
    public override func extents(at offset: UInt64, length: UInt64) throws(BlockError) -> [BlockExtent] {
        let clipped = min(length, window.size - min(offset, window.size))
        let end = start + offset + clipped
        return try next.extents(at: moved(offset, clipped), length: clipped).compactMap { extent in
            let from = max(extent.offset, start + offset), to = min(extent.offset + extent.length, end)
            guard from < to else { return nil }
            return BlockExtent(offset: from - start, length: to - from, isHole: extent.isHole, isZero: extent.isZero)
        }
    }
}

extension OffsetFilter {
    public static let descriptor = DeviceDescriptor(
        name: "offset", kind: .filter,
        summary: "Serves a window of the device below (offset= bytes in, range= bytes long) as a whole device.",
        parameters: [
            DeviceParameter("offset", "Where the window starts, e.g. 1M (default 0)."),
            DeviceParameter("range", "How long the window is, e.g. 1G (default: to the end of the device below)."),
        ],
        open: { parameters, next throws(DeviceSpecError) in
            let next = next!
            let block = UInt64(next.geometry.logicalBlockSize)
            let start = try parameters.offset("offset", multipleOf: block) ?? 0
            let length = try parameters.size("range", multipleOf: block) ?? next.geometry.size - min(start, next.geometry.size)
            return try DeviceSpecError.opening { () throws(BlockError) in try OffsetFilter(next: next, start: start, length: length) }
        })
}
