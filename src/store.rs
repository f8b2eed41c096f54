//! The node's local data: keys indexed by their ring hash, so that a hash range can be
//! read or dropped without scanning every key.
//!
//! Keys live in 256 stripes chosen by the top 8 bits of the hash; each stripe is itself a
//! contiguous hash range holding a `BTreeMap<hash, bucket>` behind its own lock, so
//! concurrent requests rarely meet and a range scan only visits the stripes it overlaps.
//! Values are the raw JSON text the client sent, kept as `Bytes` so a read is a refcount.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::Bytes;
use parking_lot::RwLock;

const STRIPE_BITS: u32 = 8;
const STRIPES: usize = 1 << STRIPE_BITS;

/// Keys whose hashes collide share a bucket (almost always of one entry).
type Bucket = Vec<(Box<str>, Bytes)>;

/// One key and its value, or `None` for a deletion (a tombstone in a transfer).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub key: String,
    pub value: Option<Bytes>,
}

/// What a batch read of a hash range returned, and where the next batch starts.
#[derive(Debug, Default)]
pub struct Batch {
    pub entries: Vec<Entry>,
    pub bytes: usize,
    /// The first hash not yet read, or `None` when the segment is exhausted.
    pub next: Option<u64>,
}

/// The local key-value data of one node.
pub struct Store {
    stripes: Box<[RwLock<BTreeMap<u64, Bucket>>]>,
    keys: AtomicUsize,
    value_bytes: AtomicUsize,
}

impl Default for Store {
    fn default() -> Self {
        Store::new()
    }
}

#[inline]
fn stripe_of(hash: u64) -> usize {
    (hash >> (64 - STRIPE_BITS)) as usize
}

impl Store {
    pub fn new() -> Self {
        Store {
            stripes: (0..STRIPES).map(|_| RwLock::new(BTreeMap::new())).collect(),
            keys: AtomicUsize::new(0),
            value_bytes: AtomicUsize::new(0),
        }
    }

