import Core
import Foundation
import XCTest

/// The record a backend keeps of its ring's private state, read back as a restarted daemon
/// would, including at the points between two stores where the process may have been killed.
final class RingRecoveryRecordTests: XCTestCase {
    var path = ""
    let identity = RingRecoveryRecord.Identity(frontendDomain: 3, ringRefs: [8, 9, 10, 11], eventPort: 5)

    override func setUp() {
        path = FileManager.default.temporaryDirectory.appendingPathComponent("ring-\(getpid())-\(UInt32.random(in: 0...UInt32.max))").path
    }
    override func tearDown() { unlink(path) }

    func open(resume: Bool, identity: RingRecoveryRecord.Identity? = nil) throws -> RingRecoveryRecord {
        try RingRecoveryRecord(path: path, identity: identity ?? self.identity, slots: 32, requestSize: 112, resume: resume)
    }

    func take(_ record: RingRecoveryRecord, slot: Int, index: UInt32, fill: UInt8) {
        let bytes = [UInt8](repeating: fill, count: 112)
        bytes.withUnsafeBytes { record.taken(slot: slot, index: index, request: $0.baseAddress!) }
    }

    /// Overwrites a header field, as if the process had been killed before that store.
    func patchHeader(_ offset: UInt64, _ value: UInt32) throws {
        let f = try FileHandle(forUpdating: URL(fileURLWithPath: path))
        try f.seek(toOffset: offset)
        try f.write(contentsOf: withUnsafeBytes(of: value) { Data($0) })
        try f.close()
    }

    func testUnansweredRequestsAreRecoveredInOrderAndAnsweredOnesAreNot() throws {
        do {
            let r = try open(resume: false)
            take(r, slot: 4, index: 10, fill: 0xA)
            take(r, slot: 7, index: 11, fill: 0xB)
            take(r, slot: 2, index: 12, fill: 0xC)
            r.answered(slot: 4, response: 5)
            r.released(slot: 4)
            take(r, slot: r.inlineSlot, index: 13, fill: 0xD)   // answered at once, all three stores
            r.answered(slot: r.inlineSlot, response: 6)
            r.released(slot: r.inlineSlot)
        }   // the process dies here
        let recovered = try open(resume: true).recover()
        XCTAssertEqual(recovered.requestConsumer, 14)
        XCTAssertEqual(recovered.responseProducer, 7)
        XCTAssertEqual(recovered.pending.map(\.index), [11, 12])
        XCTAssertEqual(recovered.pending.map(\.slot), [7, 2])
        XCTAssertEqual(recovered.pending.map { $0.bytes.first }, [0xB, 0xC])
        XCTAssertEqual(recovered.pending[0].bytes, [UInt8](repeating: 0xB, count: 112))
        // A second recovery (killed again before anything moved) finds the same.
        XCTAssertEqual(try open(resume: true).recover(), recovered)
    }

    func testKilledAfterTheResponseButBeforeTheProducerMovedCountsTheResponseOnce() throws {
        do {
            let r = try open(resume: false)
            take(r, slot: 0, index: 0, fill: 1)
            r.answered(slot: 0, response: 0)
        }
        try patchHeader(28, 0)   // the producer store did not happen
        let recovered = try open(resume: true).recover()
        XCTAssertEqual(recovered.responseProducer, 1, "the response in the ring is counted")
        XCTAssertTrue(recovered.pending.isEmpty, "and its request is not served again")
    }

    func testKilledBeforeTheConsumerMovedTakesTheRequestAgainFromTheRing() throws {
        do {
            let r = try open(resume: false)
            take(r, slot: 0, index: 0, fill: 1)
            take(r, slot: 1, index: 1, fill: 2)
        }
        try patchHeader(24, 1)   // the consumer store of request 1 did not happen
        let recovered = try open(resume: true).recover()
        XCTAssertEqual(recovered.requestConsumer, 1)
        XCTAssertEqual(recovered.pending.map(\.index), [0], "request 1 is still in the ring, to be taken again")
    }

    func testIndicesWrapAround() throws {
        do {
            let r = try open(resume: false)
            take(r, slot: 0, index: UInt32.max, fill: 1)
            take(r, slot: 1, index: 0, fill: 2)
            r.answered(slot: 1, response: UInt32.max)
            r.released(slot: 1)
        }
        let recovered = try open(resume: true).recover()
        XCTAssertEqual(recovered.requestConsumer, 1)
        XCTAssertEqual(recovered.responseProducer, 0)
        XCTAssertEqual(recovered.pending.map(\.index), [UInt32.max])
    }

    func testARecordOfAnotherRingOrNoneIsRefused() throws {
        XCTAssertThrowsError(try open(resume: true)) { XCTAssertTrue("\($0)".contains("no saved ring state"), "\($0)") }
        _ = try open(resume: false)
        var other = identity
        other.ringRefs[2] = 99
        XCTAssertThrowsError(try open(resume: true, identity: other)) { XCTAssertTrue("\($0)".contains("another ring"), "\($0)") }
        XCTAssertThrowsError(try RingRecoveryRecord(path: path, identity: identity, slots: 64, requestSize: 112, resume: true)) {
            XCTAssertTrue("\($0)".contains("bytes, not the"), "\($0)")
        }
        try open(resume: false).remove()
        XCTAssertFalse(FileManager.default.fileExists(atPath: path))
    }
}
