//! A durable node's view change survives its death (`--data-dir`, the sharded mode): what
//! the node prepared (the ranges it hands over) and every key it staged are on disk before
//! it answers; a commit applies the staged keys, forgets them and marks the change applied
//! in one atomic write, then drops what was handed over and forgets the change. A node
//! killed at any phase finds the change on disk when its metadata log replays (or a peer
//! sends) the change's outcome, and finishes it from there: nothing staged is lost, nothing
//! applied is applied twice, nothing handed over is kept.
//!
//! A memory node (and the replicated mode, whose restarted replicas are refilled by their
//! shard-mates) records nothing here: its staged keys live in the [`Migration`] only.

use std::collections::HashMap;
use std::sync::Arc;

use crate::change::{ChangeError, Migration, Staged};
use crate::meta::MetaState;
use crate::node::Node;
use crate::ring::key_hash;
use crate::store::durable::DurableEngine;
use crate::store::StoreError;
use crate::wire::Outcome;

/// The data dir this node journals its changes in, if it has one and is sharded.
fn disk(node: &Node) -> Option<&DurableEngine> {
    node.disk().filter(|_| node.replication().is_none())
}

fn broken(error: impl std::fmt::Display) -> ChangeError {
    ChangeError::Storage(StoreError(error.to_string()))
}

/// Records the change `migration` on disk before this node says it prepared it.
pub(crate) async fn begin(node: &Node, migration: &Migration) -> Result<(), ChangeError> {
    let Some(disk) = disk(node) else {
        return Ok(());
    };
    let dropping = migration
        .outgoing()
        .iter()
        .flat_map(|r| r.range.segments())
        .collect();
    let incoming = migration.incoming().to_vec();
    disk.begin_change(migration.change_id(), dropping, incoming)?
        .wait()
        .await;
    Ok(())
}

/// Stages a batch from `from`: into the migration and, on a durable node, onto disk before
/// the batch is acknowledged.
pub(crate) async fn stage(
    node: &Arc<Node>,
    migration: &Arc<Migration>,
    from: &str,
    round: u8,
    entries: crate::store::Packed,
) -> Result<(), ChangeError> {
    let (staging, migration, from) = (node.clone(), migration.clone(), from.to_string());
    let job = move || {
        let disk = disk(&staging);
        let store = |hash, key: &str, value: Option<bytes::Bytes>| -> Result<isize, ChangeError> {
            Ok(match value {
                Some(value) => isize::from(!staging.store().put(hash, key, value)?),
                None => -isize::from(staging.store().delete(hash, key)?),
            })
        };
        migration.stage(staging.address(), &from, round, entries, store, |taken| {
            let Some(disk) = disk else { return Ok(()) };
            let encoded = taken
                .iter()
                .map(|(key, staged)| {
                    Ok((key.as_str(), postcard::to_stdvec(staged).map_err(broken)?))
                })
                .collect::<Result<Vec<_>, ChangeError>>()?;
            Ok(disk.stage(migration.change_id(), encoded)?)
        })
    };
    // Checking and storing a batch takes a millisecond or so, which requests would
    // otherwise wait for: the bulk transfer's (round 0) on the background threads, which
    // yield to requests; the catch-up's beside the runtime at once (requests on the
    // frozen ranges wait for it).
    match round {
        0 => crate::blocking::in_background(job).await?,
        _ => crate::blocking::off_runtime(job)?,
    }
    // What was staged on disk and what went into the store share the store's journal.
    node.store().durable().wait().await;
    Ok(())
}

/// Puts a committed change's staged keys in the store; returns how many were received. A
/// merged group's key never overwrites (or deletes) one this group holds.
pub(crate) fn apply(
    node: &Node,
    change_id: u64,
    staged: HashMap<String, Staged>,
) -> Result<usize, ChangeError> {
    let received = staged.len();
    let mut writes = Vec::with_capacity(received);
    for (key, staged) in staged {
        let hash = key_hash(key.as_bytes());
        if staged.foreign && (staged.value.is_none() || node.store().get(hash, &key)?.is_some()) {
            continue;
        }
        writes.push((hash, key, staged.value));
    }
    match disk(node) {
        Some(disk) => disk.apply_staged(change_id, &writes)?,
        None => {
            for (hash, key, value) in writes {
                node.store().apply(hash, &key, value)?;
            }
        }
    }
    Ok(received)
}

/// The keys of `segments` leave the store (an aborted change's incoming ranges, or a
/// committed one's outgoing ranges).
pub(crate) fn drop_segments(node: &Node, segments: &[(u64, u64)]) -> Result<(), ChangeError> {
    for &(start, end) in segments {
        node.store().remove_segment(start, end)?;
    }
    Ok(())
}

/// The change is over here (committed and its ranges dropped, or aborted): forgotten.
pub(crate) fn end(node: &Node, change_id: u64) {
    if let Some(disk) = disk(node) {
        if let Err(error) = disk.end_change(change_id) {
            tracing::error!(change = change_id, %error, "forgetting a finished change failed");
        }
    }
}

/// Finishes on this node, as `outcome` says, a change it recorded on disk and no longer
/// has in memory (it was killed during the change). Returns whether there was one.
pub(crate) fn recover(node: &Node, change_id: u64, outcome: Outcome) -> bool {
    let Some(disk) = disk(node) else { return false };
    let record = match disk.change(change_id) {
        Ok(record) => record,
        Err(error) => {
            tracing::error!(change = change_id, %error, "reading the changes on disk failed");
            return false;
        }
    };
    let Some(record) = record else { return false };
    let finished = match outcome {
        Outcome::Committed => finish_commit(node, disk, &record),
        Outcome::Aborted => {
            drop_segments(node, &record.incoming).and_then(|()| Ok(disk.end_change(change_id)?))
        }
        Outcome::Pending | Outcome::Unknown => return false,
    };
    match finished {
        Ok(()) => tracing::warn!(
            change = change_id,
            ?outcome,
            keys = node.store().len(),
            "finished a view change this node was killed during"
        ),
        Err(error) => {
            tracing::error!(change = change_id, %error, "finishing a view change from disk failed")
        }
    }
    true
}

fn finish_commit(
    node: &Node,
    disk: &DurableEngine,
    record: &crate::store::changes::ChangeRecord,
) -> Result<(), ChangeError> {
    if !record.applied {
        let staged = disk
            .staged(record.change_id)?
            .into_iter()
            .map(|(key, value)| Ok((key, postcard::from_bytes(&value).map_err(broken)?)))
            .collect::<Result<HashMap<String, Staged>, ChangeError>>()?;
        apply(node, record.change_id, staged)?;
    }
    drop_segments(node, &record.dropping)?;
    disk.end_change(record.change_id)?;
    Ok(())
}

/// Finishes every change on disk that `state` decided (the state jumped there: a snapshot,
/// or the log replayed before the node knew its id). Undecided ones wait for their outcome.
pub(crate) fn settle(node: &Node, state: &MetaState) {
    let Some(disk) = disk(node) else { return };
    let in_memory = node.migration().map(|m| m.change_id());
    for record in disk.changes().unwrap_or_default() {
        if Some(record.change_id) != in_memory {
            recover(node, record.change_id, state.outcome(record.change_id));
        }
    }
}
