import Core

/// A device of a guest of the local hypervisor, connected through its class's Swift frontend
/// (`softdev guest`): what the guest command prints, checks and lets go of, whatever the class.
public protocol LocalGuestDevice: AnyObject {
    /// The guest's name for it (the backend's `dev` node), e.g. xvdb.
    var name: String { get }
    var backendPath: String { get }
    /// What was connected, in a few words ("32768 sectors of 512 bytes, ring order 4, 1 queue").
    var summary: String { get }
    /// The class's own round trip (a disk: a pattern written and read back at three places);
    /// nil when the device cannot be checked (a read-only disk). Throws with what differed.
    func check() throws -> String?
    /// Lets go as the class's Linux frontend does.
    func close(timeoutSeconds: Double) throws
}

/// What `softdev guest` asks of its frontends.
public struct LocalGuestOptions: Sendable {
    public var ringPageOrder = 4
    public var queues = 1
    public init() {}
}
