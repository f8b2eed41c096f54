//! Storage engines on ringkv's access pattern, for durable nodes (issue 14): keys ordered by
//! `hash ‖ key` (8-byte big-endian ring hash, then the key), ~100-byte values, written and
//! read in random hash order one operation at a time (as requests do), one hash range of a
//! quarter of the ring read in order (a transfer) and dropped (a handover). The in-memory
//! engine of today is the baseline; fjall (an LSM tree with a journal) and redb (a
//! copy-on-write B-tree) are the candidates, both without an fsync per write (what
//! `--fsync everysec` would do between its syncs). Prints one table.
//!
//! `cargo bench --bench engines` runs 1,000,000 keys; under `cargo test --benches` it runs
//! 10,000 so the suite stays quick.

use std::path::Path;
use std::time::{Duration, Instant};

use bytes::Bytes;
use ringkv::ring::key_hash;
use ringkv::store::{self, Store};

/// The operations compared, on byte keys `hash ‖ key`.
trait Candidate {
    fn name(&self) -> &'static str;
    fn put(&self, hash: u64, key: &str, value: &[u8]);
    fn get(&self, hash: u64, key: &str) -> bool;
    /// Keys with hashes in `from..=to`, read in order.
    fn scan(&self, from: u64, to: u64) -> usize;
    /// Drops the keys with hashes in `from..=to`; how many.
    fn drop_range(&self, from: u64, to: u64) -> usize;
    /// Bytes on disk (0 in memory).
    fn disk(&self) -> u64;
}

fn ordered(hash: u64, key: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(8 + key.len());
    out.extend_from_slice(&hash.to_be_bytes());
    out.extend_from_slice(key.as_bytes());
    out
}

fn bound(hash: u64, last: bool) -> Vec<u8> {
    let mut out = hash.to_be_bytes().to_vec();
    if last {
        // Past every key with this hash (keys are at most a few hundred bytes).
        out.extend_from_slice(&[0xff; 1024]);
    }
    out
}

struct Memory(Store);

impl Candidate for Memory {
    fn name(&self) -> &'static str {
        "memory (today)"
    }
    fn put(&self, hash: u64, key: &str, value: &[u8]) {
        self.0
            .put(hash, key, Bytes::copy_from_slice(value))
            .unwrap();
    }
    fn get(&self, hash: u64, key: &str) -> bool {
        self.0.get(hash, key).unwrap().is_some()
    }
    fn scan(&self, from: u64, to: u64) -> usize {
        let (mut at, mut seen) = (from, 0);
        loop {
            let mut batch = store::Packer::default();
            let next = self
                .0
                .read_batch(at, to, 4096, usize::MAX, &mut batch)
                .unwrap();
            seen += batch.len();
            match next {
                Some(next) => at = next,
                None => return seen,
            }
        }
    }
    fn drop_range(&self, from: u64, to: u64) -> usize {
        self.0.remove_segment(from, to).unwrap()
    }
    fn disk(&self) -> u64 {
        0
    }
}

struct Fjall {
    db: fjall::Database,
    keys: fjall::Keyspace,
}

impl Fjall {
    fn open(dir: &Path) -> Fjall {
        let db = fjall::Database::builder(dir).open().unwrap();
        let keys = db
            .keyspace("kv", fjall::KeyspaceCreateOptions::default)
            .unwrap();
        Fjall { db, keys }
    }
}

impl Candidate for Fjall {
    fn name(&self) -> &'static str {
        "fjall 3 (LSM)"
    }
    fn put(&self, hash: u64, key: &str, value: &[u8]) {
        self.keys.insert(ordered(hash, key), value).unwrap();
    }
    fn get(&self, hash: u64, key: &str) -> bool {
        self.keys.get(ordered(hash, key)).unwrap().is_some()
    }
    fn scan(&self, from: u64, to: u64) -> usize {
        self.keys
            .range(bound(from, false)..=bound(to, true))
            .map(|kv| kv.into_inner().unwrap())
            .filter(|(_, value)| !value.is_empty())
            .count()
    }
    fn drop_range(&self, from: u64, to: u64) -> usize {
        // No range tombstone: one removal per key, in batches.
        let keys: Vec<_> = self
            .keys
            .range(bound(from, false)..=bound(to, true))
            .map(|kv| kv.key().unwrap())
            .collect();
        for chunk in keys.chunks(4096) {
            let mut batch = self.db.batch();
            for key in chunk {
                batch.remove(&self.keys, key.clone());
            }
            batch.commit().unwrap();
        }
        keys.len()
    }
    fn disk(&self) -> u64 {
        self.db.persist(fjall::PersistMode::SyncAll).unwrap();
        self.db.disk_space().unwrap_or(0)
    }
}

const TABLE: redb::TableDefinition<&[u8], &[u8]> = redb::TableDefinition::new("kv");

struct Redb {
    db: redb::Database,
    path: std::path::PathBuf,
}

impl Redb {
    fn open(dir: &Path) -> Redb {
        let path = dir.join("kv.redb");
        let db = redb::Database::create(&path).unwrap();
        Redb { db, path }
    }

    fn write(&self, f: impl FnOnce(&mut redb::Table<&[u8], &[u8]>) -> usize) -> usize {
        let mut txn = self.db.begin_write().unwrap();
        txn.set_durability(redb::Durability::None).unwrap();
        let n = {
            let mut table = txn.open_table(TABLE).unwrap();
            f(&mut table)
        };
        txn.commit().unwrap();
        n
    }
}

