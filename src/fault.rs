//! Test-only fault hooks: pause points in the transfer and commit phases and a coordinator
//! that crashes right after its first commit, so tests hit the failure windows of a view
//! change deterministically instead of by timing. Compiled only with the `fault-hooks`
//! cargo feature (and then enabled by the hidden `--fault-hooks` flag); without it every
//! hook is an empty inline function and `/internal/fault` does not exist.

#[cfg(feature = "fault-hooks")]
pub use hooks::{FaultSettings, FaultStatus, Faults};

#[cfg(not(feature = "fault-hooks"))]
pub use off::Faults;

#[cfg(feature = "fault-hooks")]
mod hooks {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

    use serde::{Deserialize, Serialize};
    use tokio::sync::watch;

    /// Settings a test writes with `PUT /internal/fault`.
    #[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
    pub struct FaultSettings {
        /// Hold every transfer at its start until this is cleared.
        #[serde(default)]
        pub pause_transfer: bool,
        /// Hold every commit on this node (from the coordinator, a peer or the watchdog) at its
        /// start until this is cleared.
        #[serde(default)]
        pub pause_commit: bool,
        /// Exit the process right after the first participant (other than this node) commits.
        #[serde(default)]
        pub exit_after_first_commit: bool,
        /// Exit the process right after this node, coordinating, wrote a change's `Begin`
        /// to the log (before any participant prepared it).
        #[serde(default)]
        pub exit_after_begin: bool,
        /// Holds a coordinator after the catch-up (or a failed phase), before it proposes
        /// its decision to the log.
        #[serde(default)]
        pub pause_decide: bool,
        /// Cuts the node off from its peers: it answers no node-to-node message and sends
        /// none (its HTTP API stays reachable, for the test).
        #[serde(default)]
        pub isolated: bool,
        /// A coordinator leaves the log's voters as they were after a commit (as when its
        /// membership change times out), for the leader's alignment to put right.
        #[serde(default)]
        pub skip_voter_change: bool,
    }

    /// What a test reads back with `GET /internal/fault`.
    #[derive(Debug, Clone, Copy, Serialize, Deserialize)]
    pub struct FaultStatus {
        pub enabled: bool,
        /// A transfer is waiting at the pause point.
        pub waiting_in_transfer: bool,
        /// A commit is waiting at the pause point.
        pub waiting_in_commit: bool,
        pub waiting_to_decide: bool,
        pub isolated: bool,
    }

    /// A point where a phase waits while a test holds it.
    struct PausePoint {
        paused: watch::Sender<bool>,
        waiting: AtomicUsize,
    }

    impl PausePoint {
        fn new() -> Self {
            PausePoint {
                paused: watch::Sender::new(false),
                waiting: AtomicUsize::new(0),
            }
        }

        fn is_waiting(&self) -> bool {
            self.waiting.load(Ordering::SeqCst) > 0
        }

