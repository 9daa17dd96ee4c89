import CCrypto
import Core
@testable import Devices
import Foundation
import Glibc
import Synchronization
import TestPeers
import XCTest

/// The `crypt` filter (LUKS1) against qemu-img's luks driver and nbdkit's luks filter, both
/// ways, byte for byte; key slots, wrong keys, damaged headers; the filter's own paths.
final class CryptFilterTests: XCTestCase {
    private var directory = ""

    override func setUp() {
        directory = makeTemporaryDirectory(self)
    }

    // MARK: Helpers

    /// A key file holding `text` (no newline: the whole file is the passphrase).
    private func keyfile(_ name: String, _ text: String) -> String {
        let path = "\(directory)/\(name)"
        FileManager.default.createFile(atPath: path, contents: Data(text.utf8))
        return path
    }

    /// `softdev luks-format` with a short PBKDF2 time.
    private func format(_ image: String, size: String, arguments: [String]) throws {
        let (status, output) = try Peers.run(try SoftDevBinary.path(), ["luks-format", image, "--size", size, "--iter-time", "10"] + arguments)
        XCTAssertEqual(status, 0, output)
    }

    private static func pattern(_ count: Int, seed: UInt64) -> [UInt8] { patternBytes(count, seed: seed) }

    private func write(_ device: any BlockDevice, _ bytes: [UInt8], at offset: UInt64) throws {
        let buffer = TestBuffer(count: bytes.count)
        bytes.withUnsafeBytes { buffer.vector.pointee.iov_base!.copyMemory(from: $0.baseAddress!, byteCount: bytes.count) }
        try withExtendedLifetime(buffer) { try device.sync.write(from: buffer.buffers, at: offset, fua: false) }
    }

    /// A plaintext image's expected contents: what `writes` put over zeroes.
    private func expected(size: Int, _ writes: [(UInt64, [UInt8])]) -> [UInt8] {
        var image = [UInt8](repeating: 0, count: size)
        for (offset, bytes) in writes { image.replaceSubrange(Int(offset)..<Int(offset) + bytes.count, with: bytes) }
        return image
    }

    /// Some writes: aligned, unaligned to 4 KiB, large (several of the filter's pieces), at the end.
    private func workload(size: Int) -> [(UInt64, [UInt8])] {
        [(0, Self.pattern(4096, seed: 1)), (512 * 9, Self.pattern(512 * 3, seed: 2)), (1 << 20, Self.pattern(3 << 20 | 512, seed: 3)),
         (UInt64(size - 8192), Self.pattern(8192, seed: 4)), (65536, Self.pattern(512, seed: 5))]
    }

    private func qemuImg() throws -> String { try Peers.program("qemu-img", package: "qemu-utils") }

    /// The plaintext of a LUKS image as qemu-img's luks driver reads it.
    private func qemuPlaintext(_ image: String, key: String) throws -> [UInt8] {
        let out = "\(directory)/out-\(UUID().uuidString).raw"
        let (status, output) = try Peers.run(try qemuImg(), ["convert", "--object", "secret,id=s0,file=\(key)", "--image-opts",
                                                            "driver=luks,key-secret=s0,file.filename=\(image)", "-O", "raw", out])
        XCTAssertEqual(status, 0, output)
        defer { unlink(out) }
        return [UInt8](try Data(contentsOf: URL(fileURLWithPath: out)))
    }

    private func open(_ spec: String) throws -> any BlockDevice {
        do { return try DeviceRegistry.open(spec) } catch { XCTFail("\(spec): \(error)"); throw error }
    }

    // MARK: Interoperability

