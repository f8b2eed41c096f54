//! The durable engine (`--data-dir`): every key is served from memory, as by the memory
//! engine (the request path's reads and the view change's range scans cost the same), and
//! kept on disk in fjall, an LSM tree with its own journal, under `hash ‖ key` (8-byte
//! big-endian ring hash, then the key) so that a hash range is one ordered scan and a
//! handed-over range one run of removals. A write reaches fjall's journal (the OS's buffers)
//! before the memory; [`super::sync`] decides when the journal reaches the disk. On open,
//! the keys on disk are loaded into memory.
//!
//! Lock order: a write stripe here, then fjall's journal, then the memory engine's stripe
//! (a key's disk and memory copies change together, in the same order).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use parking_lot::Mutex;

use super::changes::{self, failed, ChangeRecord};
use super::memory::MemoryEngine;
use super::sync::{Durable, FsyncPolicy, SyncStats, Syncer};
use super::{Engine, Packer, StoreError};

const WRITE_STRIPES: usize = 256;

/// Removals of a handed-over range go to the journal in batches of this many keys.
const REMOVE_BATCH: usize = 4096;

/// The durable engine: memory in front, fjall behind.
pub struct DurableEngine {
    memory: MemoryEngine,
    db: fjall::Database,
    keys: fjall::Keyspace,
    /// The view change in progress ([`super::changes`]).
    changes: fjall::Keyspace,
    syncer: Arc<Syncer>,
    writes: Box<[Mutex<()>]>,
}

/// What opening a durable store found.
#[derive(Debug, Clone, Copy)]
pub struct Recovered {
    pub keys: usize,
    pub millis: u64,
}

fn disk_key(hash: u64, key: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(8 + key.len());
    out.extend_from_slice(&hash.to_be_bytes());
    out.extend_from_slice(key.as_bytes());
    out
}

fn hash_bound(hash: u64) -> [u8; 8] {
    hash.to_be_bytes()
}

/// Splits a key as stored on disk into its hash and key; `None` for one this version did
/// not write (it is skipped, with a warning).
fn split_disk_key(raw: &[u8]) -> Option<(u64, &str)> {
    let (hash, key) = raw.split_first_chunk::<8>()?;
    Some((u64::from_be_bytes(*hash), std::str::from_utf8(key).ok()?))
}

/// Forces fjall's journal to disk without holding its writer lock for the fsync (fjall's
/// own `persist` holds it, and every writer waits for the disk): the journal's buffer goes
/// to the OS under the lock, which is quick, then the active journal file is fsynced
/// through a handle of this syncer's own while writers go on appending, so the next fsync
/// covers every write that came meanwhile. The active journal is the highest-numbered
/// `N.jnl` in the data dir; fjall fsyncs a journal when it seals it, so a write made
/// before a rotation is on disk either way. Where no journal file is found, fjall's own
/// `persist` does it all.
struct JournalSync {
    db: fjall::Database,
    dir: PathBuf,
    active: Option<(u64, std::fs::File)>,
}

impl JournalSync {
    fn sync(&mut self) -> std::io::Result<()> {
        self.db
            .persist(fjall::PersistMode::Buffer)
            .map_err(std::io::Error::other)?;
        let Some(newest) = newest_journal(&self.dir)? else {
            return self
                .db
                .persist(fjall::PersistMode::SyncData)
                .map_err(std::io::Error::other);
        };
        if self.active.as_ref().is_none_or(|(n, _)| *n != newest) {
            let file = std::fs::File::open(self.dir.join(format!("{newest}.jnl")))?;
            self.active = Some((newest, file));
        }
        match &self.active {
            Some((_, file)) => file.sync_data(),
            None => Ok(()),
        }
    }
}

