//! Online view change. [`coordinator`] drives prepare → transfer → catch-up → commit across
//! the nodes of the old and new view; this module is the participant's side: the state of a
//! prepared change and what each phase does on this node. [`transfer`] ships key ranges.

pub mod coordinator;
mod participant;
mod transfer;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use parking_lot::Mutex;
use tokio::sync::watch;

use crate::ring::{MovedRange, RangeSet};
use crate::view::{View, ViewError};

pub use participant::{abort, catch_up, commit, prepare, stage, transfer};

/// Why a view-change step failed; mapped to replies in `api::reply`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChangeError {
    #[error("{0}")]
    BadView(ViewError),
    #[error("View change in progress")]
    InProgress,
    #[error("epoch {offered} is not newer than the epoch in force ({current})")]
    StaleEpoch { offered: u64, current: u64 },
    #[error("no prepared change {0} on this node")]
    UnknownChange(u64),
    #[error("Unable to satisfy request")]
    Unreachable(Vec<String>),
    #[error(transparent)]
    Storage(#[from] crate::store::StoreError),
}

/// A change this node has prepared: the new view, what it hands over, what it receives.
pub struct Migration {
    pub change_id: u64,
    pub coordinator: String,
    pub participants: Vec<String>,
    /// The view in force once the change commits.
    pub view: Arc<View>,
    /// The ranges this node owns now and hands over, each with its new owner.
    pub outgoing: Vec<MovedRange>,
    outgoing_set: RangeSet,
    /// Keys written in an outgoing range since prepare: re-sent in the catch-up.
    dirty: Mutex<HashSet<String>>,
    frozen: AtomicBool,
    /// Keys received for ranges this node takes over; `None` is a deletion.
    staged: Mutex<HashMap<String, Option<Bytes>>>,
    ended: watch::Sender<bool>,
    last_heard: Mutex<Instant>,
}

impl Migration {
    pub(crate) fn new(
        change_id: u64,
        coordinator: String,
        participants: Vec<String>,
        view: Arc<View>,
        outgoing: Vec<MovedRange>,
    ) -> Self {
        Migration {
            change_id,
            coordinator,
            participants,
            view,
            outgoing_set: RangeSet::new(outgoing.iter().map(|r| &r.range)),
            outgoing,
            dirty: Mutex::new(HashSet::new()),
            frozen: AtomicBool::new(false),
            staged: Mutex::new(HashMap::new()),
            ended: watch::Sender::new(false),
            last_heard: Mutex::new(Instant::now()),
        }
    }

    /// Whether a key with this hash is in a range this node hands over.
    #[inline]
    pub fn hands_over(&self, hash: u64) -> bool {
        self.outgoing_set.contains(hash)
    }

    pub fn is_frozen(&self) -> bool {
        self.frozen.load(Ordering::Acquire)
    }

    pub(crate) fn freeze(&self) {
        self.frozen.store(true, Ordering::Release);
    }

    pub fn mark_dirty(&self, key: &str) {
        let mut dirty = self.dirty.lock();
        if !dirty.contains(key) {
            dirty.insert(key.to_string());
        }
    }

    fn take_dirty(&self) -> HashSet<String> {
        std::mem::take(&mut self.dirty.lock())
    }

    fn stage(&self, entries: Vec<crate::store::Entry>) {
        let mut staged = self.staged.lock();
        for entry in entries {
            staged.insert(entry.key, entry.value);
        }
    }

    fn take_staged(&self) -> HashMap<String, Option<Bytes>> {
        std::mem::take(&mut self.staged.lock())
    }

    /// A receiver that turns true once the change is committed or aborted here.
    pub fn ended(&self) -> watch::Receiver<bool> {
        self.ended.subscribe()
    }

    pub(crate) fn end(&self) {
        self.ended.send_replace(true);
    }

    /// Notes that the change is making progress (a message arrived or a batch went out).
    pub(crate) fn touch(&self) {
        *self.last_heard.lock() = Instant::now();
    }

    fn quiet_for(&self) -> std::time::Duration {
        self.last_heard.lock().elapsed()
    }
}
