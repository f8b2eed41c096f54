//! A view change in progress on this node, as the node's shared state holds it: the new
//! view, the ranges it hands over (whose writes it records, and which it freezes before
//! the commit), the ranges it takes over with the keys staged for them, and whether it has
//! shipped what it hands over. The request path sees a change only through
//! [`Migration::hands_over`], [`Migration::record_write`] and [`Migration::is_frozen`];
//! what each phase does is in [`crate::migrate`].

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use parking_lot::Mutex;
use tokio::sync::watch;

use crate::ring::{HashRange, MovedRange, RangeSet};
use crate::shard::ShardMap;
use crate::store::{Packed, StoreError};
use crate::version::Record;
use crate::view::{View, ViewError};

const PREPARED: u8 = 0;
const TRANSFERRED: u8 = 1;
const SHIPPED: u8 = 2;

/// Why a view-change step failed; mapped to replies in `api::reply` (for clients) and in
/// `endpoint` (for the coordinator), one table each.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChangeError {
    #[error("{0}")]
    BadView(ViewError),
    #[error("View change in progress")]
    InProgress,
    #[error("epoch {offered} is not newer than the epoch in force ({current})")]
    StaleEpoch { offered: u64, current: u64 },
    #[error("epoch {offered} is too far ahead of the epoch in force ({current})")]
    EpochTooFar { offered: u64, current: u64 },
    #[error("no prepared change {0} on this node")]
    UnknownChange(u64),
    #[error("{0} does not coordinate this change")]
    NotCoordinator(String),
    #[error("{0} takes no part in this change")]
    NotParticipant(String),
    #[error("change {0} has not shipped what it hands over")]
    NotShipped(u64),
    #[error("the sender does not hand over the range of key {0:?}")]
    NotIncoming(String),
    #[error("staged key {0:?}: {1}")]
    Invalid(String, crate::kv::Invalid),
    #[error("the log aborted change {0}")]
    Aborted(u64),
    #[error("{0} belongs to another cluster's log")]
    OtherGroup(String),
    #[error("Unable to satisfy request")]
    Unreachable(Vec<String>),
    #[error(transparent)]
    Storage(#[from] StoreError),
}

/// A key received for a range this node takes over (a durable node also keeps it in its
/// data dir, in this shape, until the change ends).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Staged {
    /// `None` is a deletion.
    pub value: Option<Bytes>,
    /// Sent by a node of another group that this change merges in: applied only where
    /// this group has no such key (this group's copy, shipped or already here, wins).
    pub foreign: bool,
    /// 0: the bulk transfer; 1: the catch-up, which a late transfer copy never replaces.
    pub round: u8,
}

/// What a change moves on one node: the ranges it hands over, each with its new owner,
/// and those whose keys it takes into its store as they arrive.
pub struct Moves {
    pub outgoing: Vec<MovedRange>,
    pub incoming: RangeSet,
}

/// A replicated change's part of a [`Migration`].
pub struct Replicated {
    pub map: ShardMap,
    pub dropping: Vec<HashRange>,
}

