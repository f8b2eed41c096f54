//! The in-memory engine: keys indexed by their ring hash, so that a hash range can be read
//! or dropped without scanning every key.
//!
//! Keys live in 256 stripes chosen by the top 8 bits of the hash; each stripe is itself a
//! contiguous hash range holding a `BTreeMap<hash, slot>` behind its own lock, so
//! concurrent requests rarely meet and a range scan only visits the stripes it overlaps.
//! A slot is one allocation of exactly its size holding the key and the value (the raw
//! JSON text the client sent) of every key with that hash (almost always one): 16 bytes
//! in the map's node and the key and value with a 6-byte header, nothing else per key. A
//! read copies the value out. Nothing here can fail but a key longer than 65,535 bytes
//! (the API allows 50).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::Bytes;
use parking_lot::RwLock;

use super::{Engine, Packer, StoreError};

const STRIPE_BITS: u32 = 8;
const STRIPES: usize = 1 << STRIPE_BITS;

/// Bytes before each entry's key: its length (u16) and its value's (u32), little-endian.
const HEADER: usize = 6;

/// The keys of one hash and their values, in one allocation: for each entry, its
/// [`HEADER`], then the key, then the value.
struct Slot(Box<[u8]>);

/// One entry of a slot, as offsets into it.
#[derive(Clone, Copy)]
struct At {
    /// Where the entry starts (its header) and ends.
    start: usize,
    end: usize,
    key: usize,
    value: usize,
}

impl Slot {
    fn encode_into(out: &mut Vec<u8>, key: &[u8], value: &[u8]) -> Result<(), StoreError> {
        let key_len = u16::try_from(key.len())
            .map_err(|_| StoreError(format!("a key of {} bytes", key.len())))?;
        let value_len = u32::try_from(value.len())
            .map_err(|_| StoreError(format!("a value of {} bytes", value.len())))?;
        out.extend_from_slice(&key_len.to_le_bytes());
        out.extend_from_slice(&value_len.to_le_bytes());
        out.extend_from_slice(key);
        out.extend_from_slice(value);
        Ok(())
    }

    fn one(key: &[u8], value: &[u8]) -> Result<Slot, StoreError> {
        let mut out = Vec::with_capacity(HEADER + key.len() + value.len());
        Slot::encode_into(&mut out, key, value)?;
        Ok(Slot(out.into_boxed_slice()))
    }

    /// The entries, in order.
    fn entries(&self) -> impl Iterator<Item = At> + '_ {
        let mut start = 0;
        std::iter::from_fn(move || {
            let header = self.0.get(start..start + HEADER)?;
            let key_len = u16::from_le_bytes([header[0], header[1]]) as usize;
            let value_len = u32::from_le_bytes([header[2], header[3], header[4], header[5]]);
            let key = start + HEADER;
            let value = key + key_len;
            let at = At {
                start,
                end: value + value_len as usize,
                key,
                value,
            };
            start = at.end;
            Some(at)
        })
    }

    fn key(&self, at: At) -> &[u8] {
        &self.0[at.key..at.value]
    }

    fn value(&self, at: At) -> &[u8] {
        &self.0[at.value..at.end]
    }

    fn find(&self, key: &str) -> Option<At> {
        self.entries().find(|&at| self.key(at) == key.as_bytes())
    }

    fn len(&self) -> usize {
        self.entries().count()
    }

    fn value_bytes(&self) -> usize {
        self.entries().map(|at| at.end - at.value).sum()
    }

    /// This slot with the entry at `at` replaced by `key` and `value` (`None`: removed), or
    /// with them added when `at` is `None`. `None` when nothing is left.
    fn with(
        &self,
        at: Option<At>,
        key: &[u8],
        value: Option<&[u8]>,
    ) -> Result<Option<Slot>, StoreError> {
        let (before, after) = match at {
            Some(at) => (&self.0[..at.start], &self.0[at.end..]),
            None => (&self.0[..], &[][..]),
        };
        let added = value.map_or(0, |v| HEADER + key.len() + v.len());
        if before.len() + after.len() + added == 0 {
            return Ok(None);
        }
        let mut out = Vec::with_capacity(before.len() + after.len() + added);
        out.extend_from_slice(before);
        if let Some(value) = value {
            Slot::encode_into(&mut out, key, value)?;
        }
        out.extend_from_slice(after);
        Ok(Some(Slot(out.into_boxed_slice())))
    }
}

