//! Operator endpoints outside the course contract: `GET /metrics` (Prometheus text format)
//! and `GET /cluster/status` (JSON: the view, every node's reachability, key count and share
//! of the ring, and the last view change). Neither asks for the cluster token.

use std::sync::Arc;

use futures_util::future::join_all;
use serde::{Deserialize, Serialize};
use serde_json::json;
use warp::http::StatusCode;

use super::reply::Reply;
use crate::node::{Node, Standing};
use crate::rpc::{Request, Response};
use crate::wire::{ChangeReport, NodeState};

/// One node of the view, as `GET /cluster/status` reports it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NodeStatus {
    pub address: String,
    /// Whether it answered a state call within the forwarding timeout.
    pub reachable: bool,
    /// Keys it stores (`None` when unreachable).
    #[serde(rename = "key-count")]
    pub key_count: Option<usize>,
    /// Its share of the ring under the answering node's view, in `0.0..=1.0`.
    pub ownership: f64,
    /// The epoch it serves (`None` when unreachable).
    pub epoch: Option<u64>,
    /// Whether it has a prepared view change that is not committed or aborted yet.
    pub pending: bool,
    /// Why it is not reachable.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// It restarted empty under an address the group knows: the keys it held are gone
    /// (503 for them) until a view change takes it back or drops it.
    #[serde(default)]
    pub restarted: bool,
    /// For a restarted node: how many keys the cluster expected it to hold (its ring share
    /// of the keys the other nodes hold, scaled).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expected_keys: Option<usize>,
    /// The replicated mode: its shard, and its lag: the most writes a shard-mate applied
    /// that it had not received, as that mate last heard from it (`None`: not heard).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shard: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lag: Option<u64>,
    /// The replicated mode: deleted keys whose tombstones the replica still stores.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tombstones: Option<u64>,
}

/// The view change prepared on the answering node, while it runs.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PendingChange {
    pub change_id: u64,
    pub epoch: u64,
    pub view: Vec<String>,
    pub coordinator: String,
}

/// The answer of `GET /cluster/status`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClusterStatus {
    /// The node that answered.
    pub address: String,
    pub epoch: u64,
    pub view: Vec<String>,
    pub vnodes: u32,
    /// Whether the answering node knows its view to be in force (`confirming` while it asks
    /// the members at start, `disputed` when they contradict each other).
    #[serde(default)]
    pub standing: Option<Standing>,
    /// One entry per node of the view, in view order.
    pub nodes: Vec<NodeStatus>,
    /// Keys stored on the reachable nodes.
    #[serde(rename = "key-count")]
    pub key_count: usize,
    /// How many nodes of the view answered.
    pub reachable: usize,
    /// The change prepared on the answering node, if one is under way.
    pub change: Option<PendingChange>,
    /// The last view change the answering node coordinated.
    pub last_change: Option<ChangeReport>,
}

/// `GET /cluster/state`: this node's view, epoch and change state, as it answers peers.
pub fn node_state_reply(node: &Node) -> Reply {
    Reply::json(
        StatusCode::OK,
        &serde_json::to_value(node.node_state()).unwrap_or_default(),
    )
}

/// `GET /metrics`.
pub fn metrics(node: &Node) -> Reply {
    match crate::metrics::render(&node.gauges()) {
        Ok(text) => Reply::text(StatusCode::OK, crate::metrics::CONTENT_TYPE, text),
        Err(error) => {
            tracing::warn!(%error, "cannot render metrics");
            Reply::json(
                StatusCode::INTERNAL_SERVER_ERROR,
                &json!({"error": error.to_string(), "message": "Error in GET"}),
            )
        }
    }
}

/// What one node of the view said about itself.
async fn probe(node: &Arc<Node>, peer: &str) -> Result<NodeState, String> {
    if peer == &**node.address() {
        return Ok(node.node_state());
    }
    match node.peers().ask(peer, &Request::State, &node.view()).await {
        Ok(Response::State(state)) => Ok(*state),
        Ok(_) => Err(format!("{peer} answered something else than its state")),
        Err(error) => Err(error.to_string()),
    }
}

