//! The node-to-node protocol under `/internal/`: header names, message bodies, and the
//! compact binary framing of transferred key batches.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use serde::{Deserialize, Serialize};

use crate::store::Entry;

/// The sender's current view epoch; carried by every internal request and answer.
pub const EPOCH_HEADER: &str = "x-ringkv-epoch";
/// The sender's view identity (hash of its member set), in hex.
pub const VIEW_HEADER: &str = "x-ringkv-view";
/// The sender's vnode count; a node refuses internal traffic with another count.
pub const VNODES_HEADER: &str = "x-ringkv-vnodes";
/// The sender's own address, so a receiver that is behind knows whom to ask.
pub const FROM_HEADER: &str = "x-ringkv-from";

/// A node's view and change state, as `GET /internal/state` reports it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NodeState {
    pub address: String,
    pub epoch: u64,
    pub view: Vec<String>,
    pub view_id: u64,
    pub vnodes: u32,
    pub key_count: usize,
    /// The change this node has prepared and not yet committed or aborted.
    pub pending: Option<u64>,
}

/// The answer of an owner that no longer owns a key: its newer view.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Misdirected {
    pub epoch: u64,
    pub view: Vec<String>,
}

/// Prepare: adopt `view` as epoch `epoch` once change `change_id` commits.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Prepare {
    pub change_id: u64,
    pub epoch: u64,
    pub view: Vec<String>,
    pub coordinator: String,
    /// Every node taking part (old view ∪ new view), for asking about the outcome.
    pub participants: Vec<String>,
}

/// A phase message naming the change it belongs to.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct ChangeRef {
    pub change_id: u64,
}

/// What a node shipped in the transfer or catch-up phase.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Shipped {
    pub ranges: usize,
    pub keys: usize,
    pub bytes: usize,
}

/// What the last view change coordinated by a node did, for operators and benchmarks.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ChangeReport {
    pub epoch: u64,
    pub view: Vec<String>,
    pub moved_ranges: usize,
    /// Distinct keys shipped by the bulk transfer.
    pub keys_shipped: usize,
    pub bytes_shipped: usize,
    /// Keys re-sent by the catch-up (written during the transfer).
    pub keys_caught_up: usize,
    pub millis: u64,
}

/// What a committed node holds afterwards.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct Committed {
    pub key_count: usize,
}

/// What a node knows of a change, for a participant that lost its coordinator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    Pending,
    Committed,
    Aborted,
    Unknown,
}

/// An internal error answer: `{"error": ..., "unreachable": [...]}`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct PeerFailure {
    pub error: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub unreachable: Vec<String>,
}

/// Why a batch body could not be decoded.
#[derive(Debug, thiserror::Error)]
#[error("malformed batch at byte {0}")]
pub struct BatchError(usize);

/// Encodes entries as `u64 change_id`, then per entry `u32 key_len, key, u8 has_value,
/// [u32 value_len, value]`, all big-endian.
pub fn encode_batch(change_id: u64, entries: &[Entry]) -> Bytes {
    let size: usize = entries
        .iter()
        .map(|e| 9 + e.key.len() + e.value.as_ref().map_or(0, |v| v.len()))
        .sum();
    let mut out = BytesMut::with_capacity(8 + size);
    out.put_u64(change_id);
    for entry in entries {
        out.put_u32(entry.key.len() as u32);
        out.put_slice(entry.key.as_bytes());
        match &entry.value {
            Some(value) => {
                out.put_u8(1);
                out.put_u32(value.len() as u32);
                out.put_slice(value);
            }
            None => out.put_u8(0),
        }
    }
    out.freeze()
}

/// Decodes what [`encode_batch`] wrote; values share the body's buffer.
pub fn decode_batch(mut body: Bytes) -> Result<(u64, Vec<Entry>), BatchError> {
    let total = body.len();
    let at = |body: &Bytes| total - body.remaining();
    if body.remaining() < 8 {
        return Err(BatchError(0));
    }
    let change_id = body.get_u64();
    let mut entries = Vec::new();
    while body.has_remaining() {
        if body.remaining() < 5 {
            return Err(BatchError(at(&body)));
        }
        let key_len = body.get_u32() as usize;
        if body.remaining() < key_len + 1 {
            return Err(BatchError(at(&body)));
        }
        let key = String::from_utf8(body.split_to(key_len).to_vec())
            .map_err(|_| BatchError(at(&body)))?;
        let value = match body.get_u8() {
            0 => None,
            1 => {
                if body.remaining() < 4 {
                    return Err(BatchError(at(&body)));
                }
                let len = body.get_u32() as usize;
                if body.remaining() < len {
                    return Err(BatchError(at(&body)));
                }
                Some(body.split_to(len))
            }
            _ => return Err(BatchError(at(&body))),
        };
        entries.push(Entry { key, value });
    }
    Ok((change_id, entries))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_round_trip_and_reject_garbage() {
        let entries = vec![
            Entry {
                key: "ключ".into(),
                value: Some(Bytes::from_static(b"{\"a\":1}")),
            },
            Entry {
                key: "gone".into(),
                value: None,
            },
        ];
        let body = encode_batch(42, &entries);
        let (id, decoded) = decode_batch(body.clone()).unwrap();
        assert_eq!((id, decoded), (42, entries));
        assert!(decode_batch(body.slice(..body.len() - 1)).is_err());
        assert!(decode_batch(Bytes::from_static(b"abc")).is_err());
    }
}
