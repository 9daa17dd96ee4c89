import Core
import Foundation

/// A small Bulk-Only mass-storage device for the filters' tests: interface 0 is 08:06:50 with
/// bulk IN 1 and bulk OUT 2 over 64 blocks of 512 bytes in memory (TEST UNIT READY, INQUIRY,
/// READ CAPACITY(10), READ(10), WRITE(10), MODE SENSE(6/10), REQUEST SENSE); interface 1 is a
/// HID keyboard (03:01:01, interrupt IN 3) whose reports are all zero. It records each SCSI
/// opcode it gets and each URB on a hidden endpoint.
final class BulkOnlyTestDevice: USBDevice, @unchecked Sendable {
    let name = "bot-test"
    let speed = USBSpeed.high
    let descriptors: USBDescriptors
    private let lock = NSLock()
    private(set) var memory = [UInt8](repeating: 0, count: 64 * 512)
    private(set) var opcodes: [UInt8] = []
    private(set) var keyboardURBs = 0
    private(set) var classRequests: [USBSetup] = []
    /// IN transfers queued for the host (data, then the CSW).
    private var pendingIn: [[UInt8]] = []
    /// A WRITE(10) in progress: where and how many bytes still to come.
    private var writing: (offset: Int, left: Int, tag: UInt32)?

    init() {
        let device: [UInt8] = [18, 1, 0x00, 0x02, 0, 0, 0, 64, 0x34, 0x12, 0x01, 0x50, 0x00, 0x01, 1, 2, 3, 1]
        var config: [UInt8] = [9, 2, 0, 0, 2, 1, 0, 0x80, 50]
        config += [9, 4, 0, 0, 2, 0x08, 0x06, 0x50, 0]
        config += [7, 5, 0x81, 2, 0x00, 0x02, 0]
        config += [7, 5, 0x02, 2, 0x00, 0x02, 0]
        config += [9, 4, 1, 0, 1, 0x03, 0x01, 0x01, 0]
        config += [9, 0x21, 0x11, 0x01, 0, 1, 0x22, 63, 0]   // HID descriptor
        config += [7, 5, 0x83, 3, 8, 0, 10]
        config[2] = UInt8(config.count)
        descriptors = USBDescriptors(device: device, configurations: [config], strings: [1: "SoftDev", 2: "Test Stick", 3: "42"],
                                     interfaceDescriptors: [1: [0x2200: [UInt8](repeating: 0, count: 63)]])
        for i in 0..<memory.count { memory[i] = UInt8(truncatingIfNeeded: i / 512 &+ i) }
    }

    var seenOpcodes: [UInt8] { lock.lock(); defer { lock.unlock() }; return opcodes }

    func submit(_ urb: URB) {
        lock.lock()
        switch (urb.type, urb.endpoint, urb.isIn) {
        case (.bulk, 2, false):
            let bytes = Array(urb.buffer)
            if var w = writing {
                let n = min(bytes.count, w.left)
                memory.replaceSubrange(w.offset..<(w.offset + n), with: bytes[0..<n])
                w.offset += n; w.left -= n
                writing = w.left > 0 ? w : nil
                if w.left == 0 { pendingIn.append(Self.csw(w.tag, 0, 0)) }
                lock.unlock(); urb.actualLength = bytes.count; return urb.complete(.ok)
            }
            guard bytes.count == 31, bytes[0..<4] == [0x55, 0x53, 0x42, 0x43] else { lock.unlock(); return urb.complete(.stall) }
            command(bytes)
            lock.unlock(); urb.actualLength = 31; return urb.complete(.ok)
        case (.bulk, 1, true):
            guard !pendingIn.isEmpty else { lock.unlock(); return urb.complete(.stall) }
            let data = pendingIn.removeFirst()
            lock.unlock(); return urb.complete(in: data)
        case (.interrupt, 3, true):
            keyboardURBs += 1
            lock.unlock(); return urb.complete(in: [0, 0, 0, 0, 0, 0, 0, 0])
        case (.control, 0, _):
            if let s = urb.setup { classRequests.append(s) }
            lock.unlock()
            if urb.setup?.request == 0xFE { return urb.complete(in: [0]) }   // GET MAX LUN
            urb.actualLength = 0; return urb.complete(.ok)
        default:
            lock.unlock(); return urb.complete(.stall)
        }
    }

    /// Runs a CBW's command (the lock held).
    private func command(_ cbw: [UInt8]) {
        let tag = UInt32(cbw[4]) | UInt32(cbw[5]) << 8 | UInt32(cbw[6]) << 16 | UInt32(cbw[7]) << 24
        let length = Int(UInt32(cbw[8]) | UInt32(cbw[9]) << 8 | UInt32(cbw[10]) << 16 | UInt32(cbw[11]) << 24)
        let cdb = Array(cbw[15..<31])
        opcodes.append(cdb[0])
        func reply(_ data: [UInt8]) {
            let sent = Array(data.prefix(length))
            if !sent.isEmpty { pendingIn.append(sent) }
            pendingIn.append(Self.csw(tag, UInt32(length - sent.count), 0))
        }
        let lba = Int(UInt32(cdb[2]) << 24 | UInt32(cdb[3]) << 16 | UInt32(cdb[4]) << 8 | UInt32(cdb[5]))
        let blocks = Int(UInt16(cdb[7]) << 8 | UInt16(cdb[8]))
        switch cdb[0] {
        case 0x00: reply([])
        case 0x03: reply([0x70, 0, 0, 0, 0, 0, 0, 10] + [UInt8](repeating: 0, count: 10))
        case 0x12: reply([0, 0x80, 4, 2, 31, 0, 0, 0] + Array("SoftDev Test Stick          1.0 ".utf8))
        case 0x25: reply([0, 0, 0, 63, 0, 0, 2, 0])
        case 0x1A: reply([3, 0, 0, 0])
        case 0x5A: reply([0, 6, 0, 0, 0, 0, 0, 0])
        case 0x28: reply(Array(memory[(lba * 512)..<min(memory.count, (lba + blocks) * 512)]))
        case 0x2A: writing = (lba * 512, blocks * 512, tag)
        default: pendingIn.append(Self.csw(tag, UInt32(length), 1))
        }
    }

    static func csw(_ tag: UInt32, _ residue: UInt32, _ status: UInt8) -> [UInt8] {
        [0x55, 0x53, 0x42, 0x53] + withUnsafeBytes(of: tag.littleEndian, Array.init) + withUnsafeBytes(of: residue.littleEndian, Array.init) + [status]
    }
}
