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
use crate::replica::{Replica, Snapshot};
use crate::rpc::{Refusal, Request, Response};

/// How often a replica pulls from its shard-mates.
pub const GOSSIP_EVERY: Duration = Duration::from_millis(200);

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

    async fn digests(&self, peer: &str, buckets: usize) -> Option<(VersionVector, Vec<u64>)> {
        let request = Request::Digests {
            buckets: buckets as u32,
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

/// The replica of `node` that shard-mate `from` may exchange with, or the refusal.
fn replica_for<'a>(node: &'a Node, from: &str) -> Result<&'a Arc<Replica>, Refusal> {
    let replication = node
        .replication()
        .ok_or_else(|| Refusal::NotMember(from.to_string()))?;
    match replication.replica() {
        Some(replica) if replication.mates().iter().any(|m| m == from) => Ok(replica),
        _ => Err(Refusal::NotMember(from.to_string())),
    }
}

/// Answers a shard-mate's pull, digests or snapshot request (anyone else is refused).
pub fn answer(node: &Node, from: &str, request: Request) -> Response {
    let replica = match replica_for(node, from) {
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
            Response::Pulled(replica.since(&have, max))
        }
        Request::Digests { buckets } if (1..=4096).contains(&buckets) => {
            match replica.digests(buckets as usize) {
                Ok((applied, digests)) => Response::Digests(applied, digests),
                Err(error) => storage(error),
            }
        }
        Request::Snapshot { buckets, bucket } if bucket < buckets && buckets <= 4096 => {
            match replica.snapshot(buckets as usize, bucket as usize) {
                Ok(snapshot) => Response::Snapshot(snapshot),
                Err(error) => storage(error),
            }
        }
        _ => Response::Refused(Refusal::BadView("malformed replica exchange".into())),
    }
}

/// The gossip task of a replicated node; ends with the process.
pub async fn run(node: Arc<Node>) {
    let Some(replication) = node.replication() else {
        return;
    };
    let Some(replica) = replication.replica() else {
        return;
    };
    let exchange = RpcExchange { node: &node };
    let mut ticks = tokio::time::interval(GOSSIP_EVERY);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        let mates = replication.mates();
        if mates.is_empty() {
            continue;
        }
        let round = match gossip::round(replica, &mates, &exchange).await {
            Ok(round) => round,
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
            if let Err(error) = replica.forget(&vectors) {
                tracing::error!(%error, "trimming the replica's log failed");
            }
        }
    }
}

/// Refills `replica` from the first of `mates` that answers.
async fn refill(replica: &Replica, mates: &[String], exchange: &RpcExchange<'_>) {
    for mate in mates {
        match gossip::refill(replica, mate, exchange, REFILL_BUCKETS).await {
            Ok(Some(done)) => {
                tracing::info!(from = %mate, slices = done.slices, records = done.records, "refilled");
                crate::metrics::refill(done.slices);
                return;
            }
            Ok(None) => continue,
            Err(error) => {
                tracing::error!(%error, "refill failed");
                return;
            }
        }
    }
}
