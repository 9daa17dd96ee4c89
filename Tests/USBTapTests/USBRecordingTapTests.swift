import Core
import Devices
import Foundation
import TestPeers
import USBTap
import XCTest

/// `log` and `usbmon` through the real tap: the JSON lines and the capture read back (tshark).
final class USBRecordingTapTests: USBFilterTestCase {
    func testLogWritesAJSONLinePerURB() throws {
        let path = makeTemporaryDirectory() + "/usb.log"
        let device = LoopbackDevice()
        let log = try USBLogFilter(next: device, path: path)
        let (front, _) = try connected(log)
        _ = try front.transfer(port: 1, device: 2, endpoint: 2, type: .bulk, isIn: false, data: [1, 2, 3])
        _ = try front.transfer(port: 1, device: 2, endpoint: 1, type: .bulk, isIn: true, length: 512)
        _ = try front.control(port: 1, device: 2, USBSetup(requestType: 0xc0, request: 0x42, value: 7, index: 3, length: 16))
        _ = try front.transfer(port: 1, device: 2, endpoint: 5, type: .bulk, isIn: true, length: 64)
        try front.close()
        let lines = try String(contentsOfFile: path, encoding: .utf8).split(separator: "\n")
        let all = try lines.map { try XCTUnwrap(JSONSerialization.jsonObject(with: Data($0.utf8)) as? [String: Any]) }
        XCTAssertEqual(all.count, 9, lines.joined(separator: "\n"))
        guard all.count == 9 else { return }
        // The enumeration the tap answers passes the filter too: GET_DESCRIPTOR(DEVICE) and
        // SET_ADDRESS at address 0, the configuration twice, SET_CONFIGURATION.
        let enumeration = all.prefix(5).map { $0["setup"] as? [String: Any] }
        XCTAssertEqual(enumeration.map { $0?["bRequest"] as? Int }, [6, 5, 6, 6, 9])
        XCTAssertEqual(enumeration.map { $0?["wValue"] as? Int }, [0x0100, 2, 0x0200, 0x0200, 1])
        XCTAssertEqual(all.prefix(5).map { $0["actual_length"] as? Int }, [18, 0, 9, 46, 0])
        XCTAssertEqual(all.prefix(5).map { $0["status"] as? String }, ["ok", "ok", "ok", "ok", "ok"])
        let entries = Array(all.dropFirst(5))
        XCTAssertEqual(entries.map { $0["endpoint"] as? String }, ["0x02", "0x81", "0x80", "0x85"])
        XCTAssertEqual(entries.map { $0["direction"] as? String }, ["out", "in", "in", "in"])
        XCTAssertEqual(entries.map { $0["type"] as? String }, ["bulk", "bulk", "control", "bulk"])
        XCTAssertEqual(entries.map { $0["length"] as? Int }, [3, 512, 16, 64])
        XCTAssertEqual(entries.map { $0["actual_length"] as? Int }, [3, 3, 5, 0])
        XCTAssertEqual(entries.map { $0["status"] as? String }, ["ok", "ok", "ok", "stall"])
        XCTAssertEqual(entries.map { $0["errno"] as? Int }, [0, 0, 0, -32])
        XCTAssertEqual(entries.map { $0["id"] as? Int }, [6, 7, 8, 9])
        let setup = try XCTUnwrap(entries[2]["setup"] as? [String: Any])
        XCTAssertEqual(setup["bmRequestType"] as? String, "0xc0")
        XCTAssertEqual(setup["bRequest"] as? Int, 0x42)
        XCTAssertEqual(setup["wValue"] as? Int, 7); XCTAssertEqual(setup["wIndex"] as? Int, 3); XCTAssertEqual(setup["wLength"] as? Int, 16)
        XCTAssertNil(entries[0]["setup"])
        for e in entries {
            XCTAssertNotNil((e["duration_ns"] as? Int).map { $0 >= 0 })
            XCTAssertTrue((e["time"] as? String)?.hasSuffix("Z") == true)
        }
    }

