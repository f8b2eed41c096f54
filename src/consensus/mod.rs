//! The consensus log of the cluster metadata (openraft): one Raft group per cluster, whose
//! voters are the members of the view in force, each under the Raft id of its current
//! incarnation. [`Metadata`] is a node's handle on it: its id, the state it has applied,
//! proposals (sent to the leader wherever it is), and the answering side of the Raft
//! messages peers send.
//!
//! openraft rather than raft-rs: it is async on tokio (our runtime), brings joint-consensus
//! membership changes and learners, and asks only for a log store, a state machine and a
//! network, which we already have the parts for (raft-rs would have us drive ticks, ready
//! states and persistence by hand).

mod log;
mod machine;
mod network;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use openraft::error::{ClientWriteError, RaftError};
use openraft::{BasicNode, Raft, Snapshot};
use tokio::sync::watch;

pub use log::LogDisk;
pub use machine::{Effects, Published};
pub use network::Transport;

use crate::meta::{Applied, Command, LeadError, LeaderOp, MetaState, RaftId, TypeConfig};
use crate::rpc::{Request, Response};
use network::{RaftAnswer, RaftMessage};

/// A node's handle on the metadata log.
pub struct Metadata {
    id: RaftId,
    raft: Raft<TypeConfig>,
    published: watch::Receiver<Arc<Published>>,
    effected: watch::Receiver<u64>,
    transport: Arc<dyn Transport>,
}

/// A fresh Raft id for a new incarnation.
pub fn new_id() -> RaftId {
    let mut bytes = [0u8; 8];
    getrandom::fill(&mut bytes).expect("the OS gives random bytes");
    u64::from_le_bytes(bytes).max(1)
}

fn raft_config() -> openraft::Config {
    openraft::Config {
        cluster_name: "ringkv".into(),
        heartbeat_interval: 150,
        election_timeout_min: 750,
        election_timeout_max: 1500,
        // The metadata log is a few entries per view change: never compacted.
        snapshot_policy: openraft::SnapshotPolicy::Never,
        ..Default::default()
    }
}

impl Metadata {
    /// Starts this node's Raft instance: in memory, a new incarnation with an empty log;
    /// on `disk`, the incarnation and log kept there, unless `fresh` asks for a new
    /// incarnation (the node leaves its group's log).
    pub async fn start(
        effects: Arc<dyn Effects>,
        transport: Arc<dyn Transport>,
        disk: Option<LogDisk>,
        fresh: bool,
    ) -> Result<Metadata, String> {
        let kept = match &disk {
            Some(disk) if !fresh => disk.id()?,
            _ => None,
        };
        let id = match (kept, &disk) {
            (Some(id), _) => id,
            (None, Some(disk)) => {
                let id = new_id();
                disk.start_over(id)?;
                id
            }
            (None, None) => new_id(),
        };
        let log = log::MemLog::open(disk)?;
        let config = raft_config().validate().map_err(|e| e.to_string())?;
        let (publish, published) = watch::channel(Arc::new(Published::default()));
        let (effect, effected) = watch::channel(0);
        let machine = machine::Machine::new(effects, publish, effect);
        let network = network::Network {
            transport: transport.clone(),
        };
        let raft = Raft::new(id, Arc::new(config), network, log, machine)
            .await
            .map_err(|e| e.to_string())?;
        tokio::spawn(keep_voters_aligned(raft.clone(), id, published.clone()));
        Ok(Metadata {
            id,
            raft,
            published,
            effected,
            transport,
        })
    }

    /// This incarnation's Raft id.
    pub fn id(&self) -> RaftId {
        self.id
    }

    /// The state this node has applied.
    pub fn state(&self) -> MetaState {
        self.published.borrow().state.clone()
    }

    /// Whether `address` is a member of the applied view as this incarnation.
    pub fn is_member(&self, address: &str) -> bool {
        self.published.borrow().state.is_member(address, self.id)
    }

    /// A receiver of the applied state, for waiting on it.
    pub fn watch(&self) -> watch::Receiver<Arc<Published>> {
        self.published.clone()
    }

