//! `/internal/`: nothing node-to-node lives here any more (nodes talk over [`crate::rpc`]).
//! With the `fault-hooks` feature, a test sets and reads the fault hooks here
//! (`PUT|GET /internal/fault`); with a cluster token it must send it in `x-ringkv-token`.
//! Anything else under `/internal/` is 404.

use std::sync::Arc;

use bytes::Buf;
use futures_util::Stream;
use serde_json::json;
use warp::http::{HeaderMap, Method, StatusCode};

use super::reply::Reply;
use crate::node::Node;

fn failure(status: StatusCode, error: impl ToString) -> Reply {
    Reply::json(status, &json!({"error": error.to_string()}))
}

#[cfg(feature = "fault-hooks")]
pub async fn dispatch<S, B, E>(
    node: &Arc<Node>,
    method: &Method,
    rest: &str,
    headers: &HeaderMap,
    body: S,
) -> Reply
where
    S: Stream<Item = Result<B, E>>,
    B: Buf,
{
    use crate::auth::TOKEN_HEADER;
    use crate::fault::FaultSettings;

    if let Some(token) = &node.config().cluster_token {
        let offered = headers.get(TOKEN_HEADER).map(|v| v.as_bytes());
        if !token.accepts(offered) {
            tracing::warn!(path = rest, "fault request without the cluster token");
            return failure(StatusCode::UNAUTHORIZED, "Unauthorized");
        }
    }
    let ok = |faults: &crate::fault::Faults| {
        Reply::json(
            StatusCode::OK,
            &serde_json::to_value(faults.status()).unwrap_or_default(),
        )
    };
    match (method.as_str(), rest) {
        ("GET", "fault") => ok(node.faults()),
        ("PUT", "fault") if node.faults().enabled() => {
            let body =
                match super::body::read_limited(body, 64 << 10, node.config().body_read_timeout)
                    .await
                {
                    Ok(body) => body,
                    Err(error) => return failure(StatusCode::BAD_REQUEST, error),
                };
            match serde_json::from_slice::<FaultSettings>(&body) {
                Ok(settings) => {
                    node.faults().set(settings);
                    node.peers().set_cut_off(node.faults().isolated());
                    ok(node.faults())
                }
                Err(error) => failure(StatusCode::BAD_REQUEST, error),
            }
        }
        _ => failure(StatusCode::NOT_FOUND, "Not found"),
    }
}

#[cfg(not(feature = "fault-hooks"))]
pub async fn dispatch<S, B, E>(
    _node: &Arc<Node>,
    _method: &Method,
    _rest: &str,
    _headers: &HeaderMap,
    _body: S,
) -> Reply
where
    S: Stream<Item = Result<B, E>>,
    B: Buf,
{
    failure(StatusCode::NOT_FOUND, "Not found")
}
