import Core
import Foundation
import Glibc
import Synchronization

/// What a bench run left outside its own memory: programs it started (nbdkit, qemu-nbd),
/// scratch files and directories, network namespaces (a clean-up of its own). All go when the
/// run ends (``cleanUp()``), and when the bench is interrupted: `softdev bench` installs one
/// ``SignalTrap`` that cleans up every run still going (``cleanUpAll()``), so that a Ctrl-C, a
/// `kill` or a closed output leaves no server holding an image and no file behind.
public final class BenchLeftovers: Sendable {
    private struct State {
        var processes: [Process] = []
        var paths: [String] = []
        var others: [@Sendable () -> Void] = []
    }
    private let state = Mutex(State())
    /// Every instance not yet cleaned up, for the trap.
    private static let live = Mutex<[BenchLeftovers]>([])

    public init() { Self.live.withLock { $0.append(self) } }

    /// Ends `process` at the clean-up (unless ``forget(_:)`` first).
    public func watch(_ process: Process) { state.withLock { $0.processes.append(process) } }
    func forget(_ process: Process) { state.withLock { $0.processes.removeAll { $0 === process } } }
    /// Removes the file or directory at `path` (recursively) at the clean-up.
    public func remove(atEnd path: String) { state.withLock { $0.paths.append(path) } }
    /// Runs `body` at the clean-up.
    func onCleanUp(_ body: @escaping @Sendable () -> Void) { state.withLock { $0.others.append(body) } }

    /// Terminates what still runs (and waits for it), removes the paths, runs the clean-ups.
    /// Idempotent; from the run's `defer` or the trap's thread.
    public func cleanUp() {
        let s = state.withLock { s in defer { s = State() }; return s }
        for p in s.processes where p.isRunning { p.terminate() }
        for p in s.processes { p.waitUntilExit() }
        for path in s.paths { try? FileManager.default.removeItem(atPath: path) }
        for body in s.others { body() }
        Self.live.withLock { $0.removeAll { $0 === self } }
    }

    /// Every run's clean-up that has not happened yet: the trap's.
    public static func cleanUpAll() {
        for leftovers in live.withLock({ $0 }) { leftovers.cleanUp() }
    }
}

/// SIGINT, SIGTERM, SIGHUP and SIGPIPE (the bench's output closed, as by `| head`), while it is
/// installed, run `cleanUp` on a thread of its own and then end the process as the signal would
/// have. The handler only writes the signal's number to a pipe (and stays a handler, not
/// SIG_IGN, so that the children it runs keep the default); SA_RESTART, so that the calls the
/// main thread is in go on until the process ends.
public final class SignalTrap: @unchecked Sendable {
    static let signals = [SIGINT, SIGTERM, SIGHUP, SIGPIPE]
    nonisolated(unsafe) static var writeEnd: Int32 = -1
    private var fds: [Int32] = [-1, -1]
    private var previous: [sigaction] = []
    private var thread: PosixThread?

    public init(_ cleanUp: @escaping @Sendable () -> Void) {
        guard pipe(&fds) == 0 else { return }
        for fd in fds { _ = fcntl(fd, F_SETFD, FD_CLOEXEC) }
        Self.writeEnd = fds[1]
        let readEnd = fds[0]
        thread = try? PosixThread("the bench's signal trap") {
            var signo: Int32 = 0
            while true {
                let n = read(readEnd, &signo, 4)
                if n < 0 && errno == EINTR { continue }
                guard n == 4, signo != 0 else { return }   // cancelled
                cleanUp()
                signal(signo, SIG_DFL)
                raise(signo)
                exit(128 + signo)
            }
        }
        for signo in Self.signals {
            var action = sigaction()
            action.__sigaction_handler.sa_handler = { signo in
                var s = signo
                _ = write(SignalTrap.writeEnd, &s, 4)
            }
            sigemptyset(&action.sa_mask)
            // Foundation's FileHandle traps on EINTR (readDataToEndOfFile): the main thread's
            // calls restart while the trap's thread cleans up.
            action.sa_flags = SA_RESTART
            var old = sigaction()
            sigaction(signo, &action, &old)
            previous.append(old)
        }
    }

    /// Restores the previous handlers and stops the thread.
    public func cancel() {
        for (signo, var old) in zip(Self.signals, previous) { sigaction(signo, &old, nil) }
        previous = []
        var zero: Int32 = 0
        if fds[1] >= 0 { _ = write(fds[1], &zero, 4) }
        thread?.join()
        for fd in fds where fd >= 0 { close(fd) }
        fds = [-1, -1]
        Self.writeEnd = -1
    }
}