    /// SoftDev formats (both ciphers, both hashes) and writes through `crypt | file`; qemu-img's
    /// luks driver reads the same bytes.
    func testSoftDevVolumesReadByQemuImg() throws {
        let key = keyfile("k", "correct horse battery staple")
        let size = 8 << 20
        for (index, variant) in [["--cipher", "aes-xts-plain64", "--key-size", "512", "--hash", "sha256"],
                                 ["--cipher", "aes-xts-plain64", "--key-size", "256", "--hash", "sha1"],
                                 ["--cipher", "aes-cbc-essiv:sha256", "--key-size", "256", "--hash", "sha256"]].enumerated() {
            let image = "\(directory)/v\(index).img"
            try format(image, size: "8M", arguments: ["--keyfile", key, "--zero"] + variant)
            let device = try open("crypt(keyfile=\(key)) | file(path=\(image))")
            XCTAssertEqual(device.geometry.size, UInt64(size))
            let writes = workload(size: size)
            for (offset, bytes) in writes { try write(device, bytes, at: offset) }
            try device.sync.flush()
            device.close()
            XCTAssertTrue(try qemuPlaintext(image, key: key) == expected(size: size, writes), "qemu-img reads what SoftDev wrote (\(variant))")
        }
    }

    /// `qemu-img create -f luks`, again while it fails as QEMU before 10.0 does on a fast CPU:
    /// it times its first 2^15 PBKDF2 iterations on the thread's CPU clock, which counts in
    /// scheduler ticks, and refuses a time of 0 ms ("Unable to get accurate CPU usage"; fixed
    /// upstream in January 2025 by iterating more). Whether the iterations span a tick is luck.
    private func qemuCreateLUKS(_ qemu: String, _ arguments: [String]) throws -> (status: Int32, output: String) {
        var result = try Peers.run(qemu, arguments)
        for _ in 0..<20 where result.0 != 0 && result.1.contains("Unable to get accurate CPU usage") {
            result = try Peers.run(qemu, arguments)
        }
        return result
    }

    /// qemu-img creates LUKS volumes (its default, cbc-essiv, aes-128 xts with sha1) and writes
    /// them from a raw file; SoftDev reads the same bytes, and what SoftDev writes over them
    /// qemu-img reads back.
    func testQemuImgVolumesOpenInSoftDev() throws {
        let qemu = try qemuImg()
        let key = keyfile("k", "qemu secret")
        let size = 6 << 20
        let raw = "\(directory)/plain.raw"
        let plain = Self.pattern(size, seed: 42)
        FileManager.default.createFile(atPath: raw, contents: Data(plain))
        for (index, options) in ["iter-time=10",
                                 "iter-time=10,cipher-alg=aes-256,cipher-mode=cbc,ivgen-alg=essiv,ivgen-hash-alg=sha256",
                                 "iter-time=10,cipher-alg=aes-128,cipher-mode=xts,hash-alg=sha1"].enumerated() {
            let image = "\(directory)/q\(index).img"
            var (status, output) = try qemuCreateLUKS(qemu, ["create", "-f", "luks", "--object", "secret,id=s0,file=\(key)",
                                                             "-o", "key-secret=s0,\(options)", image, "\(size)"])
            XCTAssertEqual(status, 0, output)
            (status, output) = try Peers.run(qemu, ["convert", "-n", "--object", "secret,id=s0,file=\(key)", "-f", "raw", raw,
                                                   "--target-image-opts", "driver=luks,key-secret=s0,file.filename=\(image)"])
            XCTAssertEqual(status, 0, output)
            let device = try open("crypt(keyfile=\(key)) | file(path=\(image))")
            XCTAssertEqual(device.geometry.size, UInt64(size))
            XCTAssertTrue(try device.readBytes(size, at: 0) == plain, "SoftDev reads what qemu-img wrote (\(options))")
            let patch = Self.pattern(20480, seed: 7)
            try write(device, patch, at: 1 << 20)
            device.close()
            var expectedImage = plain
            expectedImage.replaceSubrange((1 << 20)..<((1 << 20) + patch.count), with: patch)
            XCTAssertTrue(try qemuPlaintext(image, key: key) == expectedImage, "qemu-img reads SoftDev's write (\(options))")
        }
    }