/// The in-memory engine.
pub struct MemoryEngine {
    stripes: Box<[RwLock<BTreeMap<u64, Slot>>]>,
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

impl MemoryEngine {
    /// Adds `entries`, which come in hash order (keys of one hash together), building
    /// each stripe's map in one go where it was empty, not key by key (a durable node's
    /// start-up; several threads may load disjoint hash ranges at once). Returns how many
    /// keys it added.
    pub fn load_sorted(
        &self,
        entries: impl IntoIterator<Item = Result<(u64, String, Bytes), StoreError>>,
    ) -> Result<usize, StoreError> {
        let mut stripe: Option<(usize, Vec<(u64, Slot)>)> = None;
        let mut loaded = 0;
        let mut bytes = 0;
        let flush = |stripe: Option<(usize, Vec<(u64, Slot)>)>| {
            if let Some((index, slots)) = stripe {
                let mut map = self.stripes[index].write();
                if map.is_empty() {
                    // Built from sorted entries in one pass.
                    *map = slots.into_iter().collect();
                } else {
                    map.extend(slots);
                }
            }
        };
        for entry in entries {
            let (hash, key, value) = entry?;
            let index = stripe_of(hash);
            if stripe.as_ref().is_none_or(|(i, _)| *i != index) {
                flush(stripe.take());
                stripe = Some((index, Vec::new()));
            }
            let Some((_, slots)) = stripe.as_mut() else {
                continue;
            };
            bytes += value.len();
            loaded += 1;
            match slots.last_mut() {
                Some((last, slot)) if *last == hash => {
                    // The same key twice: the later copy wins, as a put would.
                    let at = slot.find(&key);
                    if let Some(at) = at {
                        loaded -= 1;
                        bytes -= at.end - at.value;
                    }
                    if let Some(new) = slot.with(at, key.as_bytes(), Some(&value))? {
                        *slot = new;
                    }
                }
                _ => slots.push((hash, Slot::one(key.as_bytes(), &value)?)),
            }
        }
        flush(stripe);
        self.keys.fetch_add(loaded, Ordering::Relaxed);
        self.value_bytes.fetch_add(bytes, Ordering::Relaxed);
        Ok(loaded)
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
        Ok(stripe.get(&hash).and_then(|slot| {
            let at = slot.find(key)?;
            Some(Bytes::copy_from_slice(slot.value(at)))
        }))
    }

    fn put(&self, hash: u64, key: &str, value: Bytes) -> Result<bool, StoreError> {
        let mut stripe = self.stripes[stripe_of(hash)].write();
        let replaced = match stripe.get_mut(&hash) {
            None => {
                stripe.insert(hash, Slot::one(key.as_bytes(), &value)?);
                None
            }
            Some(slot) => {
                let at = slot.find(key);
                let old = at.map(|at| at.end - at.value);
                if let Some(new) = slot.with(at, key.as_bytes(), Some(&value))? {
                    *slot = new;
                }
                old
            }
        };
        self.value_bytes.fetch_add(value.len(), Ordering::Relaxed);
        match replaced {
            Some(old) => {
                self.value_bytes.fetch_sub(old, Ordering::Relaxed);
                Ok(true)
            }
            None => {
                self.keys.fetch_add(1, Ordering::Relaxed);
                Ok(false)
            }
        }
    }

    fn delete(&self, hash: u64, key: &str) -> Result<bool, StoreError> {
        let mut stripe = self.stripes[stripe_of(hash)].write();
        let Some(slot) = stripe.get_mut(&hash) else {
            return Ok(false);
        };
        let Some(at) = slot.find(key) else {
            return Ok(false);
        };
        match slot.with(Some(at), key.as_bytes(), None)? {
            Some(rest) => *slot = rest,
            None => {
                stripe.remove(&hash);
            }
        }
        self.keys.fetch_sub(1, Ordering::Relaxed);
        self.value_bytes
            .fetch_sub(at.end - at.value, Ordering::Relaxed);
        Ok(true)
    }

