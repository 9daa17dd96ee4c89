import ArgumentParser

@main
struct SoftDev: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "softdev",
        abstract: "Soft devices: disks, network cards and USB devices written as small Swift types, served to Xen guests over blkif, netif and usbif, and to hosts over NBD and network links.",
        subcommands: [Demo.self, Serve.self, Attach.self, Detach.self, List.self, Guest.self, TypeText.self, Bench.self, Devices.self,
                      LUKSFormat.self, LUKSAddKey.self, Commit.self, CASInfo.self, Snapshot.self, TimeTravelPoints.self, Rollback.self])
}
