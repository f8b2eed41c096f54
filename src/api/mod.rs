//! The HTTP surface: one hyper service that routes every request by hand, so the contract's
//! check order (route and method, key, body size, JSON, value, key length) holds exactly.
//!
//! Requests come straight from hyper's connection (`crate::server`), not through warp's
//! filters: with routing done by hand they only carried the request into [`dispatch`], and
//! cost a local GET ~0.4 µs of CPU of its ~10 (nested filter futures polled per request, a
//! task-local route); `scripts/perf` measures the stack.

mod body;
mod course;
mod internal;
pub mod ops;
mod replicated;
pub mod reply;

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Instant;

use bytes::{Buf, Bytes};
use futures_util::Stream;
use http_body_util::{BodyDataStream, Full};
use hyper::body::Incoming;
use warp::http::{HeaderMap, Method, Request, Response};

use crate::metrics::{self, RouteLabel};
use crate::node::Node;
use reply::{ApiError, Reply};

/// Serves one request of a node's HTTP surface.
pub async fn handle(
    node: Arc<Node>,
    request: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let (parts, body) = request.into_parts();
    let path = parts.uri.path();
    // Only node-to-node requests read headers (epoch, sender, token).
    let headers = if path.starts_with("/internal/") {
        parts.headers
    } else {
        HeaderMap::new()
    };
    let reply = dispatch(node, parts.method, path, headers, BodyDataStream::new(body)).await;
    Ok(reply.into_response())
}

/// What a path names, before its method is checked.
enum Route<'a> {
    Key(&'a str),
    KeyCount,
    ViewChange,
    /// `PUT /cluster/view-change`: a view change that drops unreachable old members.
    ForcedViewChange,
    Internal(&'a str),
    Metrics,
    ClusterStatus,
    /// `GET /cluster/state`: this node's own view and change state.
    ClusterState,
    NotFound,
}

impl Route<'_> {
    fn label(&self) -> RouteLabel {
        match self {
            Route::Key(_) => RouteLabel::Key,
            Route::KeyCount => RouteLabel::KeyCount,
            Route::ViewChange | Route::ForcedViewChange => RouteLabel::ViewChange,
            Route::Internal(_) => RouteLabel::Internal,
            Route::Metrics | Route::ClusterStatus | Route::ClusterState | Route::NotFound => {
                RouteLabel::Other
            }
        }
    }
}

/// A single non-empty path segment, or `None`.
fn segment(rest: &str) -> Option<&str> {
    (!rest.is_empty() && !rest.contains('/')).then_some(rest)
}

fn route(path: &str) -> Route<'_> {
    if let Some(rest) = path.strip_prefix("/kvs/keys/") {
        return segment(rest).map_or(Route::NotFound, Route::Key);
    }
    if let Some(rest) = path.strip_prefix("/internal/") {
        return Route::Internal(rest);
    }
    match path {
        "/metrics" => return Route::Metrics,
        "/cluster/status" => return Route::ClusterStatus,
        "/cluster/state" => return Route::ClusterState,
        "/cluster/view-change" => return Route::ForcedViewChange,
        _ => {}
    }
    match path.strip_prefix("/kvs/").and_then(segment) {
        Some("key-count") => Route::KeyCount,
        Some("view-change") => Route::ViewChange,
        Some("keys") | None => Route::NotFound,
        Some(key) => Route::Key(key),
    }
}

/// Serves one request, then counts it in the metrics and logs it at debug level.
async fn dispatch<S, B, E>(
    node: Arc<Node>,
    method: Method,
    path: &str,
    headers: HeaderMap,
    body: S,
) -> Reply
where
    S: Stream<Item = Result<B, E>> + Send,
    B: Buf,
{
    let started = Instant::now();
    let label = route(path).label();
    let reply = serve(node, method.clone(), path, headers, body).await;
    let elapsed = started.elapsed();
    metrics::request(label, &method, reply.status, elapsed);
    tracing::debug!(
        %method,
        path,
        status = reply.status.as_u16(),
        micros = elapsed.as_micros() as u64,
        "request"
    );
    reply
}

async fn serve<S, B, E>(
    node: Arc<Node>,
    method: Method,
    path: &str,
    headers: HeaderMap,
    body: S,
) -> Reply
where
    S: Stream<Item = Result<B, E>> + Send,
    B: Buf,
{
    // Every route but a key request's is boxed: a request's future is as large as its
    // largest branch, and hyper moves it into place for every request.
    if let Some(main) = &node.config().forwarding_address {
        if path.starts_with("/kvs/") {
            return Box::pin(course::relay(&node, main, method, path, body)).await;
        }
    }
    if let Some(replication) = node.replication() {
        if let Some(route) = replicated::route(path) {
            return Box::pin(replicated::serve(&node, replication, &method, route, body)).await;
        }
    }
    let not_allowed = || ApiError::MethodNotAllowed(method.to_string()).into_reply();
    match route(path) {
        Route::Key(raw_key) => match reply::KvMethod::parse(&method) {
            Some(kv_method) => course::key(&node, kv_method, raw_key, body).await.into(),
            None => not_allowed(),
        },
        Route::KeyCount if method == Method::GET => reply::key_count_reply(node.key_count()),
        Route::ViewChange if method == Method::PUT => {
            Box::pin(course::view_change(&node, body, false))
                .await
                .into()
        }
        Route::ForcedViewChange if method == Method::PUT => {
            Box::pin(course::view_change(&node, body, true))
                .await
                .into()
        }
        Route::Metrics if method == Method::GET => ops::metrics(&node),
        Route::ClusterStatus if method == Method::GET => {
            Box::pin(ops::cluster_status_reply(&node)).await
        }
        Route::ClusterState if method == Method::GET => ops::node_state_reply(&node),
        Route::KeyCount
        | Route::ViewChange
        | Route::ForcedViewChange
        | Route::Metrics
        | Route::ClusterStatus
        | Route::ClusterState => not_allowed(),
        Route::Internal(rest) => {
            Box::pin(internal::dispatch(&node, &method, rest, &headers, body)).await
        }
        Route::NotFound => ApiError::NotFound(method.to_string()).into_reply(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_by_hand() {
        assert!(matches!(route("/kvs/keys/a%2Fb"), Route::Key("a%2Fb")));
        assert!(matches!(route("/kvs/keys/"), Route::NotFound));
        assert!(matches!(route("/kvs/keys"), Route::NotFound));
        assert!(matches!(route("/kvs/keys/a/b"), Route::NotFound));
        assert!(matches!(route("/kvs/key-count"), Route::KeyCount));
        assert!(matches!(route("/kvs/view-change"), Route::ViewChange));
        assert!(matches!(route("/kvs/sampleKey"), Route::Key("sampleKey")));
        assert!(matches!(route("/kvs/"), Route::NotFound));
        assert!(matches!(route("/other"), Route::NotFound));
        assert!(matches!(route("/metrics"), Route::Metrics));
        assert!(matches!(route("/cluster/status"), Route::ClusterStatus));
        assert!(matches!(route("/kvs/metrics"), Route::Key("metrics")));
    }
}
