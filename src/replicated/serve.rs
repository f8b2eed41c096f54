//! A key request in the replicated mode. The node a client asks finds the key's shard on
//! the ring over shards: a replica of it serves the request itself; any other node
//! forwards the client's key, method and body untouched to the shard's replicas in turn
//! (the next when one does not answer, all within the forwarding timeout) and relays the
//! answer with the replica's address. The replica validates the request as the contract
//! says (the storage node validates), serves it under the request's causal context, and,
//! when it lacks writes that context has seen, pulls them from its shard-mates first
//! (within [`CATCH_UP_WAIT`]), answering 400 when it cannot.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use serde::Deserialize;
use serde_json::value::RawValue;
use tokio::time::Instant;

use crate::causal::Context;
use crate::kv::{self, KvMethod, KvOp};
use crate::node::Node;
use crate::peers::PeerError;
use crate::replica::{KeyAnswer, Rejection, ReplicaError};
use crate::replicated::exchange::RpcExchange;
use crate::ring::key_hash;
use crate::rpc::{GiveUp, Refusal, Request, Response};

/// How long a replica that lacks writes a request's context has seen pulls them.
pub const CATCH_UP_WAIT: Duration = Duration::from_secs(1);

/// A replicated key request's answer, and the replica that served it when another node did.
#[derive(Debug)]
pub struct Served {
    pub answer: KeyAnswer,
    pub address: Option<String>,
}

#[derive(Deserialize)]
struct KeyBody<'a> {
    #[serde(borrow)]
    value: Option<&'a RawValue>,
    /// Present as written, `null` included (which is not an object: refused).
    #[serde(
        borrow,
        default,
        rename = "causal-context",
        deserialize_with = "present"
    )]
    context: Option<&'a RawValue>,
}

fn present<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<&'de RawValue>, D::Error> {
    <&RawValue>::deserialize(d).map(Some)
}

/// The request's value (raw JSON text, PUT only) and context, checked in the contract's
/// order: a body that is not a JSON object, then the context, then the value.
fn read_body(
    method: KvMethod,
    body: &[u8],
    epoch: u64,
) -> Result<(Option<Bytes>, Context), Rejection> {
    let first = body.iter().find(|b| !b.is_ascii_whitespace());
    if first.is_none() && method != KvMethod::Put {
        return Ok((None, Context::at(epoch)));
    }
    if first != Some(&b'{') {
        return Err(Rejection::InvalidJson);
    }
    let parsed: KeyBody = serde_json::from_slice(body).map_err(|_| Rejection::InvalidJson)?;
    let context = match parsed.context {
        None => Context::at(epoch),
        Some(raw) => {
            let value: serde_json::Value =
                serde_json::from_str(raw.get()).map_err(|_| Rejection::InvalidContext)?;
            Context::parse(Some(&value), epoch).map_err(|_| Rejection::InvalidContext)?
        }
    };
    let value = match (method, parsed.value) {
        (KvMethod::Put, Some(raw)) if raw.get() != "null" => {
            Some(Bytes::copy_from_slice(raw.get().as_bytes()))
        }
        (KvMethod::Put, _) => return Err(Rejection::ValueMissing),
        _ => None,
    };
    Ok((value, context))
}

/// The request's own context, for an answer that no replica gave (empty when unreadable).
fn context_of(method: KvMethod, body: &[u8], epoch: u64) -> Context {
    read_body(method, body, epoch).map_or_else(|_| Context::at(epoch), |(_, c)| c)
}

fn rejected(why: Rejection, context: Context) -> KeyAnswer {
    KeyAnswer {
        result: Err(why),
        context,
    }
}

/// Serves a client's key request from wherever its shard's replicas are.
pub async fn key(node: &Arc<Node>, method: KvMethod, key: &str, body: Bytes) -> Served {
    let epoch = node.view().epoch;
    let unavailable = || Served {
        answer: rejected(Rejection::Unavailable, context_of(method, &body, epoch)),
        address: None,
    };
    let Some(replication) = node.replication() else {
        return unavailable();
    };
    if node.wait_until_in_force().await.is_err() {
        return unavailable();
    }
    let hash = key_hash(key.as_bytes());
    // Twice at most: a view change moved the key's range while this node routed it (a
    // replica here that handed it over, or replicas elsewhere that no longer hold it).
    for _ in 0..2 {
        if replication.serves(hash) {
            match as_replica(node, key, method, &body, None).await {
                Ok(answer) => {
                    return Served {
                        answer,
                        address: None,
                    }
                }
                Err(Moved) => continue,
            }
        }
        match forward(node, method, key, &body, hash).await {
            Forwarded::Served(served) => return served,
            Forwarded::Stale(replica) if learned_newer(node, &replica).await => continue,
            Forwarded::Stale(_) | Forwarded::Failed => return unavailable(),
        }
    }
    unavailable()
}

