//! The data nodes exchange and report: a node's state, the parts of a view change, and
//! the report of the last change. Plain serde types (a leaf module); the messages that
//! carry them are in [`crate::rpc::message`].

use serde::{Deserialize, Serialize};

/// A node's view and change state, as a `State` call (and `GET /cluster/state`) reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeState {
    pub address: String,
    pub epoch: u64,
    pub view: Vec<String>,
    pub view_id: u64,
    pub vnodes: u32,
    pub key_count: usize,
    /// The change this node has prepared and not yet committed or aborted.
    pub pending: Option<u64>,
    /// The Raft id of this incarnation.
    pub raft_id: u64,
    /// Whether its log holds anything (a group formed or joined, maybe not applied yet).
    #[serde(default)]
    pub in_log: bool,
    /// This node restarted empty under an address its group knows (its keys are gone).
    pub restarted: bool,
    /// The metadata group this node applies the log of, if it belongs to one.
    pub group: Option<GroupState>,
    /// The shard layout this node routes by (the replicated mode).
    pub layout: Option<crate::shard::Layout>,
    /// The replicated mode: this node's replica, and how far behind its mates it is.
    pub replica: Option<ReplicaState>,
}

/// A replica as its node reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicaState {
    pub shard: String,
    /// Its incarnation's name in vectors and contexts.
    pub name: String,
    /// Writes it has applied, from every replica of its shard.
    pub applied: u64,
    /// Per shard-mate: how many of the writes this replica applied the mate had not, when
    /// it last pulled (a mate cut off since falls further behind with every write here).
    pub mates_lag: std::collections::BTreeMap<String, u64>,
    /// Deleted keys whose tombstones it still stores (collected once every replica has
    /// them).
    #[serde(default)]
    pub tombstones: u64,
}

/// A group's metadata as one of its nodes has applied it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupState {
    pub group: u64,
    pub epoch: u64,
    pub view: Vec<String>,
    /// Raft id of each member's incarnation.
    pub ids: std::collections::BTreeMap<String, u64>,
    /// The change the log has begun and not decided.
    pub change: Option<u64>,
    /// The leader, as this node last heard.
    pub leader: Option<String>,
    /// The log's voters, as this node last heard (the view's members once a change settled).
    pub voters: Vec<String>,
    /// The highest Raft term this incarnation has seen.
    pub term: u64,
    /// The shard layout in force (the replicated mode).
    pub layout: Option<crate::shard::Layout>,
}

/// The answer of an owner that no longer owns a key: its newer view.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Misdirected {
    pub epoch: u64,
    pub view: Vec<String>,
}

/// Prepare: adopt `view` as epoch `epoch` once change `change_id` commits.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Prepare {
    pub change_id: u64,
    pub epoch: u64,
    pub view: Vec<String>,
    pub coordinator: String,
    /// Every node taking part (old view ∪ new view), for asking about the outcome.
    pub participants: Vec<String>,
    /// Participants that come from another group (see `meta::Change::merging`).
    pub merging: Vec<String>,
    /// The shard layout after the change (the replicated mode; as the log's Begin holds).
    pub layout: Option<crate::shard::Layout>,
}

/// What a node shipped in the transfer or catch-up phase.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Shipped {
    pub ranges: usize,
    pub keys: usize,
    pub bytes: usize,
}

/// What the last view change coordinated by a node did, for operators and benchmarks.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ChangeReport {
    pub epoch: u64,
    pub view: Vec<String>,
    pub moved_ranges: usize,
    /// Distinct keys shipped by the bulk transfer.
    pub keys_shipped: usize,
    pub bytes_shipped: usize,
    /// Keys re-sent by the catch-up (written during the transfer).
    pub keys_caught_up: usize,
    pub millis: u64,
    /// Operations on the metadata log (learners added, begin, decision, voters) and the time
    /// they took, within `millis`: the consensus overhead.
    #[serde(default)]
    pub log_ops: usize,
    #[serde(default)]
    pub log_millis: f64,
    /// The longest freeze of a node's outgoing ranges (requests on them wait meanwhile), as
    /// the nodes that confirmed the commit reported it.
    #[serde(default)]
    pub freeze_ms: f64,
    /// How long the bulk transfer took (every sender, in parallel), within `millis`.
    #[serde(default)]
    pub transfer_ms: f64,
}

/// What a committed node holds afterwards.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Committed {
    pub key_count: usize,
    /// How long this node's outgoing ranges were frozen for the change (the catch-up to
    /// the commit), if it handed any over.
    #[serde(default)]
    pub freeze_micros: Option<u64>,
}

/// What a node knows of a change, for a participant that lost its coordinator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    Pending,
    Committed,
    Aborted,
    Unknown,
}
