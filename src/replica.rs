//! One replica of a shard (assignment 4): serves key operations under a causal context,
//! numbers the writes it accepts, takes in the writes of the shard's other replicas in
//! each replica's order, and hands a peer the writes it lacks. Replicas that exchanged
//! every write hold the same value for every key, whatever order the exchanges came in:
//! of two writes to a key, the greater [`Version`] wins everywhere, deletions included
//! (they are tombstones until every replica has them, see [`Replica::forget`]).
//!
//! What a replica has applied is a [`VersionVector`]: per replica, how many of its writes
//! (always a prefix, since writes are taken in in order). A request whose context has
//! seen more of this shard than that is refused with [`ReplicaError::Behind`], naming what
//! to pull first. Every write carries the context its client had (its dependencies, on
//! any shard); a replica's replies carry the union of those it applied, so a client that
//! read a write is held to everything that write depended on.
//!
//! Lock order: the replica's state, then the store's own locks (the store is written only
//! with the state held, so a write and the vector that counts it change together).

use std::collections::{BTreeMap, HashSet};

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

use crate::causal::{Context, VersionVector};
use crate::kv::{KvOp, KvOutcome};
use crate::ring::key_hash;
use crate::store::{Packer, Store, StoreError};
use crate::version::{BadRecord, Clock, Record, Version};

/// One write as replicas exchange it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Write {
    /// The replica that accepted it, and its number there (1, 2, ...).
    pub origin: String,
    pub counter: u64,
    pub hash: u64,
    pub key: String,
    pub record: Record,
    /// What the writing client had seen.
    pub deps: Context,
}

/// How a key request of the replicated contract ended, with the context its reply carries:
/// rendered by the node the client asked (which adds `address` when a replica elsewhere
/// served it), so a relayed answer is the replica's own.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyAnswer {
    pub result: Result<KvOutcome, Rejection>,
    pub context: Context,
}

/// Why a key request of the replicated contract was not served.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum Rejection {
    #[error("Invalid JSON")]
    InvalidJson,
    #[error("Invalid causal context")]
    InvalidContext,
    #[error("Value is missing")]
    ValueMissing,
    /// Too long to store (PUT) or to exist (GET, DELETE: 404).
    #[error("Key is too long")]
    KeyTooLong,
    /// The replica lacks writes the context has seen and could not get them in time (400).
    #[error("Unable to satisfy request")]
    Behind,
    /// No replica of the key's shard answered in time, or the serving one failed (503).
    #[error("Unable to satisfy request")]
    Unavailable,
}

/// Why a replica did not serve a request.
#[derive(Debug, thiserror::Error)]
pub enum ReplicaError {
    /// The request's context has seen writes this replica has not applied: per replica,
    /// how many of its writes this one has (pull the rest from a peer).
    #[error("this replica lacks writes the request's context has seen")]
    Behind(Vec<(String, u64)>),
    /// A view change replaced this replica with a successor (ask the node's current one).
    #[error("this replica was replaced by a view change")]
    Retired,
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Record(#[from] BadRecord),
}

#[derive(Debug, Default)]
struct State {
    applied: VersionVector,
    /// The writes some replica may still lack, per origin, by number.
    log: BTreeMap<String, BTreeMap<u64, Write>>,
    /// The union of the dependencies of every write applied.
    deps: Context,
    /// Keys holding a value (not a tombstone).
    live: usize,
    /// Per origin, the last write forgotten from the log: a peer that lacks one of those
    /// cannot be brought up to date from the log (it needs a refill).
    trimmed: VersionVector,
    /// Deletions forgotten from the log whose tombstones are still stored, until every
    /// replica holds exactly the same writes.
    graves: Vec<(u64, String, Version)>,
    /// Bumped whenever a tombstone no log accounts for may have been stored (kept through
    /// a view change or a restart, or taken in by a refill); `swept` is the value a sweep
    /// that collected every one of them saw (see [`Replica::tombstone_scan`]).
    loose: u64,
    swept: u64,
    /// Keys stored since a view change began (`None`: not tracking): re-sent in its
    /// catch-up.
    tracked: Option<HashSet<String>>,
    /// Replaced by a successor: serves and takes in nothing more.
    retired: bool,
}

/// What a retired replica hands its successor.
#[derive(Debug, Clone, Copy, Default)]
pub struct Retired {
    live: usize,
    time: u64,
}

/// A replica of shard `shard` at address `me`, keeping its records in `store`.
pub struct Replica {
    me: String,
    origin: u64,
    shard: String,
    store: Store,
    clock: Clock,
    state: Mutex<State>,
    /// Digest scans running (see [`Replica::digests`]): tombstones wait for them.
    scans: std::sync::atomic::AtomicUsize,
}

/// Counts a digest scan while it runs.
struct Scanning<'a>(&'a std::sync::atomic::AtomicUsize);

