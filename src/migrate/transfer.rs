//! The range-transfer engine: streams the keys of outgoing hash ranges to their new owners
//! in bounded batches, every destination in parallel.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::future::join_all;
use futures_util::stream::{FuturesUnordered, StreamExt};

use crate::change::{ChangeError, Migration};
use crate::metrics;
use crate::node::Node;
use crate::peers::PeerError;
use crate::ring::HashRange;
use crate::rpc::{Request, Response};
use crate::store::{Engine, Entry, Packed, Packer, StoreError};
use crate::wire::Shipped;

/// Most keys in one batch of the catch-up (sent while the ranges are frozen: few, large).
pub const BATCH_KEYS: usize = 4096;
/// Most keys in one batch of the bulk transfer: large enough that a batch carries several
/// ranges, small enough that taking one in holds a receiver's thread for about a
/// millisecond (readers share the machine: `cargo bench --bench migration` measured 4096
/// keys at 1.5x the shipping rate of per-range batches but 5x the readers' p99; 1024 keys
/// with two in flight kept most of the rate and the slowest reader under 10 ms).
pub const TRANSFER_BATCH_KEYS: usize = 1024;
/// Most bytes of keys and values in one batch (a single larger value still goes alone).
pub const BATCH_BYTES: usize = 1 << 20;
/// Most batches of the bulk transfer in flight to one destination: the next is read and
/// sent while the receiver takes in the last.
const PIPELINE: usize = 2;
/// How long one batch may take to be accepted.
const BATCH_TIMEOUT: Duration = Duration::from_secs(30);
/// Least time between two progress lines for one destination.
const PROGRESS_EVERY: Duration = Duration::from_secs(1);

/// One destination's bulk transfer, for the progress log: what share of the hash space of
/// its segments is done, what went out, and since when.
struct Progress<'a> {
    change_id: u64,
    destination: &'a str,
    /// The destination's segments, in the order they are read.
    segments: &'a [(u64, u64)],
    /// Hashes in all of them.
    total: u128,
    started: Instant,
    logged: Instant,
}

impl<'a> Progress<'a> {
    fn new(change_id: u64, destination: &'a str, segments: &'a [(u64, u64)]) -> Self {
        let now = Instant::now();
        Progress {
            change_id,
            destination,
            segments,
            total: hashes(segments).max(1),
            started: now,
            logged: now,
        }
    }

    /// The share done when the next hash to read is `cursor` (`None`: all).
    fn percent(&self, cursor: Option<Cursor>) -> f64 {
        let done = match cursor {
            None => self.total,
            Some(Cursor { segment, from }) => {
                hashes(&self.segments[..segment]) + u128::from(from - self.segments[segment].0)
            }
        };
        done as f64 * 100.0 / self.total as f64
    }

    /// Logs at most one line per [`PROGRESS_EVERY`].
    fn tick(&mut self, shipped: &Shipped, cursor: Option<Cursor>) {
        if self.logged.elapsed() < PROGRESS_EVERY {
            return;
        }
        self.logged = Instant::now();
        tracing::info!(
            change = self.change_id,
            to = self.destination,
            keys = shipped.keys,
            bytes = shipped.bytes,
            percent = format_args!("{:.1}", self.percent(cursor)),
            elapsed_ms = self.started.elapsed().as_millis() as u64,
            "transfer progress"
        );
    }

    fn finish(&self, shipped: &Shipped) {
        tracing::info!(
            change = self.change_id,
            to = self.destination,
            ranges = shipped.ranges,
            keys = shipped.keys,
            bytes = shipped.bytes,
            elapsed_ms = self.started.elapsed().as_millis() as u64,
            "transfer to destination done"
        );
    }
}

/// Hashes in the non-wrapping inclusive `segments`.
fn hashes(segments: &[(u64, u64)]) -> u128 {
    segments
        .iter()
        .map(|&(start, end)| HashRange { start, end }.len())
        .sum()
}

/// Where the bulk transfer to one destination goes on: the next hash to read, in which of
/// its segments.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Cursor {
    segment: usize,
    from: u64,
}

/// Reads from `at` on, across `segments`, until a transfer batch is full
/// ([`TRANSFER_BATCH_KEYS`] or [`BATCH_BYTES`]) or the segments end: a batch carries
/// several ranges (a range holds a few hundred keys at 1M keys on 3 nodes). Returns it and
/// where the next one starts.
fn fill(
    store: &dyn Engine,
    segments: &[(u64, u64)],
    at: Cursor,
) -> Result<(Packed, Option<Cursor>), StoreError> {
    let mut batch = Packer::default();
    let mut at = at;
    loop {
        let end = segments[at.segment].1;
        let read = store.read_batch(
            at.from,
            end,
            TRANSFER_BATCH_KEYS - batch.len(),
            BATCH_BYTES.saturating_sub(batch.bytes()).max(1),
            &mut batch,
        )?;
        let next = match read {
            Some(from) => Some(Cursor { from, ..at }),
            None => segments.get(at.segment + 1).map(|&(from, _)| Cursor {
                segment: at.segment + 1,
                from,
            }),
        };
        match next {
            Some(next) if batch.len() < TRANSFER_BATCH_KEYS && batch.bytes() < BATCH_BYTES => {
                at = next
            }
            _ => return Ok((batch.finish(), next)),
        }
    }
}

