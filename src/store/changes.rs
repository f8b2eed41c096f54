//! A durable node's record of the view change it takes part in, kept in the data dir beside
//! the keys (one fjall database, so a commit's writes to both are one atomic batch): what it
//! hands over, and the keys it received for the ranges it takes over, staged under the
//! change's id. A node killed at any phase of a change finds here, when the metadata log
//! replays the change's outcome, what it still has to do: apply the staged keys and drop
//! what it handed over (committed), or forget them (aborted).
//!
//! Keys of the `changes` keyspace: `'r' ‖ change id` holds a [`ChangeRecord`];
//! `'s' ‖ change id ‖ key` a staged key, as the change module encoded it.

use serde::{Deserialize, Serialize};

use super::StoreError;

/// What a node recorded of a change when it prepared it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChangeRecord {
    pub change_id: u64,
    /// The hash segments (`start..=end`) this node hands over: dropped once the change
    /// commits.
    pub dropping: Vec<(u64, u64)>,
    /// The staged keys are in the store (the commit got that far): only the drop is left.
    pub applied: bool,
    /// The hash segments whose keys went into the store as they arrived: dropped if the
    /// change aborts.
    pub incoming: Vec<(u64, u64)>,
}

const RECORD: u8 = b'r';
const STAGED: u8 = b's';

pub(super) fn failed(error: impl std::fmt::Display) -> StoreError {
    StoreError(error.to_string())
}

pub(super) fn record_key(change_id: u64) -> [u8; 9] {
    let mut key = [RECORD; 9];
    key[1..].copy_from_slice(&change_id.to_be_bytes());
    key
}

fn staged_prefix(change_id: u64) -> [u8; 9] {
    let mut key = [STAGED; 9];
    key[1..].copy_from_slice(&change_id.to_be_bytes());
    key
}

pub(super) fn staged_key(change_id: u64, key: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(9 + key.len());
    out.extend_from_slice(&staged_prefix(change_id));
    out.extend_from_slice(key.as_bytes());
    out
}

pub(super) fn encode(record: &ChangeRecord) -> Result<Vec<u8>, StoreError> {
    postcard::to_stdvec(record).map_err(failed)
}

/// The records on disk: every change this node prepared and has not finished.
pub(super) fn records(keyspace: &fjall::Keyspace) -> Result<Vec<ChangeRecord>, StoreError> {
    let mut out = Vec::new();
    for item in keyspace.prefix([RECORD]) {
        let (_, value) = item.into_inner().map_err(failed)?;
        out.push(postcard::from_bytes(&value).map_err(failed)?);
    }
    Ok(out)
}

/// The record of `change_id`, if this node has one.
pub(super) fn record(
    keyspace: &fjall::Keyspace,
    change_id: u64,
) -> Result<Option<ChangeRecord>, StoreError> {
    keyspace
        .get(record_key(change_id))
        .map_err(failed)?
        .map(|raw| postcard::from_bytes(&raw).map_err(failed))
        .transpose()
}

/// The keys staged for `change_id`, each with its encoded value.
pub(super) fn staged(
    keyspace: &fjall::Keyspace,
    change_id: u64,
) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
    let mut out = Vec::new();
    for item in keyspace.prefix(staged_prefix(change_id)) {
        let (raw, value) = item.into_inner().map_err(failed)?;
        let key = std::str::from_utf8(&raw[9..]).map_err(failed)?;
        out.push((key.to_string(), value.to_vec()));
    }
    Ok(out)
}

/// The disk keys of what was staged for `change_id`.
pub(super) fn staged_keys(
    keyspace: &fjall::Keyspace,
    change_id: u64,
) -> Result<Vec<fjall::UserKey>, StoreError> {
    keyspace
        .prefix(staged_prefix(change_id))
        .map(|item| item.key().map_err(failed))
        .collect()
}
