import Core
import Foundation
import XCTest

final class PosixThreadTests: XCTestCase {
    func testThreadsCarryTheirShortNamesToTheSystem() throws {
        let names = [("netif queue 1 of domain 12", "netif q1 d12"), ("blkif queue 0 of domain 5", "blkif q0 d5"),
                     ("usbif controller of domain 7", "usbif ctl d7"), ("tap(name=sdn1) queue 0", "tap sdn1 q0"),
                     ("the xenstore watch dispatcher", "xenstore watch "), ("crypt cipher", "crypt cipher")]
        for (purpose, short) in names { XCTAssertEqual(PosixThread.shortName(purpose), short) }
        // Never past 15 bytes, never a cut character.
        XCTAssertEqual(PosixThread.shortName("αβγδεζηθικλμνξο"), "αβγδεζη")
        let seen = LockedBox("")
        let thread = try PosixThread("netif queue 1 of domain 12") {
            seen.set((try? String(contentsOfFile: "/proc/thread-self/comm", encoding: .utf8)) ?? "?")
        }
        thread.join()
        XCTAssertEqual(seen.get(), "netif q1 d12\n", "the name top -H and ps -L show")
    }
}

final class LockedBox<T>: @unchecked Sendable {
    private var value: T
    private let lock = NSLock()
    init(_ value: T) { self.value = value }
    func set(_ v: T) { lock.lock(); value = v; lock.unlock() }
    func get() -> T { lock.lock(); defer { lock.unlock() }; return value }
}
