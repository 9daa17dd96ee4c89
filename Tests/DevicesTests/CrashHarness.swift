import Core
import Devices
import Foundation
import Glibc
import Synchronization
import TestPeers
import XCTest

/// Crash safety for any device with state on disk (issue 12): a child process
/// (`softdev-crash-child`) serves the stack over NBD; the harness writes a random write-heavy
/// workload with flushes in flight, SIGKILLs the child at a random moment, opens the stack
/// again in this process and checks every sector of the region:
/// - a write acknowledged before a flush that completed reads back (or a later write to it),
/// - nothing reads back garbage: each sector is zeroes (never written since the region was
///   zeroed) or exactly one of the sectors written there, stamped with its write's number, its
///   block and its place,
/// then the format's own check (`options.check`) runs, and the next iteration goes on from what
/// was read.
///
/// ```swift
/// let report = try CrashHarness(options: .init(spec: "crypt(keyfile=k) | file(path=img)")).run()
/// ```
/// `SOFTDEV_CRASH_ITERATIONS=5000` runs more by hand; `SOFTDEV_CRASH_SEED` repeats a run.
final class CrashHarness {
    struct Options {
        /// The stack the child serves, and that the harness opens after each kill.
        var spec: String
        /// The region exercised: `blocks` blocks of `blockSize` bytes from offset 0; it must read
        /// as zeroes at the start.
        var blocks = 256
        var blockSize = 4096
        var queueDepth = 8
        /// A flush after every this many writes (sent while writes are in flight).
        var flushEvery = 12
        /// When the child is killed, in milliseconds after the workload starts.
        var killAfter: ClosedRange<Int> = 1...20
        var iterations = Int(ProcessInfo.processInfo.environment["SOFTDEV_CRASH_ITERATIONS"] ?? "") ?? 200
        var seed = UInt64(ProcessInfo.processInfo.environment["SOFTDEV_CRASH_SEED"] ?? "") ?? UInt64.random(in: 1...UInt64.max)
        /// The format's own check after each reopen (e.g. `qemu-img check`), given the iteration.
        var check: ((Int) throws -> Void)?
        init(spec: String) { self.spec = spec }
    }

    struct Report: CustomStringConvertible {
        var iterations = 0, writesAcknowledged = 0, writesLost = 0, flushesCompleted = 0, sectorsNewerThanFlush = 0
        var seed: UInt64 = 0
        var description: String {
            "\(iterations) kills (seed \(seed)): \(writesAcknowledged) writes acknowledged, \(flushesCompleted) flushes completed, "
                + "\(writesLost) writes in flight at the kill, \(sectorsNewerThanFlush) sectors read newer than their last flush"
        }
    }

    let options: Options
    private var random: SplitMix64
    private let sectorsPerBlock: Int
    /// Per sector: the value it must hold at least (0: zeroes), and what was written to it
    /// since, in order (any of which may be what is read).
    private var durable: [UInt32]
    private var since: [[UInt32]]
    private var report = Report()
    private var nextSequence: UInt32 = 1

    init(options: Options) {
        self.options = options
        random = SplitMix64(seed: options.seed)
        sectorsPerBlock = options.blockSize / 512
        durable = Array(repeating: 0, count: options.blocks * options.blockSize / 512)
        since = Array(repeating: [], count: durable.count)
        report.seed = options.seed
    }

    /// Runs every iteration; the first failure throws, naming the iteration, sector and seed.
    func run(directory: String) throws -> Report {
        let child = try SoftDevBinary.path("softdev-crash-child")
        for iteration in 0..<options.iterations {
            try self.iteration(iteration, child: child, socket: "\(directory)/crash-\(iteration % 4).sock")
            report.iterations += 1
        }
        return report
    }

    /// Runs every iteration of `options` and prints the report as "`name` crash harness: ...";
    /// fails the test unless every kill ran, flushes completed and writes went through.
    static func runChecked(_ name: String, options: Options, directory: String, file: StaticString = #filePath, line: UInt = #line) throws {
        let start = Date()
        let report = try CrashHarness(options: options).run(directory: directory)
        print("\(name) crash harness: \(report) in \(String(format: "%.1f", Date().timeIntervalSince(start))) s")
        XCTAssertEqual(report.iterations, options.iterations, file: file, line: line)
        XCTAssertGreaterThan(report.flushesCompleted, 0, "flushes completed before kills", file: file, line: line)
        XCTAssertGreaterThan(report.writesAcknowledged, options.iterations, "writes went through", file: file, line: line)
    }

    // MARK: One iteration

