//! What each phase of a view change does on one participating node, and the watchdog that
//! finishes or abandons a change whose coordinator went silent.

use std::sync::Arc;

use super::apply::prepared;
use super::transfer::{ship_entries, ship_ranges};
use crate::change::{ChangeError, Migration, Moves};
use crate::node::Node;
use crate::ring::{key_hash, HashRing, MovedRange, RangeSet};
use crate::rpc::{Request, Response};
use crate::store::{Entry, Packed};
use crate::view::{View, ViewError};
use crate::wire::{Committed, Outcome, Prepare, Shipped};

/// Phase 1: remember the new view and start recording writes to the ranges that will move.
/// Taken only from the coordinator the message names, at an epoch newer than this node's
/// and within reach of it.
pub(crate) async fn prepare(
    node: &Arc<Node>,
    from: &str,
    request: Prepare,
) -> Result<(), ChangeError> {
    if request.coordinator != from {
        return Err(ChangeError::NotCoordinator(from.to_string()));
    }
    // Only a change the log has begun: wait (bounded) for this node's log to apply it.
    let meta = node
        .meta()
        .ok_or(ChangeError::UnknownChange(request.change_id))?;
    let begun = |s: &crate::meta::MetaState| {
        s.change.as_ref().is_some_and(|c| {
            c.change_id == request.change_id
                && c.epoch == request.epoch
                && c.view == request.view
                && c.layout == request.layout
        })
    };
    // The coordinator wrote it before asking: a log that lags gets there in moments.
    let timeout = node.peers().timeout();
    // And until this node carried out every entry before it (a commit applied late).
    if !meta.wait_for(timeout, begun).await || !meta.caught_up(timeout).await {
        return Err(ChangeError::UnknownChange(request.change_id));
    }
    let _serial = node.change_lock().lock().await;
    if let Some(current) = node.migration() {
        return if current.change_id() == request.change_id {
            Ok(())
        } else {
            Err(ChangeError::InProgress)
        };
    }
    let current = node.view();
    if request.epoch <= current.epoch {
        return Err(ChangeError::StaleEpoch {
            offered: request.epoch,
            current: current.epoch,
        });
    }
    if !crate::view::epoch_within_reach(current.epoch, request.epoch) {
        return Err(ChangeError::EpochTooFar {
            offered: request.epoch,
            current: current.epoch,
        });
    }
    let members =
        crate::view::parse_members(&request.view.join(",")).map_err(ChangeError::BadView)?;
    let view = View::new(request.epoch, members, node.config().vnodes)
        .map_err(|e| ChangeError::BadView(ViewError::BadEntry(e.to_string())))?;
    let (outgoing, incoming, taken_in, replicated) = match (node.replication(), &request.layout) {
        (Some(replication), Some(layout)) => {
            let plan = replication
                .handover(layout)
                .map_err(|e| ChangeError::BadView(ViewError::BadEntry(e.to_string())))?;
            let map = crate::shard::ShardMap::new(layout.clone(), node.config().vnodes)
                .map_err(|e| ChangeError::BadView(ViewError::BadEntry(e.to_string())))?;
            let replicated = crate::change::Replicated {
                map,
                dropping: plan.dropping,
            };
            let incoming = plan.incoming.len();
            (
                plan.outgoing,
                incoming,
                RangeSet::default(),
                Some(replicated),
            )
        }
        (None, None) => {
            let moved = HashRing::diff(&current.ring, &view.ring);
            let (outgoing, others): (Vec<MovedRange>, Vec<MovedRange>) =
                moved.into_iter().partition(|r| r.from == *node.address());
            let incoming: Vec<&MovedRange> =
                others.iter().filter(|r| r.to == *node.address()).collect();
            // Keys of the incoming ranges go into the store as they arrive, except when
            // another group merges in (its keys must not overwrite this group's).
            let taken_in = match request.merging.is_empty() {
                true => RangeSet::new(incoming.iter().map(|r| &r.range)),
                false => RangeSet::default(),
            };
            (outgoing, incoming.len(), taken_in, None)
        }
        _ => {
            return Err(ChangeError::BadView(ViewError::BadEntry(
                "a change in the other mode".into(),
            )))
        }
    };
    tracing::info!(
        change = request.change_id,
        epoch = request.epoch,
        view = %view.members_text(),
        coordinator = %request.coordinator,
        outgoing_ranges = outgoing.len(),
        incoming_ranges = incoming,
        "prepared view change"
    );
    let migration = Arc::new(Migration::new(
        request.change_id,
        request.coordinator,
        request.participants,
        view,
        Moves {
            outgoing,
            incoming: taken_in,
        },
        request.merging,
        replicated,
    ));
    // What the store holds in the incoming ranges is left over from an earlier change (no
    // request routes here for them): gone, so only what this change ships is there.
    super::journal::drop_segments(node, migration.incoming())?;
    // The replicated mode: every key this node's replica stores from now on (a client's,
    // a mate's, a refill's) is noted for the catch-up.
    if let Some(replica) = node.replication().and_then(|r| r.replica()) {
        replica.track();
    }
    super::journal::begin(node, &migration).await?;
    node.install_migration(migration.clone());
    tokio::spawn(watchdog(node.clone(), migration));
    Ok(())
}

