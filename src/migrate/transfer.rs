//! The range-transfer engine: streams the keys of outgoing hash ranges to their new owners
//! in bounded batches, every destination in parallel.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use futures_util::future::join_all;

use super::{ChangeError, Migration};
use crate::forward::PeerError;
use crate::node::Node;
use crate::ring::HashRange;
use crate::store::Entry;
use crate::wire::{encode_batch, Shipped};

/// Most keys in one batch.
pub const BATCH_KEYS: usize = 4096;
/// Most bytes of keys and values in one batch (a single larger value still goes alone).
pub const BATCH_BYTES: usize = 1 << 20;
/// How long one batch may take to be accepted.
const BATCH_TIMEOUT: Duration = Duration::from_secs(30);

fn failure(errors: Vec<PeerError>) -> ChangeError {
    ChangeError::Unreachable(
        errors
            .into_iter()
            .map(|e| match e {
                PeerError::Unreachable(peer)
                | PeerError::BadAnswer(peer)
                | PeerError::Refused { peer, .. } => peer,
            })
            .collect(),
    )
}

fn total(parts: impl IntoIterator<Item = Shipped>) -> Shipped {
    parts
        .into_iter()
        .fold(Shipped::default(), |sum, s| Shipped {
            ranges: sum.ranges + s.ranges,
            keys: sum.keys + s.keys,
            bytes: sum.bytes + s.bytes,
        })
}

async fn collect(results: Vec<Result<Shipped, PeerError>>) -> Result<Shipped, ChangeError> {
    let (ok, errors): (Vec<_>, Vec<_>) = results.into_iter().partition(Result::is_ok);
    if !errors.is_empty() {
        return Err(failure(
            errors.into_iter().filter_map(Result::err).collect(),
        ));
    }
    Ok(total(ok.into_iter().filter_map(Result::ok)))
}

/// Ships every key of the migration's outgoing ranges; memory is bounded by one batch per
/// destination, whatever the number of keys.
pub async fn ship_ranges(node: &Arc<Node>, migration: &Migration) -> Result<Shipped, ChangeError> {
    let mut by_destination: HashMap<&str, Vec<HashRange>> = HashMap::new();
    for moved in &migration.outgoing {
        by_destination
            .entry(&moved.to)
            .or_default()
            .push(moved.range);
    }
    let sends = by_destination
        .into_iter()
        .map(|(destination, ranges)| ship_to(node, migration, destination, ranges));
    collect(join_all(sends).await).await
}

async fn ship_to(
    node: &Node,
    migration: &Migration,
    destination: &str,
    ranges: Vec<HashRange>,
) -> Result<Shipped, PeerError> {
    let view = node.view();
    let mut shipped = Shipped {
        ranges: ranges.len(),
        ..Shipped::default()
    };
    for (start, end) in ranges.iter().flat_map(HashRange::segments) {
        let mut from = start;
        loop {
            let batch = node.store.read_batch(from, end, BATCH_KEYS, BATCH_BYTES);
            if !batch.entries.is_empty() {
                shipped.keys += batch.entries.len();
                shipped.bytes += batch.bytes;
                let body = encode_batch(migration.change_id, &batch.entries);
                node.peers
                    .stage(destination, body, &view, BATCH_TIMEOUT)
                    .await?;
                migration.touch();
            }
            match batch.next {
                Some(next) => from = next,
                None => break,
            }
        }
    }
    Ok(shipped)
}

/// Ships individual entries (the catch-up) to each key's new owner.
pub async fn ship_entries(
    node: &Arc<Node>,
    migration: &Migration,
    entries: Vec<Entry>,
) -> Result<Shipped, ChangeError> {
    let mut by_destination: HashMap<Arc<str>, Vec<Entry>> = HashMap::new();
    for entry in entries {
        let owner = migration.view.ring.owner(entry.key.as_bytes()).clone();
        by_destination.entry(owner).or_default().push(entry);
    }
    let view = node.view();
    let sends = by_destination.into_iter().map(|(destination, entries)| {
        let view = view.clone();
        async move {
            let mut shipped = Shipped::default();
            for chunk in entries.chunks(BATCH_KEYS) {
                shipped.keys += chunk.len();
                shipped.bytes += chunk
                    .iter()
                    .map(|e| e.key.len() + e.value.as_ref().map_or(0, |v| v.len()))
                    .sum::<usize>();
                let body = encode_batch(migration.change_id, chunk);
                node.peers
                    .stage(&destination, body, &view, BATCH_TIMEOUT)
                    .await?;
            }
            Ok(shipped)
        }
    });
    collect(join_all(sends).await).await
}
