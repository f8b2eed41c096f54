//! What a node does when its metadata log decides something ([`Effects`]: a commit applies
//! the staged keys, switches view and drops what was handed over; an abort discards the
//! staged keys and releases the freeze), how the log's messages leave the node
//! ([`Transport`]), and how a node leaves a group's log to join another ([`reset`]): the glue
//! between [`crate::consensus`] and the node, so the consensus module knows nothing of
//! nodes.

use std::sync::{Arc, Weak};
use std::time::Duration;

use futures_util::future::BoxFuture;

use crate::change::{ChangeError, Migration};
use crate::consensus::{Effects, Transport};
use crate::meta::{Applied, Command, MetaState};
use crate::node::Node;
use crate::peers::PeerError;
use crate::rpc::{Request, Response};
use crate::wire::{Committed, Outcome};

/// The node as the log sees it (weak: the node owns its log).
pub struct Link(pub Weak<Node>);

impl Link {
    pub fn new(node: &Arc<Node>) -> Arc<Link> {
        Arc::new(Link(Arc::downgrade(node)))
    }
}

impl Effects for Link {
    fn applied(&self, command: &Command, applied: &Applied, state: &MetaState) {
        let Some(node) = self.0.upgrade() else { return };
        match (command, applied) {
            (Command::Genesis { .. }, Applied::Done) => {
                tracing::info!(
                    group = state.group,
                    view = ?state.view,
                    "the metadata group is formed"
                );
                follow_if_member(&node, state);
            }
            (Command::Commit { change_id }, Applied::Decided(outcome))
            | (Command::Abort { change_id }, Applied::Decided(outcome)) => {
                decided(&node, *change_id, *outcome, state);
            }
            _ => {}
        }
    }

    fn installed(&self, state: &MetaState) {
        let Some(node) = self.0.upgrade() else { return };
        super::journal::settle(&node, state);
        if let Some(migration) = node.migration() {
            let outcome = state.outcome(migration.change_id());
            if matches!(outcome, Outcome::Committed | Outcome::Aborted) {
                decided(&node, migration.change_id(), outcome, state);
            }
        }
        follow_if_member(&node, state);
    }
}

/// Routes by the view `state` holds if this node is a member of it under its current Raft
/// id (then it is no longer one that restarted empty), or a learner holding no key (one
/// added to a change that did not go through follows the group's view). A learner with
/// keys of its own (a node of another group being merged) keeps its view until the change
/// that adds it commits.
fn follow_if_member(node: &Node, state: &MetaState) {
    let member = node
        .meta()
        .is_some_and(|m| state.is_member(node.address(), m.id()));
    if member {
        node.set_restarted(false);
    }
    if member || (node.migration().is_none() && node.store().is_empty()) {
        node.follow(state.epoch, state.view.clone());
        follow_layout(node, state.epoch, state.layout.as_ref());
    }
}

/// The replicated mode: takes `layout` as the one in force when this node did not carry
/// out the change to it (it learned it from the log or a peer), dropping what it no longer
/// holds. A change this node prepared switches in [`commit_now`].
pub(crate) fn follow_layout(node: &Node, epoch: u64, layout: Option<&crate::shard::Layout>) {
    let (Some(replication), Some(layout)) = (node.replication(), layout) else {
        return;
    };
    let placed = replication.placed();
    if placed.layout() == layout && placed.epoch() >= epoch {
        return;
    }
    // Dropping what it no longer holds scans the store: off the runtime's threads when this
    // runs on one (a layout learned while serving).
    let switched = crate::blocking::off_runtime(|| {
        replication.handover(layout).and_then(|plan| {
            let dropping: Vec<(u64, u64)> =
                plan.dropping.iter().flat_map(|r| r.segments()).collect();
            replication.switch(epoch, layout, &dropping, std::iter::empty())
        })
    });
    if let Err(error) = switched {
        tracing::error!(%error, "taking the layout in force failed");
    }
}