impl<'a> Scanning<'a> {
    fn new(scans: &'a std::sync::atomic::AtomicUsize) -> Self {
        scans.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        Scanning(scans)
    }
}

impl Drop for Scanning<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
    }
}

impl Replica {
    pub fn new(me: &str, shard: &str, store: Store) -> Replica {
        // Records a store already holds (a restart on a data dir, a view change's successor)
        // may include tombstones this new incarnation's log knows nothing of.
        let state = State {
            loose: u64::from(!store.is_empty()),
            ..State::default()
        };
        Replica {
            me: me.to_string(),
            origin: xxhash_rust::xxh3::xxh3_64(me.as_bytes()),
            shard: shard.to_string(),
            store,
            clock: Clock::default(),
            state: Mutex::new(state),
            scans: std::sync::atomic::AtomicUsize::new(0),
        }
    }

    pub fn shard(&self) -> &str {
        &self.shard
    }

    /// This incarnation's name in vectors and contexts.
    pub fn name(&self) -> &str {
        &self.me
    }

    /// What this replica has applied, per replica.
    pub fn applied(&self) -> VersionVector {
        self.state.lock().applied.clone()
    }

    /// Keys holding a value.
    pub fn live_keys(&self) -> usize {
        self.state.lock().live
    }

    /// Deleted keys whose tombstones are still stored.
    pub fn tombstones(&self) -> usize {
        let state = self.state.lock();
        self.store.len().saturating_sub(state.live)
    }

    fn read(&self, hash: u64, key: &str) -> Result<Option<Record>, ReplicaError> {
        match self.store.get(hash, key)? {
            Some(bytes) => Ok(Some(Record::decode(&bytes)?)),
            None => Ok(None),
        }
    }

    /// Serves `op` on `key` for a client that has seen `seen`; the outcome and the context
    /// of the reply.
    pub fn serve(
        &self,
        hash: u64,
        key: &str,
        op: &KvOp,
        seen: &Context,
    ) -> Result<(KvOutcome, Context), ReplicaError> {
        let mut state = self.state.lock();
        if state.retired {
            return Err(ReplicaError::Retired);
        }
        let needed = seen.shard(&self.shard);
        if !state.applied.covers(&needed) {
            return Err(ReplicaError::Behind(state.applied.missing(&needed)));
        }
        let value = self.read(hash, key)?.and_then(|r| r.value);
        let outcome = match (op, value) {
            (KvOp::Get, Some(value)) => KvOutcome::Found(value),
            (KvOp::Get | KvOp::Delete, None) => KvOutcome::Absent,
            (KvOp::Put(new), old) => {
                self.write(&mut state, hash, key, Some(new.clone()), seen)?;
                if old.is_some() {
                    KvOutcome::Replaced
                } else {
                    KvOutcome::Added
                }
            }
            (KvOp::Delete, Some(_)) => {
                self.write(&mut state, hash, key, None, seen)?;
                KvOutcome::Deleted
            }
        };
        let mut reply = seen.clone();
        reply.merge(&state.deps);
        reply.merge_shard(&self.shard, &state.applied);
        Ok((outcome, reply))
    }

    fn write(
        &self,
        state: &mut State,
        hash: u64,
        key: &str,
        value: Option<bytes::Bytes>,
        seen: &Context,
    ) -> Result<(), ReplicaError> {
        let counter = state.applied.get(&self.me) + 1;
        let write = Write {
            origin: self.me.clone(),
            counter,
            hash,
            key: key.to_string(),
            record: Record {
                version: Version {
                    time: self.clock.tick(),
                    origin: self.origin,
                    counter,
                },
                value,
            },
            deps: seen.clone(),
        };
        self.take(state, write)
    }

    /// Applies `write` (the next of its origin) and logs it.
    fn take(&self, state: &mut State, write: Write) -> Result<(), ReplicaError> {
        self.store_if_newer(state, write.hash, &write.key, &write.record)?;
        state.applied.observe(&write.origin, write.counter);
        state.deps.merge(&write.deps);
        state
            .log
            .entry(write.origin.clone())
            .or_default()
            .insert(write.counter, write);
        Ok(())
    }

    /// Takes in writes from a peer: each one that is the next of its origin is applied;
    /// those already applied are skipped, and one after a gap waits for a later exchange.
    /// Returns how many were applied.
    pub fn receive(&self, writes: Vec<Write>) -> Result<usize, ReplicaError> {
        let mut state = self.state.lock();
        if state.retired {
            return Err(ReplicaError::Retired);
        }
        let mut applied = 0;
        for write in writes {
            if write.counter != state.applied.get(&write.origin) + 1 {
                continue;
            }
            self.clock.observe(write.record.version.time);
            self.take(&mut state, write)?;
            applied += 1;
        }
        Ok(applied)
    }