    /// nbdkit's luks filter (`passphrase=+FILE`) reads an image SoftDev wrote, and writes one
    /// SoftDev then reads.
    func testNbdkitLuksFilterBothWays() throws {
        let nbdkit = try Peers.program("nbdkit", package: "nbdkit")
        let key = keyfile("k", "nbdkit passphrase")
        let image = "\(directory)/n.img"
        let size = 8 << 20
        try format(image, size: "8M", arguments: ["--keyfile", key, "--zero"])
        let ours = try open("crypt(keyfile=\(key)) | file(path=\(image))")
        let writes = workload(size: size)
        for (offset, bytes) in writes { try write(ours, bytes, at: offset) }
        ours.close()

        let socket = "\(directory)/nbdkit.sock"
        let process = Process()
        process.executableURL = URL(fileURLWithPath: nbdkit)
        process.arguments = ["-f", "-U", socket, "file", image, "--filter=luks", "passphrase=+\(key)"]
        try process.run()
        defer { process.terminate(); process.waitUntilExit() }
        for _ in 0..<500 where !FileManager.default.fileExists(atPath: socket) { usleep(10_000) }
        let remote = try NBDDevice(address: .unix(path: socket))
        XCTAssertEqual(remote.geometry.size, UInt64(size))
        XCTAssertTrue(try remote.readBytes(size, at: 0) == expected(size: size, writes), "nbdkit's luks filter reads what SoftDev wrote")
        let patch = Self.pattern(8192, seed: 9)
        try write(remote, patch, at: 12288)
        try remote.sync.flush()
        remote.close()

        let again = try open("crypt(keyfile=\(key)) | file(path=\(image))")
        defer { again.close() }
        XCTAssertTrue(try again.readBytes(patch.count, at: 12288) == patch, "SoftDev reads what nbdkit's luks filter wrote")
    }

    /// libgcrypt's XTS, a data unit per sector, gives OpenSSL's own EVP_aes_*_xts bytes: both
    /// key sizes, both directions, in place and not, sector numbers that cross 2^32 and 2^64.
    func testXTSMatchesOpenSSL() throws {
        for keyBytes in [32, 64] {
            for encrypt in [true, false] {
                let key = try LUKSCrypto.random(keyBytes)
                let spec = try LUKSCipherSpec(cipherName: "aes", mode: "xts-plain64", keyBytes: keyBytes)
                let ours = try LUKSSectorCipher(spec: spec, key: key, encrypt: encrypt)
                let reference = EVP_CIPHER_CTX_new()
                defer { EVP_CIPHER_CTX_free(reference) }
                XCTAssertEqual(EVP_CipherInit_ex(reference, keyBytes == 64 ? EVP_aes_256_xts() : EVP_aes_128_xts(), nil,
                                                 key.pointer.assumingMemoryBound(to: UInt8.self), nil, encrypt ? 1 : 0), 1)
                for (count, first) in [(1, UInt64(0)), (37, 0x1_2345_6789), (16, 5), (100, UInt64.max - 200)] {
                    let input = Self.pattern(count * 512, seed: UInt64(count))
                    var expected = [UInt8](repeating: 0, count: input.count), actual = input, outOfPlace = expected
                    XCTAssertEqual(ccrypto_sectors(reference, nil, input, &expected, count, first), 1)
                    XCTAssertTrue(actual.withUnsafeMutableBytes { ours.run($0.baseAddress!, $0.baseAddress!, sectors: count, first: first) })
                    XCTAssertTrue(input.withUnsafeBytes { i in outOfPlace.withUnsafeMutableBytes { ours.run(i.baseAddress!, $0.baseAddress!, sectors: count, first: first) } })
                    XCTAssertTrue(actual == expected && outOfPlace == expected, "\(keyBytes * 8)-bit key, encrypt \(encrypt), \(count) sectors from \(first)")
                }
            }
        }
    }