/// Phase 2: ship every key of the outgoing ranges to its new owner; this node keeps
/// serving them meanwhile.
pub(crate) async fn transfer(
    node: &Arc<Node>,
    from: &str,
    change_id: u64,
) -> Result<Shipped, ChangeError> {
    let migration = prepared(node, change_id)?;
    migration.coordinated_by(from)?;
    migration.touch();
    node.faults().transfer_pause_point().await;
    let shipped = ship_ranges(node, &migration).await?;
    migration.mark_transferred();
    tracing::info!(
        change = change_id,
        ranges = shipped.ranges,
        keys = shipped.keys,
        bytes = shipped.bytes,
        "transfer done"
    );
    migration.touch();
    Ok(shipped)
}

/// A batch of entries from `from` for ranges it hands to this node.
pub(crate) async fn stage(
    node: &Arc<Node>,
    from: &str,
    change_id: u64,
    round: u8,
    entries: Packed,
) -> Result<(), ChangeError> {
    let migration = prepared(node, change_id)?;
    let (keys, bytes) = (entries.len(), entries.bytes());
    super::journal::stage(node, &migration, from, round, entries).await?;
    // Only a batch that was taken counts as progress (a refused one must not keep a dead
    // change alive past its watchdog).
    migration.touch();
    crate::metrics::received(keys, bytes);
    Ok(())
}

/// Phase 3: freeze writes to the outgoing ranges and re-send every key written there
/// since prepare (deleted keys as tombstones).
pub(crate) async fn catch_up(
    node: &Arc<Node>,
    from: &str,
    change_id: u64,
) -> Result<Shipped, ChangeError> {
    let migration = prepared(node, change_id)?;
    migration.coordinated_by(from)?;
    if !migration.transferred() {
        // Without the bulk transfer, a catch-up would mark as shipped ranges that never
        // left this node.
        return Err(ChangeError::NotShipped(change_id));
    }
    migration.touch();
    node.freeze(&migration);
    // A copy: the keys stay recorded until they are shipped, so a catch-up that fails (or
    // is cut off and sent again) re-sends them all. After the freeze no write adds any.
    let mut dirty = migration.dirty_keys();
    if let Some(replica) = node.replication().and_then(|r| r.replica()) {
        dirty.extend(
            replica
                .tracked()
                .into_iter()
                .filter(|key| migration.hands_over(key_hash(key.as_bytes()))),
        );
    }
    let entries = dirty
        .into_iter()
        .map(|key| {
            let value = node.store().get(key_hash(key.as_bytes()), &key)?;
            Ok(Entry { key, value })
        })
        .collect::<Result<Vec<Entry>, ChangeError>>()?;
    let shipped = ship_entries(node, &migration, entries).await?;
    migration.mark_shipped();
    tracing::info!(change = change_id, keys = shipped.keys, "catch-up done");
    migration.touch();
    Ok(shipped)
}

/// Phase 4, as the coordinator asks it: the log decides the change (see
/// [`super::apply`]); this waits until this node has applied the decision, and reports its
/// key count then. Refused if the log aborted the change.
pub(crate) async fn committed(node: &Arc<Node>, change_id: u64) -> Result<Committed, ChangeError> {
    let meta = node.meta().ok_or(ChangeError::UnknownChange(change_id))?;
    let decided = |s: &crate::meta::MetaState| s.outcome(change_id) != Outcome::Pending;
    // Asked once the log decided: a lagging log gets there in moments (the coordinator asks
    // again until its phase timeout).
    let timeout = node.peers().timeout();
    if meta.wait_for(timeout, decided).await {
        meta.caught_up(timeout).await;
    }
    match meta.state().outcome(change_id) {
        Outcome::Committed if node.migration().is_none_or(|m| m.change_id() != change_id) => {
            Ok(node.committed_report(change_id))
        }
        Outcome::Aborted => Err(ChangeError::Aborted(change_id)),
        _ => Err(ChangeError::UnknownChange(change_id)),
    }
}

