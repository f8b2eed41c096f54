//! Every answer a node gives, rendered in one place: the success bodies of the course API
//! and the mapping of each error type to its status and JSON body.

use bytes::Bytes;
use serde_json::json;
use warp::http::{header, HeaderValue, StatusCode};

use crate::causal::Context;
use crate::change::ChangeError;
use crate::data::KvError;
use crate::kv::KvOutcome;
use crate::migrate::coordinator::Shard;
use crate::replica::{KeyAnswer, Rejection};

pub use crate::kv::KvMethod;

/// A rendered answer: a status and a body, JSON unless made by [`Reply::text`].
#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub body: Bytes,
    pub content_type: &'static str,
}

const JSON: &str = "application/json";

impl Reply {
    pub fn json(status: StatusCode, value: &serde_json::Value) -> Reply {
        Reply {
            status,
            body: Bytes::from(value.to_string()),
            content_type: JSON,
        }
    }

    pub fn raw(status: StatusCode, body: impl Into<Bytes>) -> Reply {
        Reply {
            status,
            body: body.into(),
            content_type: JSON,
        }
    }

    /// A body that is not JSON (the metrics' text format).
    pub fn text(status: StatusCode, content_type: &'static str, body: impl Into<Bytes>) -> Reply {
        Reply {
            status,
            body: body.into(),
            content_type,
        }
    }

    /// The HTTP response this reply is.
    pub fn into_response(self) -> warp::http::Response<http_body_util::Full<Bytes>> {
        let mut response = warp::http::Response::new(http_body_util::Full::new(self.body));
        *response.status_mut() = self.status;
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static(self.content_type),
        );
        response
    }
}

/// Why a client request failed, for every route of the public API.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("Not found")]
    NotFound(String),
    #[error("Method not allowed")]
    MethodNotAllowed(String),
    #[error("Invalid key")]
    InvalidKey(String),
    #[error("Value is too large")]
    TooLarge(String),
    #[error("Request body not received in time")]
    BodyTimeout(String),
    #[error("Invalid JSON")]
    InvalidJson(String),
    #[error("Value is missing")]
    ValueMissing,
    #[error("Key is too long")]
    KeyTooLong,
    #[error("Key does not exist")]
    KeyDoesNotExist(KvMethod),
    #[error("Unable to satisfy request")]
    Unavailable(KvMethod, KvError),
    #[error("Main instance is down")]
    MainDown(String),
    #[error("view change failed: {0}")]
    ViewChange(ChangeError),
}

fn method_message(method: &str) -> String {
    format!("Error in {method}")
}

fn kv_message(method: KvMethod) -> &'static str {
    match method {
        KvMethod::Get => "Error in GET",
        KvMethod::Put => "Error in PUT",
        KvMethod::Delete => "Error in DELETE",
    }
}

