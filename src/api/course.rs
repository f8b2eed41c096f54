//! The course's public API: key requests (sharded, with forwarding to the owner), view
//! changes, and the forwarding-instance relay of assignment 2.

use std::borrow::Cow;
use std::sync::Arc;

use bytes::Buf;
use futures_util::Stream;
use percent_encoding::percent_decode_str;
use serde::Deserialize;
use warp::http::{Method, StatusCode};

use super::body::{put_value, read_limited, BodyError};
use super::reply::{
    kv_reply, replicated_view_change_reply, view_change_reply, ApiError, KvMethod, Reply,
};
use crate::change::ChangeError;
use crate::kv::{self, KvOp};
use crate::migrate::coordinator;
use crate::node::Node;
use crate::shard::LayoutError;
use crate::view::{parse_members, ViewError};

fn method_name(method: KvMethod) -> String {
    method.name().to_string()
}

async fn read_body<S, B, E>(node: &Node, body: S, method: &str) -> Result<bytes::Bytes, ApiError>
where
    S: Stream<Item = Result<B, E>>,
    B: Buf,
{
    read_limited(
        body,
        node.config().max_body_bytes,
        node.config().body_read_timeout,
    )
    .await
    .map_err(|error| match error {
        BodyError::TooLarge => ApiError::TooLarge(method.to_string()),
        BodyError::Broken => ApiError::InvalidJson(method.to_string()),
        BodyError::TimedOut => ApiError::BodyTimeout(method.to_string()),
    })
}

/// The percent-decoded key and the whole body of a key request, in the contract's order.
pub(super) async fn key_and_body<'a, S, B, E>(
    node: &Node,
    method: KvMethod,
    raw_key: &'a str,
    body: S,
) -> Result<(Cow<'a, str>, bytes::Bytes), ApiError>
where
    S: Stream<Item = Result<B, E>>,
    B: Buf,
{
    let key = percent_decode_str(raw_key)
        .decode_utf8()
        .map_err(|_| ApiError::InvalidKey(method_name(method)))?;
    let body = read_body(node, body, &method_name(method)).await?;
    Ok((key, body))
}

/// `GET|PUT|DELETE /kvs/keys/<key>` and `/kvs/<key>`.
pub async fn key<S, B, E>(
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
    let too_long = !kv::key_fits(&key);
    let op = match method {
        KvMethod::Put => {
            let value = put_value(&body)?;
            if too_long {
                return Err(ApiError::KeyTooLong);
            }
            KvOp::Put(value)
        }
        _ if too_long => return Err(ApiError::KeyDoesNotExist(method)),
        KvMethod::Get => KvOp::Get,
        KvMethod::Delete => KvOp::Delete,
    };
    let served = crate::data::serve_kv(node, &key, op)
        .await
        .map_err(|cause| ApiError::Unavailable(method, cause))?;
    Ok(kv_reply(method, served.outcome, served.address.as_deref()))
}

#[derive(Deserialize)]
struct ViewChangeBody {
    view: Option<serde_json::Value>,
    #[serde(rename = "repl-factor")]
    repl_factor: Option<serde_json::Value>,
}

/// `PUT /kvs/view-change`; with `drop_unreachable`, the operator's
/// `PUT /cluster/view-change`, which removes old members that do not answer. In the
/// replicated mode the body also names the `repl-factor`, and the answer lists shards.
pub async fn view_change<S, B, E>(
    node: &Arc<Node>,
    body: S,
    drop_unreachable: bool,
) -> Result<Reply, ApiError>
where
    S: Stream<Item = Result<B, E>>,
    B: Buf,
{
    let body = read_body(node, body, "PUT").await?;
    let bad_view = |why| ApiError::ViewChange(ChangeError::BadView(why));
    let parsed: ViewChangeBody =
        serde_json::from_slice(&body).map_err(|_| ApiError::InvalidJson("PUT".into()))?;
    let members = match parsed.view {
        None | Some(serde_json::Value::Null) => return Err(bad_view(ViewError::Missing)),
        Some(serde_json::Value::String(text)) => parse_members(&text).map_err(bad_view)?,
        Some(_) => return Err(bad_view(ViewError::NotText)),
    };
    let replicated = node.replication().is_some();
    let factor = match (replicated, parsed.repl_factor) {
        (false, _) => None,
        (true, None | Some(serde_json::Value::Null)) => {
            return Err(bad_view(ViewError::FactorMissing))
        }
        (true, Some(factor)) => {
            let factor = factor
                .as_u64()
                .filter(|f| *f > 0)
                .ok_or(bad_view(ViewError::Layout(LayoutError::BadFactor)))?;
            let factor = usize::try_from(factor).unwrap_or(usize::MAX);
            crate::shard::Layout::initial(&members, factor)
                .map_err(|e| bad_view(ViewError::Layout(e)))?;
            Some(factor)
        }
    };
    let target = coordinator::Target {
        members,
        drop_unreachable,
        factor,
    };
    let changed = coordinator::change_view(node, target)
        .await
        .map_err(ApiError::ViewChange)?;
    Ok(match &changed.layout {
        Some(layout) => replicated_view_change_reply(layout, &changed),
        None => view_change_reply(&changed.shards),
    })
}

/// Forwarding-instance mode: relays the request to the main instance unchanged.
pub async fn relay<S, B, E>(node: &Node, main: &str, method: Method, path: &str, body: S) -> Reply
where
    S: Stream<Item = Result<B, E>>,
    B: Buf,
{
    let name = method.to_string();
    let body = match read_body(node, body, &name).await {
        Ok(body) => body,
        Err(error) => return error.into_reply(),
    };
    let relayed = node.peers().relay(main, method, path, body).await;
    crate::metrics::forward(main, relayed.is_ok());
    match relayed {
        Ok(relayed) => Reply::raw(
            StatusCode::from_u16(relayed.status.as_u16()).unwrap_or(StatusCode::BAD_GATEWAY),
            relayed.body,
        ),
        Err(_) => ApiError::MainDown(name).into_reply(),
    }
}