/// A change this node has prepared: the new view, what it hands over, what it receives.
pub struct Migration {
    change_id: u64,
    coordinator: String,
    participants: Vec<String>,
    /// The view in force once the change commits.
    view: Arc<View>,
    /// The ranges this node owns now and hands over, each with its new owner.
    outgoing: Vec<MovedRange>,
    outgoing_set: RangeSet,
    /// How far this node's shipping got: [`PREPARED`], [`TRANSFERRED`] (the bulk transfer
    /// of every outgoing range was accepted) or [`SHIPPED`] (and then the catch-up). Only a
    /// shipped change may drop the outgoing ranges at commit.
    progress: AtomicU8,
    /// Keys written in an outgoing range since prepare: re-sent in the catch-up.
    dirty: Mutex<HashSet<String>>,
    frozen: AtomicBool,
    /// When the catch-up froze the outgoing ranges.
    frozen_at: Mutex<Option<Instant>>,
    /// The ranges this node takes over (owned under the new view, not the current one)
    /// whose keys go straight into the store as they arrive: nothing routes a request
    /// to this node for them until the commit, which then has nothing to apply, and an
    /// abort drops them. Empty in the replicated mode and when another group merges in.
    incoming: RangeSet,
    /// Keys of `incoming` the catch-up wrote: a late copy of the bulk transfer never
    /// undoes them. Locked before `staged`; held while a batch goes into the store.
    caught: Mutex<HashSet<String>>,
    /// Entries taken into the store for `incoming`, and the keys that added there.
    taken_in: std::sync::atomic::AtomicUsize,
    keys_taken_in: std::sync::atomic::AtomicIsize,
    /// Keys received for other ranges this node takes over, applied at the commit;
    /// `None` is a deletion.
    staged: Mutex<HashMap<String, Staged>>,
    /// Participants from another group: their keys never overwrite this group's.
    merging: Vec<String>,
    /// The replicated mode: the shard map after the change, and the ranges this node holds
    /// now and not after it (shipped ranges are not all dropped: a replica that stays in a
    /// shard also ships to a node joining it). Staged values are encoded records, and the
    /// newer version wins.
    replicated: Option<Replicated>,
    ended: watch::Sender<bool>,
    /// Keeps freed memory from going back to the OS until the change ends (each batch's
    /// buffers would otherwise be given back and faulted in again): see [`crate::reclaim`].
    hold: Mutex<Option<crate::reclaim::Hold>>,
    last_heard: Mutex<Instant>,
}

/// A staged value's own copy: a slice of its batch would keep the whole batch's buffer
/// alive until the commit.
fn own(value: &[u8]) -> Bytes {
    Bytes::copy_from_slice(value)
}

impl Migration {
    pub fn change_id(&self) -> u64 {
        self.change_id
    }

    pub fn coordinator(&self) -> &str {
        &self.coordinator
    }

    /// Every node taking part (old view ∪ new view).
    pub fn participants(&self) -> &[String] {
        &self.participants
    }

    /// The view in force once the change commits.
    pub fn view(&self) -> &Arc<View> {
        &self.view
    }

    /// The ranges this node hands over, each with its new owner.
    pub fn outgoing(&self) -> &[MovedRange] {
        &self.outgoing
    }

    /// The replicated mode's part of the change.
    pub fn replicated(&self) -> Option<&Replicated> {
        self.replicated.as_ref()
    }

    /// The ranges the commit drops here: the outgoing ones, or in the replicated mode
    /// those this node no longer holds.
    pub fn dropping(&self) -> Vec<HashRange> {
        match &self.replicated {
            Some(replicated) => replicated.dropping.clone(),
            None => self.outgoing.iter().map(|r| r.range).collect(),
        }
    }

    pub(crate) fn new(
        change_id: u64,
        coordinator: String,
        participants: Vec<String>,
        view: Arc<View>,
        moves: Moves,
        merging: Vec<String>,
        replicated: Option<Replicated>,
    ) -> Self {
        let Moves { outgoing, incoming } = moves;
        Migration {
            incoming,
            caught: Mutex::new(HashSet::new()),
            taken_in: std::sync::atomic::AtomicUsize::new(0),
            keys_taken_in: std::sync::atomic::AtomicIsize::new(0),
            merging,
            replicated,
            change_id,
            coordinator,
            participants,
            view,
            outgoing_set: RangeSet::new(outgoing.iter().map(|r| &r.range)),
            outgoing,
            progress: AtomicU8::new(PREPARED),
            dirty: Mutex::new(HashSet::new()),
            frozen: AtomicBool::new(false),
            frozen_at: Mutex::new(None),
            staged: Mutex::new(HashMap::new()),
            ended: watch::Sender::new(false),
            hold: Mutex::new(Some(crate::reclaim::Hold::new())),
            last_heard: Mutex::new(Instant::now()),
        }
    }

    /// The segments whose keys go into the store as they arrive (dropped on abort).
    pub fn incoming(&self) -> &[(u64, u64)] {
        self.incoming.segments()
    }

    /// How many entries went into the store as they arrived.
    pub fn taken_in(&self) -> usize {
        self.taken_in.load(Ordering::Relaxed)
    }

