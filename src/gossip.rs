//! Anti-entropy between the replicas of a shard: each round, a replica pulls from every
//! peer the writes it lacks (its applied vector says which), so a write reaches every
//! reachable replica within a round or two, and replicas converge once a partition heals.
//! A request whose causal context is ahead of its replica pulls the same way, within a
//! bounded wait ([`catch_up`]). The transport is a trait, so the rounds are tested with
//! replicas in one process and run over the RPC layer in a node.

use std::time::Duration;

use tokio::time::Instant;

use crate::blocking::off_runtime;
use crate::causal::VersionVector;
use crate::replica::{Digest, Replica, ReplicaError, Snapshot, Write};

/// Most writes one pull brings.
pub const PULL_MAX: usize = 4096;

/// How a replica reaches its peers.
pub trait Exchange {
    /// What `peer` has for a replica which applied `have` (at most `max` writes).
    fn pull(
        &self,
        peer: &str,
        have: &VersionVector,
        max: usize,
    ) -> impl std::future::Future<Output = Pulled> + Send;

    /// `peer`'s digests of `buckets` slices and what it had applied then (`None`: no
    /// answer).
    fn digests(
        &self,
        peer: &str,
        buckets: usize,
        kind: Digest,
    ) -> impl std::future::Future<Output = Option<(VersionVector, Vec<u64>)>> + Send;

    /// `peer`'s records of slice `bucket` of `buckets`.
    fn snapshot(
        &self,
        peer: &str,
        buckets: usize,
        bucket: usize,
    ) -> impl std::future::Future<Output = Option<Snapshot>> + Send;
}

/// What a refill did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Refilled {
    /// Slices whose digests differed (and were shipped).
    pub slices: usize,
    /// Records that won over this replica's.
    pub records: usize,
}

/// Refills `replica` from `peer` by range digests: only the slices whose digests differ
/// are shipped, then the replica counts what the peer had applied as applied. `None` when
/// the peer did not answer every call (nothing is counted then; a later refill redoes it).
pub async fn refill<E: Exchange>(
    replica: &Replica,
    peer: &str,
    exchange: &E,
    buckets: usize,
) -> Result<Option<Refilled>, ReplicaError> {
    let Some((applied, theirs)) = exchange.digests(peer, buckets, Digest::All).await else {
        return Ok(None);
    };
    let (_, mine) = off_runtime(|| replica.digests(buckets, Digest::All))?;
    let mut done = Refilled::default();
    for (bucket, (a, b)) in mine.iter().zip(&theirs).enumerate() {
        if a == b {
            continue;
        }
        let Some(snapshot) = exchange.snapshot(peer, buckets, bucket).await else {
            return Ok(None);
        };
        done.slices += 1;
        done.records += replica.absorb(snapshot)?;
    }
    replica.refilled(&applied);
    Ok(Some(done))
}

/// Most tombstones one sweep lists (a sweep that found more is due again).
pub const SWEEP_MAX: usize = 100_000;

/// What a sweep did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Swept {
    /// Slices every replica held alike (whose tombstones could go).
    pub alike: usize,
    /// Tombstones dropped.
    pub dropped: usize,
}

/// Collects the tombstones no log accounts for (kept through a view change or a restart,
/// or taken in by a refill; a logged deletion is collected by [`Replica::forget`]): every
/// one of `mates` is asked for its digests of the values it holds first, then `replica`
/// scans its own, and where a slice's digest is the same on every replica, and `replica`
/// has applied every write the mates had then, its tombstones there leave the store. Each
/// replica sweeps for itself: one that dropped a tombstone another still holds leaves
/// their digests alike. `None` when a mate did not
/// answer or had applied writes `replica` had not (a later sweep tries again).
pub async fn sweep<E: Exchange>(
    replica: &Replica,
    mates: &[String],
    exchange: &E,
    buckets: usize,
) -> Result<Option<Swept>, ReplicaError> {
    let mut theirs = Vec::with_capacity(mates.len());
    for mate in mates {
        match exchange.digests(mate, buckets, Digest::Live).await {
            Some((applied, digests)) if digests.len() == buckets => theirs.push((applied, digests)),
            _ => return Ok(None),
        }
    }
    let scan = off_runtime(|| replica.tombstone_scan(buckets, SWEEP_MAX))?;
    if !theirs
        .iter()
        .all(|(applied, _)| scan.applied.covers(applied))
    {
        return Ok(None);
    }
    let alike: Vec<bool> = (0..buckets)
        .map(|b| {
            theirs
                .iter()
                .all(|(_, digests)| digests[b] == scan.digests[b])
        })
        .collect();
    let dropped = replica.drop_tombstones(scan, &alike)?;
    Ok(Some(Swept {
        alike: alike.iter().filter(|a| **a).count(),
        dropped,
    }))
}