/// Carries out on this node what the log decided for `change_id`.
fn decided(node: &Arc<Node>, change_id: u64, outcome: Outcome, state: &MetaState) {
    node.record_outcome(change_id, outcome);
    match outcome {
        Outcome::Committed => {
            // A test may hold this node's commit here (fault hooks).
            tokio::runtime::Handle::current().block_on(node.faults().commit_pause_point());
            if let Err(error) = commit_now(node, change_id) {
                tracing::error!(change = change_id, %error, "applying a committed change failed");
            }
            // A member that had not prepared the change (or had already applied it) takes
            // the view the log holds. A learner replaying the log keeps its own view until
            // the change that adds it (it may hold another group's keys to hand over).
            follow_if_member(node, state);
        }
        Outcome::Aborted => abort_now(node, change_id),
        Outcome::Pending | Outcome::Unknown => {}
    }
}

impl Transport for Link {
    fn send(
        &self,
        peer: String,
        request: Request,
        timeout: Duration,
    ) -> BoxFuture<'static, Result<Response, PeerError>> {
        let node = self.0.clone();
        Box::pin(async move {
            let Some(node) = node.upgrade() else {
                return Err(PeerError::Unreachable(peer));
            };
            node.peers()
                .send_once(&peer, &request, &node.view(), timeout)
                .await
        })
    }
}

/// The change `change_id`, if this node has it prepared.
pub(crate) fn prepared(node: &Node, change_id: u64) -> Result<Arc<Migration>, ChangeError> {
    node.migration()
        .filter(|m| m.change_id() == change_id)
        .ok_or(ChangeError::UnknownChange(change_id))
}

/// Applies a committed change here: received keys go live, the view switches, what was
/// handed over is dropped. Called in log order (from the log's effects) on a blocking
/// thread. A node that has not shipped what it hands over (it cannot happen when the log
/// commits only after every catch-up, but a bug must not lose keys) keeps those ranges.
pub(crate) fn commit_now(node: &Node, change_id: u64) -> Result<Committed, ChangeError> {
    let _serial = node.change_lock().blocking_lock();
    let migration = match prepared(node, change_id) {
        Ok(migration) => migration,
        Err(error) => {
            return if node.outcome(change_id) == Outcome::Committed {
                // A durable node killed during the change finishes it from its data dir.
                super::journal::recover(node, change_id, Outcome::Committed);
                Ok(node.committed_report(change_id))
            } else {
                Err(error)
            };
        }
    };
    let may_drop = migration.may_drop();
    if !may_drop {
        tracing::error!(
            change = change_id,
            "the log committed a change before this node shipped its ranges; keeping them"
        );
    }
    let staged = migration.take_staged();
    let received = staged.len() + migration.taken_in();
    if let (Some(replicated), Some(replication)) = (migration.replicated(), node.replication()) {
        // The replicated mode: the replica retires and its successor (if this node is in
        // the new layout) takes in what was staged, without what this node hands over.
        let dropping: Vec<(u64, u64)> = match may_drop {
            true => migration
                .dropping()
                .iter()
                .flat_map(|r| r.segments())
                .collect(),
            false => Vec::new(),
        };
        let records = staged
            .into_iter()
            .filter_map(|(k, s)| s.value.map(|v| (k, v)));
        node.record_outcome(change_id, Outcome::Committed);
        let epoch = migration.view().epoch;
        let switched = replication.switch(epoch, replicated.map.layout(), &dropping, records);
        node.switch_to(&migration);
        let frozen = migration.end_freeze();
        node.record_freeze(change_id, frozen);
        migration.end();
        switched.map_err(|e| ChangeError::Storage(crate::store::StoreError(e.to_string())))?;
        tracing::info!(
            change = change_id,
            epoch = migration.view().epoch,
            view = %migration.view().members_text(),
            received,
            dropped_ranges = dropping.len(),
            freeze_ms = frozen.map(|f| f.as_secs_f64() * 1000.0),
            keys = node.key_count(),
            "committed view change"
        );
        return Ok(node.committed_report(change_id));
    }
    super::journal::apply(node, change_id, staged)?;
    // The outcome first: a peer asking about the change between the switch and the record
    // would hear "unknown" and refuse to commit.
    node.record_outcome(change_id, Outcome::Committed);
    node.switch_to(&migration);
    let frozen = migration.end_freeze();
    node.record_freeze(change_id, frozen);
    migration.end();
    let mut dropped = 0;
    let handed_over = migration.outgoing().iter().filter(|_| may_drop);
    for (start, end) in handed_over.flat_map(|r| r.range.segments()) {
        dropped += node.store().remove_segment(start, end)?;
    }
    super::journal::end(node, change_id);
    tracing::info!(
        change = change_id,
        epoch = migration.view().epoch,
        view = %migration.view().members_text(),
        received,
        dropped,
        freeze_ms = frozen.map(|f| f.as_secs_f64() * 1000.0),
        keys = node.store().len(),
        "committed view change"
    );
    Ok(node.committed_report(change_id))
}

