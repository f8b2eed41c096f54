//! Every message nodes exchange: one [`Request`] variant per call, one [`Response`] variant
//! per kind of answer, and [`Refusal`], the one list of reasons a node refuses a call.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::causal::VersionVector;
use crate::kv::{Invalid, KvMethod, KvOp, KvOutcome};
use crate::meta::{Applied, LeadError, LeaderOp, RaftId};
use crate::replica::{Digest, KeyAnswer, Snapshot, Write};
use crate::store::Packed;
use crate::wire::{Committed, Misdirected, NodeState, Outcome, Prepare, Shipped};

/// What the sender of a message routes by: carried by every request and every answer, so
/// a node acting on an old view is detected instead of silently obeyed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stamp {
    pub epoch: u64,
    /// The identity of the sender's member set ([`crate::view::view_id`]).
    pub view_id: u64,
}

/// How much earlier than its own timeout a forward's sender asks the owner to give up:
/// the clocks of a cluster's nodes are assumed to agree within this.
pub const CLOCK_MARGIN: Duration = Duration::from_millis(50);

/// The moment (milliseconds since the Unix epoch, by the sender's clock) after which the
/// sender of a forward no longer waits for its answer. The owner does not execute a
/// forward it reads later: a node paused with the message in its socket buffer would
/// otherwise write after the client was told 503, and after writes the client made since.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct GiveUp(pub u64);

impl GiveUp {
    /// `wait` from now, less [`CLOCK_MARGIN`].
    pub fn after(wait: Duration) -> GiveUp {
        GiveUp(unix_millis().saturating_add(wait.saturating_sub(CLOCK_MARGIN).as_millis() as u64))
    }

    /// Whether the moment has come.
    pub fn passed(self) -> bool {
        unix_millis() >= self.0
    }
}

fn unix_millis() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |since| since.as_millis() as u64)
}

/// A call from one node to another.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Request {
    /// A client's key request, forwarded to the key's owner, who executes it only before
    /// `give_up` (the sender answers the client 503 then).
    Kv {
        key: String,
        op: KvOp,
        give_up: GiveUp,
    },
    /// The receiver's view and change state.
    State,
    /// Phase 1 of a view change.
    Prepare(Prepare),
    /// Phase 2: ship the outgoing ranges.
    Transfer { change_id: u64 },
    /// Keys for ranges the receiver takes over (a `None` value is a deletion).
    Stage {
        change_id: u64,
        /// 0 for the bulk transfer, 1 for the catch-up.
        round: u8,
        entries: Packed,
    },
    /// Phase 3: freeze the outgoing ranges and re-send what was written meanwhile.
    CatchUp { change_id: u64 },
    /// Phase 4: answered once the receiver applied the log's decision (its key count then).
    Commit { change_id: u64 },
    /// What the receiver knows of a change (for a participant whose coordinator is silent).
    Outcome { change_id: u64 },
    /// A message of the metadata log for the receiver's Raft node `target` (postcard bytes
    /// of `consensus::network::RaftMessage`).
    Raft { target: RaftId, message: Vec<u8> },
    /// An operation for the leader of the metadata log.
    Lead(LeaderOp),
    /// A node that is not in the group and holds no key asks to leave the group it
    /// formed on its own (its start view): it comes back as a new Raft node, ready to join.
    Reset,
    /// Whether the receiver is still driving a change it coordinates (`Outcome(Pending)`)
    /// or not (`Outcome(Unknown)`): a watchdog does not abort a change whose coordinator
    /// is at work.
    Driving { change_id: u64 },
    /// The sender restarted empty, as Raft node `raft_id`, under an address its group knows.
    Restarted { raft_id: RaftId },
    /// Replicated mode: a client's key request, for a replica of the key's shard, which
    /// validates it as the contract says (the storage node validates) and serves it only
    /// before `give_up`. `body` is the client's body as it came.
    ShardKv {
        key: String,
        method: KvMethod,
        body: bytes::Bytes,
        give_up: GiveUp,
    },
    /// Replicated mode (gossip): the writes of the receiver's shard that a replica of it
    /// which has applied `have` lacks, at most `max`.
    Pull { have: VersionVector, max: u32 },
    /// Replicated mode (push): a shard-mate's new writes, each origin's in order, sent as
    /// soon as it accepted them.
    Push { writes: Vec<Write> },
    /// Replicated mode (refill, sweep): digests of `buckets` equal slices of the ring.
    Digests { buckets: u32, kind: Digest },
    /// Replicated mode (refill): every record of slice `bucket` of `buckets`.
    Snapshot { buckets: u32, bucket: u32 },
}