/// How forwarding a key request ended.
enum Forwarded {
    Served(Served),
    /// No replica served it, and this one said it is not one: this node's layout may be
    /// behind.
    Stale(String),
    Failed,
}

/// Whether `peer` serves a newer view than this node and this node learned it.
async fn learned_newer(node: &Arc<Node>, peer: &str) -> bool {
    let before = node.view().epoch;
    let epoch = match node.peers().ask(peer, &Request::State, &node.view()).await {
        Ok(Response::State(state)) if state.epoch > before => state.epoch,
        _ => return false,
    };
    crate::migrate::learn(node, epoch, None, peer).await;
    node.view().epoch > before
}

/// Forwards a key request to the replicas of its shard in turn; the first answer, with the
/// replica that gave it.
async fn forward(
    node: &Arc<Node>,
    method: KvMethod,
    key: &str,
    body: &Bytes,
    hash: u64,
) -> Forwarded {
    let Some(replication) = node.replication() else {
        return Forwarded::Failed;
    };
    let view = node.view();
    // Replicas in an order that spreads keys over them, the same for one key every time.
    let replicas = replication.placed().shard_of_hash(hash).replicas.clone();
    let n = replicas.len();
    let first = (hash % n as u64) as usize;
    let order = (0..n).map(|i| &replicas[(first + i) % n]);
    let deadline = Instant::now() + node.config().forward_timeout;
    let mut stale = None;
    for (i, replica) in order.enumerate() {
        // What is left, shared by the replicas not tried yet.
        let left = deadline.saturating_duration_since(Instant::now());
        let attempt = left / (n - i) as u32;
        let request = Request::ShardKv {
            key: key.to_string(),
            method,
            body: body.clone(),
            give_up: GiveUp::after(attempt),
        };
        let answer = node
            .peers()
            .send_once(replica, &request, &view, attempt)
            .await;
        crate::metrics::forward(replica, answer.is_ok());
        match answer {
            Ok(Response::ShardKv(answer)) => {
                return Forwarded::Served(Served {
                    answer,
                    address: Some(replica.clone()),
                })
            }
            Err(PeerError::Refused {
                refusal: Refusal::NotMember(_),
                ..
            }) => {
                tracing::debug!(%replica, "not a replica of the key's shard (any more)");
                stale.get_or_insert_with(|| replica.clone());
            }
            Ok(other) => tracing::debug!(%replica, ?other, "replica did not serve"),
            Err(error) => tracing::debug!(%replica, %error, "replica did not answer"),
        }
    }
    stale.map_or(Forwarded::Failed, Forwarded::Stale)
}

/// A view change moved the key's shard away from this node while the request waited:
/// route it again.
#[derive(Debug)]
pub struct Moved;

/// What one attempt on this node's replica came to.
enum Attempt {
    Served(Result<(crate::kv::KvOutcome, Context), ReplicaError>),
    /// The key's range is frozen for a handover: wait for the change to end.
    Frozen(tokio::sync::watch::Receiver<bool>),
}

