import ArgumentParser

@main
struct SoftDev: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "softdev",
        abstract: "Soft devices: block devices written as small Swift types, served to Xen guests over blkif and to hosts over NBD.",
        subcommands: [Demo.self, Serve.self, Attach.self, Detach.self, List.self, Guest.self, Bench.self, Devices.self, LUKSFormat.self, LUKSAddKey.self])
}
