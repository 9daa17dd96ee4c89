import Foundation

/// The softdev binary (or another of the package's executables) built beside this test bundle.
public enum SoftDevBinary {
    public static func path(_ name: String = "softdev") throws -> String {
        let dir = URL(fileURLWithPath: CommandLine.arguments[0]).deletingLastPathComponent()
        for candidate in [dir, dir.deletingLastPathComponent()] {
            let path = candidate.appendingPathComponent(name).path
            if FileManager.default.isExecutableFile(atPath: path) { return path }
        }
        try Peers.missing("the \(name) binary beside the tests", install: "swift build --build-tests")
    }

    /// Starts softdev with `arguments`, its stdout and stderr going to the file `log`.
    public static func launch(_ arguments: [String], log: String) throws -> Process {
        let p = Process()
        p.executableURL = URL(fileURLWithPath: try path())
        p.arguments = arguments
        _ = FileManager.default.createFile(atPath: log, contents: nil)
        let handle = try FileHandle(forWritingTo: URL(fileURLWithPath: log))
        p.standardOutput = handle
        p.standardError = handle
        try p.run()
        return p
    }
}