/// `entries` cut into batches of at most [`BATCH_KEYS`] keys and [`BATCH_BYTES`] bytes (a
/// single larger entry goes alone), as the bulk transfer cuts them.
fn batches(entries: &[Entry]) -> impl Iterator<Item = &[Entry]> {
    let mut rest = entries;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let mut bytes = 0;
        let mut take = 0;
        while take < rest.len() && take < BATCH_KEYS && (take == 0 || bytes < BATCH_BYTES) {
            bytes += rest[take].size();
            take += 1;
        }
        let (batch, tail) = rest.split_at(take);
        rest = tail;
        Some(batch)
    })
}

/// Sends one batch of entries to `destination`'s staging area.
async fn stage(
    node: &Node,
    destination: &str,
    change_id: u64,
    entries: Packed,
    view: &crate::view::View,
) -> Result<(), PeerError> {
    // The bulk transfer is round 0, the catch-up round 1: a late copy of a transfer batch
    // never undoes what the catch-up sent (found by the model check, model/).
    let round = node
        .migration()
        .filter(|m| m.change_id() == change_id)
        .map_or(0, |m| u8::from(m.transferred()));
    let request = Request::Stage {
        change_id,
        round,
        entries,
    };
    match node
        .peers()
        .call(destination, &request, view, BATCH_TIMEOUT)
        .await?
    {
        Response::Done => Ok(()),
        _ => Err(PeerError::BadAnswer(destination.to_string())),
    }
}

