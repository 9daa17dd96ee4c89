import Core
import NBDWire

/// One named export of an `NBDServer`: a device stack under a name clients ask for.
///
/// ```swift
/// let disk = NBDExport(name: "disk", device: stats, description: "the guest's root disk")
/// let iso = NBDExport(name: "iso", device: file, readOnly: true)
/// ```
public struct NBDExport: Sendable {
    /// The name clients ask for (`nbd+unix:///NAME?socket=...`). The first export is also
    /// the default one, served to clients that ask for the empty name.
    public var name: String
    public var device: any BlockDevice
    /// Refuse writes, trims and zeroes with EPERM even if the device could do them.
    public var readOnly: Bool
    /// Shown by `nbdinfo --list` (NBD_INFO_DESCRIPTION).
    public var description: String
    /// Advertise the device's logical block size as the NBD minimum block size and refuse
    /// unaligned requests from clients that agreed to it. Off by default: the export then
    /// advertises a minimum of 1 and does read-modify-write for sub-block I/O, as clients such
    /// as qemu-io and nbdcopy may send it.
    public var enforceDeviceBlockSize: Bool

    public init(name: String, device: any BlockDevice, readOnly: Bool = false, description: String = "",
                enforceDeviceBlockSize: Bool = false) {
        self.name = name; self.device = device; self.readOnly = readOnly
        self.description = description; self.enforceDeviceBlockSize = enforceDeviceBlockSize
    }

    /// Whether writes reach the device: the export allows them and the device can.
    var writable: Bool { !readOnly && device.capabilities.contains(.write) }

    /// The transmission flags: only what the device can do is advertised.
    var transmissionFlags: UInt16 {
        let caps = device.capabilities
        var f = NBD.tflagHasFlags | NBD.tflagSendDF
        if !writable { f |= NBD.tflagReadOnly }
        if writable && caps.contains(.flush) { f |= NBD.tflagSendFlush }
        if writable && caps.contains(.fua) { f |= NBD.tflagSendFUA }
        if writable && caps.contains(.discard) { f |= NBD.tflagSendTrim }
        // Zeroes are always possible on a writable export (emulated by writing zero buffers).
        if writable { f |= NBD.tflagSendWriteZeroes }
        if caps.contains(.multiConn) { f |= NBD.tflagCanMultiConn }
        return f
    }

    /// NBD_INFO_BLOCK_SIZE: minimum, preferred, maximum.
    func blockSizes(enforced: Bool) -> (UInt32, UInt32, UInt32) {
        let g = device.geometry
        let minimum = enforced ? max(1, g.logicalBlockSize) : 1
        let preferred = max(minimum, max(g.physicalBlockSize, 4096))
        return (minimum, preferred, NBD.maxPayload)
    }
}