/// Loads every key on disk into `memory` (empty), on as many threads as there are cores,
/// each over its own share of the hash space; returns how many disk keys were not
/// `hash ‖ key` (skipped).
fn load(keys: &fjall::Keyspace, memory: &MemoryEngine) -> Result<usize, StoreError> {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get().min(8)) as u64;
    let share = u64::MAX / threads;
    let skipped = std::sync::atomic::AtomicUsize::new(0);
    std::thread::scope(|scope| {
        let loaders: Vec<_> = (0..threads)
            .map(|t| {
                let skipped = &skipped;
                scope.spawn(move || {
                    let start = hash_bound(t * share);
                    let items = match t + 1 == threads {
                        true => keys.range(start..),
                        false => keys.range(start..hash_bound((t + 1) * share)),
                    };
                    let entries = items.filter_map(|item| {
                        let (raw, value) = match item.into_inner() {
                            Ok(pair) => pair,
                            Err(error) => return Some(Err(failed(error))),
                        };
                        match split_disk_key(&raw) {
                            Some((hash, key)) => {
                                Some(Ok((hash, key.to_string(), Bytes::copy_from_slice(&value))))
                            }
                            None => {
                                skipped.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                                None
                            }
                        }
                    });
                    memory.load_sorted(entries)
                })
            })
            .collect();
        loaders
            .into_iter()
            .map(|loader| {
                loader
                    .join()
                    .unwrap_or_else(|_| Err(failed("a loader panicked")))
            })
            .collect::<Result<Vec<usize>, StoreError>>()
    })?;
    Ok(skipped.into_inner())
}

/// The number of the newest journal file (`N.jnl`) in `dir`, if there is one.
fn newest_journal(dir: &Path) -> std::io::Result<Option<u64>> {
    let mut newest = None;
    for entry in std::fs::read_dir(dir)? {
        let name = entry?.file_name();
        let number = name
            .to_str()
            .and_then(|n| n.strip_suffix(".jnl"))
            .and_then(|n| n.parse::<u64>().ok());
        newest = newest.max(number);
    }
    Ok(newest)
}

impl DurableEngine {
    /// Opens (or creates) the keys of `db` (in `dir`) and loads them into memory.
    pub fn open(
        db: fjall::Database,
        dir: &Path,
        policy: FsyncPolicy,
    ) -> Result<(DurableEngine, Recovered), StoreError> {
        let started = Instant::now();
        let keys = db
            .keyspace("kv", fjall::KeyspaceCreateOptions::default)
            .map_err(failed)?;
        let changes = db
            .keyspace("changes", fjall::KeyspaceCreateOptions::default)
            .map_err(failed)?;
        let memory = MemoryEngine::new();
        let skipped = load(&keys, &memory)?;
        if skipped > 0 {
            tracing::warn!(skipped, "skipped keys on disk that are not hash ‖ key");
        }
        let mut journal = JournalSync {
            db: db.clone(),
            dir: dir.to_path_buf(),
            active: None,
        };
        let syncer = Syncer::start(policy, move || journal.sync());
        let recovered = Recovered {
            keys: memory.len(),
            millis: started.elapsed().as_millis() as u64,
        };
        let engine = DurableEngine {
            memory,
            db,
            keys,
            changes,
            syncer,
            writes: (0..WRITE_STRIPES).map(|_| Mutex::new(())).collect(),
        };
        Ok((engine, recovered))
    }

    fn stripe(&self, hash: u64) -> &Mutex<()> {
        &self.writes[(hash >> 56) as usize % WRITE_STRIPES]
    }

    /// Bytes on disk (tables and journal).
    pub fn disk_bytes(&self) -> u64 {
        self.db.disk_space().unwrap_or(0)
    }

    /// Bytes of the journal on disk.
    pub fn journal_bytes(&self) -> u64 {
        self.db.journal_disk_space().unwrap_or(0)
    }

    pub fn sync_stats(&self) -> SyncStats {
        self.syncer.stats()
    }

    pub fn policy(&self) -> FsyncPolicy {
        self.syncer.policy()
    }

