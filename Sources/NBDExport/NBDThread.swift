import Core

/// Starts a detached thread running `body`: connections and the listener each own one. Throws
/// if it cannot start (EAGAIN at the thread limit): the caller fails that connection or that
/// start, not the process.
func spawnThread(_ purpose: String, _ body: @escaping @Sendable () -> Void) throws(ThreadStartError) {
    try PosixThread.detached(purpose, body)
}
