// softdev-crash-child SOCKET SPEC: serves the device stack SPEC as the NBD export "d" on the
// unix socket SOCKET, prints "ready" when it listens, and runs until it is killed (the crash
// harness's SIGKILL) or its standard input closes (the test that started it is gone).
// Smaller than `softdev serve` (no hypervisor, no xenstore), so that it starts in milliseconds.
import Core
import Devices
import Glibc
import NBDExport

let arguments = CommandLine.arguments
guard arguments.count == 3 else {
    fputs("usage: softdev-crash-child SOCKET SPEC\n", stderr)
    exit(2)
}
let device: any BlockDevice
do {
    device = try DeviceRegistry.open(arguments[2])
} catch {
    fputs("softdev-crash-child: \(error)\n", stderr)
    exit(1)
}
let server = NBDServer(listen: .unix(path: arguments[1]), exports: [NBDExport(name: "d", device: device)])
do {
    try server.start()
} catch {
    fputs("softdev-crash-child: \(error)\n", stderr)
    exit(1)
}
print("ready")
fflush(stdout)
var byte: UInt8 = 0
while read(0, &byte, 1) > 0 {}
server.stop()
device.close()
exit(0)