    /// Records that this node prepared `change_id`, handing over `dropping` and taking in
    /// `incoming` as it arrives; the caller
    /// awaits the [`Durable`] before it says it prepared.
    pub fn begin_change(
        &self,
        change_id: u64,
        dropping: Vec<(u64, u64)>,
        incoming: Vec<(u64, u64)>,
    ) -> Result<Durable, StoreError> {
        let record = ChangeRecord {
            change_id,
            dropping,
            applied: false,
            incoming,
        };
        self.changes
            .insert(changes::record_key(change_id), changes::encode(&record)?)
            .map_err(failed)?;
        self.syncer.wrote();
        Ok(self.syncer.durable())
    }

    /// Stages keys received for `change_id` (each value encoded by the change module); the
    /// caller awaits [`Engine::durable`] before it acknowledges them.
    pub fn stage<'a>(
        &self,
        change_id: u64,
        entries: impl IntoIterator<Item = (&'a str, Vec<u8>)>,
    ) -> Result<(), StoreError> {
        let mut batch = self.db.batch();
        for (key, value) in entries {
            batch.insert(&self.changes, changes::staged_key(change_id, key), value);
        }
        batch.commit().map_err(failed)?;
        self.syncer.wrote();
        Ok(())
    }

    /// The changes this node prepared and did not finish, as recorded on disk.
    pub fn changes(&self) -> Result<Vec<ChangeRecord>, StoreError> {
        changes::records(&self.changes)
    }

    /// The record of `change_id`, if this node prepared it and did not finish it.
    pub fn change(&self, change_id: u64) -> Result<Option<ChangeRecord>, StoreError> {
        changes::record(&self.changes, change_id)
    }

    /// The keys staged for `change_id`, with their encoded values.
    pub fn staged(&self, change_id: u64) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        changes::staged(&self.changes, change_id)
    }

    /// Applies a committed change's staged keys (`writes`: puts, and `None` deletes) in one
    /// atomic batch that also forgets the staged copies and marks the change applied: a
    /// crash leaves either all of it or none, and a change applied once is never applied
    /// again over the writes that followed it.
    pub fn apply_staged(
        &self,
        change_id: u64,
        writes: &[(u64, String, Option<Bytes>)],
    ) -> Result<(), StoreError> {
        let Some(mut record) = self.change(change_id)? else {
            return Err(StoreError(format!("no record of change {change_id}")));
        };
        record.applied = true;
        let mut batch = self.db.batch();
        for (hash, key, value) in writes {
            match value {
                Some(value) => batch.insert(&self.keys, disk_key(*hash, key), value.as_ref()),
                None => batch.remove(&self.keys, disk_key(*hash, key)),
            }
        }
        for key in changes::staged_keys(&self.changes, change_id)? {
            batch.remove(&self.changes, key);
        }
        batch.insert(
            &self.changes,
            changes::record_key(change_id),
            changes::encode(&record)?,
        );
        batch.commit().map_err(failed)?;
        self.syncer.wrote();
        for (hash, key, value) in writes {
            self.memory.apply(*hash, key, value.clone())?;
        }
        Ok(())
    }

    /// Forgets `change_id`: its record and anything still staged for it (the change ended,
    /// or was aborted).
    pub fn end_change(&self, change_id: u64) -> Result<(), StoreError> {
        let mut batch = self.db.batch();
        for key in changes::staged_keys(&self.changes, change_id)? {
            batch.remove(&self.changes, key);
        }
        batch.remove(&self.changes, changes::record_key(change_id));
        batch.commit().map_err(failed)?;
        self.syncer.wrote();
        Ok(())
    }

    /// Forces everything written so far to disk (a node stopping cleanly).
    pub fn flush(&self) -> Result<(), StoreError> {
        self.db.persist(fjall::PersistMode::SyncAll).map_err(failed)
    }
}

impl Drop for DurableEngine {
    fn drop(&mut self) {
        self.syncer.stop();
    }
}