    // MARK: Keys

    /// Three key slots (a key file, a second key file, a passphrase): each opens the volume, in
    /// SoftDev and in qemu-img; the slot that opened it is the one added for it.
    func testSeveralKeySlots() throws {
        let first = keyfile("k1", "first key"), second = keyfile("k2", "second key")
        let image = "\(directory)/s.img"
        try format(image, size: "2M", arguments: ["--keyfile", first, "--zero"])
        var (status, output) = try Peers.run(try SoftDevBinary.path(), ["luks-add-key", image, "--keyfile", first, "--new-keyfile", second,
                                                                       "--iter-time", "10"])
        XCTAssertEqual(status, 0, output)
        XCTAssertTrue(output.contains("key slot 1 added"), output)
        (status, output) = try Peers.run(try SoftDevBinary.path(), ["luks-add-key", image, "--keyfile", second, "--new-passphrase", "third one",
                                                                   "--iter-time", "10", "--slot", "5"])
        XCTAssertEqual(status, 0, output)
        XCTAssertTrue(output.contains("key slot 5 added"), output)
        let data = Self.pattern(4096, seed: 11)
        let writer = try open("crypt(keyfile=\(second)) | file(path=\(image))") as! CryptFilter
        XCTAssertEqual(writer.unlockedSlot, 1)
        try write(writer, data, at: 0)
        writer.close()
        for (spec, slot) in [("keyfile=\(first)", 0), ("keyfile=\(second)", 1), ("passphrase=\"third one\"", 5)] {
            let device = try open("crypt(\(spec)) | file(path=\(image))") as! CryptFilter
            XCTAssertEqual(device.unlockedSlot, slot, spec)
            XCTAssertTrue(try device.readBytes(4096, at: 0) == data, spec)
            device.close()
        }
        XCTAssertTrue(try qemuPlaintext(image, key: second).prefix(4096).elementsEqual(data), "qemu-img opens with the second slot")
    }

    /// A wrong passphrase is refused, naming the file and the slots tried; so are both or
    /// neither of keyfile and passphrase, an empty key file and a missing one.
    func testWrongKeyIsRefused() throws {
        let key = keyfile("k", "right"), wrong = keyfile("w", "wrong"), empty = keyfile("e", "")
        let image = "\(directory)/w.img"
        try format(image, size: "1M", arguments: ["--keyfile", key])
        let message = openError("crypt(keyfile=\(wrong)) | file(path=\(image))")
        XCTAssertTrue(message.contains("wrong passphrase") && message.contains(image) && message.contains("tried slot 0"), message)
        XCTAssertTrue(openError("crypt(passphrase=righ) | file(path=\(image))").contains("wrong passphrase"))
        XCTAssertTrue(openError("crypt | file(path=\(image))").contains("exactly one of keyfile= and passphrase="))
        XCTAssertTrue(openError("crypt(keyfile=\(key), passphrase=x) | file(path=\(image))").contains("exactly one"))
        XCTAssertTrue(openError("crypt(keyfile=\(empty)) | file(path=\(image))").contains("is empty"))
        XCTAssertTrue(openError("crypt(keyfile=\(directory)/none) | file(path=\(image))").contains("cannot open"))
        let (status, output) = try Peers.run(try SoftDevBinary.path(), ["luks-add-key", image, "--keyfile", wrong, "--new-keyfile", wrong,
                                                                       "--iter-time", "10"])
        XCTAssertNotEqual(status, 0)
        XCTAssertTrue(output.contains("wrong passphrase"), output)
    }

    // MARK: Damaged headers