/// A peer's answer to a pull.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Pulled {
    /// The writes it logged that the puller lacks.
    Writes(Vec<Write>),
    /// Some of them have left its log: the puller needs a refill.
    Refill,
    /// No answer.
    Silent,
}

/// What one round did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Round {
    /// Writes applied.
    pub applied: usize,
    /// Peers that did not answer.
    pub silent: usize,
    /// Peers whose log no longer holds what this replica lacks.
    pub refill: usize,
}

/// How long one pull may take before its peer counts as silent for the round.
pub const PULL_TIMEOUT: Duration = Duration::from_secs(1);

/// Pulls from every one of `peers` at once, each until it has nothing more to give (or
/// stops answering within [`PULL_TIMEOUT`]), so one hung peer never holds up the others.
pub async fn round<E: Exchange>(
    replica: &Replica,
    peers: &[String],
    exchange: &E,
) -> Result<Round, ReplicaError> {
    let pulls = peers.iter().map(|peer| async move {
        let mut done = Round::default();
        loop {
            let pulled = tokio::time::timeout(
                PULL_TIMEOUT,
                exchange.pull(peer, &replica.applied(), PULL_MAX),
            )
            .await
            .unwrap_or(Pulled::Silent);
            let writes = match pulled {
                Pulled::Writes(writes) => writes,
                Pulled::Refill => {
                    done.refill += 1;
                    break;
                }
                Pulled::Silent => {
                    done.silent += 1;
                    break;
                }
            };
            let full = writes.len() == PULL_MAX;
            let applied = replica.receive(writes)?;
            done.applied += applied;
            if !full || applied == 0 {
                break;
            }
        }
        Ok::<Round, ReplicaError>(done)
    });
    let mut total = Round::default();
    for done in futures_util::future::join_all(pulls).await {
        let done = done?;
        total.applied += done.applied;
        total.silent += done.silent;
        total.refill += done.refill;
    }
    Ok(total)
}

