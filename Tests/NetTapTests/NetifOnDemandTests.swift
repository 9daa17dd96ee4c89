import Core
import Devices
import Foundation
import Glibc
import NetTap
import XCTest

/// A device that makes frames on demand (``NetDevice/makesFramesOnDemand``): it records what
/// the queue told it, and makes a frame for each buffer it was told of, once it was told of
/// `waitFor` buffers in all (until then it makes none).
final class OnDemandSource: NetDevice, @unchecked Sendable {
    let name = "on-demand"
    let offloads: NetOffloads = .all
    var makesFramesOnDemand: Bool { true }
    private let lock = NSLock()
    private var receiver: (any NetFrameReceiver)?
    private(set) var announcements: [(buffers: Int, queue: Int, thread: pthread_t)] = []
    var waitFor = 0
    private var owed = 0
    private var made = 0

    func fromGuest(_ frame: EthernetFrame) {}
    func connect(_ receiver: any NetFrameReceiver, accepting offloads: NetOffloads) { lock.lock(); self.receiver = receiver; lock.unlock() }
    func close() { lock.lock(); receiver = nil; lock.unlock() }

    func guestPostedBuffers(_ buffers: Int, queue: Int) -> Int {
        lock.lock()
        announcements.append((buffers, queue, pthread_self()))
        owed += buffers
        let n = made + owed >= waitFor ? owed : 0
        owed -= n
        let first = made
        made += n
        let r = receiver
        lock.unlock()
        // Each frame says which it is: 100 bytes, its number in the payload.
        let frames = (first..<(first + n)).map { i -> EthernetFrame in
            var f = TestFrames.tcp4(count: 100, seed: UInt8(truncatingIfNeeded: i))
            f.queue = queue
            return f
        }
        r?.toGuest(frames)
        return n
    }

    var announced: Int { lock.lock(); defer { lock.unlock() }; return announcements.reduce(0) { $0 + $1.buffers } }
    var calls: Int { lock.lock(); defer { lock.unlock() }; return announcements.count }
    /// The buffers of each announcement, in order.
    var told: [Int] { lock.lock(); defer { lock.unlock() }; return announcements.map(\.buffers) }
}

/// The on-demand path: the queue tells such a device of every buffer the guest posts, once, on
/// the queue's thread, and the frames it makes reach the guest in that sweep; a device that
/// makes fewer is not asked again until the guest posts more, and then the queue wakes for them.
final class NetifOnDemandTests: XCTestCase {
    var lab: NetLab!
    override func setUpWithError() throws { lab = try NetLab() }
    override func tearDown() { lab.shutdown() }

    func testEveryPostedBufferIsAnnouncedOnceAndFilled() throws {
        let source = OnDemandSource()
        let (front, _, paths) = try lab.frontend(over: source) { $0.rxBuffers = 8 }
        // The 8 buffers posted at connect get 8 frames; receive() reposts them and they get 8
        // more: the frames in order, byte for byte.
        var frames: [EthernetFrame] = []
        let deadline = Date(timeIntervalSinceNow: 5)
        while frames.count < 16 && Date() < deadline { frames += try front.receive(atLeast: 1, timeoutMilliseconds: 500) }
        XCTAssertEqual(frames.prefix(16).map(\.bytes), (0..<16).map { TestFrames.tcp4(count: 100, seed: UInt8($0)).bytes })
        // Announced as posted, never twice: the 8 of the connect, then those reposted (one for
        // each frame taken; the last reposts perhaps not yet seen).
        XCTAssertGreaterThanOrEqual(source.announced, 16)
        XCTAssertLessThanOrEqual(source.announced, 8 + frames.count)
        // On the queue's ring thread, never the guest's (this one).
        XCTAssertTrue(source.announcements.allSatisfy { pthread_equal($0.thread, pthread_self()) == 0 && $0.queue == 0 })
        XCTAssertEqual(Set(source.announcements.map { UInt(bitPattern: Int(bitPattern: UInt($0.thread))) }).count, 1)
        let backend = try XCTUnwrap(lab.host.inspect { $0[paths.backendPath]?.driver as? NetifBackend })
        XCTAssertGreaterThanOrEqual(backend.counters.rxFrames, 16)
        XCTAssertEqual(backend.counters.rxDropped, 0)
        try front.close()
    }

    func testASourceThatHoldsBackIsAskedAgainOnlyForNewBuffersAndTheQueueWakesForThem() throws {
        let source = OnDemandSource()
        source.waitFor = 6
        let (guest, paths) = try lab.guestWithVif(source)
        var options = LocalNetFrontend.Options()
        options.rxBuffers = 4
        let front = try LocalNetFrontend(hypervisor: guest, frontendPath: paths.frontendPath, options: options)
        // Told of the 4 buffers, it makes none; the queue must not ask again and again.
        XCTAssertEqual(try front.receive(atLeast: 1, timeoutMilliseconds: 300).count, 0)
        XCTAssertEqual(source.calls, 1)
        XCTAssertEqual(source.announced, 4)
        // 4 more buffers, long after the queue went to sleep: it wakes, tells the source of those
        // 4 alone, and the source fills all 8.
        XCTAssertEqual(front.postRxBuffers(4), 4)
        XCTAssertEqual(try front.receive(atLeast: 8).count, 8)
        XCTAssertEqual(Array(source.told.prefix(2)), [4, 4], "the 4 of the connect, then those 4 alone")
        // receive() posted the 8 buffers again as it took the frames: the queue may have told
        // the source of them already (a loaded machine's timing), never of more.
        XCTAssertLessThanOrEqual(source.announced, 16)
        try front.close()
    }

    /// A paced generator (`rate`) is not asked for frames: its own thread hands them up as
    /// runs, through the vif's backlog, and the guest gets every one of its count, whole.
    func testAPacedGeneratorReachesTheGuestThroughTheBacklog() throws {
        let generator = try FrameGenerator(size: 100, count: 300, rate: 20_000)
        let (guest, paths) = try lab.guestWithVif(generator)
        let front = try LocalNetFrontend(hypervisor: guest, frontendPath: paths.frontendPath)
        var got: [EthernetFrame] = []
        let deadline = Date(timeIntervalSinceNow: 10)
        while got.count < 300 && Date() < deadline { got += try front.receive(atLeast: 1, timeoutMilliseconds: 500) }
        XCTAssertEqual(got.count, 300)
        let template = try FrameGenerator.frame(size: 100, mss: nil, destination: .broadcast)
        XCTAssertTrue(got.allSatisfy { $0.bytes == template.bytes })
        let backend = try XCTUnwrap(lab.host.inspect { $0[paths.backendPath]?.driver as? NetifBackend })
        XCTAssertEqual(backend.counters.rxFrames, 300)
        XCTAssertEqual(backend.counters.rxDropped, 0)
        try front.close()
    }
}