impl Engine for DurableEngine {
    fn len(&self) -> usize {
        self.memory.len()
    }

    fn value_bytes(&self) -> usize {
        self.memory.value_bytes()
    }

    fn get(&self, hash: u64, key: &str) -> Result<Option<Bytes>, StoreError> {
        self.memory.get(hash, key)
    }

    fn put(&self, hash: u64, key: &str, value: Bytes) -> Result<bool, StoreError> {
        let _write = self.stripe(hash).lock();
        self.keys
            .insert(disk_key(hash, key), value.as_ref())
            .map_err(failed)?;
        self.syncer.wrote();
        self.memory.put(hash, key, value)
    }

    fn delete(&self, hash: u64, key: &str) -> Result<bool, StoreError> {
        let _write = self.stripe(hash).lock();
        if self.memory.get(hash, key)?.is_none() {
            return Ok(false);
        }
        self.keys.remove(disk_key(hash, key)).map_err(failed)?;
        self.syncer.wrote();
        self.memory.delete(hash, key)
    }

    fn read_batch(
        &self,
        from: u64,
        end: u64,
        max_keys: usize,
        max_bytes: usize,
        into: &mut Packer,
    ) -> Result<Option<u64>, StoreError> {
        self.memory.read_batch(from, end, max_keys, max_bytes, into)
    }

    fn remove_segment(&self, start: u64, end: u64) -> Result<usize, StoreError> {
        if start > end {
            return Ok(0);
        }
        // Off disk first: a crash half-way leaves keys in neither or only on disk (the
        // memory copy goes last), never a key served that the disk no longer has.
        let upper = end.checked_add(1).map(hash_bound);
        let doomed: Vec<fjall::UserKey> = match upper {
            Some(upper) => self.keys.range(hash_bound(start)..upper),
            None => self.keys.range(hash_bound(start)..),
        }
        .map(|item| item.key().map_err(failed))
        .collect::<Result<_, _>>()?;
        for chunk in doomed.chunks(REMOVE_BATCH) {
            let mut batch = self.db.batch();
            for key in chunk {
                batch.remove(&self.keys, key.clone());
            }
            batch.commit().map_err(failed)?;
            self.syncer.wrote();
        }
        self.memory.remove_segment(start, end)
    }

