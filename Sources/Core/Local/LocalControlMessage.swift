import CXen
import Glibc

/// The emulated hypervisor's "hypercalls": fixed-size messages on a SOCK_SEQPACKET Unix socket,
/// with file descriptors (domain memory, event channel sockets, xenstore connections) passed as
/// SCM_RIGHTS.
/// One connection is one domain: the first message says which (dom0 backend or a new guest),
/// and closing it destroys the guest, as a crash would.
struct LocalControlMessage {
    enum Operation: UInt32 {
        case helloBackend = 1      // -> domid 0
        case createDomain = 2      // name, a = data frames -> a = domid, fds [memory]
        case openMemory = 3        // a = domid -> a = total frames, fds [memory]
        case allocUnbound = 4      // a = remote domid -> a = port, fds [our end of the channel]
        case bindInterdomain = 5   // a = remote domid, b = remote port -> a = port, fds [our end]
        case closePort = 6         // a = port
        case connectStore = 7      // -> fds [xenstore connection]
    }
    var operation: UInt32 = 0
    /// 0 on success, else an errno value.
    var status: Int32 = 0
    var a: UInt32 = 0
    var b: UInt32 = 0
    var name: String = ""

    static let size = 16 + 64

    init(_ op: Operation, a: UInt32 = 0, b: UInt32 = 0, name: String = "") {
        operation = op.rawValue; self.a = a; self.b = b; self.name = name
    }
    init() {}

    func encode() -> [UInt8] {
        var bytes = [UInt8](repeating: 0, count: Self.size)
        bytes.withUnsafeMutableBytes { p in
            p.storeBytes(of: operation, toByteOffset: 0, as: UInt32.self)
            p.storeBytes(of: status, toByteOffset: 4, as: Int32.self)
            p.storeBytes(of: a, toByteOffset: 8, as: UInt32.self)
            p.storeBytes(of: b, toByteOffset: 12, as: UInt32.self)
            let n = Array(name.utf8.prefix(63))
            for (i, c) in n.enumerated() { p[16 + i] = c }
        }
        return bytes
    }

    /// Decodes a message; nil if it is not exactly one message's size.
    static func decode(_ bytes: UnsafeRawBufferPointer) -> LocalControlMessage? {
        guard bytes.count == size else { return nil }
        var m = LocalControlMessage()
        m.operation = bytes.loadUnaligned(fromByteOffset: 0, as: UInt32.self)
        m.status = bytes.loadUnaligned(fromByteOffset: 4, as: Int32.self)
        m.a = bytes.loadUnaligned(fromByteOffset: 8, as: UInt32.self)
        m.b = bytes.loadUnaligned(fromByteOffset: 12, as: UInt32.self)
        let nameBytes = bytes[16..<size].prefix { $0 != 0 }
        m.name = String(decoding: nameBytes, as: UTF8.self)
        return m
    }

    /// Sends the message with `fds`.
    func send(on socket: Int32, fds: [Int32] = []) -> Bool {
        let bytes = encode()
        let r = bytes.withUnsafeBytes { b in fds.withUnsafeBufferPointer { f in
            cxen_send_fds(socket, b.baseAddress, b.count, f.baseAddress, Int32(f.count))
        } }
        return r == Self.size
    }

    /// Receives one message and up to `maxFDs` descriptors; nil on EOF, error or a bad size.
    static func receive(on socket: Int32, maxFDs: Int = 4) -> (LocalControlMessage, [Int32])? {
        var buffer = [UInt8](repeating: 0, count: size + 1)
        var fds = [Int32](repeating: -1, count: max(maxFDs, 1))
        var nfds = Int32(maxFDs)
        let r = buffer.withUnsafeMutableBytes { b in
            fds.withUnsafeMutableBufferPointer { f in cxen_recv_fds(socket, b.baseAddress, b.count, f.baseAddress, &nfds) }
        }
        let got = Array(fds.prefix(Int(nfds)))
        guard r == size, let m = buffer.withUnsafeBytes({ decode(UnsafeRawBufferPointer(rebasing: $0[0..<size])) }) else {
            got.forEach { Glibc.close($0) }
            return nil
        }
        return (m, got)
    }
}