    func testUnlinkPassesThroughTheRelay() throws {
        let device = LoopbackDevice()
        let (front, _) = try connected(try USBLogFilter(next: device, path: makeTemporaryDirectory() + "/u.log"))
        let id = try front.put(port: 1, device: 2, endpoint: 3, type: .interrupt, isIn: true, length: 8, interval: 4)
        let end = monotonicSeconds() + 2
        while device.pending == 0 && monotonicSeconds() < end { usleep(1000) }
        let unlink = try front.unlink(id, port: 1)
        XCTAssertEqual(try front.wait(unlink).status, .ok)
        XCTAssertEqual(try front.wait(id, isIn: true).status, .cancelled)
        XCTAssertEqual(device.cancelled, 1)
        try front.close()
    }

    func testUsbmonCaptureReadsBackInTshark() throws {
        let tshark = try Peers.program("tshark", package: "tshark")
        let path = makeTemporaryDirectory() + "/usb.pcap"
        let device = BulkOnlyTestDevice()
        let (front, _) = try connected(try USBMonFilter(next: try USBReadOnlyStorageFilter(device: device), path: path, snapLength: 256))
        var bot = BulkOnly(front: front)
        _ = try bot.run(Self.read10(0, 1), inLength: 512)                                       // 3 URBs
        _ = try front.control(port: 1, device: 2, USBSetup(requestType: 0xA1, request: 0xFE, value: 0, index: 0, length: 1))   // 1
        try front.close()
        let end = monotonicSeconds() + 5
        var rows: [[String]] = []
        while monotonicSeconds() < end {
            // The file is flushed when the controller closes the stack.
            let (status, output) = try Peers.run(tshark, ["-r", path, "-T", "fields", "-E", "separator=|", "-e", "usb.urb_type", "-e", "usb.transfer_type",
                                                          "-e", "usb.endpoint_address", "-e", "usb.urb_len", "-e", "usb.data_len",
                                                          "-e", "usb.setup.bRequest", "-e", "usb.urb_status", "-e", "usbms.setup.bRequest",
                                                          "-e", "usbms.dCBWTag"], errors: false)
            rows = output.split(separator: "\n").map { $0.split(separator: "|", omittingEmptySubsequences: false).map(String.init) }
            if status == 0 && rows.count == 18 { break }
            usleep(50_000)
        }
        XCTAssertEqual(rows.count, 18, "\(rows)")
        guard rows.count == 18 else { return }
        // The enumeration first (the tap answers it, the capture sees it): five control
        // transfers, GET_DESCRIPTOR, SET_ADDRESS, GET_DESCRIPTOR twice, SET_CONFIGURATION.
        XCTAssertEqual(rows.prefix(10).map { $0[1] }, [String](repeating: "0x02", count: 10))
        XCTAssertEqual(stride(from: 0, to: 10, by: 2).map { rows[$0][5] }, ["6", "5", "6", "6", "9"])
        XCTAssertEqual(rows.prefix(10).map { $0[6] }, ["-115", "0", "-115", "0", "-115", "0", "-115", "0", "-115", "0"])
        rows.removeFirst(10)
        XCTAssertEqual(rows.map { $0[0] }, ["'S'", "'C'", "'S'", "'C'", "'S'", "'C'", "'S'", "'C'"])
        XCTAssertEqual(rows.map { $0[1] }, ["0x03", "0x03", "0x03", "0x03", "0x03", "0x03", "0x02", "0x02"])
        XCTAssertEqual(rows.map { $0[2] }, ["0x02", "0x02", "0x81", "0x81", "0x81", "0x81", "0x80", "0x80"])
        XCTAssertEqual(rows.map { $0[3] }, ["31", "31", "512", "512", "13", "13", "1", "1"])
        XCTAssertEqual(rows.map { $0[4] }, ["31", "0", "0", "256", "0", "13", "0", "1"], "data: OUT with the submission, IN with the completion, cut at the snap length")
        // tshark knows the interface from the enumeration: GET MAX LUN and the CBW as mass storage.
        XCTAssertEqual(rows[6][7], "0xfe", "GET MAX LUN's setup")
        XCTAssertFalse(rows[0][8].isEmpty, "the CBW dissected: \(rows[0])")
        XCTAssertEqual(rows.map { $0[6] }, ["-115", "0", "-115", "0", "-115", "0", "-115", "0"])
        // With the enumeration in the capture tshark knows the interface and dissects the CBW.
        let verbose = try Peers.run(tshark, ["-r", path, "-V"], errors: false).output
        XCTAssertTrue(verbose.contains("USB URB"), String(verbose.prefix(2000)))
        XCTAssertFalse(verbose.contains("Malformed"), String(verbose.prefix(4000)))
    }
}