    /// Up to `max` of the logged writes a replica that has applied `have` lacks, each
    /// origin's in order; `None` when some of them have left the log (the peer needs a
    /// refill, not a pull).
    pub fn since(&self, have: &VersionVector, max: usize) -> Option<Vec<Write>> {
        let state = self.state.lock();
        if !have.covers(&state.trimmed) {
            return None;
        }
        let mut out = Vec::new();
        for (origin, writes) in &state.log {
            let from = have.get(origin).saturating_add(1);
            for write in writes.range(from..).map(|(_, w)| w) {
                if out.len() == max {
                    return Some(out);
                }
                out.push(write.clone());
            }
        }
        Some(out)
    }

    /// Forgets what every replica has: `others` are the applied vectors of every other
    /// replica of the shard. Writes all of them (and this one) applied leave the log. A
    /// deletion's tombstone leaves the store only once every replica holds exactly the same
    /// writes: until then a replica may hold an older write to that key that another lacks,
    /// which the tombstone must still beat when it arrives. Returns how many tombstones
    /// were dropped.
    pub fn forget(&self, others: &[VersionVector]) -> Result<usize, ReplicaError> {
        self.forget_before(others, u64::MAX)
    }

    /// [`Replica::forget`], keeping in the log every write versioned at `before` or later
    /// (a hybrid-clock time): a peer's pull that was sent before it confirmed a write, and
    /// arrives after, still finds that write in the log instead of being told to refill.
    pub fn forget_before(
        &self,
        others: &[VersionVector],
        before: u64,
    ) -> Result<usize, ReplicaError> {
        let mut state = self.state.lock();
        let state = &mut *state;
        let everyone = others
            .iter()
            .fold(state.applied.clone(), |all, v| all.meet(v));
        for (origin, writes) in state.log.iter_mut() {
            // An origin's writes are numbered in the order of their versions.
            let recent = writes
                .range(..=everyone.get(origin))
                .find(|(_, w)| w.record.version.time >= before)
                .map(|(counter, _)| *counter);
            let upto = recent.map_or(everyone.get(origin), |c| c - 1);
            let kept = writes.split_off(&upto.saturating_add(1));
            let done = std::mem::replace(writes, kept);
            if let Some(last) = done.keys().next_back() {
                state.trimmed.observe(origin, *last);
            }
            state.graves.extend(
                done.into_values()
                    .filter(|w| w.record.value.is_none())
                    .map(|w| (w.hash, w.key, w.record.version)),
            );
        }
        state.log.retain(|_, writes| !writes.is_empty());
        // Not while a view change tracks keys: its catch-up must find a deleted key's
        // tombstone, or the new replicas would keep the value its bulk transfer shipped.
        let scanning = self.scans.load(std::sync::atomic::Ordering::Acquire) > 0;
        if scanning || state.tracked.is_some() || !others.iter().all(|v| *v == state.applied) {
            return Ok(0);
        }
        let mut dropped = 0;
        for (hash, key, version) in std::mem::take(&mut state.graves) {
            let current = self.read(hash, &key)?;
            if current.is_some_and(|r| r.version == version) {
                self.store.delete(hash, &key)?;
                dropped += 1;
            }
        }
        Ok(dropped)
    }

    /// Stores `record` under `key` if it wins over the stored one, counting live keys;
    /// whether it did.
    fn store_if_newer(
        &self,
        state: &mut State,
        hash: u64,
        key: &str,
        record: &Record,
    ) -> Result<bool, ReplicaError> {
        let current = self.read(hash, key)?;
        if !record.wins_over(current.as_ref()) {
            return Ok(false);
        }
        let was_live = current.is_some_and(|r| r.value.is_some());
        self.store.put(hash, key, record.encode())?;
        if let Some(tracked) = &mut state.tracked {
            tracked.insert(key.to_string());
        }
        match (was_live, record.value.is_some()) {
            (false, true) => state.live += 1,
            (true, false) => state.live -= 1,
            _ => {}
        }
        Ok(true)
    }

    /// Calls `each` with every key and record of the hash segment `from..=to`, in order.
    fn each_record(
        &self,
        from: u64,
        to: u64,
        mut each: impl FnMut(String, Record),
    ) -> Result<(), ReplicaError> {
        let mut at = from;
        loop {
            let mut batch = Packer::default();
            let next = self
                .store
                .read_batch(at, to, 4096, usize::MAX, &mut batch)?;
            for (key, value) in batch.finish().iter() {
                each(key.to_string(), Record::decode(&value.ok_or(BadRecord)?)?);
            }
            match next {
                Some(next) => at = next,
                None => return Ok(()),
            }
        }
    }

