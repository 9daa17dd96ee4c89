/// xenbus device states (io/xenbus.h), written by each end to its `state` node.
public enum XenbusDeviceState: UInt32, Sendable, CustomStringConvertible {
    case unknown = 0, initialising = 1, initWait = 2, initialised = 3, connected = 4
    case closing = 5, closed = 6, reconfiguring = 7, reconfigured = 8

    public var description: String {
        ["Unknown", "Initialising", "InitWait", "Initialised", "Connected", "Closing", "Closed",
         "Reconfiguring", "Reconfigured"][Int(rawValue)]
    }
}
