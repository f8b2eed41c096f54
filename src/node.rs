//! A node's shared state: its settings, store and peers, the view in force and whether it
//! is confirmed, the view change in progress, and the outcomes of past changes. Everything
//! is behind narrow methods; what a request does is in [`crate::data`], what a view change
//! does in [`crate::migrate`].
//!
//! Lock order: `change_lock` (async, serialises prepare/commit/abort) before `state`
//! (the view and change slot, a short-held RwLock); `learning` (async) is taken before
//! `change_lock` when a catch-up commits; `coordinating` is only ever tried; `undecided` and
//! `outcomes` are leaf locks taken alone. `meta` (the log handle) is taken after `state`
//! (a view switch asks whether this node is a member) and never holds another lock;
//! `restarts` is a leaf. `state` is never read twice on one thread (no method that reads
//! it is called while its guard is held): parking_lot's lock is fair, so a second read
//! behind a waiting writer never returns.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use parking_lot::{Mutex, RwLock};
use tokio::sync::watch;

use crate::change::Migration;
use crate::config::Config;
use crate::consensus::Metadata;
use crate::datadir::{DataDir, DataDirError};
use crate::fault::Faults;
use crate::peers::Peers;
use crate::replication::{Replication, ReplicationError};
use crate::rpc::client::Identity;
use crate::store::durable::DurableEngine;
use crate::store::Store;
use crate::view::View;
use crate::wire::{ChangeReport, NodeState, Outcome};

/// How many change outcomes a node remembers for peers that lost their coordinator.
const REMEMBERED_OUTCOMES: usize = 64;

/// Whether this node knows which view is in force, and so may route keys.
///
/// A node's `VIEW` is what it was told at start, not necessarily what its peers hold: until
/// the other members confirm it (see [`crate::join`]), key requests wait, bounded by the
/// forwarding timeout, and then get 503 rather than an answer from a ring nobody else holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Standing {
    /// Asking the other members of the start view which view they hold.
    Confirming,
    /// The view this node routes by is the one its members hold.
    InForce,
    /// The members hold views that contradict each other; no view can be told to be in force.
    Disputed,
}

struct State {
    view: Arc<View>,
    migration: Option<Arc<Migration>>,
}

