import Foundation
import XCTest
@testable import XenStore

/// A started server on a fresh socket path, stopped at the end of the test.
func makeServer(_ test: XCTestCase, file: StaticString = #filePath, line: UInt = #line) throws -> XenStoreServer {
    let path = "/tmp/xs-test-\(getpid())-\(UUID().uuidString.prefix(8)).sock"
    let server = XenStoreServer(socketPath: path)
    try server.start()
    test.addTeardownBlock { server.stop() }
    return server
}

/// Waits for the next watch event, failing the test if none comes within `seconds`.
func nextEvent(_ client: XenStoreSocketClient, within seconds: Int32 = 5,
               file: StaticString = #filePath, line: UInt = #line) -> XenStoreWatchEvent? {
    let event = client.watchEvents.next(timeoutMilliseconds: seconds * 1000)
    if event == nil { XCTFail("no watch event within \(seconds) s", file: file, line: line) }
    return event
}

/// Collects the events that arrive within `milliseconds`.
func drainEvents(_ client: XenStoreSocketClient, milliseconds: Int32 = 200) -> [XenStoreWatchEvent] {
    var out: [XenStoreWatchEvent] = []
    while let e = client.watchEvents.next(timeoutMilliseconds: milliseconds) { out.append(e) }
    return out
}

/// The output of one of Debian's xenstore-utils, run against `server`'s socket.
struct ToolResult { var status: Int32; var stdout: String; var stderr: String }

/// Runs /usr/bin/<tool> with XENSTORED_PATH pointing at the server. A missing tool fails the
/// test (CI installs xenstore-utils), it does not skip.
func runTool(_ tool: String, _ arguments: [String], server: XenStoreServer,
             file: StaticString = #filePath, line: UInt = #line) throws -> ToolResult {
    let executable = "/usr/bin/\(tool)"
    guard FileManager.default.isExecutableFile(atPath: executable) else {
        XCTFail("\(executable) is missing: install Debian's xenstore-utils (apt-get install -y xenstore-utils)", file: file, line: line)
        throw XenStoreError.other("missing \(tool)")
    }
    let process = Process()
    process.executableURL = URL(fileURLWithPath: executable)
    process.arguments = arguments
    var environment = ProcessInfo.processInfo.environment
    environment["XENSTORED_PATH"] = server.socketPath!
    process.environment = environment
    let out = Pipe(), err = Pipe()
    process.standardOutput = out
    process.standardError = err
    try process.run()
    let stdout = out.fileHandleForReading.readDataToEndOfFile()
    let stderr = err.fileHandleForReading.readDataToEndOfFile()
    process.waitUntilExit()
    return ToolResult(status: process.terminationStatus,
                      stdout: String(decoding: stdout, as: UTF8.self), stderr: String(decoding: stderr, as: UTF8.self))
}
