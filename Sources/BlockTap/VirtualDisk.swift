import Core

/// A guest disk name and its xenbus device id, as libxl computes them (xvda = 51712):
/// `xvd<letters>` is 202 << 8 | disk << 4 for the first 16 disks and 1 << 28 | disk << 8 beyond;
/// a plain number is taken as the id itself.
public struct VirtualDisk: Equatable, Sendable, CustomStringConvertible {
    public let name: String
    public let deviceID: UInt32

    public init(_ text: String) throws {
        if let n = UInt32(text) { name = text; deviceID = n; return }
        guard text.hasPrefix("xvd"), text.count > 3 else {
            throw VirtualDiskError("'\(text)' is not a virtual disk name (use xvda, xvdb, ... or a device number)")
        }
        var disk = 0
        for c in text.dropFirst(3) {
            guard let a = c.asciiValue, a >= 97, a <= 122 else {
                throw VirtualDiskError("'\(text)' is not a virtual disk name (use xvda, xvdb, ... ; partitions are not devices)")
            }
            disk = disk * 26 + Int(a - 96)
            guard disk <= (1 << 20) else { throw VirtualDiskError("'\(text)': disk number too large") }
        }
        disk -= 1
        guard disk < (1 << 20) else { throw VirtualDiskError("'\(text)': disk number too large") }
        name = text
        deviceID = disk < 16 ? UInt32(202 << 8 | disk << 4) : UInt32(1 << 28 | disk << 8)
    }

    public var description: String { "\(name) (\(deviceID))" }
    public var xenbusName: XenbusDeviceName { XenbusDeviceName(name: name, deviceID: deviceID) }
}

public struct VirtualDiskError: Error, CustomStringConvertible {
    public let description: String
    init(_ d: String) { description = d }
}
