//! Replicas exchanging writes over the node-to-node RPC layer: [`RpcExchange`] carries the
//! gossip module's pulls and a refill's digests and snapshots, [`answer`] serves a
//! shard-mate's, and [`run`] is the gossip task of a node (a round every
//! [`GOSSIP_EVERY`], a refill when a mate's log no longer holds what this replica lacks,
//! and the log trimmed to what every mate has).

use std::sync::Arc;
use std::time::Duration;

use crate::causal::VersionVector;
use crate::gossip::{self, Exchange, Pulled, PULL_TIMEOUT};
use crate::node::Node;
use crate::replica::{Digest, Replica, Snapshot};
use crate::rpc::{Refusal, Request, Response};

/// How often a replica pulls from its shard-mates.
pub const GOSSIP_EVERY: Duration = Duration::from_millis(200);

/// How long a write stays in the log after every mate has it: a pull sent before a mate
/// confirmed a write, and read after, still finds it there.
pub const KEEP_LOGGED: Duration = Duration::from_secs(2);

/// How often (in gossip rounds) a replica that began with a view change asks the mates it
/// has not compared digests with yet.
const REPAIR_EVERY_ROUNDS: u64 = 5;

/// How often (in gossip rounds) a replica that may hold tombstones no log accounts for
/// compares digests with its mates to collect them ([`gossip::sweep`]).
const SWEEP_EVERY_ROUNDS: u64 = 10;

/// Slices a refill compares.
pub const REFILL_BUCKETS: usize = 256;

/// Pulls, digests and snapshots as RPC calls from `node`.
pub struct RpcExchange<'a> {
    pub node: &'a Node,
}

impl RpcExchange<'_> {
    async fn ask(&self, peer: &str, request: Request) -> Option<Response> {
        let view = self.node.view();
        self.node
            .peers()
            .send_once(peer, &request, &view, PULL_TIMEOUT)
            .await
            .ok()
    }
}

impl Exchange for RpcExchange<'_> {
    async fn pull(&self, peer: &str, have: &VersionVector, max: usize) -> Pulled {
        let request = Request::Pull {
            have: have.clone(),
            max: max as u32,
        };
        match self.ask(peer, request).await {
            Some(Response::Pulled(Some(writes))) => Pulled::Writes(writes),
            Some(Response::Pulled(None)) => Pulled::Refill,
            _ => Pulled::Silent,
        }
    }

    async fn digests(
        &self,
        peer: &str,
        buckets: usize,
        kind: Digest,
    ) -> Option<(VersionVector, Vec<u64>)> {
        let request = Request::Digests {
            buckets: buckets as u32,
            kind,
        };
        match self.ask(peer, request).await {
            Some(Response::Digests(applied, digests)) if digests.len() == buckets => {
                Some((applied, digests))
            }
            _ => None,
        }
    }

    async fn snapshot(&self, peer: &str, buckets: usize, bucket: usize) -> Option<Snapshot> {
        let request = Request::Snapshot {
            buckets: buckets as u32,
            bucket: bucket as u32,
        };
        match self.ask(peer, request).await {
            Some(Response::Snapshot(snapshot)) => Some(snapshot),
            _ => None,
        }
    }
}

/// The replica of `node` that shard-mate `from`, at `epoch`, may exchange with, or the
/// refusal: only a mate under the same view (across a view change, what a replica holds
/// belongs to another layout; the refill after the switch reconciles them).
fn replica_for(node: &Node, from: &str, epoch: u64) -> Result<Arc<Replica>, Refusal> {
    let replication = node
        .replication()
        .ok_or_else(|| Refusal::NotMember(from.to_string()))?;
    // The placement's epoch, not only the view's: at a commit the view switches first and
    // the replica a moment later, and a successor that refilled from the retired replica
    // in between took in keys of ranges its shard had just handed over (CI caught a shard's
    // replicas reporting 116 and 157 keys).
    let placed = replication.placed();
    let current = node.view().epoch;
    if epoch != current || placed.epoch() != epoch {
        return Err(Refusal::BadView(format!(
            "a replica exchange at epoch {epoch}, this node is at {current} (its replica at {})",
            placed.epoch()
        )));
    }
    match placed.replica() {
        Some(replica) if !replica.is_retired() && replication.mates().iter().any(|m| m == from) => {
            Ok(replica.clone())
        }
        _ => Err(Refusal::NotMember(from.to_string())),
    }
}

