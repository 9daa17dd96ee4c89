import CCrypto
import Core
@testable import Devices
import Foundation
import Glibc
import TestPeers
import XCTest

/// Real clients on a `compress | file` stack served over NBD: qemu-img convert and compare,
/// qemu-io writes, reads and discards, nbdcopy both ways; and the kernel through nbdfuse on a
/// `crypt | compress | file` stack: mkfs.ext4, mount, files, fsck.ext4 -fn clean, files read
/// back after reopening the stack.
final class CompressClientTests: SoftDiskClientTestCase {
    func testQemuImgQemuIOAndNbdcopy() throws {
        let size = 8 << 20
        let container = "\(directory)/c.img"
        let (server, device, uri) = try serve("compress(size=\(size)) | file(path=\(container), size=\(size + (2 << 20)))")
        defer { server.stop(); device.close() }
        // qemu-img: a new device reads as zeroes, then takes an image with zeroes and data.
        let zeroes = "\(directory)/zeroes.raw"
        FileManager.default.createFile(atPath: zeroes, contents: nil)
        truncate(zeroes, off_t(size))
        try run("qemu-img", "qemu-utils", ["compare", "-f", "raw", zeroes, "-F", "raw", uri])
        let source = "\(directory)/source.raw"
        var model = CompressFilterTests.compressible(size, seed: 7)
        model.replaceSubrange((2 << 20)..<(3 << 20), with: repeatElement(0, count: 1 << 20))
        model.replaceSubrange((5 << 20)..<(6 << 20), with: patternBytes(1 << 20, seed: 8))
        FileManager.default.createFile(atPath: source, contents: Data(model))
        try run("qemu-img", "qemu-utils", ["convert", "-n", "-f", "raw", source, "-O", "raw", uri])
        try run("qemu-img", "qemu-utils", ["compare", "-f", "raw", source, "-F", "raw", uri])
        XCTAssertGreaterThan((device as! CompressFilter).ratio, 1.5, (device as! CompressFilter).ratioDescription)

        // qemu-io: unaligned writes, reads with a pattern, a discard (reads as zeroes).
        try run("qemu-io", "qemu-utils", ["-f", "raw", "-c", "write -P 0xab 1000000 70000", "-c", "write -P 0xcd 4096 512", uri])
        model.replaceSubrange(1_000_000..<1_070_000, with: repeatElement(0xAB, count: 70000))
        model.replaceSubrange(4096..<4608, with: repeatElement(0xCD, count: 512))
        let output = try run("qemu-io", "qemu-utils", ["-f", "raw", "-c", "read -P 0xab 1000000 70000", "-c", "read -P 0xcd 4096 512", uri])
        XCTAssertFalse(output.contains("verification failed"), output)
        try run("qemu-io", "qemu-utils", ["-f", "raw", "-c", "discard 4194304 1048576", uri])
        model.replaceSubrange((4 << 20)..<(5 << 20), with: repeatElement(0, count: 1 << 20))

        // nbdcopy: out to a file, then a file in.
        let out = "\(directory)/out.raw"
        try run("nbdcopy", "libnbd-bin", [uri, out])
        XCTAssertTrue(try bytes(out) == model, "nbdcopy reads what qemu-img and qemu-io wrote, zeroes under the discard")
        let other = patternBytes(size, seed: 9)
        FileManager.default.createFile(atPath: source, contents: Data(other))
        try run("nbdcopy", "libnbd-bin", [source, uri])
        try run("qemu-img", "qemu-utils", ["compare", "-f", "raw", source, "-F", "raw", uri])
    }

    func testKernelExt4OnCryptOverCompress() throws {
        try requireKernelPath()
        let container = "\(directory)/c.img"
        let stack = "crypt(passphrase=kernel) | compress | file(path=\(container), size=96M)"
        // The LUKS volume is made on the compress device, through the library.
        do {
            let compress = try DeviceRegistry.open("compress | file(path=\(container), size=96M)")
            defer { compress.close() }
            let cipher = try LUKSCipherSpec(cipherName: "aes", mode: "xts-plain64", keyBytes: 64)
            try LUKSVolume.format(LUKSStorage.device(compress, label: container), options: .init(cipher: cipher, iterationMilliseconds: 5),
                                  passphrase: SecretBytes(utf8: "kernel"), zeroPayload: false)
        }
        var files: [String: Data] = [:]
        do {
            let (server, device, uri) = try serve(stack)
            defer { server.stop(); device.close() }
            try withKernelDisk(uri) { loop, mountPoint in
                try run("mkfs.ext4", "e2fsprogs", ["-q", "-F", loop])
                try run("mount", "mount", [loop, mountPoint])
                files = writeFiles(in: mountPoint)
                try run("umount", "mount", [mountPoint])
                try run("fsck.ext4", "e2fsprogs", ["-fn", loop])
            }
        }
        // Opened again: the files are there and fsck is still clean.
        let (server, device, uri) = try serve(stack)
        defer { server.stop(); device.close() }
        try withKernelDisk(uri) { loop, mountPoint in
            try run("fsck.ext4", "e2fsprogs", ["-fn", loop])
            try run("mount", "mount", ["-o", "ro", loop, mountPoint])
            for (name, data) in files {
                XCTAssertEqual(FileManager.default.contents(atPath: "\(mountPoint)/\(name)"), data, name)
            }
            try run("umount", "mount", [mountPoint])
        }
    }
}