    /// How many keys the store holds in the incoming ranges (they became this node's at
    /// the commit): what its key count leaves out while the change runs.
    pub fn keys_taken_in(&self) -> usize {
        self.keys_taken_in.load(Ordering::Relaxed).max(0) as usize
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
        self.frozen_at.lock().get_or_insert_with(Instant::now);
        self.frozen.store(true, Ordering::Release);
    }

    /// How long the catch-up's freeze lasted, as the change ends (its caller then releases
    /// the waiters), if this node hands any range over: the window in which requests on
    /// them wait. Counted in `ringkv_handover_freeze_seconds`.
    pub(crate) fn end_freeze(&self) -> Option<std::time::Duration> {
        let frozen = self.frozen_at.lock().take()?.elapsed();
        (!self.outgoing.is_empty()).then(|| {
            crate::metrics::freeze(frozen);
            frozen
        })
    }

    /// Notes a write to `key`, in a range this node hands over: re-sent in the catch-up.
    pub fn record_write(&self, key: &str) {
        let mut dirty = self.dirty.lock();
        if !dirty.contains(key) {
            dirty.insert(key.to_string());
        }
    }

    /// The keys written in the outgoing ranges since prepare (a copy: they stay recorded
    /// until the change ends, so a catch-up that is sent again re-sends them all).
    pub(crate) fn dirty_keys(&self) -> Vec<String> {
        self.dirty.lock().iter().cloned().collect()
    }

    /// Takes a batch from `from`, a participant, if this node owns every key of it under
    /// the new view. (Not "under the sender's ring": nodes started with different views
    /// converge through a change, and each ships what its own ring says it held.) In the
    /// sharded mode, a key of the incoming ranges goes to `store` at once (unless the
    /// catch-up already wrote it and this is the bulk transfer's copy; `store` answers how
    /// many keys that added: 1, 0, or -1 for a deletion), and `keep` is given
    /// the other keys whose staged copy the batch replaced, with that copy, before any other
    /// batch can stage (a durable node writes them to disk, in the order they were taken).
    pub(crate) fn stage(
        &self,
        me: &str,
        from: &str,
        round: u8,
        entries: Packed,
        mut store: impl FnMut(u64, &str, Option<Bytes>) -> Result<isize, ChangeError>,
        keep: impl FnOnce(&[(String, Staged)]) -> Result<(), ChangeError>,
    ) -> Result<(), ChangeError> {
        if !self.participants.iter().any(|p| p == from) {
            return Err(ChangeError::NotParticipant(from.to_string()));
        }
        // The batch is checked whole before any of it is taken, in one pass that keeps each
        // entry's hash for the second. A batch covers runs of one range: the cursor finds
        // each run's segment once.
        let mut incoming = self.incoming.cursor();
        let mut checked = Vec::with_capacity(entries.len());
        for (key, value) in entries.iter() {
            let hash = crate::ring::key_hash(key.as_bytes());
            let (ours, taken_in) = match &self.replicated {
                Some(replicated) => {
                    let shard = replicated.map.shard_of_hash(hash);
                    (shard.replicas.iter().any(|r| r == me), false)
                }
                // A hash in `incoming` is this node's under the new view.
                None if incoming.contains(hash) => (true, true),
                None => (**self.view.ring.owner_of_hash(hash) == *me, false),
            };
            if !ours {
                return Err(ChangeError::NotIncoming(key.to_string()));
            }
            // What a client could not store, no peer may stage either.
            let record;
            let plain = match (&self.replicated, &value) {
                (Some(_), Some(bytes)) => {
                    record = Record::decode(bytes).map_err(|_| {
                        ChangeError::Invalid(key.to_string(), crate::kv::Invalid::NotJson)
                    })?;
                    record.value.as_deref()
                }
                (Some(_), None) => {
                    return Err(ChangeError::Invalid(
                        key.to_string(),
                        crate::kv::Invalid::ValueMissing,
                    ))
                }
                (None, value) => value.as_deref(),
            };
            crate::kv::check_write(key, plain)
                .map_err(|why| ChangeError::Invalid(key.to_string(), why))?;
            checked.push((hash, key, value, taken_in));
        }
        if self.replicated.is_some() {
            // Records from every old replica: the newer version wins, whoever sent it.
            let mut staged = self.staged.lock();
            for (_, key, value, _) in checked {
                let Some(value) = value else {
                    continue; // refused above
                };
                let newer = match staged.get(key).and_then(|s| s.value.as_ref()) {
                    Some(held) => Record::decode(&value)
                        .ok()
                        .is_some_and(|new| new.wins_over(Record::decode(held).ok().as_ref())),
                    None => true,
                };
                if newer {
                    staged.insert(
                        key.to_string(),
                        Staged {
                            value: Some(own(&value)),
                            foreign: false,
                            round,
                        },
                    );
                }
            }
            return Ok(());
        }
        let foreign = self.merging.iter().any(|m| m == from);
        let mut caught = self.caught.lock();
        let mut staged = self.staged.lock();
        let mut taken = Vec::with_capacity(entries.len());
        for (hash, key, value, taken_in) in checked {
            if !foreign && taken_in {
                if round > 0 {
                    caught.insert(key.to_string());
                } else if caught.contains(key) {
                    continue;
                }
                let added = store(hash, key, value)?;
                self.taken_in.fetch_add(1, Ordering::Relaxed);
                self.keys_taken_in.fetch_add(added, Ordering::Relaxed);
                continue;
            }
            let copy = Staged {
                value: value.as_deref().map(own),
                foreign,
                round,
            };
            match staged.entry(key.to_string()) {
                std::collections::hash_map::Entry::Occupied(mut held) => {
                    // This group's copy wins over a merged group's; a merged node's later
                    // copy (its catch-up) replaces only its own earlier one.
                    let (held_foreign, held_round) = (held.get().foreign, held.get().round);
                    if (!foreign || held_foreign)
                        && (held_foreign != foreign || round >= held_round)
                    {
                        taken.push((held.key().clone(), copy.clone()));
                        held.insert(copy);
                    }
                }
                std::collections::hash_map::Entry::Vacant(slot) => {
                    taken.push((slot.key().clone(), copy.clone()));
                    slot.insert(copy);
                }
            }
        }
        keep(&taken)
    }