impl Request {
    /// The name logs and metrics use.
    pub fn name(&self) -> &'static str {
        match self {
            Request::Kv { .. } => "kv",
            Request::State => "state",
            Request::Prepare(_) => "prepare",
            Request::Transfer { .. } => "transfer",
            Request::Stage { .. } => "stage",
            Request::CatchUp { .. } => "catch-up",
            Request::Commit { .. } => "commit",
            Request::Outcome { .. } => "outcome",
            Request::Raft { .. } => "raft",
            Request::Lead(_) => "lead",
            Request::Reset => "reset",
            Request::Restarted { .. } => "restarted",
            Request::Driving { .. } => "driving",
            Request::ShardKv { .. } => "shard-kv",
            Request::Pull { .. } => "pull",
            Request::Push { .. } => "push",
            Request::Digests { .. } => "digests",
            Request::Snapshot { .. } => "snapshot",
        }
    }
}

/// An answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Response {
    /// What the owner did with a key request.
    Kv(KvOutcome),
    /// Not the owner under the receiver's view, which is newer than the sender's.
    Misdirected(Misdirected),
    State(Box<NodeState>),
    /// Done, nothing to report.
    Done,
    Shipped(Shipped),
    Committed(Committed),
    Outcome(Outcome),
    /// The answer to a Raft message (postcard bytes of `consensus::network::RaftAnswer`).
    Raft(Vec<u8>),
    Led(Result<Applied, LeadError>),
    /// The receiver's new Raft id after a reset.
    Reset(RaftId),
    /// A replica's answer to a key request.
    ShardKv(KeyAnswer),
    /// The writes a puller lacks; `None` when some have left the log (refill instead).
    Pulled(Option<Vec<Write>>),
    /// What the replica has applied after taking in a push.
    Pushed(VersionVector),
    /// Slice digests, and what the replica had applied when it took them.
    Digests(VersionVector, Vec<u64>),
    Snapshot(Snapshot),
    Refused(Refusal),
}

/// Why a node refused a call; the caller maps it to its own error (one table per surface).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum Refusal {
    #[error("View change in progress")]
    InProgress,
    #[error("epoch {offered} is not newer than the epoch in force ({current})")]
    StaleEpoch { offered: u64, current: u64 },
    #[error("epoch {offered} is too far ahead of the epoch in force ({current})")]
    EpochTooFar { offered: u64, current: u64 },
    #[error("no prepared change {0} on this node")]
    UnknownChange(u64),
    #[error("{0}")]
    BadView(String),
    #[error("{0} takes no part in this node's view or change")]
    NotMember(String),
    #[error("change {0} has not shipped what it hands over; commit refused")]
    NotShipped(u64),
    #[error("the sender does not hand over the range of key {0:?}")]
    NotIncoming(String),
    #[error("the log aborted change {0}")]
    Aborted(u64),
    #[error("the sender routes by another view at the same epoch")]
    ViewMismatch,
    #[error("the view in force is not known yet")]
    Unsettled,
    #[error("{0}")]
    Invalid(Invalid),
    #[error("nodes did not answer: {0:?}")]
    Unreachable(Vec<String>),
    #[error("storage: {0}")]
    Storage(String),
    #[error("too many requests waiting on this connection")]
    Busy,
    #[error("the sender had given up on this request before it could be served")]
    GaveUp,
}