/// Where a key with a given hash lives, as [`Node::placement`] shows it.
pub enum Placement<'a> {
    /// This node owns it, and the change in progress if its range is being handed over.
    Owner(Option<&'a Migration>),
    /// Another node owns it under this view.
    NotOwner(&'a Arc<View>),
}

/// One ringkv node.
pub struct Node {
    config: Config,
    address: Arc<str>,
    store: Store,
    peers: Peers,
    faults: Faults,
    state: RwLock<State>,
    /// This node as it introduces itself on RPC connections.
    identity: Identity,
    /// Held while this node fetches a newer view it heard of (one fetch at a time).
    learning: tokio::sync::Mutex<()>,
    /// Serialises prepare, commit and abort on this node.
    change_lock: tokio::sync::Mutex<()>,
    /// Held while this node coordinates a view change.
    coordinating: tokio::sync::Mutex<()>,
    /// The change this node coordinates and has not decided yet: pending to peers that ask,
    /// even when this node takes no part in it (it is in neither view).
    undecided: Mutex<Option<u64>>,
    outcomes: Mutex<VecDeque<(u64, Outcome)>>,
    /// The last change this node froze ranges for, and for how long (microseconds).
    last_freeze: Mutex<Option<(u64, u64)>>,
    /// The last view change this node coordinated.
    last_change: Mutex<Option<ChangeReport>>,
    /// Key requests waiting right now for a range being handed over.
    waiting_for_handover: AtomicUsize,
    /// Whether the view is known to be in force; written only under the `state` lock.
    standing: watch::Sender<Standing>,
    /// `standing == InForce`, read on every key request without touching the watch.
    in_force: AtomicBool,
    /// The metadata log, once started ([`Node::start_log`]); replaced when the node leaves
    /// its group to join another (`migrate::reset`).
    meta: RwLock<Option<Arc<Metadata>>>,
    /// Set when this node finds the group holding its address under another Raft id: it
    /// restarted empty, and the keys it held are gone.
    restarted: AtomicBool,
    /// Members that told this node they restarted empty.
    restarts: Mutex<std::collections::BTreeSet<String>>,
    /// The replicated mode's state (`--repl-factor`); `None` in the sharded mode.
    replication: Option<Replication>,
    /// `--data-dir`: where the keys and the metadata log are kept.
    data_dir: Option<DataDir>,
    /// The store, as the durable engine it is with a data dir (for its disk's metrics).
    disk: Option<Arc<DurableEngine>>,
}

/// Why a node could not be built from its configuration.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error(transparent)]
    Replication(#[from] ReplicationError),
    #[error(transparent)]
    DataDir(#[from] DataDirError),
}

impl Node {
    pub fn new(config: Config) -> Result<Arc<Node>, NodeError> {
        let view =
            View::new(0, config.view.clone(), config.vnodes).map_err(ReplicationError::from)?;
        let (store, data_dir, disk) = match &config.data_dir {
            None => (crate::store::memory(), None, None),
            Some(path) => {
                let dir = DataDir::open(path, &config.address, config.cluster_token.as_ref())?;
                let (engine, recovered) = dir.keys(config.fsync)?;
                tracing::info!(
                    data_dir = %path.display(),
                    keys = recovered.keys,
                    millis = recovered.millis,
                    fsync = %config.fsync,
                    "recovered the keys on disk"
                );
                let engine = Arc::new(engine);
                (engine.clone() as Store, Some(dir), Some(engine))
            }
        };
        let replication = match config.repl_factor {
            Some(factor) => Some(Replication::new(
                &config.address,
                &config.view,
                factor,
                config.vnodes,
                store.clone(),
            )?),
            None => None,
        };
        // Alone in its view (or a forwarding instance, which routes nothing) a node has
        // nobody to confirm its view with.
        let alone = view.members.iter().all(|m| *m == config.address);
        let standing = if alone || config.forwarding_address.is_some() {
            Standing::InForce
        } else {
            Standing::Confirming
        };
        let identity = Identity {
            address: config.address.clone(),
            vnodes: config.vnodes,
            repl_factor: config.repl_factor.unwrap_or(0) as u32,
            token: config.cluster_token.clone(),
        };
        let peers = Peers::new(
            identity.clone(),
            config.forward_timeout,
            config.connect_window,
            config.max_forwards,
        );
        Ok(Arc::new(Node {
            address: Arc::from(config.address.as_str()),
            store,
            peers,
            faults: Faults::new(config.fault_hooks),
            state: RwLock::new(State {
                view,
                migration: None,
            }),
            identity,
            learning: tokio::sync::Mutex::new(()),
            change_lock: tokio::sync::Mutex::new(()),
            coordinating: tokio::sync::Mutex::new(()),
            undecided: Mutex::new(None),
            outcomes: Mutex::new(VecDeque::new()),
            last_freeze: Mutex::new(None),
            last_change: Mutex::new(None),
            waiting_for_handover: AtomicUsize::new(0),
            in_force: AtomicBool::new(standing == Standing::InForce),
            standing: watch::Sender::new(standing),
            meta: RwLock::new(None),
            restarted: AtomicBool::new(false),
            restarts: Mutex::new(Default::default()),
            replication,
            data_dir,
            disk,
            config,
        }))
    }

    /// The durable engine, when the node keeps its keys on disk (`--data-dir`).
    pub fn disk(&self) -> Option<&DurableEngine> {
        self.disk.as_deref()
    }

    /// The data directory (`--data-dir`), if any.
    pub fn data_dir(&self) -> Option<&DataDir> {
        self.data_dir.as_ref()
    }

    /// Starts this node's part of the metadata log: before serving (with a data dir, the
    /// log and incarnation kept there), and again as a new incarnation (`fresh`) when the
    /// node leaves its group's log.
    pub async fn start_log(
        &self,
        effects: Arc<dyn crate::consensus::Effects>,
        transport: Arc<dyn crate::consensus::Transport>,
        fresh: bool,
    ) -> Result<(), String> {
        let disk = match &self.data_dir {
            Some(dir) => Some(dir.log().map_err(|e| e.to_string())?),
            None => None,
        };
        let meta = Metadata::start(effects.clone(), transport, disk, fresh).await?;
        tracing::info!(raft_id = meta.id(), "metadata log started");
        let old = self.meta.write().replace(Arc::new(meta));
        if let Some(old) = old {
            old.shutdown().await;
        }
        // A log replayed from the data dir applied its entries before this node knew its
        // Raft id, so it could not tell whether it is a member of the view they hold: it
        // is told the state again now that it can.
        if let Some(state) = self.meta().map(|m| m.state()) {
            let _ = tokio::task::spawn_blocking(move || effects.installed(&state)).await;
        }
        Ok(())
    }

    /// The metadata log; `None` only before [`Node::start_log`].
    pub fn meta(&self) -> Option<Arc<Metadata>> {
        self.meta.read().clone()
    }

    /// Whether this node is a member of the view in force as the log it applies says.
    pub fn is_log_member(&self) -> bool {
        self.meta().is_some_and(|m| m.is_member(&self.address))
    }

    /// Marks this node as one that restarted empty under an address the group knows.
    pub(crate) fn set_restarted(&self, restarted: bool) {
        self.restarted.store(restarted, Ordering::Release);
    }

    /// Whether this node restarted empty and has not been taken back by a view change: the
    /// keys the group expects it to hold are gone.
    pub fn restarted(&self) -> bool {
        self.restarted.load(Ordering::Acquire)
    }

    /// Routes by exactly this view from now on (the log, or the group this node follows,
    /// holds it): at least as new as the current one, and in force.
    pub(crate) fn follow(&self, epoch: u64, members: Vec<String>) {
        let id = crate::view::view_id(&members);
        let current = |state: &State| {
            state.view.epoch > epoch
                || (state.view.epoch == epoch
                    && state.view.id == id
                    && self.in_force.load(Ordering::Acquire))
        };
        if current(&self.state.read()) {
            return;
        }
        // The ring is built before the write lock: requests keep routing meanwhile.
        let Ok(view) = View::new(epoch, members, self.config.vnodes) else {
            tracing::warn!(epoch, "refusing an invalid view");
            return;
        };
        let mut state = self.state.write();
        if current(&state) {
            return;
        }
        tracing::info!(
            epoch,
            view = %view.members_text(),
            member = view.members.iter().any(|m| *m == *self.address),
            "routing by the group's view"
        );
        self.take_view(&mut state, view);
    }

    /// Routes by `view` from now on, in force; a prepared change it supersedes ends. The
    /// caller holds the state write lock.
    fn take_view(&self, state: &mut State, view: Arc<View>) {
        if let Some(stale) = state.migration.take_if(|m| m.view().epoch <= view.epoch) {
            tracing::warn!(
                change = stale.change_id(),
                "a newer view superseded the prepared change"
            );
            stale.end();
        }
        state.view = view;
        self.set_standing(Standing::InForce);
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    /// This node's own address, as its peers see it.
    pub fn address(&self) -> &Arc<str> {
        &self.address
    }

    /// The replicated mode's state, when the node serves that contract.
    pub fn replication(&self) -> Option<&Replication> {
        self.replication.as_ref()
    }

    /// The keys this node stores: its replica's live keys in the replicated mode.
    pub fn key_count(&self) -> usize {
        match self.replication.as_ref().and_then(|r| r.replica()) {
            Some(replica) => replica.live_keys(),
            None if self.replication.is_some() => 0,
            // Not the keys a change in progress is taking in: they are not this node's yet.
            None => self
                .store
                .len()
                .saturating_sub(self.migration().map_or(0, |m| m.keys_taken_in())),
        }
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    pub fn peers(&self) -> &Peers {
        &self.peers
    }

    pub fn faults(&self) -> &Faults {
        &self.faults
    }

    pub(crate) fn identity(&self) -> &Identity {
        &self.identity
    }

    /// The right to catch up with a newer view; one catch-up runs at a time.
    pub(crate) async fn learning(&self) -> tokio::sync::MutexGuard<'_, ()> {
        self.learning.lock().await
    }

    /// Serialises prepare, commit and abort on this node.
    pub(crate) fn change_lock(&self) -> &tokio::sync::Mutex<()> {
        &self.change_lock
    }

    /// Held while this node coordinates a view change.
    pub(crate) fn coordinating(&self) -> &tokio::sync::Mutex<()> {
        &self.coordinating
    }

    /// The last view change this node coordinated.
    pub fn last_change(&self) -> Option<ChangeReport> {
        self.last_change.lock().clone()
    }

    pub(crate) fn set_last_change(&self, report: ChangeReport) {
        *self.last_change.lock() = Some(report);
    }

    /// Runs `f` with where the key of `hash` lives, under the view lock: a freeze of its
    /// range waits until `f` is done, so no write that missed the freeze is applied after.
    pub(crate) fn placement<R>(&self, hash: u64, f: impl FnOnce(Placement<'_>) -> R) -> R {
        let state = self.state.read();
        if *state.view.ring.owner_of_hash(hash) != self.address {
            return f(Placement::NotOwner(&state.view));
        }
        let moving = state.migration.as_deref().filter(|m| m.hands_over(hash));
        f(Placement::Owner(moving))
    }

    /// Runs `f` with the prepared change if it hands the range of `hash` over, under the
    /// view lock (as [`Node::placement`] does): a freeze waits until `f` is done.
    pub(crate) fn in_handover<R>(&self, hash: u64, f: impl FnOnce(Option<&Migration>) -> R) -> R {
        let state = self.state.read();
        f(state.migration.as_deref().filter(|m| m.hands_over(hash)))
    }

    /// Waits (bounded by the forwarding timeout) for a frozen range to be released; false
    /// if it was not.
    pub(crate) async fn wait_for_release(&self, mut ended: watch::Receiver<bool>) -> bool {
        /// Counts the request out even when it is cancelled while it waits.
        struct Waiting<'a>(&'a AtomicUsize);
        impl Drop for Waiting<'_> {
            fn drop(&mut self) {
                self.0.fetch_sub(1, Ordering::Relaxed);
            }
        }
        self.waiting_for_handover.fetch_add(1, Ordering::Relaxed);
        let _waiting = Waiting(&self.waiting_for_handover);
        tokio::time::timeout(self.peers.timeout(), ended.wait_for(|ended| *ended))
            .await
            .is_ok()
    }

    /// The view in force on this node.
    pub fn view(&self) -> Arc<View> {
        self.state.read().view.clone()
    }

    /// The change this node has prepared and not yet committed or aborted.
    pub fn migration(&self) -> Option<Arc<Migration>> {
        self.state.read().migration.clone()
    }

    /// Whether this node knows that the view it routes by is in force.
    pub fn standing(&self) -> Standing {
        *self.standing.borrow()
    }

    /// Sets the standing; the caller holds the `state` write lock, so a view switch and the
    /// standing it implies are seen together.
    fn set_standing(&self, standing: Standing) {
        self.in_force
            .store(standing == Standing::InForce, Ordering::Release);
        self.standing.send_if_modified(|current| {
            let changed = *current != standing;
            *current = standing;
            changed
        });
    }

    /// Waits (bounded by the forwarding timeout) until the view in force is known; the
    /// standing it still has otherwise.
    pub async fn wait_until_in_force(&self) -> Result<(), Standing> {
        if self.in_force.load(Ordering::Acquire) {
            return Ok(());
        }
        // Kept out of the caller's future: a request in force never holds these.
        Box::pin(self.wait_for_force()).await
    }

    async fn wait_for_force(&self) -> Result<(), Standing> {
        let mut standing = self.standing.subscribe();
        let settled = tokio::time::timeout(
            self.peers.timeout(),
            standing.wait_for(|s| *s == Standing::InForce),
        )
        .await;
        match settled {
            Ok(Ok(_)) => Ok(()),
            _ => Err(self.standing()),
        }
    }

    /// Key requests get 503: the nodes this one asked belong to two groups (see
    /// [`crate::join`]).
    pub(crate) fn dispute(&self) {
        let _state = self.state.write();
        if !self.in_force.load(Ordering::Acquire) {
            self.set_standing(Standing::Disputed);
        }
    }

    /// Notes that `address` restarted empty as Raft node `raft_id` (it said so).
    pub(crate) fn note_restart(&self, address: &str, raft_id: u64) {
        let known = self
            .meta()
            .and_then(|m| m.state().ids.get(address).copied());
        if known.is_some_and(|id| id != raft_id) {
            tracing::warn!(
                node = address,
                raft_id,
                "a member restarted empty: the keys it held are gone; a view change takes it \
                 back (or drops it)"
            );
            self.restarts.lock().insert(address.to_string());
        }
    }

    /// Members that said they restarted empty and are still members under their old id.
    pub fn restarts(&self) -> Vec<String> {
        let Some(meta) = self.meta() else {
            return Vec::new();
        };
        let state = meta.state();
        let mut restarts = self.restarts.lock();
        restarts.retain(|a| state.ids.contains_key(a));
        restarts.iter().cloned().collect()
    }

    /// A snapshot of what the metrics report about this node.
    pub fn gauges(&self) -> crate::metrics::NodeGauges {
        crate::metrics::NodeGauges {
            state: self.node_state(),
            value_bytes: self.store.value_bytes(),
            waiting_for_handover: self.waiting_for_handover.load(Ordering::Relaxed),
            last_change: self.last_change.lock().clone(),
            disk: self.disk().map(|disk| {
                let synced = disk.sync_stats();
                crate::metrics::DiskGauges {
                    disk_bytes: disk.disk_bytes(),
                    journal_bytes: disk.journal_bytes(),
                    fsyncs: synced.fsyncs,
                    fsync_micros: synced.fsync_micros,
                }
            }),
        }
    }

    pub fn node_state(&self) -> NodeState {
        // Before the state lock: `key_count` reads it too, and a second read while a writer
        // waits for the first never returns (parking_lot's lock is fair). That hung a
        // node's every status probe: found by the consensus nemesis test.
        let key_count = self.key_count();
        let state = self.state.read();
        NodeState {
            address: self.address.to_string(),
            epoch: state.view.epoch,
            view: state.view.members.clone(),
            view_id: state.view.id,
            vnodes: self.config.vnodes,
            key_count,
            pending: state.migration.as_ref().map(|m| m.change_id()),
            raft_id: self.meta().map_or(0, |m| m.id()),
            in_log: self.meta().is_some_and(|m| m.in_log()),
            restarted: self.restarted(),
            group: self.meta().and_then(|m| {
                let meta = m.state();
                meta.formed().then(|| crate::wire::GroupState {
                    group: meta.group,
                    epoch: meta.epoch,
                    view: meta.view,
                    ids: meta.ids,
                    change: meta.change.map(|c| c.change_id),
                    leader: m.leader(),
                    voters: m.voters(),
                    term: m.term(),
                    layout: meta.layout,
                })
            }),
            layout: self
                .replication
                .as_ref()
                .map(|r| r.placed().layout().clone()),
            replica: self.replication.as_ref().and_then(|r| r.replica_state()),
        }
    }

    /// Takes a newer view that this node had no part in changing to. A prepared change to
    /// a still newer epoch stays: a node that was behind (one joining after missing earlier
    /// changes) learns the view in force while that change is under way.
    pub(crate) fn adopt(&self, epoch: u64, members: Vec<String>) {
        let Ok(view) = View::new(epoch, members, self.config.vnodes) else {
            tracing::warn!(epoch, "refusing an invalid view from a peer");
            return;
        };
        let mut state = self.state.write();
        if state.view.epoch >= epoch {
            return;
        }
        // A view change moves a cluster on, it does not replace it: a newer view that
        // shares no member with this node's and does not name this node is some other
        // cluster's, or made up.
        let continues = view
            .members
            .iter()
            .any(|m| *m == *self.address || state.view.members.contains(m));
        if !continues {
            tracing::warn!(epoch, view = %view.members_text(), "refusing a newer view that shares no member with ours");
            return;
        }
        tracing::info!(epoch, view = %view.members_text(), "adopted a newer view");
        self.take_view(&mut state, view);
    }

    /// Installs a prepared change.
    pub(crate) fn install_migration(&self, migration: Arc<Migration>) {
        self.state.write().migration = Some(migration);
    }

    /// Freezes writes to the ranges `migration` hands over; returns once no write that
    /// missed the freeze is still being applied.
    pub(crate) fn freeze(&self, migration: &Migration) {
        let _state = self.state.write();
        migration.freeze();
    }

    /// Switches to the change's view and forgets the change; true if it was still installed.
    pub(crate) fn switch_to(&self, migration: &Arc<Migration>) -> bool {
        let mut state = self.state.write();
        match &state.migration {
            Some(current) if Arc::ptr_eq(current, migration) => {
                state.view = migration.view().clone();
                state.migration = None;
                self.set_standing(Standing::InForce);
                true
            }
            _ => false,
        }
    }

    /// Forgets an aborted change; true if it was still installed.
    pub(crate) fn drop_migration(&self, migration: &Arc<Migration>) -> bool {
        let mut state = self.state.write();
        match &state.migration {
            Some(current) if Arc::ptr_eq(current, migration) => {
                state.migration = None;
                true
            }
            _ => false,
        }
    }

    /// Notes that this node coordinates `change_id`, pending until [`Node::decide`].
    pub(crate) fn coordinate(&self, change_id: u64) {
        *self.undecided.lock() = Some(change_id);
    }

    /// Whether this node coordinates `change_id` and has not decided it yet.
    pub(crate) fn drives(&self, change_id: u64) -> bool {
        *self.undecided.lock() == Some(change_id)
    }

    /// Records the coordinator's decision on the change it coordinates.
    pub(crate) fn decide(&self, change_id: u64, outcome: Outcome) {
        self.record_outcome(change_id, outcome);
        let mut undecided = self.undecided.lock();
        if *undecided == Some(change_id) {
            *undecided = None;
        }
    }

    /// Notes how long change `change_id` froze this node's outgoing ranges.
    pub(crate) fn record_freeze(&self, change_id: u64, frozen: Option<std::time::Duration>) {
        if let Some(frozen) = frozen {
            *self.last_freeze.lock() = Some((change_id, frozen.as_micros() as u64));
        }
    }

    /// How this node reports having applied change `change_id`: its key count now, and how
    /// long the change froze its outgoing ranges.
    pub(crate) fn committed_report(&self, change_id: u64) -> crate::wire::Committed {
        let freeze = *self.last_freeze.lock();
        crate::wire::Committed {
            key_count: self.key_count(),
            freeze_micros: freeze.filter(|(id, _)| *id == change_id).map(|(_, us)| us),
        }
    }

    pub(crate) fn record_outcome(&self, change_id: u64, outcome: Outcome) {
        let mut outcomes = self.outcomes.lock();
        outcomes.retain(|(id, _)| *id != change_id);
        outcomes.push_back((change_id, outcome));
        while outcomes.len() > REMEMBERED_OUTCOMES {
            outcomes.pop_front();
        }
    }

    /// What the log says of a change, or else what this node knows.
    pub fn log_outcome(&self, change_id: u64) -> Outcome {
        match self.meta().map(|m| m.state().outcome(change_id)) {
            Some(outcome @ (Outcome::Committed | Outcome::Aborted | Outcome::Pending)) => outcome,
            _ => self.outcome(change_id),
        }
    }

    /// What this node knows of a change.
    pub fn outcome(&self, change_id: u64) -> Outcome {
        if self.migration().is_some_and(|m| m.change_id() == change_id)
            || *self.undecided.lock() == Some(change_id)
        {
            return Outcome::Pending;
        }
        self.outcomes
            .lock()
            .iter()
            .find(|(id, _)| *id == change_id)
            .map_or(Outcome::Unknown, |(_, outcome)| *outcome)
    }
}
