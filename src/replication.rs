//! A node's state in the replicated mode (the course's assignment 4): the shard layout of
//! the view, the ring over its shards, this node's replica of its own shard, and what it
//! has heard of its shard-mates (their applied vectors, from their pulls). What a key
//! request does is in [`crate::replicated::serve`], how replicas exchange writes in
//! [`crate::replicated::exchange`].
//!
//! A replica's name in vectors and contexts is its address and a random incarnation tag
//! (`10.0.0.1:13800~3fa2c1d0`): a node that restarts empty numbers its writes from 1 again,
//! under a new name, so its new writes are never mistaken for ones peers already applied.
//!
//! Lock order: `switching` (held for a whole switch, never across an await) before
//! `current` (held only to read or replace the placement) and the replicas' own locks;
//! `mates` and a placement's `unrepaired` are leaf locks.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use parking_lot::{Mutex, RwLock};
use tokio::sync::watch;

use crate::causal::VersionVector;
use crate::replica::{Replica, ReplicaError};
use crate::ring::RingError;
use crate::shard::{Handover, Layout, LayoutError, Shard, ShardMap};
use crate::store::Store;

/// How recent a shard-mate's vector must be to count for trimming the log.
const MATE_FRESH: Duration = Duration::from_secs(5);

/// Why the replicated mode could not start.
#[derive(Debug, thiserror::Error)]
pub enum ReplicationError {
    #[error(transparent)]
    Layout(#[from] LayoutError),
    #[error(transparent)]
    Ring(#[from] RingError),
    #[error(transparent)]
    Replica(#[from] ReplicaError),
}

/// Where this node is in the layout in force: the layout with its ring, and this node's
/// replica of its shard (`None` for a node that is not in the view).
pub struct Placed {
    /// The epoch of the view this placement belongs to: the epoch of the causal contexts
    /// its replica reads and writes.
    epoch: u64,
    map: ShardMap,
    replica: Option<Arc<Replica>>,
    /// The shard-mates this replica still has to compare digests with: it began with a
    /// view change, and what each mate holds that it lacks (writes of the incarnations
    /// before it) is in no log.
    unrepaired: Mutex<BTreeSet<String>>,
}

impl Placed {
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    pub fn layout(&self) -> &Layout {
        self.map.layout()
    }

    /// The shard a key hash lives on.
    pub fn shard_of_hash(&self, hash: u64) -> &Shard {
        self.map.shard_of_hash(hash)
    }

    /// Whether `node` is a replica of the shard of a key hash.
    pub fn holds(&self, node: &str, hash: u64) -> bool {
        self.shard_of_hash(hash).replicas.iter().any(|r| r == node)
    }

    pub fn map(&self) -> &ShardMap {
        &self.map
    }

    /// This node's replica, if it is in the view.
    pub fn replica(&self) -> Option<&Arc<Replica>> {
        self.replica.as_ref()
    }

    /// The shard-mates the replica still has to be refilled from (by digests).
    pub fn unrepaired(&self) -> Vec<String> {
        self.unrepaired.lock().iter().cloned().collect()
    }

    /// Notes that the replica compared digests with `mate` since it began.
    pub fn repaired(&self, mate: &str) {
        self.unrepaired.lock().remove(mate);
    }
}

/// One node's part in a replicated cluster.
pub struct Replication {
    me: String,
    vnodes: u32,
    /// The store every replica of this node keeps its records in, one after another.
    store: Store,
    /// Replaced whole by a view change ([`Replication::switch`]).
    current: RwLock<Arc<Placed>>,
    /// Counts the switches, for requests that met a retired replica.
    switches: watch::Sender<u64>,
    /// Held for the whole of a switch.
    switching: Mutex<()>,
    /// Per shard-mate: the vector it last pulled with, and when.
    mates: Mutex<BTreeMap<String, (VersionVector, Instant)>>,
    pushes: Pushes,
}

/// A node's pushing state (see [`crate::replicated::push`]): writes waiting for their
/// mates, and the mates that did not answer the last push.
///
/// Lock order: `down` is a leaf lock.
pub struct Pushes {
    /// Bumped by every write waiting for its mates.
    written: watch::Sender<u64>,
    /// Bumped whenever a mate acknowledged a push or was found down.
    heard: watch::Sender<u64>,
    down: Mutex<BTreeSet<String>>,
}

impl Default for Pushes {
    fn default() -> Self {
        Pushes {
            written: watch::Sender::new(0),
            heard: watch::Sender::new(0),
            down: Mutex::new(BTreeSet::new()),
        }
    }
}

impl Pushes {
    /// Notes a write waiting for its mates: every pusher looks for new writes.
    pub fn wrote(&self) {
        self.written.send_modify(|n| *n += 1);
    }

    /// Changes whenever a write waits for its mates.
    pub fn written(&self) -> watch::Receiver<u64> {
        self.written.subscribe()
    }

    /// Changes whenever a mate acknowledged a push or was found down.
    pub fn heard(&self) -> watch::Receiver<u64> {
        self.heard.subscribe()
    }

    /// Whether `mate` did not answer the last push.
    pub fn is_down(&self, mate: &str) -> bool {
        self.down.lock().contains(mate)
    }

    pub(crate) fn heard_from(&self, mate: &str, answered: bool) {
        let mut down = self.down.lock();
        let changed = match answered {
            true => down.remove(mate),
            false => down.insert(mate.to_string()),
        };
        drop(down);
        if changed {
            tracing::info!(mate, answered, "a shard-mate's pushes changed");
        }
        self.heard.send_modify(|n| *n += 1);
    }
}

/// The other replicas of `me`'s shard in `layout`.
fn mates_in(layout: &Layout, me: &str) -> Vec<String> {
    layout
        .shard_of(me)
        .map(|s| s.replicas.iter().filter(|r| **r != me).cloned().collect())
        .unwrap_or_default()
}

/// A new incarnation's name: the address and a random tag.
fn incarnation(address: &str) -> String {
    format!("{address}~{:08x}", crate::consensus::new_id() as u32)
}

impl Replication {
    /// The initial layout of `view` with `factor` replicas per shard, for the node at
    /// `address`, keeping its records in `store`.
    pub fn new(
        address: &str,
        view: &[String],
        factor: usize,
        vnodes: u32,
        store: Store,
    ) -> Result<Replication, ReplicationError> {
        let map = ShardMap::new(Layout::initial(view, factor)?, vnodes)?;
        let replica = map.layout().shard_of(address).map(|shard| {
            Arc::new(Replica::new(
                &incarnation(address),
                &shard.id,
                store.clone(),
            ))
        });
        Ok(Replication {
            me: address.to_string(),
            vnodes,
            store,
            current: RwLock::new(Arc::new(Placed {
                epoch: 0,
                map,
                replica,
                unrepaired: Mutex::new(BTreeSet::new()),
            })),
            switches: watch::Sender::new(0),
            switching: Mutex::new(()),
            mates: Mutex::new(BTreeMap::new()),
            pushes: Pushes::default(),
        })
    }

    /// Where this node is now.
    pub fn placed(&self) -> Arc<Placed> {
        self.current.read().clone()
    }

    /// This node's replica, if it is in the view.
    pub fn replica(&self) -> Option<Arc<Replica>> {
        self.current.read().replica.clone()
    }

    /// Whether this node is a replica of the shard of a key hash.
    pub fn serves(&self, hash: u64) -> bool {
        self.current.read().holds(&self.me, hash)
    }

    /// The layout `members` with `factor` replicas per shard has after the one in force.
    pub fn regroup(&self, members: &[String], factor: usize) -> Result<Layout, LayoutError> {
        self.current.read().layout().regroup(members, factor)
    }

    /// What this node ships and drops if the layout in force becomes `layout`.
    pub fn handover(&self, layout: &Layout) -> Result<Handover, ReplicationError> {
        let new = ShardMap::new(layout.clone(), self.vnodes)?;
        Ok(crate::shard::handover(
            self.current.read().map(),
            &new,
            &self.me,
        ))
    }

    /// Takes `layout` as the one in force (a view change committed, or the log holds a
    /// newer one). The same layout changes nothing. Otherwise the replica retires and, if
    /// this node is in the new layout, a successor takes over on the same store: the
    /// `dropping` segments leave it and the `staged` records (received for the ranges this
    /// node takes over) join it.
    pub fn switch(
        &self,
        epoch: u64,
        layout: &Layout,
        dropping: &[(u64, u64)],
        staged: impl IntoIterator<Item = (String, Bytes)>,
    ) -> Result<(), ReplicationError> {
        // One switch at a time (a commit and a layout learned from the log may race).
        let _switching = self.switching.lock();
        let old = self.placed();
        if epoch < old.epoch {
            return Ok(());
        }
        if old.layout() == layout {
            // The same place under a newer epoch: the replica stays.
            if epoch > old.epoch {
                *self.current.write() = Arc::new(Placed {
                    epoch,
                    map: old.map.clone(),
                    replica: old.replica.clone(),
                    unrepaired: Mutex::new(old.unrepaired().into_iter().collect()),
                });
            }
            return Ok(());
        }
        let map = ShardMap::new(layout.clone(), self.vnodes)?;
        let retired = old.replica.as_ref().map(|r| r.retire());
        let shard = map.layout().shard_of(&self.me).map(|s| s.id.clone());
        let name = incarnation(&self.me);
        let successor = Replica::successor(
            &name,
            shard.as_deref().unwrap_or_default(),
            self.store.clone(),
            retired,
            dropping,
            staged,
        );
        let successor = match successor {
            Ok(successor) => successor,
            Err(error) => {
                // The old replica serves on rather than nothing at all.
                if let Some(replica) = &old.replica {
                    replica.unretire();
                }
                return Err(error.into());
            }
        };
        tracing::info!(
            shard = shard.as_deref(),
            replica = %name,
            keys = successor.live_keys(),
            "this node's place in the layout changed"
        );
        let mates = mates_in(map.layout(), &self.me).into_iter().collect();
        let placed = Placed {
            epoch,
            map,
            replica: shard.map(|_| Arc::new(successor)),
            unrepaired: Mutex::new(mates),
        };
        *self.current.write() = Arc::new(placed);
        self.mates.lock().clear();
        self.switches.send_modify(|n| *n += 1);
        Ok(())
    }

    /// Waits (up to `limit`) for the next switch: a request that met a retired replica
    /// retries on its successor.
    pub async fn next_switch(&self, seen: &Placed, limit: Duration) {
        let mut switches = self.switches.subscribe();
        if !std::ptr::eq(&*self.current.read().clone() as *const Placed, seen) {
            return;
        }
        let _ = tokio::time::timeout(limit, switches.changed()).await;
    }

    /// The other replicas of this node's shard.
    pub fn mates(&self) -> Vec<String> {
        mates_in(self.current.read().layout(), &self.me)
    }

    /// This node's replica as it reports itself (see [`crate::wire::ReplicaState`]).
    pub fn replica_state(&self) -> Option<crate::wire::ReplicaState> {
        let replica = self.replica()?;
        let applied = replica.applied();
        let mates_lag = self
            .mates
            .lock()
            .iter()
            .map(|(mate, (theirs, _))| {
                let lag = applied
                    .iter()
                    .map(|(origin, n)| n.saturating_sub(theirs.get(origin)))
                    .sum();
                (mate.clone(), lag)
            })
            .collect();
        Some(crate::wire::ReplicaState {
            shard: replica.shard().to_string(),
            name: replica.name().to_string(),
            applied: applied.iter().map(|(_, n)| n).sum(),
            mates_lag,
            tombstones: replica.tombstones() as u64,
        })
    }

    /// The pushing state of this node's replica.
    pub fn pushes(&self) -> &Pushes {
        &self.pushes
    }

    /// How many writes of replica `origin` shard-mate `peer` had applied when last heard
    /// of.
    pub fn mate_has(&self, peer: &str, origin: &str) -> u64 {
        self.mates
            .lock()
            .get(peer)
            .map_or(0, |(v, _)| v.get(origin))
    }

    /// What shard-mate `peer` had applied when last heard of (empty: never).
    pub fn mate_vector(&self, peer: &str) -> VersionVector {
        self.mates
            .lock()
            .get(peer)
            .map(|(v, _)| v.clone())
            .unwrap_or_default()
    }

    /// Notes what shard-mate `peer` has applied (it pulled with it, or answered a push).
    /// A vector older than the one held (a pull sent before a push was acknowledged, read
    /// after it) only refreshes the time: taken as is, it would undo what the trimmed log
    /// already counts the mate as having, and the mate would look in need of a refill. A
    /// vector that is not older (more, or another incarnation's) replaces it.
    pub fn note_mate(&self, peer: &str, have: &VersionVector) {
        let mut mates = self.mates.lock();
        let now = Instant::now();
        match mates.get_mut(peer) {
            Some((held, at)) if held.covers(have) => *at = now,
            _ => {
                mates.insert(peer.to_string(), (have.clone(), now));
            }
        }
    }

    /// The vectors of every shard-mate, when each one pulled recently; `None` otherwise
    /// (the log is trimmed only with every mate's vector in hand).
    pub fn mate_vectors(&self) -> Option<Vec<VersionVector>> {
        let names = self.mates();
        let mates = self.mates.lock();
        names
            .iter()
            .map(|m| {
                mates
                    .get(m)
                    .filter(|(_, at)| at.elapsed() < MATE_FRESH)
                    .map(|(v, _)| v.clone())
            })
            .collect()
    }
}