    /// A digest of each of `buckets` equal slices of the ring (of every key and the version
    /// of its record, tombstones included), and what this replica had applied when it took
    /// them. Replicas with equal digests for a slice hold the same records there; a refill
    /// ships only the slices whose digests differ, and the refilled replica then counts
    /// the writes of that vector as applied ([`Replica::refilled`]): every one of them is
    /// in a slice it matched or in a snapshot taken later.
    pub fn digests(
        &self,
        buckets: usize,
        kind: Digest,
    ) -> Result<(VersionVector, Vec<u64>), ReplicaError> {
        self.scan(buckets, kind, |_, _, _| {})
    }

    /// The [`Digest::Live`] digests of [`Replica::digests`], and, in the same pass, the
    /// tombstones of each slice (at most `max` in all): what a sweep may collect where every
    /// replica's digest of the slice is the same ([`crate::gossip::sweep`]).
    pub fn tombstone_scan(
        &self,
        buckets: usize,
        max: usize,
    ) -> Result<TombstoneScan, ReplicaError> {
        let loose = self.state.lock().loose;
        let mut tombstones = vec![Vec::new(); buckets];
        let mut found = 0;
        let (applied, digests) = self.scan(buckets, Digest::Live, |bucket, key, record| {
            if record.value.is_none() {
                found += 1;
                if found <= max {
                    tombstones[bucket].push((
                        key_hash(key.as_bytes()),
                        key.to_string(),
                        record.version,
                    ));
                }
            }
        })?;
        Ok(TombstoneScan {
            applied,
            digests,
            tombstones,
            complete: found <= max,
            loose,
        })
    }

    /// One pass over the store: each slice's digest (and `each` called with every record),
    /// and what this replica had applied before the pass.
    fn scan(
        &self,
        buckets: usize,
        kind: Digest,
        mut each: impl FnMut(usize, &str, &Record),
    ) -> Result<(VersionVector, Vec<u64>), ReplicaError> {
        // What was applied, taken before the scan: every write it counts is in the store by
        // then (a write is stored before it is counted, under the state lock). The scan runs
        // without the lock, so requests go on meanwhile; a record written during it only
        // makes its slice differ. No tombstone is collected meanwhile: a digest missing one
        // would let a refill keep an older value it beat.
        let _scan = Scanning::new(&self.scans);
        let applied = self.state.lock().applied.clone();
        let mut out = Vec::with_capacity(buckets);
        for (bucket, (from, to)) in slices(buckets).into_iter().enumerate() {
            let mut digest = 0u64;
            self.each_record(from, to, |key, record| {
                each(bucket, &key, &record);
                if kind == Digest::Live && record.value.is_none() {
                    return;
                }
                let version = record.version;
                let mut bytes = key.into_bytes();
                bytes.extend_from_slice(&version.time.to_le_bytes());
                bytes.extend_from_slice(&version.origin.to_le_bytes());
                bytes.extend_from_slice(&version.counter.to_le_bytes());
                // Order-free: a sum of per-record hashes.
                digest = digest.wrapping_add(xxhash_rust::xxh3::xxh3_64(&bytes));
            })?;
            out.push(digest);
        }
        Ok((applied, out))
    }

    /// Whether tombstones no log accounts for may be stored: a sweep is due.
    pub fn sweep_due(&self) -> bool {
        let state = self.state.lock();
        state.loose > state.swept
    }

    /// Drops the tombstones `scan` listed in the slices marked `alike`, each still stored
    /// with the version it was scanned with: the caller saw every replica of the shard hold
    /// the same values there (equal [`Digest::Live`] digests) and have applied no writes
    /// this replica had not applied then. No replica then holds a value for those keys, and
    /// no older write to them can still arrive: every write any replica had applied was
    /// applied here before the tombstone was scanned, and lost to it. Refused (0) while a
    /// digest scan or a view change runs, as for [`Replica::forget`]. When every slice was
    /// alike and the scan listed every tombstone, no sweep is due until another loose one
    /// may have been stored. Returns how many were dropped.
    pub fn drop_tombstones(
        &self,
        scan: TombstoneScan,
        alike: &[bool],
    ) -> Result<usize, ReplicaError> {
        let mut state = self.state.lock();
        let scanning = self.scans.load(std::sync::atomic::Ordering::Acquire) > 0;
        if scanning || state.tracked.is_some() || state.retired {
            return Ok(0);
        }
        let mut dropped = 0;
        let slices = scan.tombstones.into_iter().zip(alike).filter(|(_, a)| **a);
        for (hash, key, version) in slices.flat_map(|(tombstones, _)| tombstones) {
            let current = self.read(hash, &key)?;
            if current.is_some_and(|r| r.version == version && r.value.is_none()) {
                self.store.delete(hash, &key)?;
                dropped += 1;
            }
        }
        let all = alike.len() == scan.digests.len() && alike.iter().all(|a| *a);
        if all && scan.complete && state.loose == scan.loose {
            state.swept = scan.loose;
        }
        Ok(dropped)
    }

