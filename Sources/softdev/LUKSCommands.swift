import ArgumentParser
import Core
import Devices
import Glibc

/// `--keyfile F | --passphrase P`: the key that opens (or, for luks-format, protects) a volume.
struct LUKSKeyOptions: ParsableArguments {
    @Option(help: "A file whose whole contents are the passphrase (as cryptsetup's --key-file).")
    var keyfile: String?
    @Option(help: "The passphrase itself (tests only: it shows in process lists).")
    var passphrase: String?

    func secret() throws -> SecretBytes {
        try readSecret(keyfile: keyfile, passphrase: passphrase, keyfileOption: "--keyfile", passphraseOption: "--passphrase")
    }
}

/// The passphrase options the LUKS commands share: a key file (its whole contents, as
/// cryptsetup's --key-file) or the passphrase itself (shows in process lists: tests only).
private func readSecret(keyfile: String?, passphrase: String?, keyfileOption: String, passphraseOption: String) throws -> SecretBytes {
    switch (keyfile, passphrase) {
    case (let path?, nil):
        do { return try SecretBytes.contents(ofFile: path, what: keyfileOption) } catch { throw ValidationError(error.message) }
    case (nil, let text?):
        guard !text.isEmpty else { throw ValidationError("\(passphraseOption): the passphrase is empty") }
        warn("\(passphraseOption) shows in process lists and shell history: use \(keyfileOption) outside tests")
        return SecretBytes(utf8: text)
    default:
        throw ValidationError("give exactly one of \(keyfileOption) FILE and \(passphraseOption) TEXT")
    }
}

/// A failure after the arguments were accepted: printed as it is, without the usage.
struct CommandFailure: Error, CustomStringConvertible {
    var message: String
    var description: String { message }
}

private func warn(_ message: String) {
    var line = "softdev: warning: \(message)\n"
    line.withUTF8 { _ = write(2, $0.baseAddress, $0.count) }
}

/// `softdev luks-format PATH --size SIZE`: a new LUKS1 volume in a file.
struct LUKSFormat: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "luks-format",
        abstract: "Create a LUKS1 volume in a new file, for the crypt device (qemu-img's luks driver, nbdkit's luks filter and cryptsetup open it too).",
        discussion: """
            Writes the header with a master key from the kernel's CSPRNG (getrandom), the passphrase in key slot 0 \
            (PBKDF2 iterations measured for --iter-time), and leaves the payload sparse: unwritten sectors read as \
            noise, as on volumes qemu-img and cryptsetup make, unless --zero writes it as encrypted zeroes.
            Example: softdev luks-format disk.img --size 1G --keyfile key && softdev serve --export 'd=crypt(keyfile=key) | file(path=disk.img)'
            """)

    @Argument(help: "The new volume's file (must not exist).")
    var path: String
    @Option(help: "The payload's size (K, M, G, T), a multiple of 512 bytes.")
    var size: String
    @OptionGroup var key: LUKSKeyOptions
    @Option(help: "aes-xts-plain64, aes-cbc-essiv:sha256 or aes-cbc-plain64.")
    var cipher = "aes-xts-plain64"
    @Option(help: "Key size in bits: 256 or 512 for XTS (two AES keys), 128, 192 or 256 for CBC.")
    var keySize = 512
    @Option(help: "PBKDF2's hash: sha1, sha256 or sha512.")
    var hash = "sha256"
    @Option(help: "Milliseconds of PBKDF2 per key slot (cryptsetup's --iter-time).")
    var iterTime = 2000
    @Flag(help: "Write the payload as encrypted zeroes, so that it reads as zeroes (takes as long as writing the whole size).")
    var zero = false

    func run() throws {
        let passphrase = try key.secret()
        guard let bytes = DeviceParameters.parseSize(size), bytes > 0, bytes % 512 == 0 else {
            throw ValidationError("--size \(size): use a positive multiple of 512 bytes, e.g. 1G")
        }
        guard cipher.hasPrefix("aes-") else { throw ValidationError("--cipher \(cipher): only aes (aes-xts-plain64, aes-cbc-essiv:sha256)") }
        guard keySize % 8 == 0 else { throw ValidationError("--key-size \(keySize): a number of bits, e.g. 512") }
        guard iterTime > 0 else { throw ValidationError("--iter-time must be positive") }
        let spec: LUKSCipherSpec
        do { spec = try LUKSCipherSpec(cipherName: "aes", mode: String(cipher.dropFirst(4)), keyBytes: keySize / 8) } catch {
            throw ValidationError("--cipher \(cipher) --key-size \(keySize): \(error.message)")
        }
        let options = LUKSVolume.FormatOptions(cipher: spec, hash: hash, iterationMilliseconds: iterTime)
        do throws(BlockError) {
            let storage = try LUKSStorage.file(path, writable: true, create: LUKSVolume.payloadBytes(options) + bytes)
            do throws(BlockError) {
                let header = try LUKSVolume.format(storage, options: options, passphrase: passphrase, zeroPayload: zero)
                print("\(path): LUKS1 \(spec), \(hash), payload \(bytes) bytes at offset \(UInt64(header.payloadOffset) * 512), uuid \(header.uuid), key slot 0 (\(header.slots[0].iterations) iterations)")
            } catch {
                unlink(path)
                throw error
            }
        } catch {
            throw CommandFailure(message: error.message)
        }
    }
}

/// `softdev luks-add-key PATH`: another passphrase for a LUKS1 volume.
struct LUKSAddKey: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "luks-add-key",
        abstract: "Add a key slot to a LUKS1 volume: an existing passphrase opens it, the new one goes in a free slot.",
        discussion: "Example: softdev luks-add-key disk.img --keyfile old.key --new-keyfile new.key")

    @Argument(help: "The volume's file.")
    var path: String
    @OptionGroup(title: "An existing key") var key: LUKSKeyOptions
    @Option(help: "A file holding the new passphrase.")
    var newKeyfile: String?
    @Option(help: "The new passphrase (tests only).")
    var newPassphrase: String?
    @Option(help: "The slot to fill, 0-7 (default: the first free one).")
    var slot: Int?
    @Option(help: "Milliseconds of PBKDF2 for the new slot.")
    var iterTime = 2000

    func run() throws {
        let existing = try key.secret()
        let new = try readSecret(keyfile: newKeyfile, passphrase: newPassphrase, keyfileOption: "--new-keyfile", passphraseOption: "--new-passphrase")
        guard iterTime > 0 else { throw ValidationError("--iter-time must be positive") }
        do throws(BlockError) {
            let storage = try LUKSStorage.file(path, writable: true)
            let used = try LUKSVolume.addKey(storage, existing: existing, newPassphrase: new, slot: slot, iterationMilliseconds: iterTime)
            print("\(path): key slot \(used) added")
        } catch {
            throw CommandFailure(message: error.message)
        }
    }
}