/// Abandons a prepared change as the log decided: received keys are discarded, the old
/// view stays, the frozen ranges are released. Called in log order, on a blocking thread.
pub(crate) fn abort_now(node: &Node, change_id: u64) {
    let _serial = node.change_lock().blocking_lock();
    let Ok(migration) = prepared(node, change_id) else {
        super::journal::recover(node, change_id, Outcome::Aborted);
        return;
    };
    node.record_outcome(change_id, Outcome::Aborted);
    node.drop_migration(&migration);
    if let Err(error) = super::journal::drop_segments(node, migration.incoming()) {
        tracing::error!(change = change_id, %error, "dropping the keys taken in failed");
    }
    super::journal::end(node, change_id);
    if let Some(replica) = node.replication().and_then(|r| r.replica()) {
        replica.untrack();
    }
    migration.end_freeze();
    migration.end();
    tracing::warn!(
        change = change_id,
        "aborted view change; the old view stays"
    );
}

/// Carries out here a decision this node learned from a peer's log, not its own (a node
/// the log no longer replicates to: one a change removed while it was paused).
pub(crate) async fn apply_learned(node: &Arc<Node>, migration: &Arc<Migration>, outcome: Outcome) {
    let (node, migration) = (node.clone(), migration.clone());
    let _ = tokio::task::spawn_blocking(move || match outcome {
        Outcome::Committed => {
            let _ = commit_now(&node, migration.change_id());
            node.follow(migration.view().epoch, migration.view().members.clone());
            let layout = migration.replicated().map(|r| r.map.layout());
            follow_layout(&node, migration.view().epoch, layout);
        }
        Outcome::Aborted => abort_now(&node, migration.change_id()),
        Outcome::Pending | Outcome::Unknown => {}
    })
    .await;
}

/// Starts this node's log afresh for a change (coordinated by `from`) that merges it into
/// another group, or takes it back into the group an earlier change removed it from: it
/// comes back as a new Raft node with an empty log, its keys and its view kept for the
/// handover. Refused while a change is prepared here.
pub(crate) async fn reset(node: &Arc<Node>, from: &str) -> Result<u64, ChangeError> {
    let _serial = node.change_lock().lock().await;
    if node.migration().is_some() {
        return Err(ChangeError::InProgress);
    }
    let link = Link::new(node);
    node.start_log(link.clone(), link, true)
        .await
        .map_err(|_| ChangeError::OtherGroup(node.address().to_string()))?;
    let id = node.meta().map_or(0, |m| m.id());
    tracing::warn!(
        coordinator = from,
        raft_id = id,
        "started a new incarnation of the log, to join the coordinator's group"
    );
    Ok(id)
}