/// Serves a key request as a replica of the key's shard: validates it, then serves it
/// under its context, catching up first when behind. A forwarded request is executed only
/// before its sender's `give_up`. While a view change hands the key's range over, writes
/// are noted for its catch-up and, once the range is frozen, the request waits for the
/// change to end; `Moved` if the key's shard is then elsewhere.
pub async fn as_replica(
    node: &Node,
    key: &str,
    method: KvMethod,
    body: &[u8],
    give_up: Option<GiveUp>,
) -> Result<KeyAnswer, Moved> {
    let Some(replication) = node.replication() else {
        return Ok(rejected(
            Rejection::Unavailable,
            Context::at(node.view().epoch),
        ));
    };
    // Contexts are read at the epoch of the placement that serves them.
    let epoch = replication.placed().epoch();
    let (value, mut context) = match read_body(method, body, epoch) {
        Ok(read) => read,
        Err(why) => return Ok(rejected(why, Context::at(epoch))),
    };
    if !kv::key_fits(key) {
        return Ok(rejected(Rejection::KeyTooLong, context));
    }
    let op = match (method, value) {
        (KvMethod::Put, Some(value)) => KvOp::Put(value),
        (KvMethod::Delete, _) => KvOp::Delete,
        _ => KvOp::Get,
    };
    let hash = key_hash(key.as_bytes());
    let deadline = Instant::now() + node.peers().timeout();
    let mut caught_up = false;
    loop {
        if give_up.is_some_and(GiveUp::passed) || Instant::now() >= deadline {
            return Ok(rejected(Rejection::Unavailable, context));
        }
        let placed = replication.placed();
        let Some(replica) = placed
            .replica()
            .filter(|_| placed.holds(node.address(), hash))
        else {
            return Err(Moved);
        };
        if context.epoch() != placed.epoch() {
            // A view change happened while the request waited: its context, of the epoch
            // before, is read again at the new one (ignored, as the contract allows).
            context = read_body(method, body, placed.epoch())
                .map_or_else(|_| Context::at(placed.epoch()), |(_, c)| c);
        }
        let attempt = node.in_handover(hash, |moving| match moving {
            Some(migration) if migration.is_frozen() => Attempt::Frozen(migration.ended()),
            _ => Attempt::Served(replica.serve(hash, key, &op, &context)),
        });
        match attempt {
            Attempt::Frozen(ended) => {
                if !node.wait_for_release(ended).await {
                    return Ok(rejected(Rejection::Unavailable, context));
                }
            }
            Attempt::Served(Ok((outcome, reply))) => {
                if outcome.is_write() {
                    // Answered once the shard-mates that answer hold it too.
                    let counter = reply.shard(replica.shard()).get(replica.name());
                    crate::replicated::push::replicated(node, replica.name(), counter).await;
                }
                return Ok(KeyAnswer {
                    result: Ok(outcome),
                    context: reply,
                });
            }
            Attempt::Served(Err(ReplicaError::Retired)) => {
                let left = deadline.saturating_duration_since(Instant::now());
                replication.next_switch(&placed, left).await;
            }
            Attempt::Served(Err(ReplicaError::Behind(missing))) if !caught_up => {
                tracing::debug!(key, ?missing, "behind the request's context; pulling");
                caught_up = true;
                let needed = context.shard(replica.shard());
                let exchange = RpcExchange { node };
                let mates = replication.mates();
                let wait =
                    crate::gossip::catch_up(replica, &needed, &mates, &exchange, CATCH_UP_WAIT);
                if let Err(error) = wait.await {
                    tracing::error!(%error, "catching up failed");
                }
            }
            Attempt::Served(Err(ReplicaError::Behind(missing))) => {
                tracing::info!(key, ?missing, "still behind the request's context: 400");
                return Ok(rejected(Rejection::Behind, context));
            }
            Attempt::Served(Err(error)) => {
                tracing::error!(%error, key, "the replica's store failed");
                return Ok(rejected(Rejection::Unavailable, context));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(method: KvMethod, body: &str) -> Result<(Option<String>, Context), Rejection> {
        read_body(method, body.as_bytes(), 3)
            .map(|(v, c)| (v.map(|v| String::from_utf8(v.to_vec()).unwrap()), c))
    }

    #[test]
    fn the_body_is_checked_in_the_contracts_order() {
        use KvMethod::*;
        assert_eq!(read(Get, "").unwrap(), (None, Context::at(3)));
        assert_eq!(read(Put, "").unwrap_err(), Rejection::InvalidJson);
        assert_eq!(read(Get, "[1]").unwrap_err(), Rejection::InvalidJson);
        assert_eq!(
            read(Put, r#"{"value":"#).unwrap_err(),
            Rejection::InvalidJson
        );
        assert_eq!(
            read(Put, r#"{"causal-context":[1]}"#).unwrap_err(),
            Rejection::InvalidContext
        );
        assert_eq!(
            read(Get, r#"{"causal-context":null}"#).unwrap_err(),
            Rejection::InvalidContext
        );
        assert_eq!(
            read(Put, r#"{"causal-context":{}}"#).unwrap_err(),
            Rejection::ValueMissing
        );
        assert_eq!(
            read(Put, r#"{"value":null}"#).unwrap_err(),
            Rejection::ValueMissing
        );
        assert_eq!(
            read(Put, r#"{"value":[1, 2],"causal-context":{}}"#).unwrap(),
            (Some("[1, 2]".into()), Context::at(3))
        );
        assert_eq!(
            read(Delete, r#"{"causal-context":{}}"#).unwrap(),
            (None, Context::at(3))
        );
    }
}
