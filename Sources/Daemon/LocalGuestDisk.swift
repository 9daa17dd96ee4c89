import BlockTap
import Core
import XenStore

/// A local guest's disk through the Swift blkfront (`softdev guest`).
final class LocalGuestDisk: LocalGuestDevice {
    let front: LocalBlockFrontend
    let name: String
    var backendPath: String { front.backendPath }

    init(guest: LocalHypervisor, frontendPath: String, options: LocalGuestOptions) throws {
        var o = LocalBlockFrontend.Options()
        o.ringPageOrder = options.ringPageOrder
        o.queues = options.queues
        front = try LocalBlockFrontend(hypervisor: guest, frontendPath: frontendPath, options: o)
        let id = String(frontendPath.split(separator: "/").last ?? "")
        name = ((try? guest.store.readString(front.backendPath + "/dev")) ?? nil) ?? id
    }

    var summary: String {
        let order = ((try? front.hypervisor.store.readString(front.frontendPath + "/ring-page-order")) ?? nil) ?? "0"
        return "\(front.sectors) sectors of \(front.sectorSize) bytes\(front.readOnly ? ", read-only" : ""), "
            + "ring order \(order), \(front.queues.count) queue\(front.queues.count == 1 ? "" : "s")"
    }

    /// Writes a pattern at the start, middle and end of the disk and reads it back.
    func check() throws -> String? {
        guard !front.readOnly else { return nil }
        let bytes = 64 * xenPageSize
        let span = UInt64(bytes / 512)
        guard front.sectors >= span else { throw ServeConfigError("\(name): too small to check (\(front.sectors) sectors)") }
        for (n, sector) in [0, front.sectors / 2 / 8 * 8, (front.sectors - span) / 8 * 8].enumerated() {
            let pattern = (0..<bytes).map { UInt8(truncatingIfNeeded: $0 &* 131 &+ n &* 17 &+ Int(sector)) }
            try front.write(sector: sector, pattern)
            guard try front.read(sector: sector, count: bytes) == pattern else {
                throw ServeConfigError("\(name): read-back mismatch at sector \(sector)")
            }
        }
        return "256 KiB written and read back at 3 places"
    }

    func close(timeoutSeconds: Double) throws { try front.close(timeoutSeconds: timeoutSeconds) }
}