    /// Truncated volumes and damaged fields give an error naming the file and the offset; a
    /// byte flipped anywhere in the header never crashes and never opens with the wrong key
    /// material (it fails, or opens and reads the right data).
    func testTruncatedAndCorruptedHeaders() throws {
        let key = keyfile("k", "header test")
        let image = "\(directory)/h.img"
        try format(image, size: "1M", arguments: ["--keyfile", key, "--zero"])
        let spec = "crypt(keyfile=\(key)) | file(path=\(image))"
        let image_ = try DamagedImage(path: image, spec: spec)
        let good = image_.good
        func damaged(_ change: (inout [UInt8]) -> Void) -> String { image_.open(change) }
        func check(_ message: String, _ fragments: [String], file: StaticString = #filePath, line: UInt = #line) {
            image_.check(message, fragments, file: file, line: line)
        }
        check(damaged { $0 = Array($0.prefix(100)) }, [])   // the file device: "the file is empty" (under a sector)
        check(damaged { $0 = Array($0.prefix(1000)) }, ["offset 0", "truncated"])
        check(damaged { $0 = Array($0.prefix(4096)) }, ["truncated"])   // header whole, key material and payload gone
        check(damaged { $0 = Array($0.prefix(200 * 1024)) }, ["offset", "truncated"])
        check(damaged { $0[0] = 0x4D }, ["offset 0", "bad magic"])
        check(damaged { $0[7] = 2 }, ["offset 6", "version 2"])
        check(damaged { $0.replaceSubrange(8..<11, with: Array("des".utf8)) }, ["offset 8", "cipher 'des'"])
        check(damaged { $0.replaceSubrange(40..<51, with: Array("ecb-plain64".utf8)) }, ["offset 40", "ecb-plain64"])
        check(damaged { $0.replaceSubrange(72..<78, with: Array("md5\0\0\0".utf8)) }, ["offset 72", "md5"])
        check(damaged { $0[104] = 0x7F }, ["offset 104", "past the end"])
        check(damaged { $0[111] = 48 }, ["offset 108"])
        check(damaged { $0[164...167] = [0, 0, 0, 0] }, ["offset 164"])
        check(damaged { $0[208] = 0x11 }, ["offset 208", "key slot 0"])
        check(damaged { $0[208 + 46] = 0 }, ["offset 252", "stripes"])
        check(damaged { $0[208 + 40] = 0x7F }, ["offset 248", "key material"])
        check(damaged { $0[208 + 8] ^= 1 }, ["wrong passphrase"])   // the salt: the key no longer opens it
        check(damaged { $0[4096 + 77] ^= 1 }, ["wrong passphrase"])   // the key material
        check(damaged { $0[112] ^= 1 }, ["wrong passphrase"])   // the master key digest
        // Every byte of the header and a slot, flipped: an error or the right data, never a trap.
        var opened = 0
        for offset in stride(from: 0, to: LUKSHeader.size, by: 7) {
            var bytes = good
            bytes[offset] ^= 0xA5
            FileManager.default.createFile(atPath: image, contents: Data(bytes))
            if let device = try? DeviceRegistry.open(spec) {
                opened += 1
                XCTAssertTrue(try device.readBytes(512, at: 0) == [UInt8](repeating: 0, count: 512), "flip at \(offset) opened with the right key")
                device.close()
            }
        }
        XCTAssertGreaterThan(opened, 0, "flips in unused fields (the uuid, disabled slots) still open")
        // The same checks without a file below: the message names the device.
        let message = openError("crypt(keyfile=\(key)) | memory(size=1M)")
        XCTAssertTrue(message.contains("memory") && message.contains("offset 0"), message)
    }

    // MARK: The filter's own paths

