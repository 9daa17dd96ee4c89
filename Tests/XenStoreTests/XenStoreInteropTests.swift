import Foundation
import XCTest
@testable import XenStore

/// Debian's xenstore-utils (libxenstore 4.17) against the server: the real protocol users.
/// libxenstore finds the store through XENSTORED_PATH (it stats the path: a socket is
/// connected to, anything else is opened as the xenbus device).
final class XenStoreInteropTests: XCTestCase {
    func testWriteReadExistsRemoveAndList() throws {
        let server = try makeServer(self)
        let xs = try server.connect(as: 0)

        let write = try runTool("xenstore-write", ["/vm/1/name", "guest one", "/vm/1/memory", "512"], server: server)
        XCTAssertEqual(write.status, 0, write.stderr)
        XCTAssertEqual(try xs.readString("/vm/1/name"), "guest one")
        XCTAssertEqual(try xs.readString("/vm/1/memory"), "512")

        try xs.write("/vm/1/device/vbd/768/state", "4")
        let read = try runTool("xenstore-read", ["/vm/1/name", "/vm/1/device/vbd/768/state"], server: server)
        XCTAssertEqual(read.status, 0, read.stderr)
        XCTAssertEqual(read.stdout, "guest one\n4\n")

        let missing = try runTool("xenstore-read", ["/vm/2"], server: server)
        XCTAssertNotEqual(missing.status, 0, "reading a missing node fails")

        XCTAssertEqual(try runTool("xenstore-exists", ["/vm/1/memory"], server: server).status, 0)
        XCTAssertNotEqual(try runTool("xenstore-exists", ["/vm/9"], server: server).status, 0)

        let list = try runTool("xenstore-list", ["/vm/1"], server: server)
        XCTAssertEqual(list.status, 0, list.stderr)
        XCTAssertEqual(list.stdout, "name\nmemory\ndevice\n")

        let ls = try runTool("xenstore-ls", ["-f", "/vm"], server: server)
        XCTAssertEqual(ls.status, 0, ls.stderr)
        XCTAssertEqual(ls.stdout, """
            /vm/1 = ""
            /vm/1/name = "guest one"
            /vm/1/memory = "512"
            /vm/1/device = ""
            /vm/1/device/vbd = ""
            /vm/1/device/vbd/768 = ""
            /vm/1/device/vbd/768/state = "4"

            """)

        let rm = try runTool("xenstore-rm", ["/vm/1/device"], server: server)
        XCTAssertEqual(rm.status, 0, rm.stderr)
        XCTAssertEqual(try xs.directory("/vm/1", transaction: .none), ["name", "memory"])
    }

    func testChmodAndPermissionListing() throws {
        let server = try makeServer(self)
        let xs = try server.connect(as: 0)
        try xs.write("/local/domain/5/device/vif/0/mac", "00:16:3e:00:00:05")
        let chmod = try runTool("xenstore-chmod", ["-r", "/local/domain/5", "n5", "r0"], server: server)
        XCTAssertEqual(chmod.status, 0, chmod.stderr)
        XCTAssertEqual(try xs.permissions("/local/domain/5/device/vif/0/mac", transaction: .none),
                       [.init(domain: 5, access: .none), .init(domain: 0, access: .read)])
        let guest = try server.connect(as: 5)
        XCTAssertEqual(try guest.readString("device/vif/0/mac"), "00:16:3e:00:00:05", "the new owner may read")

        let ls = try runTool("xenstore-ls", ["-p", "/local/domain/5/device/vif"], server: server)
        XCTAssertEqual(ls.status, 0, ls.stderr)
        XCTAssertTrue(ls.stdout.contains("(n5,r0)"), ls.stdout)
        XCTAssertTrue(ls.stdout.contains("mac = \"00:16:3e:00:00:05\""), ls.stdout)
    }

    func testWatchPrintsEvents() throws {
        let server = try makeServer(self)
        let xs = try server.connect(as: 0)
        let executable = "/usr/bin/xenstore-watch"
        guard FileManager.default.isExecutableFile(atPath: executable) else {
            return XCTFail("\(executable) is missing: install Debian's xenstore-utils")
        }
        let process = Process()
        process.executableURL = URL(fileURLWithPath: executable)
        process.arguments = ["-n", "3", "/watched"]
        var environment = ProcessInfo.processInfo.environment
        environment["XENSTORED_PATH"] = server.socketPath!
        process.environment = environment
        let out = Pipe()
        process.standardOutput = out
        try process.run()
        // Never let a stuck watcher hang the suite.
        DispatchQueue.global().asyncAfter(deadline: .now() + 20) { if process.isRunning { process.terminate() } }

        // The registration event comes first: once it is printed, the watch is in place.
        var output = ""
        while !output.contains("\n") {
            let data = out.fileHandleForReading.availableData
            if data.isEmpty { break }
            output += String(decoding: data, as: UTF8.self)
        }
        XCTAssertEqual(output, "/watched\n")
        try xs.write("/watched/a", "1")
        try xs.write("/unrelated", "2")
        try xs.remove("/watched", transaction: .none)
        output += String(decoding: out.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
        process.waitUntilExit()
        XCTAssertEqual(process.terminationReason, .exit, "xenstore-watch -n 3 exits by itself after three events")
        XCTAssertEqual(output, "/watched\n/watched/a\n/watched\n")
    }
}
