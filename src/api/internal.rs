//! Node-to-node endpoints under `/internal/`: forwarded key requests, node state, the
//! phases of a view change, and (when enabled) the test fault hooks.

use std::sync::Arc;

use bytes::{Buf, Bytes};
use futures_util::Stream;
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::json;
use warp::http::{HeaderMap, Method, StatusCode};

use super::body::read_limited;
use super::reply::Reply;
use crate::auth::TOKEN_HEADER;
use crate::migrate::{self, ChangeError};
use crate::node::Node;
use crate::wire::{decode_batch, ChangeRef, PeerFailure, Prepare, FROM_HEADER, VNODES_HEADER};

/// Transfer batches are bounded by the sender; this only stops a runaway body.
const MAX_INTERNAL_BODY: usize = 256 << 20;

fn failure(status: StatusCode, error: impl ToString) -> Reply {
    Reply::json(status, &json!({"error": error.to_string()}))
}

fn ok<T: Serialize>(value: &T) -> Reply {
    Reply::json(
        StatusCode::OK,
        &serde_json::to_value(value).unwrap_or_default(),
    )
}

fn change_failure(error: ChangeError) -> Reply {
    let status = match &error {
        ChangeError::InProgress => StatusCode::CONFLICT,
        ChangeError::BadView(_) => StatusCode::BAD_REQUEST,
        ChangeError::StaleEpoch { .. } | ChangeError::UnknownChange(_) => StatusCode::GONE,
        ChangeError::Unreachable(_) | ChangeError::Storage(_) => StatusCode::SERVICE_UNAVAILABLE,
    };
    let unreachable = match &error {
        ChangeError::Unreachable(peers) => peers.clone(),
        _ => Vec::new(),
    };
    let body = PeerFailure {
        error: error.to_string(),
        unreachable,
    };
    Reply::json(status, &serde_json::to_value(body).unwrap_or_default())
}

fn header<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

fn json_body<T: DeserializeOwned>(body: &Bytes) -> Result<T, Reply> {
    serde_json::from_slice(body).map_err(|e| failure(StatusCode::BAD_REQUEST, e))
}

pub async fn dispatch<S, B>(
    node: &Arc<Node>,
    method: &Method,
    rest: &str,
    headers: &HeaderMap,
    body: S,
) -> Reply
where
    S: Stream<Item = Result<B, warp::Error>>,
    B: Buf,
{
    if let Some(token) = &node.config.cluster_token {
        let offered = headers.get(TOKEN_HEADER).map(|v| v.as_bytes());
        if !token.accepts(offered) {
            let from = header(headers, FROM_HEADER).unwrap_or("?");
            tracing::warn!(
                path = rest,
                from,
                "internal request without the cluster token"
            );
            return failure(StatusCode::UNAUTHORIZED, "Unauthorized");
        }
    }
    if let Some(vnodes) = header(headers, VNODES_HEADER) {
        if vnodes.parse::<u32>().ok() != Some(node.config.vnodes) {
            return failure(
                StatusCode::CONFLICT,
                format!(
                    "vnode count mismatch: sender uses {vnodes}, this node {}",
                    node.config.vnodes
                ),
            );
        }
    }
    let body = match read_limited(body, MAX_INTERNAL_BODY, node.config.body_read_timeout).await {
        Ok(body) => body,
        Err(error) => return failure(StatusCode::PAYLOAD_TOO_LARGE, error),
    };
    let result = match (method.as_str(), rest) {
        ("GET", "state") => Ok(ok(&node.node_state())),
        ("GET", outcome) if outcome.starts_with("outcome/") => match outcome[8..].parse::<u64>() {
            Ok(id) => Ok(ok(&node.outcome(id))),
            Err(e) => Err(failure(StatusCode::BAD_REQUEST, e)),
        },
        ("POST", "prepare") => match json_body::<Prepare>(&body) {
            Ok(prepare) => Ok(migrate::prepare(node, prepare)
                .await
                .map(|_| ok(&json!({})))
                .unwrap_or_else(change_failure)),
            Err(reply) => Err(reply),
        },
        ("POST", "stage") => match decode_batch(body) {
            Ok((change_id, entries)) => {
                let keys = entries.len();
                let bytes = entries
                    .iter()
                    .map(|e| e.key.len() + e.value.as_ref().map_or(0, |v| v.len()))
                    .sum();
                Ok(migrate::stage(node, change_id, entries)
                    .map(|_| {
                        crate::metrics::received(keys, bytes);
                        ok(&json!({}))
                    })
                    .unwrap_or_else(change_failure))
            }
            Err(e) => Err(failure(StatusCode::BAD_REQUEST, e)),
        },
        ("POST", phase @ ("transfer" | "catchup" | "commit" | "abort")) => {
            match json_body::<ChangeRef>(&body) {
                Ok(change) => Ok(phase_call(node, phase, change.change_id).await),
                Err(reply) => Err(reply),
            }
        }
        #[cfg(feature = "fault-hooks")]
        ("GET", "fault") => Ok(ok(&node.faults.status())),
        #[cfg(feature = "fault-hooks")]
        ("PUT", "fault") if node.faults.enabled() => {
            match json_body::<crate::fault::FaultSettings>(&body) {
                Ok(settings) => {
                    node.faults.set(settings);
                    Ok(ok(&node.faults.status()))
                }
                Err(reply) => Err(reply),
            }
        }
        _ => Err(failure(StatusCode::NOT_FOUND, "Not found")),
    };
    result.unwrap_or_else(|reply| reply)
}

async fn phase_call(node: &Arc<Node>, phase: &str, change_id: u64) -> Reply {
    let result = match phase {
        "transfer" => migrate::transfer(node, change_id).await.map(|s| ok(&s)),
        "catchup" => migrate::catch_up(node, change_id).await.map(|s| ok(&s)),
        "commit" => migrate::commit(node, change_id).await.map(|c| ok(&c)),
        _ => migrate::abort(node, change_id)
            .await
            .map(|_| ok(&json!({}))),
    };
    result.unwrap_or_else(change_failure)
}