    /// What a refill of slice `bucket` of `buckets` ships: every record there, and what
    /// this replica depends on.
    pub fn snapshot(&self, buckets: usize, bucket: usize) -> Result<Snapshot, ReplicaError> {
        let state = self.state.lock();
        let (from, to) = slices(buckets)[bucket];
        let mut records = Vec::new();
        self.each_record(from, to, |key, record| {
            records.push((key_hash(key.as_bytes()), key, record));
        })?;
        Ok(Snapshot {
            deps: state.deps.clone(),
            records,
        })
    }

    /// Takes in a peer's snapshot of a slice whose digest differed: each record that wins
    /// over this replica's is stored. Returns how many.
    pub fn absorb(&self, snapshot: Snapshot) -> Result<usize, ReplicaError> {
        let mut state = self.state.lock();
        if state.retired {
            return Err(ReplicaError::Retired);
        }
        let mut taken = 0;
        for (hash, key, record) in snapshot.records {
            if self.store_if_newer(&mut state, hash, &key, &record)? {
                self.clock.observe(record.version.time);
                taken += 1;
                if record.value.is_none() {
                    state.loose += 1;
                }
            }
        }
        state.deps.merge(&snapshot.deps);
        Ok(taken)
    }

    /// Ends a refill: every slice whose digest differed from the peer's (taken with
    /// `applied`) has been absorbed, so this replica counts those writes as applied. They
    /// are not in its log: a replica that lacks them is told to refill from it too.
    pub fn refilled(&self, applied: &VersionVector) {
        let mut state = self.state.lock();
        for (origin, count) in applied.iter() {
            if count > state.applied.get(origin) {
                state.applied.observe(origin, count);
                state.trimmed.observe(origin, count);
            }
        }
    }

    /// Starts noting every key stored (by a client, a peer or a refill), for a view
    /// change's catch-up; a change already tracking keeps what it noted.
    pub fn track(&self) {
        self.state.lock().tracked.get_or_insert_with(HashSet::new);
    }

    /// The keys stored since [`Replica::track`] (they stay noted, so a catch-up sent again
    /// re-sends them all).
    pub fn tracked(&self) -> Vec<String> {
        let state = self.state.lock();
        state.tracked.iter().flatten().cloned().collect()
    }

    /// Stops noting stored keys (the change ended).
    pub fn untrack(&self) {
        self.state.lock().tracked = None;
    }

    /// Retires this replica for a view change that gives its node another place: from now
    /// on it serves and takes in nothing ([`ReplicaError::Retired`]). What it hands its
    /// successor ([`Replica::successor`]).
    pub fn retire(&self) -> Retired {
        let mut state = self.state.lock();
        state.retired = true;
        Retired {
            live: state.live,
            time: self.clock.tick(),
        }
    }

    /// Whether [`Replica::retire`] retired it (its successor holds the shard now).
    pub fn is_retired(&self) -> bool {
        self.state.lock().retired
    }

    /// Undoes [`Replica::retire`]: its successor could not be made.
    pub fn unretire(&self) {
        self.state.lock().retired = false;
    }

    /// The replica a node holds after a view change, on the store its retired replica
    /// (`before`, if it had one) kept: the records of the `dropping` segments leave the
    /// store, the `staged` records (encoded, as shipped) are taken in where they win, and
    /// its clock goes on past the retired one's. It starts a new incarnation `me` with an
    /// empty log: what its shard-mates hold that it lacks comes by a refill. (The
    /// tombstones it keeps or takes in are in no log: a sweep collects them.)
    pub fn successor(
        me: &str,
        shard: &str,
        store: Store,
        before: Option<Retired>,
        dropping: &[(u64, u64)],
        staged: impl IntoIterator<Item = (String, bytes::Bytes)>,
    ) -> Result<Replica, ReplicaError> {
        let before = before.unwrap_or_default();
        let replica = Replica::new(me, shard, store);
        replica.clock.observe(before.time);
        let mut state = replica.state.lock();
        let mut gone = 0;
        for &(from, to) in dropping {
            replica.each_record(from, to, |_, record| {
                gone += usize::from(record.value.is_some());
            })?;
            replica.store.remove_segment(from, to)?;
        }
        state.live = before.live.saturating_sub(gone);
        for (key, bytes) in staged {
            let record = Record::decode(&bytes)?;
            let hash = key_hash(key.as_bytes());
            if replica.store_if_newer(&mut state, hash, &key, &record)? {
                replica.clock.observe(record.version.time);
            }
        }
        state.loose = u64::from(!replica.store.is_empty());
        drop(state);
        Ok(replica)
    }
}

