import Core
import Devices
import Foundation
import XCTest

final class ErrorFilterTests: XCTestCase {
    func testFailsOnlyTheChosenOperationWithTheChosenError() throws {
        let device = try DeviceRegistry.open("error(error=ENOSPC, error-pwrite-rate=100%) | memory(size=1M)")
        let data = TestBuffer(count: 4096, pattern: 1)
        let result = device.submitAndWait(device.writeRequest(data, at: 0))
        XCTAssertEqual(result.errorCode, .noSpace)
        if case .failure(let error) = result {
            XCTAssertEqual(error.errno, ENOSPC)
            XCTAssertTrue(error.message.hasPrefix("error: injected ENOSPC on pwrite at 0+4096"), error.message)
        }
        XCTAssertThrowsError(try device.writePattern(512, seed: 1, at: 512))
        XCTAssertEqual(try device.readBytes(4096, at: 0), [UInt8](repeating: 0, count: 4096), "reads pass, nothing was written")
        XCTAssertNoThrow(try device.sync.flush())
        XCTAssertNoThrow(try device.sync.discard(at: 0, length: 4096))
    }

    func testPerOperationSettingsOverrideTheGeneralOnes() throws {
        let device = try DeviceRegistry.open("error(error=EIO, error-rate=1, error-pread-rate=0, error-trim=EPERM) | memory(size=1M)")
        XCTAssertNoThrow(try device.readBytes(512, at: 0))
        XCTAssertThrowsError(try device.sync.flush()) { XCTAssertEqual(($0 as? BlockError)?.errno, EIO) }
        XCTAssertThrowsError(try device.sync.discard(at: 0, length: 512)) { XCTAssertEqual(($0 as? BlockError)?.code, .readOnly) }
    }

    func testTheSameSeedFailsTheSameRequests() throws {
        func failures(seed: Int) throws -> [Bool] {
            let device = try DeviceRegistry.open("error(error-rate=0.5, error-seed=\(seed)) | null(size=1M)")
            return (0..<200).map { i in (try? device.readBytes(512, at: UInt64(i % 64) * 512)) == nil }
        }
        let first = try failures(seed: 42)
        XCTAssertEqual(try failures(seed: 42), first, "a seed repeats a run")
        XCTAssertNotEqual(try failures(seed: 43), first)
        XCTAssertTrue((60...140).contains(first.filter { $0 }.count), "about half fail: \(first.filter { $0 }.count)")
    }

    func testFailsOnlyRequestsThatTouchTheRange() throws {
        let device = try DeviceRegistry.open("error(error-rate=1, error-offset=8K, error-range=4K) | memory(size=1M)")
        XCTAssertNoThrow(try device.readBytes(4096, at: 4096), "ends where the range starts")
        XCTAssertThrowsError(try device.readBytes(4096, at: 6144), "overlaps the start")
        XCTAssertThrowsError(try device.readBytes(512, at: 12288 - 512), "inside")
        XCTAssertNoThrow(try device.readBytes(4096, at: 12288), "starts where the range ends")
        XCTAssertThrowsError(try device.sync.flush(), "a flush has no range and may always fail")
    }

    func testErrorFileTurnsInjectionOnAndOff() throws {
        let trigger = makeTemporaryDirectory(self) + "/inject"
        let device = try DeviceRegistry.open("error(error-rate=1, error-file=\(trigger)) | null(size=1M)")
        XCTAssertNoThrow(try device.readBytes(512, at: 0))
        XCTAssertTrue(FileManager.default.createFile(atPath: trigger, contents: nil))
        XCTAssertThrowsError(try device.readBytes(512, at: 0))
        try FileManager.default.removeItem(atPath: trigger)
        XCTAssertNoThrow(try device.readBytes(512, at: 0))
    }

    func testMalformedParametersAreNamed() {
        XCTAssertEqual(specError("error(error-rate=2) | null(size=1M)"),
                       "error: error-rate '2' is not a rate from 0 to 1 (use e.g. 0.1, 10% or 1:10)")
        XCTAssertEqual(specError("error(error=EBADF) | null(size=1M)"),
                       "error: error 'EBADF' is not one of EIO, ENOSPC, EPERM, EINVAL, ENOMEM, ESHUTDOWN, EROFS")
        XCTAssertEqual(specError("error(error-seed=-1) | null(size=1M)"),
                       "error: error-seed '-1' is not a whole number from 0 to 18446744073709551615")
        XCTAssertNil(specError("error(error-rate=1:10, error-zero-rate=5%) | null(size=1M)"))
    }
}
