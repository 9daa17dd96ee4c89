import CXen
import Foundation

/// Where the threads of a ring benchmark run: the guest's thread (the caller) on one CPU, every
/// other thread of the process (the backends' ring threads, SoftDev's and the C reference's
/// alike) on the others, as a guest's vCPU and dom0's vCPUs are different physical CPUs under
/// Xen. Left to the scheduler on a two-CPU machine, the busy threads now and then shared a CPU
/// or moved mid-row: the C backend's 64-byte tx rate varied 8.7-14.3M frames/s between runs
/// and a ratio by half; placed, it was 14.1-15.4M in 10 runs of 12 (5.2M and 10.4M in the
/// other two: a virtual machine's vCPUs still share their host, whose load comes and goes).
/// Threads started later run where the thread that started them may.
struct BenchCPUPlacement: CustomStringConvertible {
    let allowed: [Int32]
    let guestCPU: Int32
    var backendCPUs: [Int32] { allowed.filter { $0 != guestCPU } }

    /// Places the threads; nil (nothing changed) when fewer than two CPUs are allowed.
    static func separateGuest() -> BenchCPUPlacement? {
        var cpus = [Int32](repeating: 0, count: 1024)
        let n = cxen_allowed_cpus(&cpus, Int32(cpus.count))
        guard n >= 2 else { return nil }
        let placement = BenchCPUPlacement(allowed: Array(cpus.prefix(Int(n))), guestCPU: cpus[0])
        let me = cxen_gettid()
        for tid in threads() where tid != me { placement.set(tid, placement.backendCPUs) }
        placement.set(me, [placement.guestCPU])
        return placement
    }

    /// Lets every thread run on every allowed CPU again (the TAP rows' iperf3 processes are
    /// started by the guest's thread and would inherit its single CPU).
    func restore() {
        for tid in Self.threads() { set(tid, allowed) }
    }

    var description: String {
        "the guest's thread on CPU \(guestCPU), the backends' threads on CPU \(backendCPUs.map(String.init).joined(separator: ","))"
    }

    private func set(_ tid: Int32, _ cpus: [Int32]) {
        _ = cpus.withUnsafeBufferPointer { cxen_set_thread_cpus(tid, $0.baseAddress, Int32($0.count)) }   // a thread gone meanwhile: nothing to place
    }

    private static func threads() -> [Int32] {
        ((try? FileManager.default.contentsOfDirectory(atPath: "/proc/self/task")) ?? []).compactMap { Int32($0) }
    }
}
