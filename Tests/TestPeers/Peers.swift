import Foundation
import XCTest

/// The real programs the tests run against (nbdkit, qemu-img, nbdinfo, nbdcopy, fio, nbdfuse...)
/// and what happens when one is missing, decided in one place: in CI a missing peer fails the
/// test, because a test that skips there passes without testing anything; on a developer's
/// machine it skips, saying what to install.
///
/// CI is told by `SOFTDEV_REQUIRE_PEERS=1`, which scripts/test.sh exports (`.ci/run` runs it).
///
/// ```swift
/// let nbdkit = try Peers.program("nbdkit", package: "nbdkit")
/// ```
public enum Peers {
    /// The environment variable that makes a missing peer a failure.
    public static let requireVariable = "SOFTDEV_REQUIRE_PEERS"

    /// Missing peers fail the test (CI) instead of skipping it.
    public static var required: Bool { ProcessInfo.processInfo.environment[requireVariable] == "1" }

    /// Where the programs are looked for, Debian's places first.
    static let directories = ["/usr/bin", "/usr/sbin", "/bin", "/sbin", "/usr/local/bin"]

    /// The path of the program `name` (from Debian's `package`). Missing: fails the test in CI
    /// (and throws, so that the test stops there), skips it elsewhere.
    public static func program(_ name: String, package: String, file: StaticString = #filePath, line: UInt = #line) throws -> String {
        if let path = find(name) { return path }
        try missing(name, install: install(package), file: file, line: line)
    }

    /// Whether `name` is installed, for a test that does less without it: in CI a missing peer
    /// fails the test (and throws); elsewhere the reason is printed and the answer is false.
    public static func available(_ name: String, package: String, file: StaticString = #filePath, line: UInt = #line) throws -> Bool {
        if find(name) != nil { return true }
        if required { try fail(name, install: install(package), file: file, line: line) }
        print("\(name) is missing (\(install(package))): the test goes on without it")
        return false
    }

    /// Anything else a test needs from the machine (a device node, a binary built beside the
    /// tests): `present` false fails the test in CI and skips it elsewhere. `what` names the
    /// thing, `install` says how to get it.
    public static func require(_ present: Bool, _ what: String, install: String, file: StaticString = #filePath, line: UInt = #line) throws {
        if !present { try missing(what, install: install, file: file, line: line) }
    }

    /// Runs `program` with `arguments` to the end: its exit status and its output (standard
    /// error too, unless `errors` is false, when it is thrown away).
    @discardableResult
    public static func run(_ program: String, _ arguments: [String], errors: Bool = true) throws -> (status: Int32, output: String) {
        let process = Process()
        process.executableURL = URL(fileURLWithPath: program)
        process.arguments = arguments
        let pipe = Pipe()
        process.standardOutput = pipe
        process.standardError = errors ? pipe : FileHandle.nullDevice
        try process.run()
        let data = pipe.fileHandleForReading.readDataToEndOfFile()
        process.waitUntilExit()
        return (process.terminationStatus, String(decoding: data, as: UTF8.self))
    }

    private static func install(_ package: String) -> String { "apt-get install \(package), or scripts/install-deps.sh" }

    static func find(_ name: String) -> String? {
        directories.lazy.map { "\($0)/\(name)" }.first { access($0, X_OK) == 0 }
    }

    /// `what` is missing: fails the test in CI, skips it elsewhere.
    public static func missing(_ what: String, install: String, file: StaticString = #filePath, line: UInt = #line) throws -> Never {
        if required { try fail(what, install: install, file: file, line: line) }
        print("skipping: \(what) is missing (\(install))")
        throw XCTSkip("\(what) is missing (\(install))", file: file, line: line)
    }

    private static func fail(_ what: String, install: String, file: StaticString, line: UInt) throws -> Never {
        XCTFail("\(what) is required in CI (\(requireVariable)=1) but missing: install it (\(install))", file: file, line: line)
        throw PeerMissing(what: what)
    }
}

/// Thrown after the failure is recorded, to end the test where the peer was needed.
public struct PeerMissing: Error, CustomStringConvertible {
    public let what: String
    public var description: String { "\(what) is missing (the test stopped there)" }
}