    /// Waits (up to `timeout`) until the applied state satisfies `f`.
    pub async fn wait_for(&self, timeout: Duration, f: impl Fn(&MetaState) -> bool) -> bool {
        let mut watch = self.published.clone();
        tokio::time::timeout(timeout, watch.wait_for(|p| f(&p.state)))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    /// Waits (up to `timeout`) until the node has carried out every entry applied so far;
    /// false if it has not.
    pub async fn caught_up(&self, timeout: Duration) -> bool {
        let applied = self.published.borrow().last_applied.map_or(0, |l| l.index);
        let mut effected = self.effected.clone();
        tokio::time::timeout(timeout, effected.wait_for(|done| *done >= applied))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    /// Whether this node's log holds anything (it formed or joined a group, even if it has
    /// not applied the group's first entry yet).
    pub fn in_log(&self) -> bool {
        self.raft.metrics().borrow().last_log_index.is_some()
    }

    /// The leader's address as this node last heard it.
    pub fn leader(&self) -> Option<String> {
        let metrics = self.raft.metrics().borrow().clone();
        let leader = metrics.current_leader?;
        metrics
            .membership_config
            .membership()
            .get_node(&leader)
            .map(|n| n.addr.clone())
    }

    /// The highest Raft term this incarnation has seen (it only grows).
    pub fn term(&self) -> u64 {
        self.raft.metrics().borrow().current_term
    }

    /// The log's voters (addresses) as this node last heard, in address order.
    pub fn voters(&self) -> Vec<String> {
        let metrics = self.raft.metrics().borrow().clone();
        let membership = metrics.membership_config.membership();
        let mut voters: Vec<String> = membership
            .voter_ids()
            .filter_map(|id| membership.get_node(&id).map(|n| n.addr.clone()))
            .collect();
        voters.sort_unstable();
        voters
    }

    /// Forms a new group of these nodes (Raft id → address), this one among them; then
    /// writes `genesis` as its first entry.
    pub async fn bootstrap(
        &self,
        members: BTreeMap<RaftId, String>,
        genesis: Command,
        timeout: Duration,
    ) -> Result<Applied, LeadError> {
        let nodes: BTreeMap<RaftId, BasicNode> = members
            .into_iter()
            .map(|(id, addr)| (id, BasicNode { addr }))
            .collect();
        if let Err(error) = self.raft.initialize(nodes).await {
            tracing::warn!(%error, "could not initialize the metadata group");
        }
        self.submit(LeaderOp::Write(genesis), timeout, Vec::new())
            .await
    }

    /// Carries out `op` if this node leads; otherwise says who does.
    pub async fn lead(&self, op: LeaderOp) -> Result<Applied, LeadError> {
        // A leader the last membership change removed still leads until that change is
        // committed, and must not start another (openraft asserts it): it is not the leader.
        let metrics = self.raft.metrics().borrow().clone();
        let voter = metrics
            .membership_config
            .membership()
            .voter_ids()
            .any(|id| id == self.id);
        if !voter {
            let leader = self
                .leader()
                .filter(|_| metrics.current_leader != Some(self.id));
            return Err(LeadError::NotLeader(leader));
        }
        let result = match op {
            LeaderOp::Write(command) => {
                return match self.raft.client_write(command).await {
                    Ok(response) => Ok(response.data),
                    Err(error) => Err(lead_error(error)),
                };
            }
            LeaderOp::AddLearner { id, address } => {
                // Not openraft's blocking add: it waits without a bound for the learner to
                // catch up, and one that cannot (a stale incarnation holding a higher term,
                // say) held the leader's answer, and the change, forever. A learner still
                // behind after the wait catches up while its participant waits for `Begin`.
                let added = self
                    .raft
                    .add_learner(id, BasicNode { addr: address }, false)
                    .await;
                if let Ok(response) = &added {
                    let index = response.log_id.index;
                    let caught_up = self
                        .raft
                        .wait(Some(LEARNER_CATCH_UP))
                        .metrics(
                            |m| {
                                m.replication
                                    .as_ref()
                                    .and_then(|r| r.get(&id).cloned().flatten())
                                    .is_some_and(|matched| matched.index >= index)
                            },
                            "the new learner caught up",
                        )
                        .await;
                    if caught_up.is_err() {
                        tracing::info!(learner = id, "the new learner is still catching up");
                    }
                }
                added
            }
            LeaderOp::Voters(voters) => {
                let ids: BTreeSet<RaftId> = voters.keys().copied().collect();
                self.raft.change_membership(ids, false).await
            }
        };
        result.map(|_| Applied::Done).map_err(lead_error)
    }

    /// Carries out `op` on the leader, wherever it is, within `timeout`. `hints` are where
    /// to look when this node does not know (it is not in the group yet, or the leader it
    /// knew stepped down): the leader a peer reported first, then the group's members, each
    /// asked in turn until one leads or names who does.
    pub async fn submit(
        &self,
        op: LeaderOp,
        timeout: Duration,
        hints: Vec<String>,
    ) -> Result<Applied, LeadError> {
        let deadline = Instant::now() + timeout;
        let mut next_hint = 0;
        let mut named: Option<String> = None;
        loop {
            // This node's Raft knows best who leads (it says so when it does not).
            let mut answer = self.lead(op.clone()).await;
            if let Err(LeadError::NotLeader(known)) = &answer {
                let candidate = known.clone().or(named.take()).or_else(|| {
                    let hint = hints.get(next_hint % hints.len().max(1)).cloned();
                    next_hint += 1;
                    hint
                });
                if let Some(address) = candidate {
                    // One hop, at most a second: a leader that stopped answering is replaced
                    // by an election meanwhile.
                    let left = deadline.saturating_duration_since(Instant::now());
                    let request = Request::Lead(op.clone());
                    let hop = left.min(Duration::from_secs(1));
                    answer = match self.transport.send(address, request, hop).await {
                        Ok(Response::Led(answer)) => answer,
                        Ok(_) => Err(LeadError::Failed("unexpected answer".into())),
                        Err(_) => Err(LeadError::NotLeader(None)),
                    };
                    if let Err(LeadError::NotLeader(Some(next))) = &answer {
                        named = Some(next.clone());
                    }
                }
            }
            match answer {
                // No leader known yet, or another membership change still committing.
                Err(LeadError::NotLeader(_) | LeadError::Busy) if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(LeadError::NotLeader(_)) => return Err(LeadError::NoLeader),
                other => return other,
            }
        }
    }

    /// Answers a Raft message a peer sent to Raft node `target`.
    pub async fn handle(&self, target: RaftId, message: &[u8]) -> Vec<u8> {
        let answer = if target != self.id {
            RaftAnswer::NotHere(format!("this node is Raft node {}, not {target}", self.id))
        } else {
            match postcard::from_bytes::<RaftMessage>(message) {
                Err(error) => RaftAnswer::NotHere(format!("undecodable raft message: {error}")),
                Ok(RaftMessage::Append(request)) => match self.raft.append_entries(request).await {
                    Ok(answer) => RaftAnswer::Append(answer),
                    Err(error) => RaftAnswer::NotHere(error.to_string()),
                },
                Ok(RaftMessage::Vote(request)) => match self.raft.vote(request).await {
                    Ok(answer) => RaftAnswer::Vote(answer),
                    Err(error) => RaftAnswer::NotHere(error.to_string()),
                },
                Ok(RaftMessage::Snapshot { vote, meta, state }) => {
                    let snapshot = Snapshot {
                        meta: *meta,
                        snapshot: state,
                    };
                    match self.raft.install_full_snapshot(vote, snapshot).await {
                        Ok(answer) => RaftAnswer::Snapshot(answer),
                        Err(error) => RaftAnswer::NotHere(error.to_string()),
                    }
                }
            }
        };
        postcard::to_allocvec(&answer).unwrap_or_default()
    }

    /// Stops the Raft instance (its tasks end).
    pub async fn shutdown(&self) {
        let _ = self.raft.shutdown().await;
    }
}

/// How long the leader waits for a learner it added to hold the log (the answer to the
/// coordinator's call must come well within its one-second hop).
const LEARNER_CATCH_UP: Duration = Duration::from_millis(500);

/// How often the leader compares the log's voters with the view's members.
const ALIGN_EVERY: Duration = Duration::from_millis(500);

/// How long the voters must have differed from the members before the leader steps in: the
/// coordinator changes them itself once every participant applied the commit, and a
/// removed node still being sent the log meanwhile learns the decision from it.
const ALIGN_GRACE: Duration = Duration::from_secs(5);

/// While this Raft instance runs: whenever it leads and the log's voters are not the applied
/// view's members (the coordinator's own membership change after a commit timed out, say,
/// because a member was paused), it makes them so. Without this a cluster whose voters are
/// still an old view's could lose its quorum to nodes the view no longer holds.
async fn keep_voters_aligned(
    raft: Raft<TypeConfig>,
    id: RaftId,
    mut published: watch::Receiver<Arc<Published>>,
) {
    let mut differ_since: Option<Instant> = None;
    loop {
        // A new state applied, or the period passed (a new leader checks within it).
        tokio::select! {
            changed = published.changed() => if changed.is_err() { return },
            _ = tokio::time::sleep(ALIGN_EVERY) => {}
        }
        let now = raft.metrics().borrow().clone();
        if now.running_state.is_err() {
            return;
        }
        let state = published.borrow_and_update().state.clone();
        let membership = now.membership_config.membership();
        // A joint configuration is left alone while it is being committed; one that is
        // committed but was never followed by its second step (the caller of that change
        // gave up, a member being paused) would stay for good, counting removed nodes as
        // voters: it is finished like any other difference.
        let applied = |index: u64| now.last_applied.is_some_and(|a| a.index >= index);
        let settled = membership.get_joint_config().len() == 1
            || now
                .membership_config
                .log_id()
                .is_some_and(|l| applied(l.index));
        let voters: BTreeSet<RaftId> = membership.voter_ids().collect();
        let members: BTreeSet<RaftId> = state.ids.values().copied().collect();
        let complete = state.formed() && members.len() == state.view.len();
        if now.current_leader != Some(id) || !settled || !complete || voters == members {
            differ_since = None;
            continue;
        }
        if differ_since.get_or_insert_with(Instant::now).elapsed() < ALIGN_GRACE {
            continue;
        }
        tracing::info!(
            ?voters,
            ?members,
            "making the view's members the log's voters"
        );
        match raft.change_membership(members, false).await {
            Ok(_) => tracing::info!("the log's voters are the view's members"),
            Err(error) => tracing::warn!(%error, "could not align the log's voters yet"),
        }
    }
}

fn lead_error(error: RaftError<RaftId, ClientWriteError<RaftId, BasicNode>>) -> LeadError {
    match error {
        RaftError::APIError(ClientWriteError::ForwardToLeader(forward)) => {
            LeadError::NotLeader(forward.leader_node.map(|n| n.addr))
        }
        RaftError::APIError(ClientWriteError::ChangeMembershipError(
            openraft::error::ChangeMembershipError::InProgress(_),
        )) => LeadError::Busy,
        other => LeadError::Failed(other.to_string()),
    }
}