impl ApiError {
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::NotFound(_) | ApiError::KeyDoesNotExist(_) => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::BodyTimeout(_) => StatusCode::REQUEST_TIMEOUT,
            ApiError::InvalidKey(_)
            | ApiError::InvalidJson(_)
            | ApiError::ValueMissing
            | ApiError::KeyTooLong => StatusCode::BAD_REQUEST,
            ApiError::Unavailable(..) | ApiError::MainDown(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::ViewChange(error) => match error {
                ChangeError::BadView(_) => StatusCode::BAD_REQUEST,
                ChangeError::InProgress => StatusCode::CONFLICT,
                ChangeError::StaleEpoch { .. }
                | ChangeError::EpochTooFar { .. }
                | ChangeError::UnknownChange(_)
                | ChangeError::NotCoordinator(_)
                | ChangeError::NotParticipant(_)
                | ChangeError::NotShipped(_)
                | ChangeError::NotIncoming(_)
                | ChangeError::Invalid(..)
                | ChangeError::Aborted(_)
                | ChangeError::OtherGroup(_)
                | ChangeError::Unreachable(_)
                | ChangeError::Storage(_) => StatusCode::SERVICE_UNAVAILABLE,
            },
        }
    }

    /// The error as the contract renders it.
    pub fn into_reply(self) -> Reply {
        let (status, body) = self.into_body();
        Reply::json(status, &body)
    }

    /// The error as the replicated contract renders it on a key request: with the request's
    /// causal context (`context`; an empty one when the body was never read).
    pub fn into_key_reply(self, context: &Context) -> Reply {
        let (status, mut body) = self.into_body();
        body["causal-context"] = context.to_json();
        Reply::json(status, &body)
    }

    fn into_body(self) -> (StatusCode, serde_json::Value) {
        let status = self.status();
        let error = self.to_string();
        let body = match self {
            ApiError::NotFound(method)
            | ApiError::MethodNotAllowed(method)
            | ApiError::InvalidKey(method)
            | ApiError::TooLarge(method)
            | ApiError::BodyTimeout(method)
            | ApiError::InvalidJson(method)
            | ApiError::MainDown(method) => {
                json!({"error": error, "message": method_message(&method)})
            }
            ApiError::ValueMissing | ApiError::KeyTooLong => {
                json!({"error": error, "message": "Error in PUT"})
            }
            ApiError::KeyDoesNotExist(method) => {
                json!({"doesExist": false, "error": error, "message": kv_message(method)})
            }
            ApiError::Unavailable(method, cause) => {
                tracing::debug!(%cause, "answering 503");
                json!({"error": error, "message": kv_message(method)})
            }
            ApiError::ViewChange(change) => match change {
                ChangeError::BadView(why) => {
                    json!({"error": why.to_string(), "message": "Error in PUT"})
                }
                ChangeError::InProgress => {
                    json!({"error": "View change in progress", "message": "Error in PUT"})
                }
                ChangeError::Unreachable(peers) => json!({
                    "error": "Unable to satisfy request",
                    "message": "Error in PUT",
                    "unreachable": peers,
                }),
                other => json!({
                    "error": "Unable to satisfy request",
                    "message": "Error in PUT",
                    "detail": other.to_string(),
                    "unreachable": [],
                }),
            },
        };
        (status, body)
    }
}

/// The answer to a key request, served here (`address` is `None`) or by `address`.
pub fn kv_reply(method: KvMethod, outcome: KvOutcome, address: Option<&str>) -> Reply {
    let (status, mut body) = kv_body(method, outcome, address);
    body.push(b'}');
    Reply::raw(status, body)
}