    fn durable(&self) -> Durable {
        self.syncer.durable()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open(dir: &std::path::Path, policy: FsyncPolicy) -> DurableEngine {
        let db = fjall::Database::builder(dir).open().unwrap();
        DurableEngine::open(db, dir, policy).unwrap().0
    }

    #[test]
    fn the_durable_engine_passes_the_engine_suite() {
        let dir = tempfile::tempdir().unwrap();
        crate::store::conformance::run(&open(dir.path(), FsyncPolicy::No));
    }

    #[test]
    fn keys_written_are_there_when_the_store_is_opened_again() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = open(dir.path(), FsyncPolicy::Everysec);
            for i in 0..1000u64 {
                store
                    .put(i << 50, &format!("k{i}"), Bytes::from(format!("{i}")))
                    .unwrap();
            }
            store.delete(7 << 50, "k7").unwrap();
            assert_eq!(
                store.remove_segment(100 << 50, (200 << 50) - 1).unwrap(),
                100
            );
        }
        let store = open(dir.path(), FsyncPolicy::Everysec);
        assert_eq!(store.len(), 1000 - 1 - 100);
        assert_eq!(store.get(8 << 50, "k8").unwrap().unwrap(), "8");
        assert_eq!(store.get(7 << 50, "k7").unwrap(), None);
        assert_eq!(store.get(150 << 50, "k150").unwrap(), None);
        assert_eq!(store.get(999 << 50, "k999").unwrap().unwrap(), "999");
    }

    #[test]
    fn a_change_on_disk_is_found_again_and_applied_once() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = open(dir.path(), FsyncPolicy::Always);
            store.put(1, "kept", Bytes::from_static(b"1")).unwrap();
            let _ = store.begin_change(9, vec![(0, 10)], vec![]).unwrap();
            let _ = store.begin_change(10, vec![], vec![(20, 30)]).unwrap();
            let staged = [("a", b"x".to_vec()), ("b", b"y".to_vec())];
            store
                .stage(9, staged.iter().map(|(k, v)| (*k, v.clone())))
                .unwrap();
            store.stage(10, [("c", b"z".to_vec())]).unwrap();
        }
        let store = open(dir.path(), FsyncPolicy::Always);
        let ids: Vec<u64> = store
            .changes()
            .unwrap()
            .iter()
            .map(|r| r.change_id)
            .collect();
        assert_eq!(ids, [9, 10]);
        let staged = store.staged(9).unwrap();
        assert_eq!(
            staged,
            [
                ("a".to_string(), b"x".to_vec()),
                ("b".to_string(), b"y".to_vec())
            ]
        );
        let writes = [
            (5, "a".to_string(), Some(Bytes::from_static(b"x"))),
            (1, "kept".to_string(), None),
        ];
        store.apply_staged(9, &writes).unwrap();
        let record = store.changes().unwrap().remove(0);
        assert_eq!(
            (record.change_id, record.applied, record.dropping),
            (9, true, vec![(0, 10)])
        );
        assert!(store.staged(9).unwrap().is_empty());
        assert_eq!(store.staged(10).unwrap().len(), 1);
        store.end_change(9).unwrap();
        store.end_change(10).unwrap();
        assert!(store.changes().unwrap().is_empty());
        assert!(store.staged(10).unwrap().is_empty());
        assert!(store.apply_staged(9, &writes).is_err());
        drop(store);
        let store = open(dir.path(), FsyncPolicy::Always);
        assert_eq!(store.get(5, "a").unwrap().unwrap(), "x");
        assert_eq!(store.get(1, "kept").unwrap(), None);
        assert!(store.changes().unwrap().is_empty());
    }

    #[test]
    fn the_fsync_finds_the_active_journal_of_the_data_dir() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path(), FsyncPolicy::Always);
        store.put(1, "a", Bytes::from_static(b"1")).unwrap();
        assert!(newest_journal(dir.path()).unwrap().is_some());
        let mut journal = JournalSync {
            db: store.db.clone(),
            dir: dir.path().to_path_buf(),
            active: None,
        };
        journal.sync().unwrap();
        assert!(journal.active.is_some(), "synced through its own handle");
    }

    #[test]
    fn keys_load_in_hash_order_on_every_thread() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = open(dir.path(), FsyncPolicy::No);
            for i in 0..5000u64 {
                let hash = i.wrapping_mul(0x9E37_79B9_7F4A_7C15);
                store
                    .put(hash, &format!("k{i}"), Bytes::from(format!("{i}")))
                    .unwrap();
            }
            // Colliding hashes, either side of the middle of the ring.
            for hash in [u64::MAX / 2, u64::MAX / 2 + 1] {
                store.put(hash, "x", Bytes::from_static(b"1")).unwrap();
                store.put(hash, "y", Bytes::from_static(b"2")).unwrap();
            }
        }
        let store = open(dir.path(), FsyncPolicy::No);
        assert_eq!(store.len(), 5004);
        assert_eq!(store.get(u64::MAX / 2 + 1, "y").unwrap().unwrap(), "2");
        assert_eq!(store.get(u64::MAX / 2, "x").unwrap().unwrap(), "1");
        let hash = 77u64.wrapping_mul(0x9E37_79B9_7F4A_7C15);
        assert_eq!(store.get(hash, "k77").unwrap().unwrap(), "77");
        let mut all = Packer::default();
        let next = store
            .read_batch(0, u64::MAX, usize::MAX, usize::MAX, &mut all)
            .unwrap();
        assert_eq!((all.len(), next), (5004, None));
    }
}