/// Asks every node of the view for its state, all at once, each bounded by the forwarding
/// timeout.
pub async fn cluster_status(node: &Arc<Node>) -> ClusterStatus {
    let view = node.view();
    // The replicated mode: a node owns its shard's share.
    let shares = match node.replication() {
        Some(replication) => replication.placed().map().ownership(),
        None => view.ring.ownership(),
    };
    let placed = node.replication().map(|r| r.placed());
    let shard_of = |address: &str| {
        let layout = placed.as_ref()?.layout();
        layout.shard_of(address).map(|s| s.id.clone())
    };
    let answers = join_all(view.members.iter().map(|peer| probe(node, peer))).await;
    let lags: Vec<std::collections::BTreeMap<String, u64>> = answers
        .iter()
        .filter_map(|a| a.as_ref().ok()?.replica.as_ref())
        .map(|r| r.mates_lag.clone())
        .collect();
    let nodes: Vec<NodeStatus> = view
        .members
        .iter()
        .zip(answers)
        .map(|(address, answer)| {
            let ownership = shares
                .iter()
                .find(|(a, _)| **a == **address)
                .map_or(0.0, |(_, share)| *share);
            match answer {
                Ok(state) => NodeStatus {
                    address: address.clone(),
                    reachable: true,
                    key_count: Some(state.key_count),
                    ownership,
                    epoch: Some(state.epoch),
                    pending: state.pending.is_some(),
                    error: None,
                    restarted: state.restarted,
                    expected_keys: None,
                    shard: shard_of(address),
                    lag: None,
                    tombstones: state.replica.as_ref().map(|r| r.tombstones),
                },
                Err(error) => NodeStatus {
                    address: address.clone(),
                    reachable: false,
                    key_count: None,
                    ownership,
                    epoch: None,
                    pending: false,
                    error: Some(error),
                    restarted: false,
                    expected_keys: None,
                    shard: shard_of(address),
                    lag: None,
                    tombstones: None,
                },
            }
        })
        .collect();
    let mut nodes: Vec<NodeStatus> = nodes;
    // A replica's lag: the most writes a shard-mate applied and it had not received, as the
    // mates saw it when it last pulled from them.
    for status in nodes.iter_mut().filter(|n| n.shard.is_some()) {
        status.lag = lags
            .iter()
            .filter_map(|reported| reported.get(&status.address).copied())
            .max();
    }
    let (held, share) = nodes
        .iter()
        .filter(|n| !n.restarted && n.key_count.is_some())
        .fold((0usize, 0f64), |(k, o), n| {
            (k + n.key_count.unwrap_or(0), o + n.ownership)
        });
    for restarted in nodes.iter_mut().filter(|n| n.restarted) {
        if share > 0.0 {
            restarted.expected_keys =
                Some((held as f64 * restarted.ownership / share).round() as usize);
        }
    }
    let change = node.migration().map(|m| PendingChange {
        change_id: m.change_id(),
        epoch: m.view().epoch,
        view: m.view().members.clone(),
        coordinator: m.coordinator().to_string(),
    });
    ClusterStatus {
        address: node.address().to_string(),
        epoch: view.epoch,
        view: view.members.clone(),
        vnodes: node.config().vnodes,
        standing: Some(node.standing()),
        key_count: nodes.iter().filter_map(|n| n.key_count).sum(),
        reachable: nodes.iter().filter(|n| n.reachable).count(),
        nodes,
        change,
        last_change: node.last_change(),
    }
}

/// `GET /cluster/status`.
pub async fn cluster_status_reply(node: &Arc<Node>) -> Reply {
    let status = cluster_status(node).await;
    match serde_json::to_value(status) {
        Ok(body) => Reply::json(StatusCode::OK, &body),
        Err(error) => Reply::json(
            StatusCode::INTERNAL_SERVER_ERROR,
            &json!({"error": error.to_string(), "message": "Error in GET"}),
        ),
    }
}
