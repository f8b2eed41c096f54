//! A node's shared state (store, view, change in progress) and how a key request is
//! executed: locally when this node owns the key, otherwise by forwarding it to the owner.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use parking_lot::{Mutex, RwLock};
use reqwest::Method;
use tokio::sync::watch;

use crate::config::Config;
use crate::fault::Faults;
use crate::forward::{ForwardReply, PeerError, Peers};
use crate::kv::{KvOp, KvOutcome};
use crate::migrate::Migration;
use crate::ring::{key_hash, RingError};
use crate::store::{Store, StoreError};
use crate::view::View;
use crate::wire::{ChangeReport, Misdirected, NodeState, Outcome};

/// How many times a client request is re-routed after learning of a newer view.
const MAX_ROUTES: usize = 8;
/// How many change outcomes a node remembers for peers that lost their coordinator.
const REMEMBERED_OUTCOMES: usize = 64;

/// Why a client's key request could not be served.
#[derive(Debug, thiserror::Error)]
pub enum KvError {
    #[error("the owner {0} did not answer")]
    OwnerUnreachable(String),
    #[error("the key's range stayed frozen by a view change")]
    StillMoving,
    #[error("the owner refused: {0}")]
    Refused(PeerError),
    #[error("no stable owner after {MAX_ROUTES} re-routes")]
    NoStableOwner,
    #[error("the view in force is not known yet ({0:?})")]
    ViewNotSettled(Standing),
    #[error(transparent)]
    Storage(#[from] StoreError),
}

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

/// An answer served by `address` (`None` when this node served it).
#[derive(Debug)]
pub struct Served {
    pub outcome: KvOutcome,
    pub address: Option<Arc<str>>,
}

/// Why an owner did not serve a forwarded key request.
#[derive(Debug)]
pub enum NotServed {
    /// It does not own the key under its view (which it sends back).
    Misdirected(Misdirected),
    /// It does not know the view in force yet.
    Unsettled,
    /// Its store failed.
    Failed(StoreError),
}

/// One attempt to execute a key operation on this node.
pub enum Local {
    Done(KvOutcome),
    /// This node does not own the key under `view`.
    NotOwner(Arc<View>),
    /// The key's range is being handed over; retry once the change ends.
    Wait(watch::Receiver<bool>),
    /// The store could not do it.
    Failed(StoreError),
}

struct State {
    view: Arc<View>,
    migration: Option<Arc<Migration>>,
}

/// One ringkv node.
pub struct Node {
    pub config: Config,
    pub address: Arc<str>,
    pub store: Store,
    pub peers: Peers,
    pub faults: Faults,
    state: RwLock<State>,
    /// Serialises prepare, commit and abort on this node.
    pub(crate) change_lock: tokio::sync::Mutex<()>,
    /// Held while this node coordinates a view change.
    pub(crate) coordinating: tokio::sync::Mutex<()>,
    /// The change this node coordinates and has not decided yet: pending to peers that ask,
    /// even when this node takes no part in it (it is in neither view).
    undecided: Mutex<Option<u64>>,
    outcomes: Mutex<VecDeque<(u64, Outcome)>>,
    /// The last view change this node coordinated.
    pub last_change: Mutex<Option<ChangeReport>>,
    /// Key requests waiting right now for a range being handed over.
    pub waiting_for_handover: AtomicUsize,
    /// Whether the view is known to be in force; written only under the `state` lock.
    standing: watch::Sender<Standing>,
    /// `standing == InForce`, read on every key request without touching the watch.
    in_force: AtomicBool,
}

impl Node {
    pub fn new(config: Config) -> Result<Arc<Node>, RingError> {
        let view = View::new(0, config.view.clone(), config.vnodes)?;
        // Alone in its view (or a forwarding instance, which routes nothing) a node has
        // nobody to confirm its view with.
        let alone = view.members.iter().all(|m| *m == config.address);
        let standing = if alone || config.forwarding_address.is_some() {
            Standing::InForce
        } else {
            Standing::Confirming
        };
        let peers = Peers::new(
            &config.address,
            config.vnodes,
            config.forward_timeout,
            config.connect_window,
            config.max_forwards,
        )
        .with_token(config.cluster_token.as_ref());
        Ok(Arc::new(Node {
            address: Arc::from(config.address.as_str()),
            store: crate::store::memory(),
            peers,
            faults: Faults::new(config.fault_hooks),
            state: RwLock::new(State {
                view,
                migration: None,
            }),
            change_lock: tokio::sync::Mutex::new(()),
            coordinating: tokio::sync::Mutex::new(()),
            undecided: Mutex::new(None),
            outcomes: Mutex::new(VecDeque::new()),
            last_change: Mutex::new(None),
            waiting_for_handover: AtomicUsize::new(0),
            in_force: AtomicBool::new(standing == Standing::InForce),
            standing: watch::Sender::new(standing),
            config,
        }))
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

    /// Waits (bounded by the forwarding timeout) until the view in force is known.
    async fn wait_until_in_force(&self) -> Result<(), KvError> {
        if self.in_force.load(Ordering::Acquire) {
            return Ok(());
        }
        let mut standing = self.standing.subscribe();
        let settled = tokio::time::timeout(
            self.peers.timeout(),
            standing.wait_for(|s| *s == Standing::InForce),
        )
        .await;
        match settled {
            Ok(Ok(_)) => Ok(()),
            _ => Err(KvError::ViewNotSettled(self.standing())),
        }
    }

    /// The start-up settlement's verdict (see [`crate::join`]): routes by `members` (at the
    /// same epoch) from now on, with `standing`. Refused, returning false, when the view is
    /// no longer `seen` (a view change or a newer view came first) or a change is prepared.
    pub(crate) fn settle(
        &self,
        seen: &Arc<View>,
        members: Option<Vec<String>>,
        standing: Standing,
    ) -> bool {
        let mut state = self.state.write();
        if !Arc::ptr_eq(&state.view, seen) || state.migration.is_some() {
            return false;
        }
        if let Some(members) = members.filter(|m| crate::view::view_id(m) != seen.id) {
            match View::new(seen.epoch, members, self.config.vnodes) {
                Ok(view) => {
                    tracing::info!(
                        epoch = view.epoch,
                        view = %view.members_text(),
                        member = view.members.iter().any(|m| *m == *self.address),
                        "routing by the view the members hold"
                    );
                    state.view = view;
                }
                Err(error) => {
                    tracing::warn!(%error, "refusing an invalid view from a peer");
                    return false;
                }
            }
        }
        self.set_standing(standing);
        true
    }

    /// A snapshot of what the metrics report about this node.
    pub fn gauges(&self) -> crate::metrics::NodeGauges {
        crate::metrics::NodeGauges {
            state: self.node_state(),
            value_bytes: self.store.value_bytes(),
            waiting_for_handover: self.waiting_for_handover.load(Ordering::Relaxed),
            last_change: self.last_change.lock().clone(),
        }
    }

    pub fn node_state(&self) -> NodeState {
        let state = self.state.read();
        NodeState {
            address: self.address.to_string(),
            epoch: state.view.epoch,
            view: state.view.members.clone(),
            view_id: state.view.id,
            vnodes: self.config.vnodes,
            key_count: self.store.len(),
            pending: state.migration.as_ref().map(|m| m.change_id),
        }
    }

    /// Executes `op` here if this node owns the key, keeping a range that is being handed
    /// over consistent: writes to it are recorded for re-sending; once it is frozen, every
    /// operation waits, reads too, since the new owner may commit first and take writes.
    pub fn try_local(&self, key: &str, hash: u64, op: &KvOp) -> Local {
        let state = self.state.read();
        if *state.view.ring.owner_of_hash(hash) != self.address {
            return Local::NotOwner(state.view.clone());
        }
        if let Some(migration) = &state.migration {
            if migration.hands_over(hash) {
                if migration.is_frozen() {
                    return Local::Wait(migration.ended());
                }
                if op.is_write() {
                    migration.mark_dirty(key);
                }
            }
        }
        let done = match op {
            KvOp::Get => self.store.get(hash, key).map(|found| match found {
                Some(value) => KvOutcome::Found(value),
                None => KvOutcome::Absent,
            }),
            KvOp::Put(value) => self.store.put(hash, key, value.clone()).map(|replaced| {
                if replaced {
                    KvOutcome::Replaced
                } else {
                    KvOutcome::Added
                }
            }),
            KvOp::Delete => self.store.delete(hash, key).map(|deleted| {
                if deleted {
                    KvOutcome::Deleted
                } else {
                    KvOutcome::Absent
                }
            }),
        };
        match done {
            Ok(outcome) => Local::Done(outcome),
            Err(error) => {
                tracing::error!(%error, key, "the store failed");
                Local::Failed(error)
            }
        }
    }

    /// Waits (bounded by the forwarding timeout) for a frozen range to be released.
    async fn wait_for_release(&self, mut ended: watch::Receiver<bool>) -> Result<(), KvError> {
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
            .map(|_| ())
            .map_err(|_| KvError::StillMoving)
    }

    /// Serves a client's key request from wherever the key lives.
    pub async fn serve_kv(self: &Arc<Self>, key: &str, op: KvOp) -> Result<Served, KvError> {
        self.wait_until_in_force().await?;
        let hash = key_hash(key.as_bytes());
        for _ in 0..MAX_ROUTES {
            let view = match self.try_local(key, hash, &op) {
                Local::Done(outcome) => {
                    return Ok(Served {
                        outcome,
                        address: None,
                    })
                }
                Local::Wait(ended) => {
                    self.wait_for_release(ended).await?;
                    continue;
                }
                Local::Failed(error) => return Err(error.into()),
                Local::NotOwner(view) => view,
            };
            let owner = view.ring.owner_of_hash(hash).clone();
            let answer = self.peers.forward_kv(&owner, key, &op, &view).await;
            crate::metrics::forward(&owner, answer.is_ok());
            match answer {
                Ok(ForwardReply::Served(outcome)) => {
                    return Ok(Served {
                        outcome,
                        address: Some(owner),
                    })
                }
                Ok(ForwardReply::Misdirected(newer)) => {
                    self.learn(newer.epoch, Some(newer.view), &owner).await;
                }
                Err(PeerError::Unreachable(peer)) => return Err(KvError::OwnerUnreachable(peer)),
                Err(refused) => return Err(KvError::Refused(refused)),
            }
        }
        Err(KvError::NoStableOwner)
    }

    /// Serves a key request forwarded by `sender`, which routed it with view `epoch`.
    /// Never forwards again: answers with this node's newer view when it is not the owner,
    /// and refuses while it does not know the view in force.
    pub async fn serve_forwarded(
        self: &Arc<Self>,
        key: &str,
        op: KvOp,
        epoch: u64,
        sender: &str,
    ) -> Result<KvOutcome, NotServed> {
        self.learn(epoch, None, sender).await;
        self.wait_until_in_force()
            .await
            .map_err(|_| NotServed::Unsettled)?;
        let hash = key_hash(key.as_bytes());
        let misdirected = |view: &View| {
            NotServed::Misdirected(Misdirected {
                epoch: view.epoch,
                view: view.members.clone(),
            })
        };
        loop {
            match self.try_local(key, hash, &op) {
                Local::Done(outcome) => return Ok(outcome),
                Local::Wait(ended) => {
                    if self.wait_for_release(ended).await.is_err() {
                        return Err(misdirected(&self.view()));
                    }
                }
                Local::NotOwner(view) => return Err(misdirected(&view)),
                Local::Failed(error) => return Err(NotServed::Failed(error)),
            }
        }
    }

    /// Catches up with a newer epoch heard from `source`: commits the prepared change of
    /// that epoch (someone committed it, so it is decided), or adopts the newer view.
    pub async fn learn(self: &Arc<Self>, epoch: u64, members: Option<Vec<String>>, source: &str) {
        if epoch <= self.view().epoch {
            return;
        }
        if let Some(migration) = self.migration() {
            if migration.view.epoch == epoch {
                tracing::info!(
                    epoch,
                    from = source,
                    "a peer already serves the new view; committing"
                );
                if let Err(error) = crate::migrate::commit(self, migration.change_id).await {
                    tracing::warn!(%error, "commit on hearing a newer epoch failed");
                }
                return;
            }
        }
        let members = match members {
            Some(members) => members,
            None => {
                let state: Result<NodeState, _> = self
                    .peers
                    .call::<(), _>(
                        source,
                        Method::GET,
                        "/internal/state",
                        None,
                        &self.view(),
                        self.peers.timeout(),
                    )
                    .await;
                match state {
                    Ok(state) if state.epoch == epoch => state.view,
                    Ok(state) => {
                        tracing::warn!(epoch, their = state.epoch, from = source, "epoch moved on");
                        return;
                    }
                    Err(error) => {
                        tracing::warn!(%error, epoch, "cannot fetch the newer view");
                        return;
                    }
                }
            }
        };
        self.adopt(epoch, members);
    }

    /// Takes a newer view that this node had no part in changing to. A prepared change to
    /// a still newer epoch stays: a node that was behind (one joining after missing earlier
    /// changes) learns the view in force while that change is under way.
    fn adopt(&self, epoch: u64, members: Vec<String>) {
        let Ok(view) = View::new(epoch, members, self.config.vnodes) else {
            tracing::warn!(epoch, "refusing an invalid view from a peer");
            return;
        };
        let mut state = self.state.write();
        if state.view.epoch >= epoch {
            return;
        }
        if let Some(stale) = state.migration.take_if(|m| m.view.epoch <= epoch) {
            tracing::warn!(
                change = stale.change_id,
                "a newer view superseded the prepared change"
            );
            stale.end();
        }
        tracing::info!(epoch, view = %view.members_text(), "adopted a newer view");
        state.view = view;
        self.set_standing(Standing::InForce);
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
                state.view = migration.view.clone();
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

    /// Records the coordinator's decision on the change it coordinates.
    pub(crate) fn decide(&self, change_id: u64, outcome: Outcome) {
        self.record_outcome(change_id, outcome);
        let mut undecided = self.undecided.lock();
        if *undecided == Some(change_id) {
            *undecided = None;
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

    /// What this node knows of a change.
    pub fn outcome(&self, change_id: u64) -> Outcome {
        if self.migration().is_some_and(|m| m.change_id == change_id)
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