/// A key answer's status and body, without its closing brace (fields may follow).
fn kv_body(method: KvMethod, outcome: KvOutcome, address: Option<&str>) -> (StatusCode, Vec<u8>) {
    let (status, mut body): (StatusCode, Vec<u8>) = match outcome {
        KvOutcome::Found(value) => {
            const FOUND: &[u8] =
                br#"{"doesExist":true,"message":"Retrieved successfully","value":"#;
            // Room for exactly this answer and its closing brace: a full `Vec` becomes
            // the reply's `Bytes` without another allocation.
            let mut body = Vec::with_capacity(FOUND.len() + value.len() + 1);
            body.extend_from_slice(FOUND);
            body.extend_from_slice(&value);
            (StatusCode::OK, body)
        }
        KvOutcome::Added => (
            StatusCode::CREATED,
            br#"{"message":"Added successfully","replaced":false"#.to_vec(),
        ),
        KvOutcome::Replaced => (
            StatusCode::OK,
            br#"{"message":"Updated successfully","replaced":true"#.to_vec(),
        ),
        KvOutcome::Deleted => (
            StatusCode::OK,
            br#"{"doesExist":true,"message":"Deleted successfully""#.to_vec(),
        ),
        KvOutcome::Absent => {
            let message = kv_message(method);
            let body = format!(
                r#"{{"doesExist":false,"error":"Key does not exist","message":"{message}""#
            );
            (StatusCode::NOT_FOUND, body.into_bytes())
        }
    };
    if let Some(address) = address {
        body.extend_from_slice(br#","address":"#);
        body.extend_from_slice(json!(address).to_string().as_bytes());
    }
    (status, body)
}

/// The answer to a key request of the replicated contract (served here, or by the replica
/// at `address`): assignment 3's bodies plus `causal-context`, errors included.
pub fn shard_kv_reply(method: KvMethod, answer: KeyAnswer, address: Option<&str>) -> Reply {
    let context = answer.context.to_json();
    let why = match answer.result {
        Ok(outcome) => {
            let (status, mut body) = kv_body(method, outcome, address);
            body.extend_from_slice(br#","causal-context":"#);
            body.extend_from_slice(context.to_string().as_bytes());
            body.push(b'}');
            return Reply::raw(status, body);
        }
        Err(why) => why,
    };
    let message = kv_message(method);
    let (status, mut body) = match (why, method) {
        (Rejection::KeyTooLong, KvMethod::Get | KvMethod::Delete) => (
            StatusCode::NOT_FOUND,
            json!({"doesExist": false, "error": "Key does not exist", "message": message}),
        ),
        (Rejection::Unavailable, _) => (
            StatusCode::SERVICE_UNAVAILABLE,
            json!({"error": why.to_string(), "message": message}),
        ),
        _ => (
            StatusCode::BAD_REQUEST,
            json!({"error": why.to_string(), "message": message}),
        ),
    };
    body["causal-context"] = context;
    if let Some(address) = address {
        body["address"] = json!(address);
    }
    Reply::json(status, &body)
}

/// `GET /kvs/key-count` in the replicated mode.
pub fn shard_key_count_reply(count: usize, shard: Option<&str>) -> Reply {
    Reply::json(
        StatusCode::OK,
        &json!({"message": "Key count retrieved successfully", "key-count": count, "shard-id": shard}),
    )
}

/// `PUT /kvs/view-change` in the replicated mode: each shard of the new layout with its
/// replicas and key count (its first replica's), and the old members left out.
pub fn replicated_view_change_reply(
    layout: &crate::shard::Layout,
    changed: &crate::migrate::coordinator::Changed,
) -> Reply {
    let count = |address: &str| {
        changed
            .shards
            .iter()
            .find(|s| s.address == address)
            .map_or(0, |s| s.key_count)
    };
    let shards: Vec<_> = layout
        .shards()
        .iter()
        .map(|s| {
            json!({
                "shard-id": s.id,
                "key-count": s.replicas.first().map_or(0, |r| count(r)),
                "replicas": s.replicas,
            })
        })
        .collect();
    let mut body = json!({"message": "View change successful", "shards": shards});
    if !changed.left_out.is_empty() {
        body["left-out"] = json!(changed.left_out);
    }
    Reply::json(StatusCode::OK, &body)
}

/// `GET /kvs/shards`.
pub fn shards_reply(ids: &[String]) -> Reply {
    Reply::json(
        StatusCode::OK,
        &json!({"message": "Shard membership retrieved successfully", "shards": ids}),
    )
}

/// `GET /kvs/shards/<id>`: its key count (`None`: no replica answered) and replicas.
pub fn shard_reply(id: &str, count: Option<usize>, replicas: &[String]) -> Reply {
    match count {
        Some(count) => Reply::json(
            StatusCode::OK,
            &json!({
                "message": "Shard information retrieved successfully",
                "shard-id": id,
                "key-count": count,
                "replicas": replicas,
            }),
        ),
        None => Reply::json(
            StatusCode::SERVICE_UNAVAILABLE,
            &json!({"error": "Unable to satisfy request", "message": "Error in GET"}),
        ),
    }
}

/// `GET /kvs/shards/<id>` for an id the layout does not have.
pub fn no_such_shard_reply() -> Reply {
    Reply::json(
        StatusCode::NOT_FOUND,
        &json!({"error": "Shard does not exist", "message": "Error in GET"}),
    )
}

pub fn key_count_reply(count: usize) -> Reply {
    Reply::json(
        StatusCode::OK,
        &json!({"message": "Key count retrieved successfully", "key-count": count}),
    )
}

pub fn view_change_reply(shards: &[Shard]) -> Reply {
    let shards: Vec<_> = shards
        .iter()
        .map(|s| json!({"address": s.address, "key-count": s.key_count}))
        .collect();
    Reply::json(
        StatusCode::OK,
        &json!({"message": "View change successful", "shards": shards}),
    )
}

impl From<Result<Reply, ApiError>> for Reply {
    fn from(result: Result<Reply, ApiError>) -> Reply {
        result.unwrap_or_else(ApiError::into_reply)
    }
}