/// Pulls from `peers` until `replica` has applied everything `needed` shows, or `wait`
/// has passed; whether it has.
pub async fn catch_up<E: Exchange>(
    replica: &Replica,
    needed: &VersionVector,
    peers: &[String],
    exchange: &E,
    wait: Duration,
) -> Result<bool, ReplicaError> {
    let deadline = Instant::now() + wait;
    loop {
        if replica.applied().covers(needed) {
            return Ok(true);
        }
        let remaining = deadline.saturating_duration_since(Instant::now());
        if remaining.is_zero() {
            return Ok(false);
        }
        if tokio::time::timeout(remaining, round(replica, peers, exchange))
            .await
            .is_err()
        {
            return Ok(replica.applied().covers(needed));
        }
        if !replica.applied().covers(needed) {
            // Nobody had it yet: ask again shortly, within the wait.
            let remaining = deadline.saturating_duration_since(Instant::now());
            tokio::time::sleep(Duration::from_millis(20).min(remaining)).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::causal::Context;
    use crate::kv::{KvOp, KvOutcome};
    use crate::ring::key_hash;
    use bytes::Bytes;
    use parking_lot::Mutex;
    use std::collections::{BTreeMap, BTreeSet};
    use std::sync::Arc;

    /// Replicas in one process; `cut` holds the pairs that cannot talk, `hung` the peers
    /// that never answer.
    struct Local {
        replicas: BTreeMap<String, Arc<Replica>>,
        cut: Mutex<BTreeSet<(String, String)>>,
        hung: BTreeSet<String>,
        me: String,
    }

    impl Exchange for Local {
        async fn pull(&self, peer: &str, have: &VersionVector, max: usize) -> Pulled {
            if self.hung.contains(peer) {
                std::future::pending::<()>().await;
            }
            let pair = (self.me.clone(), peer.to_string());
            if self.cut.lock().contains(&pair) {
                return Pulled::Silent;
            }
            match self.replicas[peer].since(have, max) {
                Some(writes) => Pulled::Writes(writes),
                None => Pulled::Refill,
            }
        }

        async fn digests(
            &self,
            peer: &str,
            buckets: usize,
            kind: Digest,
        ) -> Option<(VersionVector, Vec<u64>)> {
            self.replicas[peer].digests(buckets, kind).ok()
        }

        async fn snapshot(&self, peer: &str, buckets: usize, bucket: usize) -> Option<Snapshot> {
            self.replicas[peer].snapshot(buckets, bucket).ok()
        }
    }

    fn cluster(n: usize) -> (Vec<String>, BTreeMap<String, Arc<Replica>>) {
        let names: Vec<String> = (1..=n).map(|i| format!("10.0.0.{i}:1")).collect();
        let replicas = names
            .iter()
            .map(|n| {
                (
                    n.clone(),
                    Arc::new(Replica::new(n, "1", crate::store::memory())),
                )
            })
            .collect();
        (names, replicas)
    }

    fn exchange_for(
        me: &str,
        replicas: &BTreeMap<String, Arc<Replica>>,
        cut: &[(&str, &str)],
    ) -> Local {
        Local {
            replicas: replicas.clone(),
            cut: Mutex::new(
                cut.iter()
                    .map(|(a, b)| (a.to_string(), b.to_string()))
                    .collect(),
            ),
            hung: BTreeSet::new(),
            me: me.to_string(),
        }
    }

    fn write(r: &Replica, key: &str, value: &str) -> Context {
        r.serve(
            key_hash(key.as_bytes()),
            key,
            &KvOp::Put(Bytes::from(value.to_string())),
            &Context::at(0),
        )
        .unwrap()
        .1
    }

    fn get(r: &Replica, key: &str) -> KvOutcome {
        r.serve(key_hash(key.as_bytes()), key, &KvOp::Get, &Context::at(0))
            .unwrap()
            .0
    }

    #[tokio::test]
    async fn a_round_brings_every_peers_writes_and_more_than_one_pull() {
        let (names, replicas) = cluster(3);
        for i in 0..(PULL_MAX + 10) {
            write(&replicas[&names[0]], &format!("a{i}"), "1");
        }
        write(&replicas[&names[1]], "b", "2");
        let me = &replicas[&names[2]];
        let peers = vec![names[0].clone(), names[1].clone()];
        let done = round(me, &peers, &exchange_for(&names[2], &replicas, &[]))
            .await
            .unwrap();
        assert_eq!(
            done,
            Round {
                applied: PULL_MAX + 11,
                silent: 0,
                refill: 0
            }
        );
        assert_eq!(me.live_keys(), PULL_MAX + 11);
        assert_eq!(get(me, "b"), KvOutcome::Found(Bytes::from("2")));
    }

    #[tokio::test]
    async fn a_partitioned_pair_converges_through_a_third_and_directly_once_healed() {
        let (names, replicas) = cluster(3);
        write(&replicas[&names[0]], "k", "from-1");
        // 3 cannot reach 1, but 2 can: 3 gets 1's write relayed by 2's log.
        let cut = [(names[2].as_str(), names[0].as_str())];
        let peers_of = |i: usize| -> Vec<String> {
            names
                .iter()
                .enumerate()
                .filter(|(j, _)| *j != i)
                .map(|(_, n)| n.clone())
                .collect()
        };
        round(
            &replicas[&names[1]],
            &peers_of(1),
            &exchange_for(&names[1], &replicas, &cut),
        )
        .await
        .unwrap();
        let done = round(
            &replicas[&names[2]],
            &peers_of(2),
            &exchange_for(&names[2], &replicas, &cut),
        )
        .await
        .unwrap();
        assert_eq!(
            done,
            Round {
                applied: 1,
                silent: 1,
                refill: 0
            }
        );
        assert_eq!(
            get(&replicas[&names[2]], "k"),
            KvOutcome::Found(Bytes::from("from-1"))
        );
        // Healed: 1's next write comes to 3 straight from 1.
        write(&replicas[&names[0]], "k", "again");
        let healed = exchange_for(&names[2], &replicas, &[]);
        let done = round(&replicas[&names[2]], &names[..1], &healed)
            .await
            .unwrap();
        assert_eq!(done.applied, 1);
        assert_eq!(
            get(&replicas[&names[2]], "k"),
            KvOutcome::Found(Bytes::from("again"))
        );
    }

    fn delete(r: &Replica, key: &str) {
        r.serve(
            key_hash(key.as_bytes()),
            key,
            &KvOp::Delete,
            &Context::at(0),
        )
        .unwrap();
    }

    /// Each replica's successor after a view change that keeps its store (new incarnation
    /// names, empty logs), as [`Replica::successor`] makes them.
    fn successors(
        names: &[String],
        stores: &Stores,
        replicas: &BTreeMap<String, Arc<Replica>>,
    ) -> (Vec<String>, BTreeMap<String, Arc<Replica>>) {
        let next: Vec<String> = names.iter().map(|n| format!("{n}#2")).collect();
        let successors = names
            .iter()
            .zip(&next)
            .map(|(old, new)| {
                let retired = replicas[old].retire();
                let successor =
                    Replica::successor(new, "1", stores[old].clone(), Some(retired), &[], [])
                        .unwrap();
                (new.clone(), Arc::new(successor))
            })
            .collect();
        (next, successors)
    }

    type Stores = BTreeMap<String, crate::store::Store>;

    fn cluster_on_stores(n: usize) -> (Vec<String>, Stores, BTreeMap<String, Arc<Replica>>) {
        let names: Vec<String> = (1..=n).map(|i| format!("10.0.0.{i}:1")).collect();
        let stores: Stores = names
            .iter()
            .map(|n| (n.clone(), crate::store::memory()))
            .collect();
        let replicas = names
            .iter()
            .map(|n| (n.clone(), Arc::new(Replica::new(n, "1", stores[n].clone()))))
            .collect();
        (names, stores, replicas)
    }

    async fn sweep_at(
        names: &[String],
        replicas: &BTreeMap<String, Arc<Replica>>,
        i: usize,
    ) -> Swept {
        let mates: Vec<String> = names.iter().filter(|n| **n != names[i]).cloned().collect();
        let exchange = exchange_for(&names[i], replicas, &[]);
        sweep(&replicas[&names[i]], &mates, &exchange, 16)
            .await
            .unwrap()
            .expect("every mate answers")
    }

    #[tokio::test]
    async fn tombstones_kept_through_a_view_change_are_swept_once_every_replica_holds_them() {
        let (names, stores, replicas) = cluster_on_stores(3);
        let peers = |i: usize| -> Vec<String> {
            names.iter().filter(|n| **n != names[i]).cloned().collect()
        };
        write(&replicas[&names[0]], "k", "1");
        write(&replicas[&names[0]], "kept", "1");
        for i in 0..3 {
            round(
                &replicas[&names[i]],
                &peers(i),
                &exchange_for(&names[i], &replicas, &[]),
            )
            .await
            .unwrap();
        }
        delete(&replicas[&names[0]], "k");
        // Only the second replica takes in the delete before the change: the third keeps
        // the older value.
        round(
            &replicas[&names[1]],
            &peers(1),
            &exchange_for(&names[1], &replicas, &[]),
        )
        .await
        .unwrap();
        let (next, successors) = successors(&names, &stores, &replicas);
        let counts = |rs: &BTreeMap<String, Arc<Replica>>| -> Vec<usize> {
            next.iter().map(|n| rs[n].tombstones()).collect()
        };
        assert_eq!(counts(&successors), vec![1, 1, 0]);
        assert!(successors.values().all(|r| r.sweep_due()));
        // The third holds an older value: no replica may drop the tombstone that beats it.
        for i in 0..2 {
            let swept = sweep_at(&next, &successors, i).await;
            assert_eq!((swept.dropped, swept.alike), (0, 15), "{swept:?}");
        }
        assert_eq!(counts(&successors), vec![1, 1, 0]);
        // A refill brings the third the tombstone; then all hold it alike, and it goes.
        let third = &successors[&next[2]];
        refill(
            third,
            &next[0],
            &exchange_for(&next[2], &successors, &[]),
            16,
        )
        .await
        .unwrap()
        .unwrap();
        assert_eq!(counts(&successors), vec![1, 1, 1]);
        for i in 0..3 {
            let swept = sweep_at(&next, &successors, i).await;
            assert_eq!(swept.dropped, 1, "replica {i}: {swept:?}");
            assert!(!successors[&next[i]].sweep_due());
        }
        assert_eq!(counts(&successors), vec![0, 0, 0]);
        for r in successors.values() {
            assert_eq!(get(r, "k"), KvOutcome::Absent);
            assert_eq!(get(r, "kept"), KvOutcome::Found(Bytes::from("1")));
        }
    }

    #[tokio::test]
    async fn a_replica_that_lacks_forgotten_writes_is_told_to_refill() {
        let (names, replicas) = cluster(3);
        write(&replicas[&names[0]], "k", "1");
        let (a, b) = (&replicas[&names[0]], &replicas[&names[1]]);
        round(b, &names[..1], &exchange_for(&names[1], &replicas, &[]))
            .await
            .unwrap();
        // a and b forget what both have; the third replica, new, has nothing.
        a.forget(&[b.applied()]).unwrap();
        let done = round(
            &replicas[&names[2]],
            &names[..1],
            &exchange_for(&names[2], &replicas, &[]),
        )
        .await
        .unwrap();
        assert_eq!(
            done,
            Round {
                applied: 0,
                silent: 0,
                refill: 1
            }
        );
        // Refilled by digests: the one differing slice ships, then pulls work again.
        let third = &replicas[&names[2]];
        let exchange = exchange_for(&names[2], &replicas, &[]);
        let refilled = refill(third, &names[0], &exchange, 64).await.unwrap();
        assert_eq!(
            refilled,
            Some(Refilled {
                slices: 1,
                records: 1
            })
        );
        assert_eq!(get(third, "k"), KvOutcome::Found(Bytes::from("1")));
        write(a, "k2", "2");
        let done = round(third, &names[..1], &exchange).await.unwrap();
        assert_eq!((done.applied, done.refill), (1, 0));
        assert_eq!(get(third, "k2"), KvOutcome::Found(Bytes::from("2")));
    }

    #[tokio::test]
    async fn a_hung_peer_does_not_hold_up_the_others() {
        let (names, replicas) = cluster(3);
        let seen = write(&replicas[&names[1]], "k", "1");
        let mut exchange = exchange_for(&names[2], &replicas, &[]);
        exchange.hung.insert(names[0].clone());
        let me = &replicas[&names[2]];
        // The hung peer is asked first; the other answers at once.
        let peers = vec![names[0].clone(), names[1].clone()];
        assert!(catch_up(
            me,
            &seen.shard("1"),
            &peers,
            &exchange,
            Duration::from_millis(200)
        )
        .await
        .unwrap());
        let done = round(me, &peers, &exchange).await.unwrap();
        assert_eq!(
            done,
            Round {
                applied: 0,
                silent: 1,
                refill: 0
            }
        );
    }

    #[tokio::test]
    async fn catch_up_waits_boundedly_for_what_the_context_has_seen() {
        let (names, replicas) = cluster(2);
        let seen = write(&replicas[&names[0]], "k", "1");
        let needed = seen.shard("1");
        let me = &replicas[&names[1]];
        let peers = vec![names[0].clone()];
        let cut = exchange_for(&names[1], &replicas, &[(&names[1], &names[0])]);
        let started = std::time::Instant::now();
        assert!(
            !catch_up(me, &needed, &peers, &cut, Duration::from_millis(100))
                .await
                .unwrap()
        );
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "the wait is bounded"
        );
        let open = exchange_for(&names[1], &replicas, &[]);
        assert!(
            catch_up(me, &needed, &peers, &open, Duration::from_millis(100))
                .await
                .unwrap()
        );
        assert_eq!(get(me, "k"), KvOutcome::Found(Bytes::from("1")));
    }
}
