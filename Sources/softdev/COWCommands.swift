import ArgumentParser
import Core
import Devices

/// `softdev commit STACK`: folds a cow overlay into its base.
struct Commit: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "commit",
        abstract: "Fold a cow overlay into its base: the overlay's clusters are written to the base, the base flushed, then the overlay emptied.",
        discussion: """
            STACK is the cow stack as it is served, e.g. 'cow(base="file(path=base.img, readonly=true)") | file(path=overlay.img)'. \
            The base is opened writable: its spec from base= with every readonly parameter dropped, or --base SPEC. \
            Stop everything that serves the overlay or reads the base first: they would not see the change. \
            If the commit stops half way (a crash, a full disk), the overlay still holds every cluster and the same \
            command runs again. Afterwards the stack reads as before, and the base alone reads the same.
            """)

    @Argument(help: "The cow stack: cow(base=\"SPEC\") | the overlay's device.")
    var stack: String
    @Option(help: "The base to write, when it is not the cow's base= with readonly dropped.")
    var base: String?

    func run() throws {
        let parsed: DeviceSpec
        do { parsed = try DeviceSpec(parsing: stack) } catch { throw ValidationError(error.message) }
        guard parsed.elements.count >= 2, parsed.elements[0].name == "cow",
              let baseParameter = parsed.elements[0].parameters.first(where: { $0.key == "base" })?.value else {
            throw ValidationError("the stack must be cow(base=\"SPEC\") over the overlay's device, e.g. 'cow(base=\"file(path=base.img, readonly=true)\") | file(path=overlay.img)'")
        }
        let baseSpec: String
        if let base {
            baseSpec = base
        } else {
            do {
                var writable = try DeviceSpec(parsing: baseParameter)
                for i in writable.elements.indices { writable.elements[i].parameters.removeAll { $0.key == "readonly" } }
                baseSpec = writable.description
            } catch { throw ValidationError("base=\"\(baseParameter)\": \(error.message)") }
        }
        let overlaySpec = DeviceSpec(elements: Array(parsed.elements.dropFirst()))
        do {
            let baseDevice = try DeviceRegistry.open(baseSpec)
            let overlay: any BlockDevice
            do { overlay = try DeviceRegistry.open(overlaySpec) } catch { baseDevice.close(); throw error }
            let filter: COWFilter
            do { filter = try COWFilter(next: overlay, base: baseDevice) } catch {
                overlay.close(); baseDevice.close()
                throw DeviceSpecError("cow: \(error.message)")
            }
            defer { filter.close() }
            let (clusters, bytes) = try DeviceSpecError.opening { () throws(BlockError) in try filter.commit() }
            print("committed \(clusters) clusters (\(bytes) bytes) of \(filter.label) into \(baseSpec); the overlay is empty")
        } catch let error as DeviceSpecError {
            throw CommandFailure(message: "softdev commit: \(error.message)")
        }
    }
}
