import ArgumentParser
import Devices
import Foundation

/// `softdev cas-info STORE [--verify]`: what a content-addressable store holds and saves.
struct CASInfo: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "cas-info",
        abstract: "Show a cas store's disks, its chunks and what deduplication saved; --verify checks every chunk against its SHA-256.",
        discussion: """
            Opening the store collects the chunks no disk names (as every open of the store does), so run it while no \
            softdev serves the store (a store is served by one process at a time). Exits 1 if --verify finds a damaged chunk.
            Example: softdev cas-info /var/lib/softdev/store --verify
            """)

    @Argument(help: "The store's directory (the cas device's store=).")
    var store: String
    @Flag(help: "Read every chunk a disk names and check it against the SHA-256 in the index.")
    var verify = false

    func run() throws {
        let report: CASStoreReport
        do { report = try CASStoreReport.read(store: store, verify: verify) } catch { throw CommandFailure(message: error.message) }
        for disk in report.disks {
            print("disk \(disk.path): \(disk.size) bytes, \(disk.blocksInUse) of \(disk.size / 4096) blocks hold data")
        }
        print("chunks stored: \(report.chunks) (\(report.storedBytes) bytes) for \(report.references) blocks (\(report.logicalBytes) bytes)")
        print(String(format: "saved by deduplication: %.1f%% (%.2fx)", report.savings * 100,
                     report.storedBytes == 0 ? 1.0 : Double(report.logicalBytes) / Double(report.storedBytes)))
        if verify {
            for line in report.damaged { print("damaged: \(line)") }
            print(report.damaged.isEmpty ? "verified: every chunk matches its hash" : "verify: \(report.damaged.count) damaged chunks")
            if !report.damaged.isEmpty { throw ExitCode(1) }
        }
    }
}