    /// Over a memory device (completions inside `submit`, so pieces loop rather than recurse),
    /// formatted through the library: writes split across iovecs mid-sector, writes of several
    /// pieces, the caller's buffer left alone, the ciphertext below not the plaintext,
    /// write-zeroes as encrypted zeroes, discard off by default, extents all data, reads into
    /// split buffers.
    func testFilterPathsOverMemory() throws {
        let raw = try DeviceRegistry.open("memory(size=8M)")
        let cipher = try LUKSCipherSpec(cipherName: "aes", mode: "xts-plain64", keyBytes: 64)
        try LUKSVolume.format(LUKSStorage.device(raw, label: "memory"), options: .init(cipher: cipher, iterationMilliseconds: 5),
                              passphrase: SecretBytes(utf8: "memory"), zeroPayload: true)
        let device = try CryptFilter(next: raw, passphrase: SecretBytes(utf8: "memory"))
        defer { device.close() }
        XCTAssertFalse(device.capabilities.contains(.discard))
        XCTAssertFalse(device.capabilities.contains(.extents))
        XCTAssertTrue(device.capabilities.contains(.writeZeroes))
        XCTAssertEqual(device.payloadStart, 2 << 20)
        XCTAssertEqual(device.geometry.size, 6 << 20)

        // A write in three iovecs of 700, 1000 and 348 bytes (sectors straddle them).
        let data = Self.pattern(2048, seed: 21)
        let memory = UnsafeMutableRawPointer.allocate(byteCount: 2048, alignment: 4096)
        defer { memory.deallocate() }
        data.withUnsafeBytes { memory.copyMemory(from: $0.baseAddress!, byteCount: 2048) }
        let vectors = UnsafeMutablePointer<iovec>.allocate(capacity: 3)
        defer { vectors.deallocate() }
        vectors[0] = iovec(iov_base: memory, iov_len: 700)
        vectors[1] = iovec(iov_base: memory + 700, iov_len: 1000)
        vectors[2] = iovec(iov_base: memory + 1700, iov_len: 348)
        try device.sync.write(from: IOBuffers(vectors, count: 3), at: 4096, fua: true)
        XCTAssertTrue(Array(UnsafeRawBufferPointer(start: memory, count: 2048)) == data, "the caller's buffer is unchanged")
        XCTAssertTrue(try device.readBytes(2048, at: 4096) == data)
        memset(memory, 0, 2048)
        try device.sync.read(into: IOBuffers(vectors, count: 3), at: 4096)
        XCTAssertTrue(Array(UnsafeRawBufferPointer(start: memory, count: 2048)) == data, "read into split buffers")

        // Below, the ciphertext.
        XCTAssertFalse(try raw.readBytes(2048, at: device.payloadStart + 4096) == data)

        // 3.5 MiB: four pieces.
        let big = Self.pattern(7 << 19, seed: 22)
        try write(device, big, at: 512)
        XCTAssertTrue(try device.readBytes(big.count, at: 512) == big)

        // Write-zeroes: zeroes above, noise below.
        try device.sync.writeZeroes(at: 1 << 20, length: 2 << 20, mayDiscard: true)
        XCTAssertTrue(try device.readBytes(2 << 20, at: 1 << 20).allSatisfy { $0 == 0 })
        XCTAssertFalse(try raw.readBytes(4096, at: device.payloadStart + (1 << 20)).allSatisfy { $0 == 0 })

        XCTAssertEqual(device.submitAndWait(BlockRequest(operation: .discard, offset: 0, length: 4096)).errorCode, .notSupported)
        XCTAssertEqual(try device.extents(at: 0, length: 1 << 20), [BlockExtent(offset: 0, length: 1 << 20, isHole: false, isZero: false)])
        XCTAssertEqual(device.submitAndWait(BlockRequest(operation: .read, offset: device.geometry.size, length: 512,
                                                         buffers: TestBuffer(count: 512).buffers)).errorCode, .outOfRange)
    }

