//! The replicated contract's routes (assignment 4, `--repl-factor`): key requests with a
//! causal context, the key count with its shard id, the shard list and one shard's
//! information. Everything else is served as in the sharded mode.

use std::sync::Arc;

use bytes::Buf;
use futures_util::Stream;
use warp::http::Method;

use super::course::key_and_body;
use super::reply::{self, ApiError, KvMethod, Reply};
use crate::causal::Context;
use crate::node::Node;
use crate::replication::Replication;
use crate::rpc::{Request, Response};

/// A path the replicated contract serves its own way.
pub enum Route<'a> {
    Key(&'a str),
    KeyCount,
    Shards,
    Shard(&'a str),
    ViewChange,
}

/// The replicated contract's route of `path`; `None` for one served as in the sharded mode.
pub fn route(path: &str) -> Option<Route<'_>> {
    let rest = path.strip_prefix("/kvs/")?;
    let segment = |s: &'_ str| !s.is_empty() && !s.contains('/');
    if let Some(raw_key) = rest.strip_prefix("keys/") {
        return segment(raw_key).then_some(Route::Key(raw_key));
    }
    if let Some(id) = rest.strip_prefix("shards/") {
        return segment(id).then_some(Route::Shard(id));
    }
    match rest {
        "key-count" => Some(Route::KeyCount),
        "shards" => Some(Route::Shards),
        "view-change" => Some(Route::ViewChange),
        _ => None,
    }
}

/// Serves one of the replicated contract's routes.
pub async fn serve<S, B, E>(
    node: &Arc<Node>,
    replication: &Replication,
    method: &Method,
    route: Route<'_>,
    body: S,
) -> Reply
where
    S: Stream<Item = Result<B, E>> + Send,
    B: Buf,
{
    let not_allowed = || ApiError::MethodNotAllowed(method.to_string()).into_reply();
    let get = method == Method::GET;
    match route {
        Route::Key(raw_key) => match KvMethod::parse(method) {
            Some(kv_method) => match key(node, kv_method, raw_key, body).await {
                Ok(reply) => reply,
                // Every key reply carries a causal context, errors included.
                Err(error) => error.into_key_reply(&Context::at(node.view().epoch)),
            },
            None => not_allowed(),
        },
        Route::KeyCount if get => {
            let shard = replication.replica().map(|r| r.shard().to_string());
            reply::shard_key_count_reply(node.key_count(), shard.as_deref())
        }
        Route::Shards if get => {
            let ids: Vec<String> = replication
                .placed()
                .layout()
                .shards()
                .iter()
                .map(|s| s.id.clone())
                .collect();
            reply::shards_reply(&ids)
        }
        Route::Shard(id) if get => shard(node, replication, id).await,
        Route::ViewChange if method == Method::PUT => {
            super::course::view_change(node, body, false).await.into()
        }
        Route::KeyCount | Route::Shards | Route::Shard(_) | Route::ViewChange => not_allowed(),
    }
}

async fn key<S, B, E>(
    node: &Arc<Node>,
    method: KvMethod,
    raw_key: &str,
    body: S,
) -> Result<Reply, ApiError>
where
    S: Stream<Item = Result<B, E>>,
    B: Buf,
{
    let (key, body) = key_and_body(node, method, raw_key, body).await?;
    let served = crate::replicated::serve::key(node, method, &key, body).await;
    Ok(reply::shard_kv_reply(
        method,
        served.answer,
        served.address.as_deref(),
    ))
}

/// `GET /kvs/shards/<id>`: the key count from this node when it is a replica of the
/// shard, else from the first replica that answers.
async fn shard(node: &Node, replication: &Replication, id: &str) -> Reply {
    let placed = replication.placed();
    let Some(shard) = placed.layout().shard(id) else {
        return reply::no_such_shard_reply();
    };
    if replication.replica().is_some_and(|r| r.shard() == id) {
        return reply::shard_reply(id, Some(node.key_count()), &shard.replicas);
    }
    let view = node.view();
    for replica in &shard.replicas {
        if let Ok(Response::State(state)) = node.peers().ask(replica, &Request::State, &view).await
        {
            return reply::shard_reply(id, Some(state.key_count), &shard.replicas);
        }
    }
    reply::shard_reply(id, None, &shard.replicas)
}