    /// Number of keys stored.
    pub fn len(&self) -> usize {
        self.keys.load(Ordering::Relaxed)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Total size of the stored values, in bytes.
    pub fn value_bytes(&self) -> usize {
        self.value_bytes.load(Ordering::Relaxed)
    }

    pub fn get(&self, hash: u64, key: &str) -> Option<Bytes> {
        let stripe = self.stripes[stripe_of(hash)].read();
        stripe
            .get(&hash)?
            .iter()
            .find(|(k, _)| &**k == key)
            .map(|(_, v)| v.clone())
    }

    /// Stores `value` under `key`; returns whether a value was replaced.
    pub fn put(&self, hash: u64, key: &str, value: Bytes) -> bool {
        let added_bytes = value.len();
        let mut stripe = self.stripes[stripe_of(hash)].write();
        let bucket = stripe.entry(hash).or_default();
        if let Some(slot) = bucket.iter_mut().find(|(k, _)| &**k == key) {
            let old = std::mem::replace(&mut slot.1, value);
            self.value_bytes.fetch_sub(old.len(), Ordering::Relaxed);
            self.value_bytes.fetch_add(added_bytes, Ordering::Relaxed);
            true
        } else {
            bucket.push((key.into(), value));
            self.keys.fetch_add(1, Ordering::Relaxed);
            self.value_bytes.fetch_add(added_bytes, Ordering::Relaxed);
            false
        }
    }

    /// Removes `key`; returns whether it was present.
    pub fn delete(&self, hash: u64, key: &str) -> bool {
        let mut stripe = self.stripes[stripe_of(hash)].write();
        let Some(bucket) = stripe.get_mut(&hash) else {
            return false;
        };
        let Some(at) = bucket.iter().position(|(k, _)| &**k == key) else {
            return false;
        };
        let (_, old) = bucket.swap_remove(at);
        if bucket.is_empty() {
            stripe.remove(&hash);
        }
        self.keys.fetch_sub(1, Ordering::Relaxed);
        self.value_bytes.fetch_sub(old.len(), Ordering::Relaxed);
        true
    }

    /// Applies a put or (for `None`) a delete.
    pub fn apply(&self, hash: u64, key: &str, value: Option<Bytes>) {
        match value {
            Some(value) => {
                self.put(hash, key, value);
            }
            None => {
                self.delete(hash, key);
            }
        }
    }

    /// Reads the keys of the non-wrapping segment `from..=end`, in hash order, until
    /// `max_keys` keys or `max_bytes` bytes of keys and values are collected. Keys that
    /// share a hash are never split between batches.
    pub fn read_batch(&self, from: u64, end: u64, max_keys: usize, max_bytes: usize) -> Batch {
        let mut batch = Batch::default();
        if from > end {
            return batch;
        }
        for stripe_index in stripe_of(from)..=stripe_of(end) {
            let stripe = self.stripes[stripe_index].read();
            for (&hash, bucket) in stripe.range(from..=end) {
                if batch.entries.len() >= max_keys || batch.bytes >= max_bytes {
                    batch.next = Some(hash);
                    return batch;
                }
                for (key, value) in bucket {
                    batch.bytes += key.len() + value.len();
                    batch.entries.push(Entry {
                        key: key.to_string(),
                        value: Some(value.clone()),
                    });
                }
            }
        }
        batch
    }

    /// Drops every key of the non-wrapping segment `start..=end`; returns how many.
    /// The keys are freed after the stripe's lock is released, so readers barely wait.
    pub fn remove_segment(&self, start: u64, end: u64) -> usize {
        let mut removed = 0;
        for stripe_index in stripe_of(start)..=stripe_of(end) {
            let doomed: Vec<Bucket> = self.stripes[stripe_index]
                .write()
                .extract_if(start..=end, |_, _| true)
                .map(|(_, bucket)| bucket)
                .collect();
            let keys: usize = doomed.iter().map(Vec::len).sum();
            let bytes: usize = doomed.iter().flatten().map(|(_, v)| v.len()).sum();
            self.keys.fetch_sub(keys, Ordering::Relaxed);
            self.value_bytes.fetch_sub(bytes, Ordering::Relaxed);
            removed += keys;
        }
        removed
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ring::key_hash;

    fn put(store: &Store, key: &str, value: &str) -> bool {
        store.put(
            key_hash(key.as_bytes()),
            key,
            Bytes::from(value.to_string()),
        )
    }

    #[test]
    fn put_get_delete_and_counts() {
        let store = Store::new();
        assert!(!put(&store, "a", "1"));
        assert!(put(&store, "a", "22"));
        assert_eq!(store.get(key_hash(b"a"), "a").unwrap(), "22");
        assert_eq!((store.len(), store.value_bytes()), (1, 2));
        assert!(store.delete(key_hash(b"a"), "a"));
        assert!(!store.delete(key_hash(b"a"), "a"));
        assert_eq!((store.len(), store.value_bytes()), (0, 0));
    }

    #[test]
    fn colliding_hashes_keep_both_keys() {
        let store = Store::new();
        store.put(7, "x", Bytes::from_static(b"1"));
        store.put(7, "y", Bytes::from_static(b"2"));
        assert_eq!(store.get(7, "x").unwrap(), "1");
        assert_eq!(store.get(7, "y").unwrap(), "2");
        assert!(store.delete(7, "x"));
        assert_eq!(store.get(7, "y").unwrap(), "2");
        assert_eq!(store.len(), 1);
    }

    #[test]
    fn batches_cover_a_segment_exactly_once() {
        let store = Store::new();
        for i in 0..5000 {
            put(&store, &format!("key{i}"), "\"v\"");
        }
        let (start, end) = (u64::MAX / 4, u64::MAX / 4 * 3);
        let expected: usize = (0..5000)
            .filter(|i| (start..=end).contains(&key_hash(format!("key{i}").as_bytes())))
            .count();
        let mut seen = std::collections::HashSet::new();
        let mut from = start;
        loop {
            let batch = store.read_batch(from, end, 100, usize::MAX);
            assert!(batch.entries.len() <= 100);
            for entry in batch.entries {
                assert!(seen.insert(entry.key));
            }
            match batch.next {
                Some(next) => from = next,
                None => break,
            }
        }
        assert_eq!(seen.len(), expected);
        assert_eq!(store.remove_segment(start, end), expected);
        assert_eq!(store.len(), 5000 - expected);
    }
}
