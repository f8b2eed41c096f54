//! When a durable node's journal reaches the disk (`--fsync`, in Redis's words): `always`
//! acknowledges a write only once an fsync covers it, with group commit (one syncer thread
//! fsyncs whatever was written while the previous fsync ran, so concurrent writers share
//! one); `everysec` fsyncs once a second; `no` leaves it to the OS. Every write reaches
//! the OS's buffers before it is acknowledged, whatever the policy: a killed process loses
//! nothing.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};
use tokio::sync::watch;

/// `--fsync`: when the journal is forced to disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FsyncPolicy {
    /// After every write, before its reply (concurrent writes share one fsync).
    Always,
    /// Once a second: a crash of the machine loses at most about the last second.
    Everysec,
    /// Never by ringkv: the OS writes the journal out when it sees fit.
    No,
}

impl std::fmt::Display for FsyncPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            FsyncPolicy::Always => "always",
            FsyncPolicy::Everysec => "everysec",
            FsyncPolicy::No => "no",
        })
    }
}

/// What a writer awaits before acknowledging: its writes as durable as the policy asks.
pub struct Durable {
    wait: Option<(watch::Receiver<u64>, u64)>,
}

impl Durable {
    /// Nothing to wait for (the memory engine, or a policy that does not wait).
    pub fn now() -> Durable {
        Durable { wait: None }
    }

    /// Resolves once an fsync covered the writes made before this was taken (or the
    /// syncer stopped: the node is going down, and the write is not acknowledged anyway).
    /// The wait is boxed, so a caller's future stays small when there is nothing to wait
    /// for (a key request's future is moved into place on every request).
    pub fn wait(self) -> impl std::future::Future<Output = ()> {
        let pending = self.wait.map(|(mut synced, target)| {
            Box::pin(async move {
                let _ = synced.wait_for(|done| *done >= target).await;
            })
        });
        async move {
            if let Some(pending) = pending {
                pending.await;
            }
        }
    }
}

/// The fsyncs done so far, for the metrics.
#[derive(Debug, Default, Clone, Copy)]
pub struct SyncStats {
    pub fsyncs: u64,
    pub fsync_micros: u64,
}

/// Counts the writes made and the writes an fsync covered, and runs the syncer thread.
pub struct Syncer {
    policy: FsyncPolicy,
    /// Writes made (each one counted after it reached the journal).
    written: AtomicU64,
    /// Writes an fsync covered.
    synced: watch::Sender<u64>,
    wake: Condvar,
    waiting: Mutex<bool>,
    stop: AtomicBool,
    fsyncs: AtomicU64,
    fsync_micros: AtomicU64,
}

impl Syncer {
    /// A syncer that forces the journal to disk with `fsync` (called on its own thread),
    /// as `policy` asks.
    pub fn start(
        policy: FsyncPolicy,
        mut fsync: impl FnMut() -> std::io::Result<()> + Send + 'static,
    ) -> Arc<Syncer> {
        let syncer = Arc::new(Syncer {
            policy,
            written: AtomicU64::new(0),
            synced: watch::Sender::new(0),
            wake: Condvar::new(),
            waiting: Mutex::new(false),
            stop: AtomicBool::new(false),
            fsyncs: AtomicU64::new(0),
            fsync_micros: AtomicU64::new(0),
        });
        if policy != FsyncPolicy::No {
            let running = syncer.clone();
            std::thread::Builder::new()
                .name("ringkv-fsync".into())
                .spawn(move || running.run(&mut fsync))
                .expect("the OS starts a thread");
        }
        syncer
    }

    pub fn policy(&self) -> FsyncPolicy {
        self.policy
    }

    /// Counts one write that reached the journal.
    pub fn wrote(&self) {
        self.written.fetch_add(1, Ordering::SeqCst);
        if self.policy == FsyncPolicy::Always {
            let mut waiting = self.waiting.lock();
            *waiting = true;
            self.wake.notify_one();
        }
    }

    /// What a writer awaits before acknowledging the writes it made.
    pub fn durable(&self) -> Durable {
        match self.policy {
            FsyncPolicy::Always => Durable {
                wait: Some((self.synced.subscribe(), self.written.load(Ordering::SeqCst))),
            },
            FsyncPolicy::Everysec | FsyncPolicy::No => Durable::now(),
        }
    }

    pub fn stats(&self) -> SyncStats {
        SyncStats {
            fsyncs: self.fsyncs.load(Ordering::Relaxed),
            fsync_micros: self.fsync_micros.load(Ordering::Relaxed),
        }
    }

    /// Stops the syncer thread after one last fsync (the node is shutting down).
    pub fn stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
        let _guard = self.waiting.lock();
        self.wake.notify_one();
    }

    fn run(&self, fsync: &mut impl FnMut() -> std::io::Result<()>) {
        loop {
            match self.policy {
                FsyncPolicy::Always => {
                    let mut waiting = self.waiting.lock();
                    while !*waiting && !self.stop.load(Ordering::SeqCst) {
                        self.wake.wait(&mut waiting);
                    }
                    *waiting = false;
                }
                FsyncPolicy::Everysec => {
                    let mut waiting = self.waiting.lock();
                    if !self.stop.load(Ordering::SeqCst) {
                        self.wake.wait_for(&mut waiting, Duration::from_secs(1));
                    }
                }
                FsyncPolicy::No => return,
            }
            // Every write counted before this load reached the journal before it.
            let target = self.written.load(Ordering::SeqCst);
            if target > *self.synced.borrow() {
                let started = Instant::now();
                match fsync() {
                    Ok(()) => {
                        self.fsyncs.fetch_add(1, Ordering::Relaxed);
                        self.fsync_micros
                            .fetch_add(started.elapsed().as_micros() as u64, Ordering::Relaxed);
                        self.synced.send_replace(target);
                    }
                    // The writes stay unacknowledged under `always`; tried again next round.
                    Err(error) => tracing::error!(%error, "fsync of the journal failed"),
                }
            }
            if self.stop.load(Ordering::SeqCst) {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn always_acknowledges_after_an_fsync_that_covers_the_write() {
        let count = Arc::new(AtomicU64::new(0));
        let counted = count.clone();
        let syncer = Syncer::start(FsyncPolicy::Always, move || {
            counted.fetch_add(1, Ordering::SeqCst);
            Ok(())
        });
        syncer.wrote();
        syncer.durable().wait().await;
        assert!(count.load(Ordering::SeqCst) >= 1);
        assert!(*syncer.synced.borrow() >= 1);
        syncer.stop();
    }

    #[tokio::test]
    async fn everysec_and_no_do_not_hold_the_writer() {
        for policy in [FsyncPolicy::Everysec, FsyncPolicy::No] {
            let syncer = Syncer::start(policy, || Ok(()));
            syncer.wrote();
            assert!(syncer.durable().wait.is_none());
            syncer.stop();
        }
    }
}