    private func iteration(_ iteration: Int, child: String, socket: String) throws {
        unlink(socket)
        let process = Process()
        process.executableURL = URL(fileURLWithPath: child)
        process.arguments = [socket, options.spec]
        let output = Pipe(), input = Pipe()
        process.standardOutput = output
        process.standardInput = input
        try process.run()
        defer { if process.isRunning { kill(process.processIdentifier, SIGKILL) }; process.waitUntilExit() }
        let ready = output.fileHandleForReading.availableData
        guard String(decoding: ready, as: UTF8.self).hasPrefix("ready") else {
            throw CrashFailure("iteration \(iteration): the child did not start (\(process.isRunning ? "no ready line" : "exited \(process.terminationStatus)"))")
        }
        let client = try NBDDevice(address: .unix(path: socket), export: "d")
        let state = Workload(harness: self, client: client)
        let killAt = BlockCompletionRelay.nanoseconds() + UInt64(Int.random(in: options.killAfter, using: &random)) * 1_000_000
        state.run(until: killAt, kill: { kill(process.processIdentifier, SIGKILL) }, random: &random)
        process.waitUntilExit()
        client.close()
        report.writesAcknowledged += state.acknowledged
        report.writesLost += state.lost
        report.flushesCompleted += state.flushes
        try verify(iteration)
        try options.check?(iteration)
    }

    /// Reads the region through a fresh stack and checks each sector against the model.
    private func verify(_ iteration: Int) throws {
        let device = try DeviceRegistry.open(options.spec)
        defer { device.close() }
        let length = options.blocks * options.blockSize
        var memory: UnsafeMutableRawPointer?
        precondition(posix_memalign(&memory, 4096, length) == 0)
        defer { free(memory) }
        var vector = iovec(iov_base: memory, iov_len: length)
        try withUnsafeMutablePointer(to: &vector) { try device.sync.read(into: IOBuffers($0, count: 1), at: 0) }
        for sector in 0..<durable.count {
            let bytes = UnsafeRawBufferPointer(start: memory! + sector * 512, count: 512)
            let where_ = "iteration \(iteration) (seed \(options.seed)), sector \(sector) (block \(sector / sectorsPerBlock))"
            guard let found = Stamp.read(bytes, sector: sector) else {
                throw CrashFailure("\(where_): garbage: \(bytes.prefix(16).map { String($0, radix: 16) }.joined(separator: " ")) ...")
            }
            if found != durable[sector] {
                guard since[sector].contains(found) else {
                    throw CrashFailure("\(where_): reads write \(found), but \(durable[sector] == 0 ? "zeroes" : "write \(durable[sector])") was flushed and later writes were \(since[sector])")
                }
                report.sectorsNewerThanFlush += 1
            }
            durable[sector] = found
            since[sector] = []
        }
    }

    // MARK: The workload

    /// One iteration's writes and flushes, and what the model learns from their completions.
    private final class Workload: BlockCompletionSink, @unchecked Sendable {
        unowned let harness: CrashHarness
        let client: NBDDevice
        let lock = ConditionLock()
        var inFlight = 0
        var busy: Set<Int> = []
        var failed = false
        /// Per block, the last write acknowledged (since the iteration began).
        var acked: [Int: UInt32] = [:]
        /// A flush's tag → the acknowledged writes it covers.
        var flushCovers: [UInt64: [Int: UInt32]] = [:]
        /// A write's tag → (block, buffer index).
        var writes: [UInt64: (block: Int, sequence: UInt32, buffer: Int)] = [:]
        var freeBuffers: [Int]
        let buffers: [UnsafeMutableRawPointer]
        let vectors: UnsafeMutablePointer<iovec>
        var acknowledged = 0, lost = 0, flushes = 0
        var nextTag: UInt64 = 1

        init(harness: CrashHarness, client: NBDDevice) {
            self.harness = harness; self.client = client
            let depth = harness.options.queueDepth
            buffers = (0..<depth).map { _ in
                var memory: UnsafeMutableRawPointer?
                precondition(posix_memalign(&memory, 4096, harness.options.blockSize) == 0)
                return memory!
            }
            vectors = .allocate(capacity: depth)
            freeBuffers = Array(0..<depth)
        }
        deinit { buffers.forEach { free($0) }; vectors.deallocate() }

