import Foundation
import TestPeers
import XCTest

/// The crash harness on `crypt | file`: 200 SIGKILLs of the serving process during random
/// writes and flushes (SOFTDEV_CRASH_ITERATIONS for more); after each, every flushed write
/// reads back through a freshly unlocked volume, and no sector decrypts to garbage. Every 50
/// kills, and at the end, qemu-img's luks driver opens the image too (the format's own check:
/// `qemu-img check` has none for luks).
final class CryptCrashTests: XCTestCase {
    func testCryptSurvivesSIGKILL() throws {
        let directory = makeTemporaryDirectory(self)
        let key = "\(directory)/key", image = "\(directory)/crash.img"
        FileManager.default.createFile(atPath: key, contents: Data("crash test key".utf8))
        let (status, output) = try Peers.run(try SoftDevBinary.path(), ["luks-format", image, "--size", "2M", "--keyfile", key,
                                                                       "--iter-time", "1", "--zero"])
        XCTAssertEqual(status, 0, output)
        let qemuImg = try Peers.program("qemu-img", package: "qemu-utils")
        var options = CrashHarness.Options(spec: "crypt(keyfile=\(key)) | file(path=\(image))")
        let iterations = options.iterations
        options.check = { iteration in
            guard iteration % 50 == 49 || iteration == iterations - 1 else { return }
            let (status, output) = try Peers.run(qemuImg, ["compare", "--object", "secret,id=s0,file=\(key)", "--image-opts",
                                                           "driver=luks,key-secret=s0,file.filename=\(image)",
                                                           "driver=luks,key-secret=s0,file.filename=\(image)"])
            XCTAssertEqual(status, 0, "qemu-img opens the image after kill \(iteration): \(output)")
        }
        try CrashHarness.runChecked("crypt", options: options, directory: directory)
    }
}
