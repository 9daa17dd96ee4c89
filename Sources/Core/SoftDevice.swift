/// What every soft device is, whatever its class: a name in its stack and a way to release
/// what it holds. ``BlockDevice`` refines it; the network and USB device APIs will too, so that
/// one registry and one spec language open stacks of every class.
public protocol SoftDevice: AnyObject, Sendable {
    /// The device's name in a stack, e.g. "file" or "stats".
    var name: String { get }
    /// Releases resources; nothing is submitted to the device after this.
    func close()
}

/// The classes of soft devices, by the name users write (`softdev attach DOMAIN block ...`).
/// A class's tap adds its name here; the daemon's table (`DeviceClass`) says how it is served.
public struct SoftDeviceClass: Hashable, Sendable, CustomStringConvertible {
    public let name: String
    public init(_ name: String) { self.name = name }
    public var description: String { name }
    /// Disks: ``BlockDevice``, served over blkif and NBD.
    public static let block = SoftDeviceClass("block")
}
