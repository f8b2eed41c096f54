//! A node's local data behind the [`Engine`] trait: keys addressed by their ring hash, so a
//! hash range can be read in batches or dropped without scanning every key. [`memory`] is
//! the in-memory engine of today; a durable engine implements the same trait and passes the
//! same [`conformance`] suite. Every method that touches data can fail, so a durable engine
//! can report an I/O error instead of panicking.

pub mod changes;
pub mod durable;
pub mod memory;
pub mod packed;
pub mod sync;

use std::sync::Arc;

use bytes::Bytes;

pub use packed::{Packed, Packer};
pub use sync::{Durable, FsyncPolicy};

/// One key and its value, or `None` for a deletion (a tombstone in a transfer).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Entry {
    pub key: String,
    pub value: Option<Bytes>,
}

impl Entry {
    /// Bytes of key and value, as batches count them.
    pub fn size(&self) -> usize {
        self.key.len() + self.value.as_ref().map_or(0, Bytes::len)
    }
}

/// Why the engine could not do what it was asked.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("storage engine: {0}")]
pub struct StoreError(pub String);

/// A node's key-value data. `hash` is always the key's ring hash
/// ([`crate::ring::key_hash`]); keys whose hashes collide are distinct keys.
pub trait Engine: Send + Sync + 'static {
    /// Number of keys stored.
    fn len(&self) -> usize;

    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Total size of the stored values, in bytes.
    fn value_bytes(&self) -> usize;

    fn get(&self, hash: u64, key: &str) -> Result<Option<Bytes>, StoreError>;

    /// Stores `value` under `key`; returns whether a value was replaced.
    fn put(&self, hash: u64, key: &str, value: Bytes) -> Result<bool, StoreError>;

    /// Removes `key`; returns whether it was present.
    fn delete(&self, hash: u64, key: &str) -> Result<bool, StoreError>;

    /// Applies a put or (for `None`) a delete.
    fn apply(&self, hash: u64, key: &str, value: Option<Bytes>) -> Result<(), StoreError> {
        match value {
            Some(value) => self.put(hash, key, value).map(|_| ()),
            None => self.delete(hash, key).map(|_| ()),
        }
    }

    /// Packs the keys of the non-wrapping segment `from..=end` into `into`, in hash order,
    /// until `max_keys` keys or `max_bytes` bytes of keys and values are added; returns
    /// the first hash not read, or `None` when the segment is exhausted. Keys that share a
    /// hash are never split between batches.
    fn read_batch(
        &self,
        from: u64,
        end: u64,
        max_keys: usize,
        max_bytes: usize,
        into: &mut Packer,
    ) -> Result<Option<u64>, StoreError>;

    /// Drops every key of the non-wrapping segment `start..=end`; returns how many.
    fn remove_segment(&self, start: u64, end: u64) -> Result<usize, StoreError>;

    /// What a writer awaits before acknowledging the writes it made: resolves once they
    /// are as durable as the node's `--fsync` policy asks (at once in memory).
    fn durable(&self) -> Durable {
        Durable::now()
    }
}

/// The engine a node stores in, shared by the request path and the view change.
pub type Store = Arc<dyn Engine>;

/// A new in-memory store.
pub fn memory() -> Store {
    Arc::new(memory::MemoryEngine::new())
}

/// The behaviour every engine must have, as one suite an engine's tests call.
#[cfg(test)]
pub mod conformance {
    use super::*;
    use crate::ring::key_hash;

    fn put(store: &dyn Engine, key: &str, value: &str) -> bool {
        store
            .put(
                key_hash(key.as_bytes()),
                key,
                Bytes::from(value.to_string()),
            )
            .unwrap()
    }

    /// Runs every check on `store`, which must start empty.
    pub fn run(store: &dyn Engine) {
        put_get_delete_and_counts(store);
        colliding_hashes_keep_both_keys(store);
        batches_cover_a_segment_exactly_once(store);
    }

    fn put_get_delete_and_counts(store: &dyn Engine) {
        assert!(store.is_empty());
        assert!(!put(store, "a", "1"));
        assert!(put(store, "a", "22"));
        assert_eq!(store.get(key_hash(b"a"), "a").unwrap().unwrap(), "22");
        assert_eq!((store.len(), store.value_bytes()), (1, 2));
        assert!(store.delete(key_hash(b"a"), "a").unwrap());
        assert!(!store.delete(key_hash(b"a"), "a").unwrap());
        assert_eq!((store.len(), store.value_bytes()), (0, 0));
        store.apply(5, "t", Some(Bytes::from_static(b"1"))).unwrap();
        store.apply(5, "t", None).unwrap();
        assert_eq!(store.get(5, "t").unwrap(), None);
    }

    fn colliding_hashes_keep_both_keys(store: &dyn Engine) {
        store.put(7, "x", Bytes::from_static(b"1")).unwrap();
        store.put(7, "y", Bytes::from_static(b"2")).unwrap();
        assert_eq!(store.get(7, "x").unwrap().unwrap(), "1");
        assert_eq!(store.get(7, "y").unwrap().unwrap(), "2");
        assert!(store.delete(7, "x").unwrap());
        assert_eq!(store.get(7, "y").unwrap().unwrap(), "2");
        assert!(store.delete(7, "y").unwrap());
        assert!(store.is_empty());
    }

    fn batches_cover_a_segment_exactly_once(store: &dyn Engine) {
        for i in 0..5000 {
            put(store, &format!("key{i}"), "\"v\"");
        }
        let (start, end) = (u64::MAX / 4, u64::MAX / 4 * 3);
        let expected: usize = (0..5000)
            .filter(|i| (start..=end).contains(&key_hash(format!("key{i}").as_bytes())))
            .count();
        let mut seen = std::collections::HashSet::new();
        let mut from = start;
        loop {
            let mut batch = Packer::default();
            let next = store
                .read_batch(from, end, 100, usize::MAX, &mut batch)
                .unwrap();
            assert!(batch.len() <= 100);
            for (key, _) in batch.finish().iter() {
                assert!(seen.insert(key.to_string()));
            }
            match next {
                Some(next) => from = next,
                None => break,
            }
        }
        assert_eq!(seen.len(), expected);
        assert_eq!(store.remove_segment(start, end).unwrap(), expected);
        assert_eq!(store.len(), 5000 - expected);
    }
}
