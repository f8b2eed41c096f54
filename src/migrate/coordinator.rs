//! The view-change coordinator: whichever node receives `PUT /kvs/view-change` probes every
//! node of the old and new view, begins the change in the metadata log, drives prepare →
//! transfer → catch-up, then proposes the decision to the log (commit, or abort if a step
//! failed) and waits for every node to confirm it applied it.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::future::join_all;
use xxhash_rust::xxh3::xxh3_64;

use crate::change::ChangeError;
use crate::consensus::Metadata;
use crate::meta::{Applied, Change, Command, LeaderOp, Refusal as MetaRefusal};
use crate::metrics::{self, ChangeOutcome};
use crate::node::Node;
use crate::peers::PeerError;
use crate::rpc::{Refusal, Request, Response};
use crate::shard::Layout;
use crate::view::{View, ViewError};
use crate::wire::{ChangeReport, Committed, GroupState, NodeState, Outcome, Prepare, Shipped};

/// How long the transfer and catch-up phases may take on one node.
const PHASE_CALL_TIMEOUT: Duration = Duration::from_secs(120);

/// One entry of the reply's `shards`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Shard {
    pub address: String,
    pub key_count: usize,
}

fn as_change_error(errors: Vec<PeerError>) -> ChangeError {
    let conflict = errors.iter().any(|e| {
        matches!(
            e,
            PeerError::Refused {
                refusal: Refusal::InProgress,
                ..
            }
        )
    });
    if conflict {
        return ChangeError::InProgress;
    }
    let mut unreachable: Vec<String> = Vec::new();
    for error in errors {
        let peers = match error {
            PeerError::Refused {
                refusal: Refusal::Unreachable(peers),
                ..
            } if !peers.is_empty() => peers,
            other => vec![other.peer().to_string()],
        };
        for peer in peers {
            if !unreachable.contains(&peer) {
                unreachable.push(peer);
            }
        }
    }
    ChangeError::Unreachable(unreachable)
}

struct Run<'a> {
    node: &'a Arc<Node>,
    view: Arc<View>,
    participants: Vec<String>,
}

impl Run<'_> {
    /// Sends one call to every participant at once; every answer (as `answer` reads it), or
    /// every failure.
    async fn everyone<T>(
        &self,
        request: &Request,
        timeout: Duration,
        answer: impl Fn(Response) -> Option<T>,
    ) -> Result<Vec<T>, Vec<PeerError>> {
        let calls = self.participants.iter().map(|peer| async {
            let response = self
                .node
                .peers()
                .call(peer, request, &self.view, timeout)
                .await?;
            answer(response).ok_or_else(|| PeerError::BadAnswer(peer.clone()))
        });
        let (ok, failed): (Vec<_>, Vec<_>) =
            join_all(calls).await.into_iter().partition(Result::is_ok);
        if failed.is_empty() {
            Ok(ok.into_iter().filter_map(Result::ok).collect())
        } else {
            Err(failed.into_iter().filter_map(Result::err).collect())
        }
    }

    /// Runs the transfer or catch-up phase on every participant; logs what it shipped.
    async fn shipping_phase(&self, request: Request) -> Result<Vec<Shipped>, Vec<PeerError>> {
        let started = Instant::now();
        let shipped: Vec<Shipped> = self
            .everyone(&request, PHASE_CALL_TIMEOUT, |r| match r {
                Response::Shipped(shipped) => Some(shipped),
                _ => None,
            })
            .await?;
        tracing::info!(
            millis = started.elapsed().as_millis() as u64,
            keys = shipped.iter().map(|s| s.keys).sum::<usize>(),
            bytes = shipped.iter().map(|s| s.bytes).sum::<usize>(),
            "phase {} done",
            request.name()
        );
        Ok(shipped)
    }

    /// Tells one participant to commit.
    async fn commit_on(&self, peer: &str, change_id: u64) -> Result<Committed, PeerError> {
        let peers = self.node.peers();
        let request = Request::Commit { change_id };
        match peers
            .call(peer, &request, &self.view, peers.timeout())
            .await?
        {
            Response::Committed(committed) => Ok(committed),
            _ => Err(PeerError::BadAnswer(peer.to_string())),
        }
    }
}

/// What a view change asks for.
#[derive(Debug, Clone)]
pub struct Target {
    pub members: Vec<String>,
    /// Leave out members of the old view that do not answer the probe (their keys are lost:
    /// the operator's `PUT /cluster/view-change`).
    pub drop_unreachable: bool,
    /// The replication factor after the change (the replicated mode): members of the old
    /// view that do not answer are left out when their shard keeps a replica that does.
    pub factor: Option<usize>,
}