        async fn pass(&self) {
            if !*self.paused.borrow() {
                return;
            }
            /// Counts a waiter out even when its request is cancelled while it waits.
            struct Waiting<'a>(&'a AtomicUsize);
            impl Drop for Waiting<'_> {
                fn drop(&mut self) {
                    self.0.fetch_sub(1, Ordering::SeqCst);
                }
            }
            self.waiting.fetch_add(1, Ordering::SeqCst);
            let _waiting = Waiting(&self.waiting);
            let mut paused = self.paused.subscribe();
            let _ = paused.wait_for(|paused| !*paused).await;
        }
    }

    pub struct Faults {
        enabled: bool,
        transfer: PausePoint,
        commit: PausePoint,
        decide: PausePoint,
        isolated: AtomicBool,
        exit_after_first_commit: AtomicBool,
        exit_after_begin: AtomicBool,
        skip_voter_change: AtomicBool,
        crashed: watch::Sender<bool>,
    }

    impl Faults {
        pub fn new(enabled: bool) -> Self {
            Faults {
                enabled,
                transfer: PausePoint::new(),
                commit: PausePoint::new(),
                decide: PausePoint::new(),
                isolated: AtomicBool::new(false),
                exit_after_first_commit: AtomicBool::new(false),
                exit_after_begin: AtomicBool::new(false),
                skip_voter_change: AtomicBool::new(false),
                crashed: watch::Sender::new(false),
            }
        }

        pub fn enabled(&self) -> bool {
            self.enabled
        }

        pub fn set(&self, settings: FaultSettings) {
            if !self.enabled {
                return;
            }
            self.transfer.paused.send_replace(settings.pause_transfer);
            self.commit.paused.send_replace(settings.pause_commit);
            self.decide.paused.send_replace(settings.pause_decide);
            self.isolated.store(settings.isolated, Ordering::SeqCst);
            self.exit_after_first_commit
                .store(settings.exit_after_first_commit, Ordering::SeqCst);
            self.exit_after_begin
                .store(settings.exit_after_begin, Ordering::SeqCst);
            self.skip_voter_change
                .store(settings.skip_voter_change, Ordering::SeqCst);
        }

        pub fn status(&self) -> FaultStatus {
            FaultStatus {
                enabled: self.enabled,
                waiting_in_transfer: self.transfer.is_waiting(),
                waiting_in_commit: self.commit.is_waiting(),
                waiting_to_decide: self.decide.is_waiting(),
                isolated: self.isolated(),
            }
        }

        /// Holds a transfer while its pause is set.
        pub async fn transfer_pause_point(&self) {
            if self.enabled {
                self.transfer.pass().await;
            }
        }

        /// Holds a commit while its pause is set.
        pub async fn commit_pause_point(&self) {
            if self.enabled {
                self.commit.pass().await;
            }
        }

        /// Holds a coordinator before it proposes its decision, while that pause is set.
        pub async fn decide_pause_point(&self) {
            if self.enabled {
                self.decide.pass().await;
            }
        }

        /// Whether the node is cut off from its peers.
        pub fn isolated(&self) -> bool {
            self.enabled && self.isolated.load(Ordering::SeqCst)
        }

        /// Whether the coordinator is to crash right after its first participant commits.
        pub fn crash_after_first_commit(&self) -> bool {
            self.enabled && self.exit_after_first_commit.load(Ordering::SeqCst)
        }

        /// Whether the coordinator is to crash right after it wrote a change's `Begin`.
        pub fn crash_after_begin(&self) -> bool {
            self.enabled && self.exit_after_begin.load(Ordering::SeqCst)
        }

        /// Whether a coordinator is to leave the log's voters alone after a commit.
        pub fn skip_voter_change(&self) -> bool {
            self.enabled && self.skip_voter_change.load(Ordering::SeqCst)
        }

        /// Asks `main` to end the process at once (exit code 17), as a crash would; the
        /// caller then waits forever, so nothing after the crash point runs.
        pub async fn crash(&self) -> ! {
            self.crashed.send_replace(true);
            std::future::pending().await
        }

        /// Resolves once [`Faults::crash`] was called.
        pub async fn crashed(&self) {
            let _ = self.crashed.subscribe().wait_for(|crashed| *crashed).await;
        }
    }
}

#[cfg(not(feature = "fault-hooks"))]
mod off {
    /// The hooks of a build without the `fault-hooks` feature: none.
    pub struct Faults;

    impl Faults {
        pub fn new(_enabled: bool) -> Self {
            Faults
        }

        #[inline]
        pub fn enabled(&self) -> bool {
            false
        }

        #[inline]
        pub async fn transfer_pause_point(&self) {}

        #[inline]
        pub async fn commit_pause_point(&self) {}

        #[inline]
        pub async fn decide_pause_point(&self) {}

        #[inline]
        pub fn isolated(&self) -> bool {
            false
        }

        #[inline]
        pub fn crash_after_first_commit(&self) -> bool {
            false
        }

        #[inline]
        pub fn crash_after_begin(&self) -> bool {
            false
        }

        #[inline]
        pub fn skip_voter_change(&self) -> bool {
            false
        }

        /// Never called in this build ([`Faults::crash_after_first_commit`] is false).
        pub async fn crash(&self) -> ! {
            std::future::pending().await
        }

        /// Never resolves: nothing crashes on purpose in this build.
        pub async fn crashed(&self) {
            std::future::pending().await
        }
    }
}