/// Watches a prepared change: when nothing has been heard of it for the phase timeout, it
/// proposes to the log that the change be aborted. The log decides: if the coordinator's
/// commit is in it first, the change commits, here too. A node never decides alone: with
/// no majority reachable the change stays pending (ranges frozen) until one is.
async fn watchdog(node: Arc<Node>, migration: Arc<Migration>) {
    let timeout = node.config().phase_timeout;
    let mut ended = migration.ended();
    loop {
        tokio::select! {
            _ = ended.wait_for(|ended| *ended) => return,
            _ = tokio::time::sleep(timeout / 4) => {}
        }
        if migration.quiet_for() < timeout {
            continue;
        }
        let Some(meta) = node.meta() else { return };
        let change_id = migration.change_id();
        if driven(&node, change_id, migration.coordinator()).await {
            tracing::info!(
                change = change_id,
                coordinator = %migration.coordinator(),
                "no progress past the phase timeout, but the coordinator is still at work; waiting"
            );
            migration.touch();
            continue;
        }
        tracing::warn!(
            change = change_id,
            coordinator = %migration.coordinator(),
            "no progress past the phase timeout; proposing to the log that the change abort"
        );
        let proposed = meta
            .submit(
                crate::meta::LeaderOp::Write(crate::meta::Command::Abort { change_id }),
                node.peers().timeout(),
                migration.participants().to_vec(),
            )
            .await;
        match proposed {
            Ok(crate::meta::Applied::Decided(outcome)) => {
                tracing::warn!(change = change_id, ?outcome, "the log decided the change");
                // Applied here too once this node's log has it; a node the log no longer
                // replicates to (removed meanwhile) applies the leader's answer itself.
                let decided = |s: &crate::meta::MetaState| s.outcome(change_id) == outcome;
                if !meta.wait_for(timeout / 4, decided).await && !*ended.borrow() {
                    super::apply::apply_learned(&node, &migration, outcome).await;
                }
            }
            other => {
                tracing::warn!(
                    change = change_id,
                    ?other,
                    "the log did not take the abort; will ask again"
                );
            }
        }
        migration.touch();
    }
}

/// Whether `coordinator` says it is still driving change `change_id`.
async fn driven(node: &Node, change_id: u64, coordinator: &str) -> bool {
    let ask = Request::Driving { change_id };
    let driving = node.peers().ask(coordinator, &ask, &node.view()).await;
    matches!(driving, Ok(Response::Outcome(Outcome::Pending)))
}

/// While the node runs: a change the log has begun that this node has not prepared, still
/// undecided after twice the phase timeout, whose coordinator does not say it is driving
/// it (it died, or restarted, between writing `Begin` and sending `Prepare`), is proposed
/// for abort. No participant's watchdog covers it (none prepared it), and until it is
/// decided the log refuses every other change. The log decides: a commit that got there
/// first stands.
pub async fn orphan_watch(node: Arc<Node>) {
    let timeout = node.config().phase_timeout;
    let mut seen: Option<(u64, std::time::Instant)> = None;
    loop {
        tokio::time::sleep(timeout / 2).await;
        let Some(meta) = node.meta() else { continue };
        let pending = meta.state().change.filter(|c| {
            node.is_log_member()
                && node
                    .migration()
                    .is_none_or(|m| m.change_id() != c.change_id)
        });
        let Some(change) = pending else {
            seen = None;
            continue;
        };
        let since = match seen {
            Some((id, at)) if id == change.change_id => at,
            _ => {
                seen = Some((change.change_id, std::time::Instant::now()));
                continue;
            }
        };
        if since.elapsed() < timeout * 2
            || driven(&node, change.change_id, &change.coordinator).await
        {
            continue;
        }
        tracing::warn!(
            change = change.change_id,
            coordinator = %change.coordinator,
            "a change the log began is undecided, prepared nowhere here and not driven by its \
             coordinator; proposing that it abort"
        );
        let abort = crate::meta::Command::Abort {
            change_id: change.change_id,
        };
        let proposed = meta
            .submit(
                crate::meta::LeaderOp::Write(abort),
                node.peers().timeout(),
                change.participants.clone(),
            )
            .await;
        tracing::info!(change = change.change_id, ?proposed, "the log's answer");
        seen = None;
    }
}