    /// Whether `sender` is this change's coordinator.
    pub(crate) fn coordinated_by(&self, sender: &str) -> Result<(), ChangeError> {
        if self.coordinator == sender {
            Ok(())
        } else {
            Err(ChangeError::NotCoordinator(sender.to_string()))
        }
    }

    pub(crate) fn mark_transferred(&self) {
        let _ = self.progress.compare_exchange(
            PREPARED,
            TRANSFERRED,
            Ordering::AcqRel,
            Ordering::Acquire,
        );
    }

    /// Whether the bulk transfer completed here (the catch-up must not run before it).
    pub(crate) fn transferred(&self) -> bool {
        self.progress.load(Ordering::Acquire) >= TRANSFERRED
    }

    pub(crate) fn mark_shipped(&self) {
        let _ = self.progress.compare_exchange(
            TRANSFERRED,
            SHIPPED,
            Ordering::AcqRel,
            Ordering::Acquire,
        );
    }

    /// Whether the commit may drop the outgoing ranges: the transfer and then the catch-up
    /// shipped them all (or there are none).
    pub(crate) fn may_drop(&self) -> bool {
        self.outgoing.is_empty() || self.progress.load(Ordering::Acquire) == SHIPPED
    }

    pub(crate) fn take_staged(&self) -> HashMap<String, Staged> {
        std::mem::take(&mut self.staged.lock())
    }

    /// A receiver that turns true once the change is committed or aborted here.
    pub fn ended(&self) -> watch::Receiver<bool> {
        self.ended.subscribe()
    }

    pub(crate) fn end(&self) {
        self.hold.lock().take();
        self.ended.send_replace(true);
    }

    /// Notes that the change is making progress (a message arrived or a batch went out).
    pub(crate) fn touch(&self) {
        *self.last_heard.lock() = Instant::now();
    }

    pub(crate) fn quiet_for(&self) -> std::time::Duration {
        self.last_heard.lock().elapsed()
    }
}
