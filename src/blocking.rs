//! Running a CPU-bound pass (a scan of a store, a batch of a transfer) without holding up
//! the other tasks of its runtime thread.

/// Runs `scan` (a pass over a whole store or a slice of it, a batch of keys) so that it
/// does not hold up the other tasks of its runtime thread (requests, the log's heartbeats):
/// on a multi-threaded runtime they move to another thread meanwhile.
pub fn off_runtime<R>(scan: impl FnOnce() -> R) -> R {
    match tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor()) {
        Ok(tokio::runtime::RuntimeFlavor::MultiThread) => tokio::task::block_in_place(scan),
        _ => scan(),
    }
}