/// Answers a shard-mate's pull, digests or snapshot request (anyone else is refused).
pub fn answer(node: &Node, from: &str, epoch: u64, request: Request) -> Response {
    let replica = match replica_for(node, from, epoch) {
        Ok(replica) => replica,
        Err(refusal) => return Response::Refused(refusal),
    };
    let storage = |error: crate::replica::ReplicaError| {
        tracing::error!(%error, "the replica's store failed");
        Response::Refused(Refusal::Storage(error.to_string()))
    };
    match request {
        Request::Pull { have, max } => {
            if let Some(replication) = node.replication() {
                replication.note_mate(from, &have);
            }
            let max = (max as usize).clamp(1, gossip::PULL_MAX);
            let writes = replica.since(&have, max);
            crate::metrics::gossip_sent(writes.as_ref().map_or(0, Vec::len));
            Response::Pulled(writes)
        }
        Request::Push { writes } if writes.len() <= gossip::PULL_MAX => {
            match replica.receive(writes) {
                Ok(applied) => {
                    crate::metrics::gossip_round(applied, 0);
                    Response::Pushed(replica.applied())
                }
                Err(error) => storage(error),
            }
        }
        Request::Digests { buckets, kind } if (1..=4096).contains(&buckets) => {
            match crate::blocking::off_runtime(|| replica.digests(buckets as usize, kind)) {
                Ok((applied, digests)) => Response::Digests(applied, digests),
                Err(error) => storage(error),
            }
        }
        Request::Snapshot { buckets, bucket } if bucket < buckets && buckets <= 4096 => {
            match crate::blocking::off_runtime(|| {
                replica.snapshot(buckets as usize, bucket as usize)
            }) {
                Ok(snapshot) => Response::Snapshot(snapshot),
                Err(error) => storage(error),
            }
        }
        _ => Response::Refused(Refusal::BadView("malformed replica exchange".into())),
    }
}

/// The gossip task of a replicated node; ends with the process. Each round works with the
/// replica in force then (a view change replaces it): a replica that began with a change
/// first compares digests with its mates (a refill), then pulls as usual.
pub async fn run(node: Arc<Node>) {
    let Some(replication) = node.replication() else {
        return;
    };
    let exchange = RpcExchange { node: &node };
    let mut round_number: u64 = 0;
    let mut ticks = tokio::time::interval(GOSSIP_EVERY);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        let placed = replication.placed();
        let Some(replica) = placed.replica() else {
            continue;
        };
        let mates = replication.mates();
        if mates.is_empty() {
            continue;
        }
        // After a view change: a refill from each mate (one that does not answer is asked
        // again a second later), while the pulls go on.
        let unrepaired = placed.unrepaired();
        if !unrepaired.is_empty() && round_number.is_multiple_of(REPAIR_EVERY_ROUNDS) {
            for mate in refill_from_each(replica, &unrepaired, &exchange).await {
                placed.repaired(&mate);
            }
        }
        round_number += 1;
        let round = match gossip::round(replica, &mates, &exchange).await {
            Ok(round) => round,
            Err(crate::replica::ReplicaError::Retired) => continue,
            Err(error) => {
                tracing::error!(%error, "gossip round failed");
                continue;
            }
        };
        crate::metrics::gossip_round(round.applied, round.silent);
        if round.refill > 0 {
            refill(replica, &mates, &exchange).await;
        }
        if let Some(vectors) = replication.mate_vectors() {
            let before = crate::version::time_ago(KEEP_LOGGED);
            if let Err(error) = replica.forget_before(&vectors, before) {
                tracing::error!(%error, "trimming the replica's log failed");
            }
        }
        if replica.sweep_due()
            && placed.unrepaired().is_empty()
            && round_number.is_multiple_of(SWEEP_EVERY_ROUNDS)
        {
            sweep(replica, &mates, &exchange).await;
        }
    }
}

/// Drops the tombstones of `replica` that no log accounts for, where every mate holds the
/// same values ([`gossip::sweep`]).
async fn sweep(replica: &Replica, mates: &[String], exchange: &RpcExchange<'_>) {
    match gossip::sweep(replica, mates, exchange, REFILL_BUCKETS).await {
        Ok(Some(swept)) if swept.dropped > 0 => {
            tracing::info!(
                dropped = swept.dropped,
                alike = swept.alike,
                slices = REFILL_BUCKETS,
                left = replica.tombstones(),
                "tombstones swept"
            );
            crate::metrics::tombstones_swept(swept.dropped);
        }
        Ok(_) | Err(crate::replica::ReplicaError::Retired) => {}
        Err(error) => tracing::error!(%error, "sweeping tombstones failed"),
    }
}

/// Refills `replica` from every one of `mates` that answers (after a view change each may
/// hold writes the others lack); the mates that did.
async fn refill_from_each(
    replica: &Replica,
    mates: &[String],
    exchange: &RpcExchange<'_>,
) -> Vec<String> {
    let mut answered = Vec::new();
    for mate in mates {
        if refill_from(replica, mate, exchange).await == Some(true) {
            answered.push(mate.clone());
        }
    }
    answered
}

/// Refills `replica` from the first of `mates` that answers.
async fn refill(replica: &Replica, mates: &[String], exchange: &RpcExchange<'_>) {
    for mate in mates {
        if refill_from(replica, mate, exchange).await.is_some() {
            return;
        }
    }
}

/// One refill of `replica` from `mate`: `Some(true)` done, `Some(false)` failed here (the
/// store), `None` the mate did not answer (or the replica was replaced meanwhile).
async fn refill_from(replica: &Replica, mate: &str, exchange: &RpcExchange<'_>) -> Option<bool> {
    match gossip::refill(replica, mate, exchange, REFILL_BUCKETS).await {
        Ok(Some(done)) => {
            tracing::info!(from = %mate, slices = done.slices, records = done.records, "refilled");
            crate::metrics::refill(done.slices);
            Some(true)
        }
        Ok(None) | Err(crate::replica::ReplicaError::Retired) => None,
        Err(error) => {
            tracing::error!(%error, "refill failed");
            Some(false)
        }
    }
}