    /// Many requests in flight at once from several threads through an O_DIRECT file (libaio
    /// completions on another thread): each reads back what it wrote; the pool of contexts grows
    /// to the queue and is reused.
    func testConcurrentRequests() throws {
        let key = keyfile("k", "concurrent")
        let image = "\(directory)/c.img"
        try format(image, size: "8M", arguments: ["--keyfile", key])
        let device = try open("crypt(keyfile=\(key)) | file(path=\(image))")
        defer { device.close() }
        let buffers = (0..<64).map { TestBuffer(count: 65536, pattern: UInt8($0)) }
        let completions = Completions()
        for (i, buffer) in buffers.enumerated() { device.submit(device.writeRequest(buffer, at: UInt64(i) * 65536 * 2), completion: completions.completion(UInt64(i))) }
        XCTAssertTrue(completions.wait(for: 64).values.allSatisfy { $0 == .success })
        let reads = (0..<64).map { _ in TestBuffer(count: 65536) }
        let readCompletions = Completions()
        for (i, buffer) in reads.enumerated() { device.submit(device.readRequest(buffer, at: UInt64(i) * 65536 * 2), completion: readCompletions.completion(UInt64(i))) }
        XCTAssertTrue(readCompletions.wait(for: 64).values.allSatisfy { $0 == .success })
        for (i, buffer) in reads.enumerated() { XCTAssertTrue(buffer.bytes == TestBuffer.expected(65536, UInt8(i)), "request \(i)") }
    }

    /// Requests large enough to be split with the cipher helpers, all in flight at once through
    /// an O_DIRECT file: writes from one buffer, from 4 KiB pages, from buffers that split
    /// sectors, of several pieces; reads into one buffer, into 4 KiB pages and into buffers that
    /// split sectors. Each reads back in every shape, and qemu-img's luks driver reads the same
    /// plaintext (every sector numbered as XTS wants, whoever ciphered it).
    func testLargeRequestsSplitWithTheHelpers() throws {
        let key = keyfile("k", "split")
        let image = "\(directory)/split.img"
        try format(image, size: "8M", arguments: ["--keyfile", key, "--zero"])
        let device = try open("crypt(keyfile=\(key)) | file(path=\(image))")
        defer { device.close() }
        /// A buffer of `bytes`, cut into iovecs of the sizes `cuts` gives in turn.
        final class Scattered {
            let memory: UnsafeMutableRawPointer
            let vectors: UnsafeMutablePointer<iovec>
            let count: Int
            init(_ bytes: [UInt8], cuts: [Int]) {
                let memory = UnsafeMutableRawPointer.allocate(byteCount: max(bytes.count, 1), alignment: 4096)
                bytes.withUnsafeBytes { memory.copyMemory(from: $0.baseAddress!, byteCount: bytes.count) }
                self.memory = memory
                var sizes: [Int] = []
                var left = bytes.count
                while left > 0 { let n = min(left, cuts[sizes.count % cuts.count]); sizes.append(n); left -= n }
                vectors = .allocate(capacity: sizes.count)
                var at = 0
                for (i, n) in sizes.enumerated() { vectors[i] = iovec(iov_base: memory + at, iov_len: n); at += n }
                count = sizes.count
            }
            deinit { memory.deallocate(); vectors.deallocate() }
            var buffers: IOBuffers { IOBuffers(vectors, count: count) }
            var bytes: [UInt8] { Array(UnsafeRawBufferPointer(start: memory, count: buffers.byteCount)) }
        }
        let shapes = [[1 << 30], [4096], [700, 1000, 348, 4096]]
        let writes: [(offset: UInt64, bytes: [UInt8], cuts: [Int])] = [
            (0, Self.pattern(1 << 20, seed: 31), shapes[0]),
            (1 << 20, Self.pattern(256 << 10, seed: 32), shapes[1]),
            ((1 << 20) + (256 << 10), Self.pattern(384 << 10, seed: 33), shapes[2]),
            (2 << 20, Self.pattern((3 << 19) + 512, seed: 34), shapes[0]),
        ]
        let sources = writes.map { Scattered($0.bytes, cuts: $0.cuts) }
        let written = Completions()
        for (i, w) in writes.enumerated() {
            device.submit(BlockRequest(operation: .write, offset: w.offset, length: UInt64(w.bytes.count), buffers: sources[i].buffers),
                          completion: written.completion(UInt64(i)))
        }
        XCTAssertTrue(written.wait(for: writes.count).values.allSatisfy { $0 == .success })
        for (i, w) in writes.enumerated() { XCTAssertTrue(sources[i].bytes == w.bytes, "write \(i): the caller's buffers are unchanged") }
        // Every write read back in every shape, all at once.
        var reads: [(Int, Scattered)] = []
        for (i, w) in writes.enumerated() {
            for cuts in shapes { reads.append((i, Scattered([UInt8](repeating: 0xEE, count: w.bytes.count), cuts: cuts))) }
        }
        let read = Completions()
        for (k, (i, target)) in reads.enumerated() {
            device.submit(BlockRequest(operation: .read, offset: writes[i].offset, length: UInt64(writes[i].bytes.count), buffers: target.buffers),
                          completion: read.completion(UInt64(k)))
        }
        XCTAssertTrue(read.wait(for: reads.count).values.allSatisfy { $0 == .success })
        for (k, (i, target)) in reads.enumerated() { XCTAssertTrue(target.bytes == writes[i].bytes, "read \(k) of write \(i)") }
        device.close()
        let size = 8 << 20   // --size is the payload's
        let plaintext = try qemuPlaintext(image, key: key)
        XCTAssertEqual(plaintext.count, size)
        XCTAssertTrue(plaintext == expected(size: size, writes.map { ($0.offset, $0.bytes) }), "qemu-img reads what was written")
    }