/// What a slice's digest covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Digest {
    /// Every record, tombstones included (a refill: a replica missing a tombstone must
    /// take it, or a third replica's older value could come back through it).
    All,
    /// Records holding a value (a sweep: a tombstone dropped on one replica and kept on
    /// another leaves their slices alike).
    Live,
}

/// What [`Replica::tombstone_scan`] found.
#[derive(Debug, Clone)]
pub struct TombstoneScan {
    /// What the replica had applied before the scan.
    pub applied: VersionVector,
    pub digests: Vec<u64>,
    /// Per slice, its tombstones: hash, key and version.
    pub tombstones: Vec<Vec<(u64, String, Version)>>,
    /// Every tombstone is listed (there were no more than the scan's `max`).
    pub complete: bool,
    loose: u64,
}

/// Records of one slice of the ring, with the dependencies of the replica that read them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Snapshot {
    pub deps: Context,
    pub records: Vec<(u64, String, Record)>,
}

/// `buckets` equal, non-wrapping slices covering the whole ring.
fn slices(buckets: usize) -> Vec<(u64, u64)> {
    let buckets = buckets.max(1) as u128;
    let size = (u128::from(u64::MAX) + 1) / buckets;
    (0..buckets)
        .map(|i| {
            let from = (i * size) as u64;
            let to = if i + 1 == buckets {
                u64::MAX
            } else {
                ((i + 1) * size - 1) as u64
            };
            (from, to)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use proptest::prelude::*;

    const NAMES: [&str; 3] = ["10.0.0.1:1", "10.0.0.2:1", "10.0.0.3:1"];

    fn replicas() -> Vec<Replica> {
        NAMES
            .iter()
            .map(|n| Replica::new(n, "1", crate::store::memory()))
            .collect()
    }

    fn run(r: &Replica, key: &str, op: KvOp, seen: &Context) -> (KvOutcome, Context) {
        r.serve(key_hash(key.as_bytes()), key, &op, seen).unwrap()
    }

    fn put(value: &str) -> KvOp {
        KvOp::Put(Bytes::from(value.to_string()))
    }

    /// `to` takes in everything `from` has that it lacks.
    fn sync(from: &Replica, to: &Replica) {
        to.receive(from.since(&to.applied(), usize::MAX).unwrap())
            .unwrap();
    }

    #[test]
    fn operations_answer_as_the_course_says_and_number_their_writes() {
        let r = &replicas()[0];
        let none = Context::at(0);
        let (outcome, seen) = run(r, "k", KvOp::Get, &none);
        assert_eq!(outcome, KvOutcome::Absent);
        assert_eq!(run(r, "k", KvOp::Delete, &seen).0, KvOutcome::Absent);
        assert_eq!(
            r.applied().get(NAMES[0]),
            0,
            "deleting nothing writes nothing"
        );
        let (outcome, seen) = run(r, "k", put("1"), &seen);
        assert_eq!(outcome, KvOutcome::Added);
        assert_eq!(seen.shard("1").get(NAMES[0]), 1);
        assert_eq!(run(r, "k", put("2"), &seen).0, KvOutcome::Replaced);
        assert_eq!(
            run(r, "k", KvOp::Get, &seen).0,
            KvOutcome::Found(Bytes::from("2"))
        );
        assert_eq!(r.live_keys(), 1);
        assert_eq!(run(r, "k", KvOp::Delete, &seen).0, KvOutcome::Deleted);
        assert_eq!(run(r, "k", KvOp::Get, &seen).0, KvOutcome::Absent);
        assert_eq!((r.live_keys(), r.applied().get(NAMES[0])), (0, 3));
    }

    #[test]
    fn a_replica_behind_the_context_refuses_until_it_pulled() {
        let all = replicas();
        let (_, seen) = run(&all[0], "k", put("1"), &Context::at(0));
        match all[1].serve(key_hash(b"k"), "k", &KvOp::Get, &seen) {
            Err(ReplicaError::Behind(missing)) => {
                assert_eq!(missing, vec![(NAMES[0].to_string(), 0)])
            }
            other => panic!("{other:?}"),
        }
        sync(&all[0], &all[1]);
        assert_eq!(
            run(&all[1], "k", KvOp::Get, &seen).0,
            KvOutcome::Found(Bytes::from("1"))
        );
    }

    #[test]
    fn a_reader_inherits_what_the_write_it_read_depended_on() {
        let all = replicas();
        // A client saw shard 2 at some version, then wrote k on shard 1.
        let mut seen = Context::at(0);
        let mut other = VersionVector::default();
        other.observe("10.0.9.9:1", 4);
        seen.merge_shard("2", &other);
        run(&all[0], "k", put("1"), &seen);
        sync(&all[0], &all[1]);
        // Another client reads k at another replica: held to shard 2's version too.
        let (_, reply) = run(&all[1], "k", KvOp::Get, &Context::at(0));
        assert_eq!(reply.shard("2").get("10.0.9.9:1"), 4);
    }

    #[test]
    fn a_deleted_key_never_comes_back_from_an_older_write() {
        let all = replicas();
        let none = Context::at(0);
        run(&all[1], "k", put("old"), &none);
        sync(&all[1], &all[0]);
        assert_eq!(run(&all[0], "k", KvOp::Delete, &none).0, KvOutcome::Deleted);
        // Replica 2 gets the delete first, then the older put from replica 1.
        sync(&all[0], &all[2]);
        sync(&all[1], &all[2]);
        for r in &all {
            sync(&all[0], r);
            assert_eq!(run(r, "k", KvOp::Get, &none).0, KvOutcome::Absent);
        }
        // Once everyone has the delete, the tombstone goes and the key stays absent.
        let vectors: Vec<VersionVector> = all.iter().map(Replica::applied).collect();
        for (i, r) in all.iter().enumerate() {
            let others: Vec<VersionVector> = vectors
                .iter()
                .enumerate()
                .filter(|(j, _)| *j != i)
                .map(|(_, v)| v.clone())
                .collect();
            assert_eq!(r.forget(&others).unwrap(), 1);
            assert_eq!(run(r, "k", KvOp::Get, &none).0, KvOutcome::Absent);
            assert_eq!(r.since(&vectors[i], usize::MAX), Some(vec![]));
            assert_eq!(
                r.since(&VersionVector::default(), usize::MAX),
                None,
                "a replica that lacks forgotten writes needs a refill"
            );
        }
    }

    #[test]
    fn writes_newer_than_the_cutoff_stay_logged_after_every_replica_has_them() {
        let all = replicas();
        let (a, b) = (&all[0], &all[1]);
        let none = Context::at(0);
        run(a, "k", put("x"), &none);
        sync(a, b);
        // A pull from before b had the write (its vector then was empty) still finds it.
        a.forget_before(&[b.applied()], 0).unwrap();
        let stale = VersionVector::default();
        assert_eq!(a.since(&stale, usize::MAX).map(|w| w.len()), Some(1));
        // Past the cutoff it leaves the log: the stale pull is told to refill.
        a.forget_before(&[b.applied()], u64::MAX).unwrap();
        assert_eq!(a.since(&stale, usize::MAX), None);
    }

    #[test]
    fn a_tombstone_stays_while_an_older_write_is_somewhere_it_is_not() {
        let all = replicas();
        let (a, b) = (&all[0], &all[1]);
        let none = Context::at(0);
        run(a, "k", put("x"), &none);
        run(b, "k", put("old"), &none);
        // a deletes; b gets the delete but a has not seen b's older put.
        run(a, "k", KvOp::Delete, &run(a, "k", KvOp::Get, &none).1);
        sync(a, b);
        assert_eq!(run(b, "k", KvOp::Get, &none).0, KvOutcome::Absent);
        // Both forget what both have: the tombstone must stay, a's vector is not b's.
        assert_eq!(a.forget(&[b.applied()]).unwrap(), 0);
        assert_eq!(b.forget(&[a.applied()]).unwrap(), 0);
        // b's older put reaches a: the tombstone still beats it.
        sync(b, a);
        for r in [a, b] {
            assert_eq!(run(r, "k", KvOp::Get, &none).0, KvOutcome::Absent);
        }
        // Now both hold the same writes: the tombstone goes, the key stays absent.
        assert_eq!(a.applied(), b.applied());
        assert_eq!(a.forget(&[b.applied()]).unwrap(), 1);
        assert_eq!(b.forget(&[a.applied()]).unwrap(), 1);
        for r in [a, b] {
            assert_eq!(run(r, "k", KvOp::Get, &none).0, KvOutcome::Absent);
            assert_eq!(r.live_keys(), 0);
        }
    }

    #[test]
    fn a_refill_ships_only_the_slices_that_differ_and_then_the_replicas_agree() {
        let all = replicas();
        let (a, c) = (&all[0], &all[2]);
        let none = Context::at(0);
        for i in 0..500 {
            run(a, &format!("k{i}"), put(&i.to_string()), &none);
        }
        run(a, "k7", KvOp::Delete, &none);
        // c also holds a few of them, from before: the same writes, exchanged earlier.
        sync(a, c);
        run(a, "late1", put("1"), &none);
        run(a, "late2", put("2"), &none);
        // a forgets what c has (as if every other replica had it too): c pulls nothing, the
        // rest must come by refill.
        a.forget(&[c.applied()]).unwrap();
        run(a, "late3", put("3"), &none);
        let buckets = 64;
        let (_, ours) = c.digests(buckets, Digest::All).unwrap();
        let (vector, theirs) = a.digests(buckets, Digest::All).unwrap();
        // A write after the digests: not part of this refill, pulled (or refilled) later.
        run(a, "later", put("4"), &none);
        let differing: Vec<usize> = (0..buckets).filter(|b| ours[*b] != theirs[*b]).collect();
        assert!(
            (1..=3).contains(&differing.len()),
            "three keys differ: {differing:?}"
        );
        for bucket in &differing {
            c.absorb(a.snapshot(buckets, *bucket).unwrap()).unwrap();
        }
        c.refilled(&vector);
        assert_eq!(c.applied(), vector, "what a had when it took its digests");
        // The later write is pulled as usual, and then the two agree.
        sync(a, c);
        assert_eq!(
            c.digests(buckets, Digest::All).unwrap(),
            a.digests(buckets, Digest::All).unwrap()
        );
        assert_eq!(c.applied(), a.applied());
        assert_eq!(c.live_keys(), a.live_keys());
        assert_eq!(
            run(c, "late3", KvOp::Get, &none).0,
            KvOutcome::Found(Bytes::from("3"))
        );
        assert_eq!(run(c, "k7", KvOp::Get, &none).0, KvOutcome::Absent);
        // c took those writes without their log entries: a peer lacking them refills.
        assert_eq!(c.since(&VersionVector::default(), 10), None);
    }

    #[test]
    fn slices_cover_the_ring_once() {
        for buckets in [1, 2, 3, 64, 1000] {
            let s = slices(buckets);
            assert_eq!(s.len(), buckets);
            assert_eq!((s[0].0, s[buckets - 1].1), (0, u64::MAX));
            assert!(s.windows(2).all(|w| w[0].1 + 1 == w[1].0));
        }
    }

    #[derive(Debug, Clone)]
    enum Step {
        Op { at: usize, key: u8, op: u8 },
        Sync { from: usize, to: usize },
        Forget { at: usize },
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            (0..3usize, 0..4u8, 0..3u8).prop_map(|(at, key, op)| Step::Op { at, key, op }),
            (0..3usize, 0..3usize).prop_map(|(from, to)| Step::Sync { from, to }),
            (0..3usize).prop_map(|at| Step::Forget { at }),
        ]
    }

    proptest! {
        #[test]
        fn replicas_that_exchanged_everything_agree(steps in proptest::collection::vec(step(), 1..60)) {
            let all = replicas();
            let mut contexts = vec![Context::at(0); 3];
            for (n, step) in steps.into_iter().enumerate() {
                match step {
                    Step::Op { at, key, op } => {
                        let key = format!("k{key}");
                        let op = match op {
                            0 => put(&n.to_string()),
                            1 => KvOp::Delete,
                            _ => KvOp::Get,
                        };
                        // Each replica's own client: it never gets ahead of its replica.
                        let (_, reply) = run(&all[at], &key, op, &contexts[at]);
                        contexts[at] = reply;
                    }
                    Step::Sync { from, to } if from != to => sync(&all[from], &all[to]),
                    Step::Sync { .. } => {}
                    Step::Forget { at } => {
                        let others: Vec<VersionVector> = (0..3)
                            .filter(|j| *j != at)
                            .map(|j| all[j].applied())
                            .collect();
                        all[at].forget(&others).unwrap();
                    }
                }
            }
            for _ in 0..2 {
                for from in 0..3 {
                    for to in 0..3 {
                        if from != to {
                            sync(&all[from], &all[to]);
                        }
                    }
                }
            }
            let none = Context::at(0);
            for key in (0..4).map(|k| format!("k{k}")) {
                let answers: Vec<KvOutcome> =
                    all.iter().map(|r| run(r, &key, KvOp::Get, &none).0).collect();
                prop_assert!(answers.windows(2).all(|w| w[0] == w[1]), "{key}: {answers:?}");
            }
            prop_assert!(all.windows(2).all(|w| w[0].applied() == w[1].applied()));
            prop_assert!(all.windows(2).all(|w| w[0].live_keys() == w[1].live_keys()));
            // Every context a client got is now covered everywhere.
            for r in &all {
                for c in &contexts {
                    prop_assert!(r.applied().covers(&c.shard("1")));
                }
            }
        }
    }
}
