//! What each phase of a view change does on one participating node, and the watchdog that
//! finishes or abandons a change whose coordinator went silent.

use std::sync::Arc;

use super::transfer::{ship_entries, ship_ranges};
use crate::change::{ChangeError, Migration};
use crate::node::Node;
use crate::ring::{key_hash, HashRing, MovedRange};
use crate::rpc::{Request, Response};
use crate::store::Entry;
use crate::view::{View, ViewError};
use crate::wire::{Committed, Outcome, Prepare, Shipped};

fn prepared(node: &Node, change_id: u64) -> Result<Arc<Migration>, ChangeError> {
    node.migration()
        .filter(|m| m.change_id() == change_id)
        .ok_or(ChangeError::UnknownChange(change_id))
}

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
    let moved = HashRing::diff(&current.ring, &view.ring);
    let (outgoing, others): (Vec<MovedRange>, Vec<MovedRange>) =
        moved.into_iter().partition(|r| r.from == *node.address());
    let incoming = others.iter().filter(|r| r.to == *node.address()).count();
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
        outgoing,
    ));
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
pub(crate) fn stage(
    node: &Node,
    from: &str,
    change_id: u64,
    entries: Vec<Entry>,
) -> Result<(), ChangeError> {
    let migration = prepared(node, change_id)?;
    let (keys, bytes) = (entries.len(), entries.iter().map(Entry::size).sum());
    migration.stage(node.address(), from, entries)?;
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
    let entries = migration
        .dirty_keys()
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

/// Phase 4: make received keys live, switch to the new view, drop what was handed over.
/// Idempotent: committing a change that already committed here reports the key count.
/// `from` is the coordinator that asks, or `None` when this node settles the change itself
/// (its watchdog, or a peer already serving the new epoch). Refused while this node has not
/// shipped what it hands over: a commit never drops keys that are nowhere else.
pub(crate) async fn commit(
    node: &Arc<Node>,
    from: Option<&str>,
    change_id: u64,
) -> Result<Committed, ChangeError> {
    if let Some(migration) = node.migration().filter(|m| m.change_id() == change_id) {
        if let Some(from) = from {
            migration.coordinated_by(from)?;
        }
        confirm_with_members(node, &migration).await?;
    }
    node.faults().commit_pause_point().await;
    let node = node.clone();
    // On a blocking thread: applying and dropping a large range takes a while, and once
    // begun it must finish even if the caller goes away (half a commit loses staged keys).
    tokio::task::spawn_blocking(move || commit_now(&node, change_id))
        .await
        .unwrap_or(Err(ChangeError::UnknownChange(change_id)))
}

/// A node never decides a change alone: before it commits, it asks the other members of
/// its current view (the coordinator aside, which decided) for the change's outcome. One
/// that answers it does not know the change (unknown, aborted) stops the commit. One that
/// does not answer does not: a member may die after shipping, and an operator's
/// `PUT /cluster/view-change` leaves unreachable members out on purpose.
async fn confirm_with_members(node: &Arc<Node>, migration: &Migration) -> Result<(), ChangeError> {
    let view = node.view();
    let ask = Request::Outcome {
        change_id: migration.change_id(),
    };
    let others = view
        .members
        .iter()
        .filter(|m| **m != **node.address() && *m != migration.coordinator());
    let answers = futures_util::future::join_all(others.map(|peer| {
        let (view, ask) = (&view, &ask);
        async move { (peer, node.peers().ask(peer, ask, view).await) }
    }))
    .await;
    for (peer, answer) in answers {
        match answer {
            Ok(Response::Outcome(Outcome::Pending | Outcome::Committed)) => {}
            Ok(Response::Outcome(outcome)) => {
                tracing::warn!(change = migration.change_id(), %peer, ?outcome, "a member does not know this change; not committing");
                return Err(ChangeError::NotConfirmed(peer.to_string()));
            }
            Ok(_) => return Err(ChangeError::NotConfirmed(peer.to_string())),
            Err(error) => tracing::debug!(%peer, %error, "cannot confirm the change with a member"),
        }
    }
    Ok(())
}

fn commit_now(node: &Node, change_id: u64) -> Result<Committed, ChangeError> {
    let _serial = node.change_lock().blocking_lock();
    let migration = match prepared(node, change_id) {
        Ok(migration) => migration,
        Err(error) => {
            return if node.outcome(change_id) == Outcome::Committed {
                Ok(Committed {
                    key_count: node.store().len(),
                })
            } else {
                Err(error)
            };
        }
    };
    if !migration.may_drop() {
        tracing::warn!(
            change = change_id,
            "commit before this node shipped its ranges; refused"
        );
        return Err(ChangeError::NotShipped(change_id));
    }
    let staged = migration.take_staged();
    let received = staged.len();
    for (key, value) in staged {
        node.store().apply(key_hash(key.as_bytes()), &key, value)?;
    }
    // The outcome first: a peer asking about the change between the switch and the record
    // would hear "unknown" and refuse to commit.
    node.record_outcome(change_id, Outcome::Committed);
    node.switch_to(&migration);
    let frozen = migration.end_freeze();
    migration.end();
    let mut dropped = 0;
    for (start, end) in migration.outgoing().iter().flat_map(|r| r.range.segments()) {
        dropped += node.store().remove_segment(start, end)?;
    }
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
    Ok(Committed {
        key_count: node.store().len(),
    })
}

/// Abandons a prepared change: received keys are discarded, the old view stays. `from` is
/// the coordinator that asks, or `None` when this node's watchdog gives up.
pub(crate) async fn abort(
    node: &Arc<Node>,
    from: Option<&str>,
    change_id: u64,
) -> Result<(), ChangeError> {
    let _serial = node.change_lock().lock().await;
    let Ok(migration) = prepared(node, change_id) else {
        return Ok(());
    };
    if let Some(from) = from {
        migration.coordinated_by(from)?;
    }
    node.record_outcome(change_id, Outcome::Aborted);
    node.drop_migration(&migration);
    migration.end_freeze();
    migration.end();
    tracing::warn!(
        change = change_id,
        "aborted view change; the old view stays"
    );
    Ok(())
}

/// What a silent coordinator leaves a participant to do.
enum Resolution {
    Commit,
    Abort,
    Wait,
}

/// Watches a prepared change: when nothing has been heard of it for the phase timeout,
/// asks the coordinator and peers for its outcome. Once any node committed, the change is
/// decided and this node commits too; it aborts only when nobody committed and the
/// coordinator is gone or has given up.
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
        let outcome = match resolve(&node, &migration).await {
            Resolution::Wait => {
                migration.touch();
                continue;
            }
            Resolution::Commit => commit(&node, None, migration.change_id()).await.map(|_| ()),
            Resolution::Abort => abort(&node, None, migration.change_id()).await,
        };
        match outcome {
            // A member that does not know the change yet may learn it (or come back):
            // ask again after another quiet period rather than decide alone.
            Err(error @ ChangeError::NotConfirmed(_)) => {
                tracing::warn!(change = migration.change_id(), %error, "watchdog cannot commit yet; will ask again");
                migration.touch();
            }
            Err(error) => {
                tracing::warn!(change = migration.change_id(), %error, "watchdog could not settle the change");
                return;
            }
            Ok(()) => return,
        }
    }
}

