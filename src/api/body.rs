//! Reading request bodies under the size limit, and parsing a PUT body into the raw JSON
//! text of its `value`.

use std::time::Duration;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use futures_util::{FutureExt, Stream, StreamExt};
use serde::Deserialize;
use serde_json::value::RawValue;

use super::reply::ApiError;

/// Why a body could not be read.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    #[error("body larger than the limit")]
    TooLarge,
    #[error("body could not be read")]
    Broken,
    #[error("body not received in time")]
    TimedOut,
}

/// Reads the whole body within `time`, refusing it once it grows past `limit` bytes.
pub async fn read_limited<S, B, E>(
    body: S,
    limit: usize,
    time: Duration,
) -> Result<Bytes, BodyError>
where
    S: Stream<Item = Result<B, E>>,
    B: Buf,
{
    let mut body = std::pin::pin!(body.peekable());
    // A request without a body (a GET, a DELETE) has ended already: no timer for it.
    if let Some(None) = body.as_mut().peek().now_or_never() {
        return Ok(Bytes::new());
    }
    Box::pin(tokio::time::timeout(time, read_all(body, limit)))
        .await
        .unwrap_or(Err(BodyError::TimedOut))
}

async fn read_all<S, B, E>(body: S, limit: usize) -> Result<Bytes, BodyError>
where
    S: Stream<Item = Result<B, E>>,
    B: Buf,
{
    let mut body = std::pin::pin!(body);
    let mut first: Option<Bytes> = None;
    let mut rest = BytesMut::new();
    while let Some(chunk) = body.next().await {
        let mut chunk = chunk.map_err(|_| BodyError::Broken)?;
        let so_far = first.as_ref().map_or(0, Bytes::len) + rest.len();
        if so_far + chunk.remaining() > limit {
            return Err(BodyError::TooLarge);
        }
        match &first {
            None => first = Some(chunk.copy_to_bytes(chunk.remaining())),
            Some(head) => {
                if rest.is_empty() {
                    rest.put_slice(head);
                }
                rest.put(chunk);
            }
        }
    }
    Ok(if rest.is_empty() {
        first.unwrap_or_default()
    } else {
        rest.freeze()
    })
}

#[derive(Deserialize)]
struct PutBody<'a> {
    #[serde(borrow)]
    value: Option<&'a RawValue>,
}

/// The raw JSON text of the body's `value`, copied into an allocation of its own size: a
/// stored value must not keep the request's whole read buffer alive (hyper reads a
/// connection in blocks of up to hundreds of KiB, and a slice would pin the block).
pub fn put_value(body: &Bytes) -> Result<Bytes, ApiError> {
    let invalid = || ApiError::InvalidJson("PUT".into());
    let starts_as_object = body
        .iter()
        .find(|b| !b.is_ascii_whitespace())
        .is_some_and(|&b| b == b'{');
    if !starts_as_object {
        return Err(invalid());
    }
    let parsed: PutBody = serde_json::from_slice(body).map_err(|_| invalid())?;
    match parsed.value {
        Some(raw) if raw.get() != "null" => Ok(Bytes::copy_from_slice(raw.get().as_bytes())),
        _ => Err(ApiError::ValueMissing),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn value(body: &str) -> Result<String, String> {
        put_value(&Bytes::from(body.to_string()))
            .map(|v| String::from_utf8(v.to_vec()).unwrap())
            .map_err(|e| e.to_string())
    }

    #[test]
    fn extracts_the_raw_value_or_names_the_fault() {
        assert_eq!(value(r#"{"value": [1, 2]}"#).unwrap(), "[1, 2]");
        assert_eq!(value(r#" {"value":"x","other":1}"#).unwrap(), "\"x\"");
        assert_eq!(value(r#"{"value":null}"#).unwrap_err(), "Value is missing");
        assert_eq!(value(r#"{}"#).unwrap_err(), "Value is missing");
        assert_eq!(value(r#"[1]"#).unwrap_err(), "Invalid JSON");
        assert_eq!(value(r#"{"value":"#).unwrap_err(), "Invalid JSON");
        assert_eq!(value("").unwrap_err(), "Invalid JSON");
    }
}