        func run(until deadline: UInt64, kill: () -> Void, random: inout SplitMix64) {
            let options = harness.options
            var writesSinceFlush = 0
            var killed = false
            while true {
                if !killed && BlockCompletionRelay.nanoseconds() >= deadline { kill(); killed = true }
                var submit: (tag: UInt64, block: Int, buffer: Int, sequence: UInt32)?
                var flushTag: UInt64?
                lock.withLock {
                    while !failed && inFlight >= options.queueDepth && !killed { lock.wait(timeout: 0.002) }
                    guard !failed, !killed, inFlight < options.queueDepth else { return }
                    var block = Int.random(in: 0..<options.blocks, using: &random)
                    while busy.contains(block) { block = (block + 1) % options.blocks }
                    busy.insert(block)
                    let buffer = freeBuffers.removeLast()
                    let sequence = harness.nextSequence
                    harness.nextSequence &+= 1
                    // Every write may be what a sector reads after the kill.
                    for s in 0..<harness.sectorsPerBlock { harness.since[block * harness.sectorsPerBlock + s].append(sequence) }
                    let tag = nextTag; nextTag += 1
                    writes[tag] = (block, sequence, buffer)
                    inFlight += 1
                    submit = (tag, block, buffer, sequence)
                    writesSinceFlush += 1
                    if writesSinceFlush >= options.flushEvery {
                        writesSinceFlush = 0
                        let f = nextTag; nextTag += 1
                        flushCovers[f] = acked
                        inFlight += 1
                        flushTag = f
                    }
                }
                guard let submit else {
                    if killed || failed { break } else { continue }
                }
                for s in 0..<harness.sectorsPerBlock {
                    Stamp.write(buffers[submit.buffer] + s * 512, sequence: submit.sequence, sector: submit.block * harness.sectorsPerBlock + s)
                }
                vectors[submit.buffer] = iovec(iov_base: buffers[submit.buffer], iov_len: options.blockSize)
                client.submit(BlockRequest(operation: .write, offset: UInt64(submit.block * options.blockSize), length: UInt64(options.blockSize),
                                           buffers: IOBuffers(vectors + submit.buffer, count: 1)),
                              completion: BlockCompletion(sink: self, tag: submit.tag))
                if let flushTag {
                    client.submit(BlockRequest(operation: .flush, offset: 0, length: 0), completion: BlockCompletion(sink: self, tag: flushTag))
                }
            }
            // The connection is gone: every request in flight completes (with an error).
            lock.withLock { while inFlight > 0 { lock.wait(timeout: 0.01) } }
        }

        func complete(tag: UInt64, result: BlockResult) {
            lock.withLock {
                inFlight -= 1
                if let write = writes.removeValue(forKey: tag) {
                    busy.remove(write.block)
                    freeBuffers.append(write.buffer)
                    if result == .success { acked[write.block] = write.sequence; acknowledged += 1 } else { lost += 1; failed = true }
                } else if let covered = flushCovers.removeValue(forKey: tag) {
                    if result == .success {
                        flushes += 1
                        // Durable now: each covered write, and what was written after it may replace it.
                        for (block, sequence) in covered {
                            for s in 0..<harness.sectorsPerBlock {
                                let sector = block * harness.sectorsPerBlock + s
                                guard let at = harness.since[sector].firstIndex(of: sequence) else { continue }
                                harness.durable[sector] = sequence
                                harness.since[sector].removeFirst(at + 1)
                            }
                        }
                    } else {
                        failed = true
                    }
                }
                lock.broadcast()
            }
        }
    }
}

struct CrashFailure: Error, CustomStringConvertible {
    var description: String
    init(_ description: String) { self.description = description }
}

/// The contents of a written sector: "SDCRASH!", the write's number, the sector's number, then
/// bytes that follow from both, so that a sector is recognised whole or is garbage.
enum Stamp {
    static let magic: UInt64 = 0x2148_5341_5243_4453   // "SDCRASH!"

    static func write(_ p: UnsafeMutableRawPointer, sequence: UInt32, sector: Int) {
        p.storeBytes(of: magic, as: UInt64.self)
        p.storeBytes(of: sequence, toByteOffset: 8, as: UInt32.self)
        p.storeBytes(of: UInt32(sector), toByteOffset: 12, as: UInt32.self)
        var state = SplitMix64(seed: UInt64(sequence) << 32 | UInt64(sector))
        for i in stride(from: 16, to: 512, by: 8) { p.storeBytes(of: state.next(), toByteOffset: i, as: UInt64.self) }
    }

    /// The write number a sector holds (0 for zeroes), or nil for anything else (garbage, or
    /// a sector written for another place).
    static func read(_ bytes: UnsafeRawBufferPointer, sector: Int) -> UInt32? {
        if bytes.allSatisfy({ $0 == 0 }) { return 0 }
        guard bytes.load(as: UInt64.self) == magic, bytes.load(fromByteOffset: 12, as: UInt32.self) == UInt32(sector) else { return nil }
        let sequence = bytes.load(fromByteOffset: 8, as: UInt32.self)
        var state = SplitMix64(seed: UInt64(sequence) << 32 | UInt64(sector))
        for i in stride(from: 16, to: 512, by: 8) where bytes.load(fromByteOffset: i, as: UInt64.self) != state.next() { return nil }
        return sequence
    }
}