    fn read_batch(
        &self,
        from: u64,
        end: u64,
        max_keys: usize,
        max_bytes: usize,
        into: &mut Packer,
    ) -> Result<Option<u64>, StoreError> {
        if from > end {
            return Ok(None);
        }
        let (keys, bytes) = (into.len(), into.bytes());
        for stripe_index in stripe_of(from)..=stripe_of(end) {
            let stripe = self.stripes[stripe_index].read();
            for (&hash, slot) in stripe.range(from..=end) {
                if into.len() - keys >= max_keys || into.bytes() - bytes >= max_bytes {
                    return Ok(Some(hash));
                }
                for at in slot.entries() {
                    into.push(slot.key(at), Some(slot.value(at)));
                }
            }
        }
        Ok(None)
    }

    /// The keys are freed after the stripe's lock is released, so readers barely wait.
    fn remove_segment(&self, start: u64, end: u64) -> Result<usize, StoreError> {
        let mut removed = 0;
        for stripe_index in stripe_of(start)..=stripe_of(end) {
            let doomed: Vec<Slot> = self.stripes[stripe_index]
                .write()
                .extract_if(start..=end, |_, _| true)
                .map(|(_, slot)| slot)
                .collect();
            let keys: usize = doomed.iter().map(Slot::len).sum();
            let bytes: usize = doomed.iter().map(Slot::value_bytes).sum();
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

    #[test]
    fn a_slot_of_three_colliding_keys_replaces_and_removes_each_in_place() {
        let store = MemoryEngine::new();
        for (key, value) in [("a", "1"), ("bb", "22"), ("ccc", "333")] {
            assert!(!store.put(9, key, Bytes::from(value)).unwrap());
        }
        assert!(store.put(9, "bb", Bytes::from_static(b"x")).unwrap());
        assert_eq!((store.len(), store.value_bytes()), (3, 1 + 1 + 3));
        assert!(store.delete(9, "a").unwrap());
        assert_eq!(store.get(9, "bb").unwrap().unwrap(), "x");
        assert_eq!(store.get(9, "ccc").unwrap().unwrap(), "333");
        assert_eq!(store.get(9, "a").unwrap(), None);
        let mut batch = Packer::default();
        let next = store
            .read_batch(0, u64::MAX, 10, usize::MAX, &mut batch)
            .unwrap();
        assert_eq!((next, batch.bytes()), (None, 2 + 1 + 3 + 3));
        let batch = batch.finish();
        let keys: Vec<&str> = batch.iter().map(|(key, _)| key).collect();
        assert_eq!(keys, ["bb", "ccc"]);
        assert_eq!(store.remove_segment(9, 9).unwrap(), 2);
        assert_eq!((store.len(), store.value_bytes()), (0, 0));
    }

    #[test]
    fn a_sorted_load_builds_what_puts_would() {
        let store = MemoryEngine::new();
        let entries = [(1, "a", "1"), (1, "b", "2"), (1, "a", "3"), (2, "c", "4")]
            .map(|(h, k, v)| Ok((h, k.to_string(), Bytes::from(v))));
        assert_eq!(store.load_sorted(entries).unwrap(), 3);
        assert_eq!((store.len(), store.value_bytes()), (3, 3));
        assert_eq!(store.get(1, "a").unwrap().unwrap(), "3");
        assert_eq!(store.get(1, "b").unwrap().unwrap(), "2");
        assert_eq!(store.get(2, "c").unwrap().unwrap(), "4");
        crate::store::conformance::run(&{
            let empty = MemoryEngine::new();
            empty.load_sorted(std::iter::empty()).unwrap();
            empty
        });
    }

    #[test]
    fn a_key_too_long_for_a_slot_is_an_error_not_a_panic() {
        let store = MemoryEngine::new();
        let key = "k".repeat(70_000);
        assert!(store.put(1, &key, Bytes::from_static(b"1")).is_err());
        assert!(store.is_empty());
    }
}