impl Candidate for Redb {
    fn name(&self) -> &'static str {
        "redb 4 (B-tree)"
    }
    fn put(&self, hash: u64, key: &str, value: &[u8]) {
        let key = ordered(hash, key);
        self.write(|table| {
            table.insert(key.as_slice(), value).unwrap();
            1
        });
    }
    fn get(&self, hash: u64, key: &str) -> bool {
        use redb::ReadableDatabase;
        let txn = self.db.begin_read().unwrap();
        let table = txn.open_table(TABLE).unwrap();
        table.get(ordered(hash, key).as_slice()).unwrap().is_some()
    }
    fn scan(&self, from: u64, to: u64) -> usize {
        use redb::ReadableDatabase;
        let txn = self.db.begin_read().unwrap();
        let table = txn.open_table(TABLE).unwrap();
        let (low, high) = (bound(from, false), bound(to, true));
        table
            .range(low.as_slice()..=high.as_slice())
            .unwrap()
            .map(|kv| kv.unwrap().1.value().len())
            .filter(|len| *len > 0)
            .count()
    }
    fn drop_range(&self, from: u64, to: u64) -> usize {
        let (low, high) = (bound(from, false), bound(to, true));
        self.write(|table| {
            let mut dropped = 0;
            table
                .retain_in(low.as_slice()..=high.as_slice(), |_, _| {
                    dropped += 1;
                    false
                })
                .unwrap();
            dropped
        })
    }
    fn disk(&self) -> u64 {
        std::fs::metadata(&self.path).map_or(0, |m| m.len())
    }
}

struct Row {
    name: &'static str,
    put: f64,
    get: f64,
    scan: Duration,
    scanned: usize,
    dropped: Duration,
    disk: u64,
}

fn measure(engine: &dyn Candidate, keys: &[(u64, String)], value: &[u8]) -> Row {
    let started = Instant::now();
    for (hash, key) in keys {
        engine.put(*hash, key, value);
    }
    let put = keys.len() as f64 / started.elapsed().as_secs_f64();
    // Reads in another random order (a multiplicative walk over the indices).
    let n = keys.len();
    let started = Instant::now();
    let mut found = 0;
    for i in 0..n {
        let (hash, key) = &keys[(i * 7_919 + 13) % n];
        found += usize::from(engine.get(*hash, key));
    }
    let get = n as f64 / started.elapsed().as_secs_f64();
    assert_eq!(found, n, "{}: every key reads back", engine.name());
    let (from, to) = (u64::MAX / 8, u64::MAX / 8 * 3);
    let started = Instant::now();
    let scanned = engine.scan(from, to);
    let scan = started.elapsed();
    let started = Instant::now();
    let dropped_keys = engine.drop_range(from, to);
    let dropped = started.elapsed();
    assert_eq!(
        dropped_keys,
        scanned,
        "{}: the range dropped is the range read",
        engine.name()
    );
    assert_eq!(
        engine.scan(from, to),
        0,
        "{}: nothing left in the range",
        engine.name()
    );
    Row {
        name: engine.name(),
        put,
        get,
        scan,
        scanned,
        dropped,
        disk: engine.disk(),
    }
}

fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let count = if full { 1_000_000 } else { 10_000 };
    let keys: Vec<(u64, String)> = (0..count)
        .map(|i| {
            let key = format!("key{i}");
            (key_hash(key.as_bytes()), key)
        })
        .collect();
    let value = format!("\"{}\"", "v".repeat(98)).into_bytes();
    let dir = std::env::temp_dir().join(format!("ringkv-engines-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let rows = {
        let memory = Memory(store::memory());
        let fjall_dir = dir.join("fjall");
        let redb_dir = dir.join("redb");
        std::fs::create_dir_all(&fjall_dir).unwrap();
        std::fs::create_dir_all(&redb_dir).unwrap();
        let baseline = measure(&memory, &keys, &value);
        let fjall = measure(&Fjall::open(&fjall_dir), &keys, &value);
        let redb = measure(&Redb::open(&redb_dir), &keys, &value);
        vec![baseline, fjall, redb]
    };
    let _ = std::fs::remove_dir_all(&dir);
    println!("\nstorage engines: {count} keys, ~100-byte values, keys ordered by hash ‖ key, no fsync per write");
    println!(
        "{:<18} {:>11} {:>8} {:>11} {:>8} {:>10} {:>10} {:>12} {:>9}",
        "engine", "PUT/s", "vs mem", "GET/s", "vs mem", "scan ms", "keys", "drop ms", "disk MB"
    );
    let base = &rows[0];
    for row in &rows {
        println!(
            "{:<18} {:>11.0} {:>7.2}x {:>11.0} {:>7.2}x {:>10.1} {:>10} {:>12.1} {:>9.1}",
            row.name,
            row.put,
            row.put / base.put,
            row.get,
            row.get / base.get,
            row.scan.as_secs_f64() * 1000.0,
            row.scanned,
            row.dropped.as_secs_f64() * 1000.0,
            row.disk as f64 / 1e6
        );
    }
    println!(
        "(one operation per call, as a request makes it; scan and drop: the quarter of the \
         ring from 1/8 to 3/8; fjall drops a range key by key in batches, redb in one \
         transaction)"
    );
}