    /// A run split between helpers gives the bytes one context gives, for every split size
    /// (sector counts that do not divide evenly, runs just under and over the split threshold),
    /// several callers at once, and decrypts back.
    func testParallelCipherMatchesOneContext() throws {
        let spec = try LUKSCipherSpec(cipherName: "aes", mode: "xts-plain64", keyBytes: 64)
        let key = SecretBytes(count: 64)
        for i in 0..<64 { key.pointer.storeBytes(of: UInt8(truncatingIfNeeded: i &* 7 &+ 1), toByteOffset: i, as: UInt8.self) }
        let crew = try ParallelSectorCipher(spec: spec, key: key, helpers: 3)
        defer { crew.stop() }
        let single = try LUKSSectorCipher(spec: spec, key: key, encrypt: true)
        for sectors in [1, 255, 256, 257, 2047, 2048, 4093] {
            let plain = (0..<(sectors * 512)).map { UInt8(truncatingIfNeeded: $0 &* 31 &+ sectors) }
            var expected = [UInt8](repeating: 0, count: plain.count)
            XCTAssertTrue(single.run(plain, &expected, sectors: sectors, first: 1000))
            // Four callers on the same crew at once, each with its own contexts.
            let results = Mutex<[[UInt8]]>([])
            DispatchQueue.concurrentPerform(iterations: 4) { _ in
                let encryptor = try! LUKSSectorCipher(spec: spec, key: key, encrypt: true)
                let decryptor = try! LUKSSectorCipher(spec: spec, key: key, encrypt: false)
                var out = [UInt8](repeating: 0, count: plain.count)
                let ok = plain.withUnsafeBytes { p in out.withUnsafeMutableBytes { o in
                    crew.run(encrypt: true, p.baseAddress!, o.baseAddress!, sectors: sectors, first: 1000, local: encryptor) } }
                var back = out
                let decrypted = back.withUnsafeMutableBytes { b in
                    crew.run(encrypt: false, b.baseAddress!, b.baseAddress!, sectors: sectors, first: 1000, local: decryptor) }
                results.withLock { $0.append(ok && decrypted ? out + back : []) }
            }
            for result in results.withLock({ $0 }) {
                XCTAssertTrue(result == expected + plain, "\(sectors) sectors")
            }
        }
    }
}