/// A destination that did not take a batch.
fn unreachable(error: PeerError) -> ChangeError {
    ChangeError::Unreachable(vec![error.peer().to_string()])
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

/// The sum of what every destination took, or why some did not: a local store failure
/// first, else every destination that did not answer.
fn collect(results: Vec<Result<Shipped, ChangeError>>) -> Result<Shipped, ChangeError> {
    let mut shipped = Vec::new();
    let mut gone = Vec::new();
    for result in results {
        match result {
            Ok(part) => shipped.push(part),
            Err(ChangeError::Unreachable(peers)) => gone.extend(peers),
            Err(other) => return Err(other),
        }
    }
    if gone.is_empty() {
        Ok(total(shipped))
    } else {
        Err(ChangeError::Unreachable(gone))
    }
}

/// Ships every key of the migration's outgoing ranges; memory is bounded by one batch per
/// destination, whatever the number of keys.
pub async fn ship_ranges(node: &Arc<Node>, migration: &Migration) -> Result<Shipped, ChangeError> {
    let mut by_destination: HashMap<&str, Vec<HashRange>> = HashMap::new();
    for moved in migration.outgoing() {
        by_destination
            .entry(&moved.to)
            .or_default()
            .push(moved.range);
    }
    let sends = by_destination
        .into_iter()
        .map(|(destination, ranges)| ship_to(node, migration, destination, ranges));
    collect(join_all(sends).await)
}

async fn ship_to(
    node: &Node,
    migration: &Migration,
    destination: &str,
    ranges: Vec<HashRange>,
) -> Result<Shipped, ChangeError> {
    let view = node.view();
    let mut shipped = Shipped {
        ranges: ranges.len(),
        ..Shipped::default()
    };
    let segments: Arc<[(u64, u64)]> = ranges.iter().flat_map(HashRange::segments).collect();
    let mut progress = Progress::new(migration.change_id(), destination, &segments);
    // Up to PIPELINE batches are in flight while the next is read, on the background
    // threads (so that a reader of this node does not wait for the copy).
    let mut in_flight = FuturesUnordered::new();
    let mut cursor = segments
        .first()
        .map(|&(from, _)| Cursor { segment: 0, from });
    while let Some(at) = cursor {
        let (store, part) = (node.store().clone(), segments.clone());
        let (batch, next) =
            crate::blocking::in_background(move || fill(&*store, &part, at)).await?;
        cursor = next;
        if !batch.is_empty() {
            while in_flight.len() >= PIPELINE {
                in_flight.next().await.expect("batches are in flight")?;
            }
            shipped.keys += batch.len();
            shipped.bytes += batch.bytes();
            in_flight.push(send_batch(
                node,
                migration,
                "transfer",
                destination,
                batch,
                &view,
            ));
        }
        progress.tick(&shipped, cursor);
    }
    while let Some(sent) = in_flight.next().await {
        sent?;
    }
    progress.finish(&shipped);
    Ok(shipped)
}

/// Sends one batch of `phase` (`transfer` or `catch-up`) to `destination`; one it does
/// not take fails the phase.
async fn send_batch(
    node: &Node,
    migration: &Migration,
    phase: &str,
    destination: &str,
    batch: Packed,
    view: &crate::view::View,
) -> Result<(), ChangeError> {
    let (keys, bytes) = (batch.len(), batch.bytes());
    if let Err(error) = stage(node, destination, migration.change_id(), batch, view).await {
        tracing::warn!(
            change = migration.change_id(),
            to = destination,
            %error,
            "{phase} batch not accepted"
        );
        return Err(unreachable(error));
    }
    metrics::shipped(keys, bytes);
    migration.touch();
    Ok(())
}

/// Ships individual entries (the catch-up) to each key's new owner.
pub async fn ship_entries(
    node: &Arc<Node>,
    migration: &Migration,
    entries: Vec<Entry>,
) -> Result<Shipped, ChangeError> {
    let mut by_destination: HashMap<Arc<str>, Vec<Entry>> = HashMap::new();
    for entry in entries {
        let owner = migration.view().ring.owner(entry.key.as_bytes()).clone();
        by_destination.entry(owner).or_default().push(entry);
    }
    let view = node.view();
    let sends = by_destination.into_iter().map(|(destination, entries)| {
        let view = view.clone();
        async move {
            let mut shipped = Shipped::default();
            for chunk in batches(&entries) {
                let batch: Packed = chunk.iter().collect();
                shipped.keys += batch.len();
                shipped.bytes += batch.bytes();
                send_batch(node, migration, "catch-up", &destination, batch, &view).await?;
            }
            Ok(shipped)
        }
    });
    collect(join_all(sends).await)
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    #[test]
    fn catch_up_batches_are_bounded_by_keys_and_bytes() {
        let entry = |size: usize| Entry {
            key: "k".into(),
            value: Some(Bytes::from(vec![b'1'; size - 1])),
        };
        let small: Vec<Entry> = (0..BATCH_KEYS * 2 + 1).map(|_| entry(10)).collect();
        let sizes: Vec<usize> = batches(&small).map(<[Entry]>::len).collect();
        assert_eq!(sizes, vec![BATCH_KEYS, BATCH_KEYS, 1]);
        let big: Vec<Entry> = (0..5).map(|_| entry(BATCH_BYTES / 2)).collect();
        let sizes: Vec<usize> = batches(&big).map(<[Entry]>::len).collect();
        assert_eq!(sizes, vec![2, 2, 1]);
        let huge = vec![entry(BATCH_BYTES * 3), entry(10)];
        let sizes: Vec<usize> = batches(&huge).map(<[Entry]>::len).collect();
        assert_eq!(sizes, vec![1, 1]);
    }

    #[test]
    fn progress_is_the_share_of_the_hash_space_done() {
        let segments = [(0, 99), (u64::MAX - 49, u64::MAX)];
        let progress = Progress::new(7, "10.0.0.1:1", &segments);
        assert_eq!(progress.total, 150);
        let at = |segment, from| Some(Cursor { segment, from });
        assert_eq!(progress.percent(at(0, 0)), 0.0);
        assert_eq!(progress.percent(at(0, 75)), 50.0);
        assert_eq!(
            progress.percent(at(1, u64::MAX - 49)),
            100.0 * 100.0 / 150.0
        );
        assert_eq!(progress.percent(None), 100.0);
    }

    #[test]
    fn a_transfer_batch_fills_across_segments_and_goes_on_where_it_stopped() {
        let store = crate::store::memory();
        let keys: Vec<String> = (0..3000).map(|i| format!("key{i}")).collect();
        for key in &keys {
            let hash = crate::ring::key_hash(key.as_bytes());
            store.put(hash, key, Bytes::from_static(b"\"v\"")).unwrap();
        }
        let segments = [(0, u64::MAX / 4), (u64::MAX / 2, u64::MAX)];
        let wanted = keys
            .iter()
            .filter(|k| {
                let hash = crate::ring::key_hash(k.as_bytes());
                segments.iter().any(|&(s, e)| (s..=e).contains(&hash))
            })
            .count();
        let (mut read, mut batches) = (0, 0);
        let mut cursor = Some(Cursor {
            segment: 0,
            from: 0,
        });
        while let Some(at) = cursor {
            let (batch, next) = fill(&*store, &segments, at).unwrap();
            assert!(batch.len() <= TRANSFER_BATCH_KEYS);
            assert!(next.is_none() || batch.len() == TRANSFER_BATCH_KEYS);
            read += batch.len();
            batches += 1;
            cursor = next;
        }
        assert_eq!(read, wanted);
        assert_eq!(batches, wanted.div_ceil(TRANSFER_BATCH_KEYS));
    }
}
