//! Test-only fault hooks (enabled by the hidden `--fault-hooks` flag): a pause point in the
//! transfer phase and a coordinator that dies right after its first commit, so tests hit
//! the failure windows of a view change deterministically instead of by timing.

use std::sync::atomic::{AtomicBool, Ordering};

use serde::{Deserialize, Serialize};
use tokio::sync::watch;

/// Settings a test writes with `PUT /internal/fault`.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
pub struct FaultSettings {
    /// Hold every transfer at its start until this is cleared.
    #[serde(default)]
    pub pause_transfer: bool,
    /// Exit the process right after the first participant (other than this node) commits.
    #[serde(default)]
    pub exit_after_first_commit: bool,
}

/// What a test reads back with `GET /internal/fault`.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct FaultStatus {
    pub enabled: bool,
    /// A transfer is waiting at the pause point.
    pub waiting_in_transfer: bool,
}

pub struct Faults {
    enabled: bool,
    pause_transfer: watch::Sender<bool>,
    waiting_in_transfer: AtomicBool,
    exit_after_first_commit: AtomicBool,
}

impl Faults {
    pub fn new(enabled: bool) -> Self {
        Faults {
            enabled,
            pause_transfer: watch::Sender::new(false),
            waiting_in_transfer: AtomicBool::new(false),
            exit_after_first_commit: AtomicBool::new(false),
        }
    }

    pub fn enabled(&self) -> bool {
        self.enabled
    }

    pub fn set(&self, settings: FaultSettings) {
        if !self.enabled {
            return;
        }
        self.pause_transfer.send_replace(settings.pause_transfer);
        self.exit_after_first_commit
            .store(settings.exit_after_first_commit, Ordering::SeqCst);
    }

    pub fn status(&self) -> FaultStatus {
        FaultStatus {
            enabled: self.enabled,
            waiting_in_transfer: self.waiting_in_transfer.load(Ordering::SeqCst),
        }
    }

    /// Holds a transfer while the pause is set.
    pub async fn transfer_pause_point(&self) {
        if !self.enabled || !*self.pause_transfer.borrow() {
            return;
        }
        self.waiting_in_transfer.store(true, Ordering::SeqCst);
        let mut paused = self.pause_transfer.subscribe();
        let _ = paused.wait_for(|paused| !*paused).await;
        self.waiting_in_transfer.store(false, Ordering::SeqCst);
    }

    pub fn exit_after_first_commit(&self) -> bool {
        self.enabled && self.exit_after_first_commit.load(Ordering::SeqCst)
    }
}