async fn resolve(node: &Arc<Node>, migration: &Migration) -> Resolution {
    if migration.coordinator() == &**node.address() && node.coordinating().try_lock().is_err() {
        return Resolution::Wait;
    }
    let view = node.view();
    let ask = Request::Outcome {
        change_id: migration.change_id(),
    };
    // The coordinator too, which takes no part when it is in neither view.
    let asks = migration
        .participants()
        .iter()
        .map(String::as_str)
        .chain(
            Some(migration.coordinator())
                .filter(|c| !migration.participants().iter().any(|p| p == c)),
        )
        .filter(|peer| *peer != &**node.address())
        .map(|peer| {
            let (view, ask) = (view.clone(), &ask);
            async move {
                let answer = node
                    .peers()
                    .call(peer, ask, &view, node.peers().timeout())
                    .await;
                let outcome = match answer {
                    Ok(Response::Outcome(outcome)) => outcome,
                    _ => Outcome::Unknown,
                };
                (peer.to_string(), outcome)
            }
        });
    let answers = futures_util::future::join_all(asks).await;
    let coordinator_busy = answers
        .iter()
        .any(|(peer, outcome)| *peer == migration.coordinator() && *outcome == Outcome::Pending);
    let anyone_committed = answers.iter().any(|(_, o)| *o == Outcome::Committed);
    tracing::warn!(
        change = migration.change_id(),
        coordinator = %migration.coordinator(),
        ?answers,
        "coordinator silent past the phase timeout; asked peers"
    );
    if anyone_committed {
        Resolution::Commit
    } else if coordinator_busy {
        Resolution::Wait
    } else {
        Resolution::Abort
    }
}