/// A view change carried out.
#[derive(Debug, Clone)]
pub struct Changed {
    /// Each node of the new view in its order, with its key count after the change.
    pub shards: Vec<Shard>,
    /// The shard layout after the change (the replicated mode).
    pub layout: Option<Layout>,
    /// Members of the old view left out because they did not answer.
    pub left_out: Vec<String>,
}

/// Carries out a view change to `target`. A member of the new view must answer the probe;
/// one of the old view that does not is left out as [`Target`] says, else the change fails.
///
/// The change runs in its own task, to its end, even if the client hangs up: dropped
/// half-way, it would leave the participants prepared (ranges frozen after the catch-up)
/// until their watchdogs settle it.
pub async fn change_view(node: &Arc<Node>, target: Target) -> Result<Changed, ChangeError> {
    let node = node.clone();
    let coordinating = async move { coordinate(&node, target).await };
    match tokio::spawn(coordinating).await {
        Ok(result) => result,
        // A panic in the coordinator is a bug; the change it left is settled by the
        // participants' watchdogs. The client gets a 503, not a dropped connection.
        Err(failure) => {
            tracing::error!(%failure, "the view-change coordinator failed");
            Err(ChangeError::Unreachable(Vec::new()))
        }
    }
}

async fn coordinate(node: &Arc<Node>, request: Target) -> Result<Changed, ChangeError> {
    let Target {
        members,
        drop_unreachable,
        factor,
    } = request;
    let Ok(_coordinating) = node.coordinating().try_lock() else {
        return Err(ChangeError::InProgress);
    };
    if node.migration().is_some() {
        return Err(ChangeError::InProgress);
    }
    let target = View::new(0, members, node.config().vnodes)
        .map_err(|e| ChangeError::BadView(ViewError::BadEntry(e.to_string())))?;
    let old = node.view();
    // The replicated mode: the layout after the change, regrouped from the one in force.
    let replication = node.replication();
    let layout = match (replication, factor) {
        (Some(replication), Some(factor)) => Some(
            replication
                .regroup(&target.members, factor)
                .map_err(|e| ChangeError::BadView(ViewError::Layout(e)))?,
        ),
        (Some(_), None) => return Err(ChangeError::BadView(ViewError::FactorMissing)),
        (None, _) => None,
    };
    let old_layout = replication.map(|r| r.placed().layout().clone());
    let mut left_out: Vec<String> = Vec::new();
    let mut participants = target.members.clone();
    for member in &old.members {
        if !participants.contains(member) {
            participants.push(member.clone());
        }
    }
    let mut run = Run {
        node,
        view: old.clone(),
        participants,
    };
    let started = Instant::now();
    let forming_deadline = started + node.config().connect_window.max(Duration::from_secs(2));

    // This node may be behind (a removed node hears of no later change): whoever serves
    // the newest epoch knows its members, who hold the data and must take part too.
    let states: Vec<NodeState> = loop {
        let probed = run
            .everyone(&Request::State, node.peers().timeout(), |r| match r {
                Response::State(state) => Some(*state),
                _ => None,
            })
            .await;
        let states = match probed.map_err(as_change_error) {
            Ok(states) => states,
            Err(ChangeError::Unreachable(gone))
                if !gone.iter().any(|g| target.members.contains(g))
                    && (drop_unreachable
                        || old_layout.as_ref().is_some_and(|l| {
                            keeps_a_replica(l, &gone, &left_out, &run.participants)
                        })) =>
            {
                if old_layout.is_some() && !drop_unreachable {
                    tracing::warn!(
                        ?gone,
                        "leaving out unreachable members of the old view; their shards' \
                         other replicas hand over for them"
                    );
                } else {
                    tracing::warn!(
                        ?gone,
                        "dropping unreachable members of the old view; the keys they held are lost"
                    );
                }
                run.participants.retain(|p| !gone.contains(p));
                left_out.extend(gone);
                continue;
            }
            Err(error) => return Err(error),
        };
        let newest = states.iter().max_by_key(|s| s.epoch);
        let missing: Vec<String> = newest
            .filter(|s| s.epoch > old.epoch)
            .map(|s| {
                s.view
                    .iter()
                    .filter(|m| !run.participants.contains(m))
                    .cloned()
                    .collect()
            })
            .unwrap_or_default();
        // Nodes that have just started may not have formed their group yet.
        if group_of(&states).is_none() && Instant::now() < forming_deadline {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        }
        if missing.is_empty() {
            break states;
        }
        tracing::info!(?missing, "members of a newer view take part in the change");
        run.participants.extend(missing);
    };
    if states.iter().any(|s| s.pending.is_some()) {
        return Err(ChangeError::InProgress);
    }
    // A no-op only when every node holds this view at one epoch as a member of one group
    // under its current incarnation (a node that restarted empty is taken back by a change).
    let one_group = group_of(&states).is_some_and(|g| {
        states.iter().all(|s| {
            g.ids.get(&s.address) == Some(&s.raft_id)
                && s.group.as_ref().map(|h| h.group) == Some(g.group)
        })
    });
    let agreed = one_group
        && states
            .iter()
            .all(|s| s.view_id == target.id && s.epoch == states[0].epoch && s.layout == layout);
    if agreed {
        tracing::info!(view = %target.members_text(), "view change to the view in force: no-op");
        let counts: HashMap<&str, usize> = states
            .iter()
            .map(|s| (s.address.as_str(), s.key_count))
            .collect();
        return Ok(Changed {
            shards: shards(&target, |a| counts.get(a).copied()),
            layout,
            left_out,
        });
    }
    // The group whose log decides the change: the newest (then the largest) of the groups
    // the participants belong to. Nodes of other groups (a node started alone, two groups
    // started apart) leave theirs and join it, their keys with them.
    let Some(group) = group_of(&states).cloned() else {
        let unformed: Vec<String> = states.iter().map(|s| s.address.clone()).collect();
        tracing::warn!(?unformed, "no participant belongs to a formed group yet");
        return Err(ChangeError::Unreachable(unformed));
    };
    if group.change.is_some() {
        return Err(ChangeError::InProgress);
    }
    let timeout = node.config().phase_timeout;
    // Where to send the log's operations: the leader the group reported, then its members.
    let leader: Vec<String> = group.leader.iter().chain(&group.view).cloned().collect();
    let mut joining = BTreeMap::new();
    let mut merging = Vec::new();
    for state in &states {
        if group.ids.get(&state.address) == Some(&state.raft_id) {
            continue;
        }
        let mut id = state.raft_id;
        let other_log = match &state.group {
            Some(other) => other.group != group.group,
            // A log with entries but no group applied yet: it is forming one of its own.
            None => state.in_log,
        };
        // A node an earlier change removed from this group, taken back.
        let removed = !other_log
            && target.members.contains(&state.address)
            && state.group.as_ref().is_some_and(|g| g.group == group.group);
        if other_log {
            // Leaves its own group for this one, keeping its keys for the handover.
            id = reset(node, &state.address, &run.view).await?;
            merging.push(state.address.clone());
        } else if removed {
            // Comes back as a new incarnation, with an empty log: the old one's log may stop
            // before the membership change that removed it, and then it stood for election
            // alone, term after term; added back under that id, its term would unseat the
            // leader, again at each election it races. Not before the log has stopped
            // counting the old one among its voters, though.
            until_not_a_voter(node, &group.view, &state.address, &run.view, timeout).await?;
            id = reset(node, &state.address, &run.view).await?;
            tracing::info!(node = %state.address, raft_id = id, "a removed node comes back as a new incarnation");
        } else if group.ids.contains_key(&state.address) {
            tracing::warn!(
                node = %state.address,
                "this node restarted empty; the change takes it back as a new incarnation, \
                 the keys it held are lost"
            );
        }
        if target.members.contains(&state.address) {
            joining.insert(state.address.clone(), id);
        }
    }
    let used = LogUse::default();
    // Taken after the resets: this node may have left its own group just now.
    let meta = node.meta().ok_or(ChangeError::Unreachable(Vec::new()))?;
    for (address, id) in &joining {
        let op = LeaderOp::AddLearner {
            id: *id,
            address: address.clone(),
        };
        submit(&meta, op, timeout, &leader, &used).await?;
    }

    let newest = states
        .iter()
        .map(|s| s.epoch.max(s.group.as_ref().map_or(0, |g| g.epoch)))
        .max()
        .unwrap_or(0);
    let Some(epoch) = newest
        .checked_add(1)
        .filter(|e| crate::view::epoch_within_reach(newest, *e))
    else {
        tracing::error!(newest, "no epoch left after {newest}; refusing the change");
        return Err(ChangeError::EpochTooFar {
            offered: newest,
            current: old.epoch,
        });
    };
    let change_id = xxh3_64(format!("{}#{epoch}#{:?}", node.address(), Instant::now()).as_bytes());
    let begin = Change {
        change_id,
        epoch,
        view: target.members.clone(),
        coordinator: node.address().to_string(),
        participants: run.participants.clone(),
        joining: joining.clone(),
        merging: merging.clone(),
        layout: layout.clone(),
    };
    match submit(
        &meta,
        LeaderOp::Write(Command::Begin(begin)),
        timeout,
        &leader,
        &used,
    )
    .await?
    {
        Applied::Done => {}
        // Another change is under way, or went through since the probe.
        Applied::Refused(MetaRefusal::InProgress | MetaRefusal::StaleEpoch { .. }) => {
            return Err(ChangeError::InProgress)
        }
        other => {
            tracing::warn!(?other, "the log refused the change");
            return Err(ChangeError::Unreachable(Vec::new()));
        }
    }
    if node.faults().crash_after_begin() {
        tracing::warn!(change = change_id, "fault hook: exiting right after Begin");
        node.faults().crash().await;
    }
    node.coordinate(change_id);
    metrics::view_change(ChangeOutcome::Started);
    tracing::info!(
        change = change_id,
        epoch,
        from = %old.members_text(),
        to = %target.members_text(),
        "coordinating view change (begun in the log)"
    );
    let prepare = Prepare {
        change_id,
        epoch,
        view: target.members.clone(),
        coordinator: node.address().to_string(),
        participants: run.participants.clone(),
        merging,
        layout: layout.clone(),
    };
    let phases = async {
        let phase_started = Instant::now();
        run.everyone(&Request::Prepare(prepare), timeout, |r| {
            matches!(r, Response::Done).then_some(())
        })
        .await?;
        tracing::info!(
            change = change_id,
            millis = phase_started.elapsed().as_millis() as u64,
            "phase prepare done"
        );
        let transfer_started = Instant::now();
        let shipped = run.shipping_phase(Request::Transfer { change_id }).await?;
        let transfer_ms = transfer_started.elapsed().as_secs_f64() * 1000.0;
        let caught_up = run.shipping_phase(Request::CatchUp { change_id }).await?;
        Ok::<_, Vec<PeerError>>((shipped, caught_up, transfer_ms))
    };
    let phases = phases.await;
    node.faults().decide_pause_point().await;
    // The commit point is the log's: the first of Commit and Abort in it decides.
    let proposal = match &phases {
        Ok(_) => Command::Commit { change_id },
        Err(_) => Command::Abort { change_id },
    };
    let log_started = Instant::now();
    // Until the log holds a decision: a leader that is being replaced (an election after
    // the last change's voters took over) costs a retry, never a guess.
    let decided = loop {
        let op = LeaderOp::Write(proposal.clone());
        let decided = submit(&meta, op, timeout, &leader, &used).await;
        if decided.is_ok() || log_started.elapsed() >= timeout * 2 {
            break decided;
        }
        if let outcome @ (Outcome::Committed | Outcome::Aborted) = meta.state().outcome(change_id) {
            break Ok(Applied::Decided(outcome));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    // No leader took the proposal in time (a voter paused, an election under way): what
    // was proposed may still be decided once the log has a quorum again. Waiting one more
    // phase timeout for this node's log to apply a decision turns most of those into a
    // definite answer instead of a 503 whose change commits later.
    let decided = match decided {
        Err(error) => {
            let known = |s: &crate::meta::MetaState| s.outcome(change_id) != Outcome::Pending;
            if meta.wait_for(timeout, known).await {
                Ok(Applied::Decided(meta.state().outcome(change_id)))
            } else {
                Err(error)
            }
        }
        decided => decided,
    };
    let log_millis = log_started.elapsed().as_secs_f64() * 1000.0;
    node.decide(
        change_id,
        match &decided {
            Ok(Applied::Decided(outcome)) => *outcome,
            _ => Outcome::Pending,
        },
    );
    let (shipped, caught_up, transfer_ms) = match (phases, decided) {
        (Ok(done), Ok(Applied::Decided(Outcome::Committed))) => done,
        (phases, decided) => {
            let logged = format!("{decided:?}");
            let error = match (phases, decided) {
                (Err(errors), _) => as_change_error(errors),
                // The log did not answer in time: the Commit proposed may still be decided
                // (once a paused voter is back), so this is not an abort. The answer names
                // who did not answer, as for any change that could not finish.
                (Ok(_), Err(error)) => error,
                (Ok(_), Ok(_)) => ChangeError::Aborted(change_id),
            };
            tracing::warn!(change = change_id, %error, decided = %logged, "view change not committed");
            metrics::view_change(ChangeOutcome::Aborted);
            return Err(error);
        }
    };
    metrics::view_change(ChangeOutcome::Committed);
    let phase_started = Instant::now();
    let (committed, unconfirmed) = commit_everywhere(&run, change_id).await;
    tracing::info!(
        change = change_id,
        millis = phase_started.elapsed().as_millis() as u64,
        log_commit_ms = log_millis,
        "phase commit done"
    );
    // The new view's members become the log's voters (joint consensus); removed nodes
    // leave the log (one that was paused through the commit learns the outcome from a
    // member when it asks: see the watchdog and `learn`).
    let state = meta.state();
    let skip = node.faults().skip_voter_change();
    if !skip && state.epoch >= epoch && state.ids.len() == target.members.len() {
        let voters: BTreeMap<u64, String> = state.ids.into_iter().map(|(a, id)| (id, a)).collect();
        if let Err(error) = submit(&meta, LeaderOp::Voters(voters), timeout, &leader, &used).await {
            tracing::warn!(%error, "the log's voters are not the new view's members yet");
        }
    }
    let report = ChangeReport {
        epoch,
        view: target.members.clone(),
        moved_ranges: shipped.iter().map(|s| s.ranges).sum(),
        keys_shipped: shipped.iter().map(|s| s.keys).sum(),
        bytes_shipped: shipped.iter().map(|s| s.bytes).sum(),
        keys_caught_up: caught_up.iter().map(|s| s.keys).sum(),
        millis: started.elapsed().as_millis() as u64,
        log_ops: used.ops.load(std::sync::atomic::Ordering::Relaxed),
        log_millis: used.micros.load(std::sync::atomic::Ordering::Relaxed) as f64 / 1000.0,
        freeze_ms: committed
            .values()
            .filter_map(|c| c.freeze_micros)
            .max()
            .map_or(0.0, |us| us as f64 / 1000.0),
        transfer_ms,
    };
    tracing::info!(change = change_id, ?report, "view change committed");
    node.set_last_change(report);
    if !unconfirmed.is_empty() {
        tracing::warn!(
            change = change_id,
            ?unconfirmed,
            "committed, but these nodes did not confirm within the phase timeout; \
             they apply the change when their log has it"
        );
        return Err(ChangeError::Unreachable(unconfirmed));
    }
    Ok(Changed {
        shards: shards(&target, |a| committed.get(a).map(|c| c.key_count)),
        layout,
        left_out,
    })
}

/// Whether every one of `gone` (members of the old view that did not answer) has a
/// shard-mate in `layout` that is still taking part (not gone, not left out before).
fn keeps_a_replica(
    layout: &Layout,
    gone: &[String],
    left_out: &[String],
    taking_part: &[String],
) -> bool {
    gone.iter().all(|g| {
        layout.shard_of(g).is_some_and(|shard| {
            shard
                .replicas
                .iter()
                .any(|r| !gone.contains(r) && !left_out.contains(r) && taking_part.contains(r))
        })
    })
}

/// The group the change belongs to: the newest, then the largest, then the lowest id.
fn group_of(states: &[NodeState]) -> Option<&GroupState> {
    states
        .iter()
        .filter_map(|s| s.group.as_ref())
        .max_by(|a, b| {
            (a.epoch, a.view.len(), std::cmp::Reverse(a.group)).cmp(&(
                b.epoch,
                b.view.len(),
                std::cmp::Reverse(b.group),
            ))
        })
}

/// Time spent in, and number of, the metadata log's operations of one change.
#[derive(Default)]
struct LogUse {
    micros: std::sync::atomic::AtomicU64,
    ops: std::sync::atomic::AtomicUsize,
}

async fn submit(
    meta: &Metadata,
    op: LeaderOp,
    timeout: Duration,
    leader: &[String],
    used: &LogUse,
) -> Result<Applied, ChangeError> {
    let started = Instant::now();
    let done = submit_op(meta, op, timeout, leader).await;
    let ordering = std::sync::atomic::Ordering::Relaxed;
    used.micros
        .fetch_add(started.elapsed().as_micros() as u64, ordering);
    used.ops.fetch_add(1, ordering);
    done
}

async fn submit_op(
    meta: &Metadata,
    op: LeaderOp,
    timeout: Duration,
    leader: &[String],
) -> Result<Applied, ChangeError> {
    let name = match &op {
        LeaderOp::Write(command) => command.name(),
        LeaderOp::AddLearner { .. } => "add-learner",
        LeaderOp::Voters(_) => "voters",
    };
    meta.submit(op, timeout, leader.to_vec())
        .await
        .map_err(|error| {
            tracing::warn!(op = name, %error, "the metadata log did not take the operation");
            ChangeError::Unreachable(leader.iter().take(1).cloned().collect())
        })
}

/// Asks `peer`, a node of another group, to leave it; its new Raft id.
/// Waits (up to `timeout`) until no member of the group (`members`) counts `removed`
/// among the log's voters. The change that removed it then makes the new view's members
/// the voters, in two steps of joint consensus; while the first is not committed, the old
/// voters' majority is still needed, the removed node's old incarnation among them. A
/// reset before that drops a voter the log cannot commit without, for good: the nemesis
/// test found a 2-voter group stuck in its joint configuration that way, every later
/// change failing. `InProgress` if the voters did not change in time.
async fn until_not_a_voter(
    node: &Node,
    members: &[String],
    removed: &str,
    view: &View,
    timeout: Duration,
) -> Result<(), ChangeError> {
    let deadline = Instant::now() + timeout;
    loop {
        let asked = members
            .iter()
            .filter(|m| *m != removed)
            .map(|member| async move {
                match node.peers().ask(member, &Request::State, view).await {
                    Ok(Response::State(state)) => Some(
                        state
                            .group
                            .is_some_and(|g| !g.voters.iter().any(|v| v == removed)),
                    ),
                    _ => None,
                }
            });
        // Members that answered (one that is down does not hold this up) all agree.
        let answers: Vec<bool> = join_all(asked).await.into_iter().flatten().collect();
        if !answers.is_empty() && answers.iter().all(|gone| *gone) {
            return Ok(());
        }
        if Instant::now() >= deadline {
            tracing::warn!(
                node = removed,
                "the log still counts this removed node among its voters; not taking it back yet"
            );
            return Err(ChangeError::InProgress);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn reset(node: &Node, peer: &str, view: &View) -> Result<u64, ChangeError> {
    match node
        .peers()
        .call(peer, &Request::Reset, view, node.peers().timeout())
        .await
    {
        Ok(Response::Reset(id)) => Ok(id),
        Ok(_) => Err(ChangeError::OtherGroup(peer.to_string())),
        Err(error) => Err(as_change_error(vec![error])),
    }
}

/// Asks every participant to confirm it applied the commit the log holds (and its key
/// count); one that does not confirm in time applies it when its log has it.
async fn commit_everywhere(
    run: &Run<'_>,
    change_id: u64,
) -> (HashMap<String, Committed>, Vec<String>) {
    let node = run.node;
    if node.faults().crash_after_first_commit() {
        for peer in run.participants.iter().filter(|p| ***p != **node.address()) {
            let answer = run.commit_on(peer, change_id).await;
            if answer.is_ok() {
                tracing::warn!(%peer, "fault hook: coordinator crashes after the first commit");
                node.faults().crash().await;
            }
        }
    }
    // The change is decided: keep telling each participant until it confirms, for up to
    // the phase timeout, so the answer reflects every node serving the new view.
    let deadline = Instant::now() + node.config().phase_timeout;
    let calls = run.participants.iter().map(|peer| async move {
        let mut pause = Duration::from_millis(50);
        loop {
            let asked = Instant::now();
            let answer = run.commit_on(peer, change_id).await;
            match answer {
                Ok(done) => return Ok((peer.clone(), done)),
                // A call that began before the deadline and failed after it (this node was
                // paused meanwhile) is tried once more.
                Err(error) if Instant::now() + pause < deadline || asked < deadline => {
                    tracing::warn!(%peer, %error, "commit not confirmed; retrying");
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_secs(1));
                }
                Err(_) => return Err(peer.clone()),
            }
        }
    });
    let mut counts = HashMap::new();
    let mut unconfirmed = Vec::new();
    for answer in join_all(calls).await {
        match answer {
            Ok((peer, done)) => {
                counts.insert(peer, done);
            }
            Err(peer) => unconfirmed.push(peer),
        }
    }
    (counts, unconfirmed)
}

fn shards(view: &View, count: impl Fn(&str) -> Option<usize>) -> Vec<Shard> {
    view.members
        .iter()
        .map(|address| Shard {
            address: address.clone(),
            key_count: count(address).unwrap_or(0),
        })
        .collect()
}
