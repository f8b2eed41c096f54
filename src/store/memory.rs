//! The in-memory engine: keys indexed by their ring hash, so that a hash range can be read
//! or dropped without scanning every key.
//!
//! Keys live in 256 stripes chosen by the top 8 bits of the hash; each stripe is itself a
//! contiguous hash range holding a `BTreeMap<hash, bucket>` behind its own lock, so
//! concurrent requests rarely meet and a range scan only visits the stripes it overlaps.
//! Values are the raw JSON text the client sent, kept as `Bytes` so a read is a refcount.
//! Nothing here can fail: every method answers `Ok`.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::Bytes;
use parking_lot::RwLock;

use super::{Batch, Engine, Entry, StoreError};

const STRIPE_BITS: u32 = 8;
const STRIPES: usize = 1 << STRIPE_BITS;

/// Keys whose hashes collide share a bucket (almost always of one entry).
type Bucket = Vec<(Box<str>, Bytes)>;

/// The in-memory engine.
pub struct MemoryEngine {
    stripes: Box<[RwLock<BTreeMap<u64, Bucket>>]>,
    keys: AtomicUsize,
    value_bytes: AtomicUsize,
}

impl Default for MemoryEngine {
    fn default() -> Self {
        MemoryEngine::new()
    }
}

#[inline]
fn stripe_of(hash: u64) -> usize {
    (hash >> (64 - STRIPE_BITS)) as usize
}

impl MemoryEngine {
    pub fn new() -> Self {
        MemoryEngine {
            stripes: (0..STRIPES).map(|_| RwLock::new(BTreeMap::new())).collect(),
            keys: AtomicUsize::new(0),
            value_bytes: AtomicUsize::new(0),
        }
    }
}

impl Engine for MemoryEngine {
    fn len(&self) -> usize {
        self.keys.load(Ordering::Relaxed)
    }

    fn value_bytes(&self) -> usize {
        self.value_bytes.load(Ordering::Relaxed)
    }

    fn get(&self, hash: u64, key: &str) -> Result<Option<Bytes>, StoreError> {
        let stripe = self.stripes[stripe_of(hash)].read();
        Ok(stripe
            .get(&hash)
            .and_then(|bucket| bucket.iter().find(|(k, _)| &**k == key))
            .map(|(_, v)| v.clone()))
    }

    fn put(&self, hash: u64, key: &str, value: Bytes) -> Result<bool, StoreError> {
        let added_bytes = value.len();
        let mut stripe = self.stripes[stripe_of(hash)].write();
        let bucket = stripe.entry(hash).or_default();
        if let Some(slot) = bucket.iter_mut().find(|(k, _)| &**k == key) {
            let old = std::mem::replace(&mut slot.1, value);
            self.value_bytes.fetch_sub(old.len(), Ordering::Relaxed);
            self.value_bytes.fetch_add(added_bytes, Ordering::Relaxed);
            Ok(true)
        } else {
            bucket.push((key.into(), value));
            self.keys.fetch_add(1, Ordering::Relaxed);
            self.value_bytes.fetch_add(added_bytes, Ordering::Relaxed);
            Ok(false)
        }
    }

    fn delete(&self, hash: u64, key: &str) -> Result<bool, StoreError> {
        let mut stripe = self.stripes[stripe_of(hash)].write();
        let Some(bucket) = stripe.get_mut(&hash) else {
            return Ok(false);
        };
        let Some(at) = bucket.iter().position(|(k, _)| &**k == key) else {
            return Ok(false);
        };
        let (_, old) = bucket.swap_remove(at);
        if bucket.is_empty() {
            stripe.remove(&hash);
        }
        self.keys.fetch_sub(1, Ordering::Relaxed);
        self.value_bytes.fetch_sub(old.len(), Ordering::Relaxed);
        Ok(true)
    }

    fn read_batch(
        &self,
        from: u64,
        end: u64,
        max_keys: usize,
        max_bytes: usize,
    ) -> Result<Batch, StoreError> {
        let mut batch = Batch::default();
        if from > end {
            return Ok(batch);
        }
        for stripe_index in stripe_of(from)..=stripe_of(end) {
            let stripe = self.stripes[stripe_index].read();
            for (&hash, bucket) in stripe.range(from..=end) {
                if batch.entries.len() >= max_keys || batch.bytes >= max_bytes {
                    batch.next = Some(hash);
                    return Ok(batch);
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
        Ok(batch)
    }

    /// The keys are freed after the stripe's lock is released, so readers barely wait.
    fn remove_segment(&self, start: u64, end: u64) -> Result<usize, StoreError> {
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
        Ok(removed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_memory_engine_passes_the_engine_suite() {
        crate::store::conformance::run(&MemoryEngine::new());
    }
}
