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
//! Lock order: `mates` is a leaf lock (never held across another lock or an await).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use crate::causal::VersionVector;
use crate::replica::Replica;
use crate::ring::{HashRing, RingError};
use crate::shard::{Layout, LayoutError, Shard};

/// How recent a shard-mate's vector must be to count for trimming the log.
const MATE_FRESH: Duration = Duration::from_secs(5);

/// Why the replicated mode could not start.
#[derive(Debug, thiserror::Error)]
pub enum ReplicationError {
    #[error(transparent)]
    Layout(#[from] LayoutError),
    #[error(transparent)]
    Ring(#[from] RingError),
}

/// One node's part in a replicated cluster.
pub struct Replication {
    layout: Layout,
    ring: HashRing,
    /// This node's replica; `None` for a node that is not in the view.
    replica: Option<Arc<Replica>>,
    me: String,
    /// Per shard-mate: the vector it last pulled with, and when.
    mates: Mutex<BTreeMap<String, (VersionVector, Instant)>>,
}

impl Replication {
    /// The initial layout of `view` with `factor` replicas per shard, for the node at
    /// `address`.
    pub fn new(
        address: &str,
        view: &[String],
        factor: usize,
        vnodes: u32,
    ) -> Result<Replication, ReplicationError> {
        let layout = Layout::initial(view, factor)?;
        let ring = layout.ring(vnodes)?;
        let replica = layout.shard_of(address).map(|shard| {
            let name = format!("{address}~{:08x}", crate::consensus::new_id() as u32);
            Arc::new(Replica::new(&name, &shard.id, crate::store::memory()))
        });
        Ok(Replication {
            layout,
            ring,
            replica,
            me: address.to_string(),
            mates: Mutex::new(BTreeMap::new()),
        })
    }

    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// The shard a key hash lives on.
    pub fn shard_of_hash(&self, hash: u64) -> &Shard {
        let id = self.ring.owner_of_hash(hash);
        self.layout
            .shard(id)
            .expect("the ring is made of the layout's shard ids")
    }

    /// Whether this node is a replica of the shard of a key hash.
    pub fn serves(&self, hash: u64) -> bool {
        self.shard_of_hash(hash).replicas.contains(&self.me)
    }

    /// This node's replica, if it is in the view.
    pub fn replica(&self) -> Option<&Arc<Replica>> {
        self.replica.as_ref()
    }

    /// The other replicas of this node's shard.
    pub fn mates(&self) -> Vec<String> {
        self.layout
            .shard_of(&self.me)
            .map(|s| {
                s.replicas
                    .iter()
                    .filter(|r| **r != self.me)
                    .cloned()
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Notes what shard-mate `peer` has applied (it pulled with it).
    pub fn note_mate(&self, peer: &str, have: &VersionVector) {
        self.mates
            .lock()
            .insert(peer.to_string(), (have.clone(), Instant::now()));
    }

    /// The vectors of every shard-mate, when each one pulled recently; `None` otherwise
    /// (the log is trimmed only with every mate's vector in hand).
    pub fn mate_vectors(&self) -> Option<Vec<VersionVector>> {
        let mates = self.mates.lock();
        self.mates()
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
