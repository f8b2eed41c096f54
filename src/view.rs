//! A view: the epoch, the member list as given, and the ring built from it.

use std::sync::Arc;

use xxhash_rust::xxh3::xxh3_64;

use crate::ring::{canonical_address, HashRing, RingError};

/// Why a view string was refused; the message is the `error` of a 400 reply.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ViewError {
    #[error("View is missing")]
    Missing,
    #[error("View is empty")]
    Empty,
    #[error("View must be a string of comma-separated ip:port")]
    NotText,
    #[error("View entry '{0}' is not ip:port")]
    BadEntry(String),
    /// The replicated mode's view change names no `repl-factor`.
    #[error("repl-factor is missing")]
    FactorMissing,
    #[error("{0}")]
    Layout(crate::shard::LayoutError),
}

/// Splits `"ip:port,ip:port"` into its entries in canonical spelling, refusing empty or
/// malformed ones.
pub fn parse_members(text: &str) -> Result<Vec<String>, ViewError> {
    if text.trim().is_empty() {
        return Err(ViewError::Empty);
    }
    text.split(',')
        .map(|entry| {
            let entry = entry.trim();
            canonical_address(entry).map_err(|_| ViewError::BadEntry(entry.to_string()))
        })
        .collect()
}

/// Most members a view may have (see [`crate::ring::MAX_NODES`]).
pub const MAX_MEMBERS: usize = crate::ring::MAX_NODES;

/// How far ahead of the epoch in force a message's epoch may be before it is taken for a
/// forgery or a bug: epochs grow by one per view change, so no real cluster gets near.
/// Without the bound, one message with epoch `u64::MAX` would wedge every later change.
pub const MAX_EPOCH_GAP: u64 = 1 << 20;

/// Whether `offered` is a believable epoch for a node at `current`.
pub fn epoch_within_reach(current: u64, offered: u64) -> bool {
    offered <= current.saturating_add(MAX_EPOCH_GAP) && offered < u64::MAX
}

/// The identity of a member set: equal for equal sets, whatever the order.
pub fn view_id(members: &[String]) -> u64 {
    let mut sorted: Vec<&str> = members.iter().map(String::as_str).collect();
    sorted.sort_unstable();
    sorted.dedup();
    xxh3_64(sorted.join(",").as_bytes())
}

/// One view of the cluster as a node holds it.
#[derive(Debug)]
pub struct View {
    pub epoch: u64,
    /// The members in the order the view listed them (duplicates removed).
    pub members: Vec<String>,
    pub id: u64,
    pub ring: HashRing,
}

impl View {
    pub fn new(epoch: u64, members: Vec<String>, vnodes: u32) -> Result<Arc<View>, RingError> {
        if members.len() > MAX_MEMBERS {
            return Err(RingError::TooManyNodes(members.len()));
        }
        let mut unique: Vec<String> = Vec::with_capacity(members.len());
        for member in members {
            if !unique.contains(&member) {
                unique.push(member);
            }
        }
        let ring = HashRing::new(&unique, vnodes)?;
        Ok(Arc::new(View {
            epoch,
            id: view_id(&unique),
            members: unique,
            ring,
        }))
    }

    /// The members joined as the course writes a view.
    pub fn members_text(&self) -> String {
        self.members.join(",")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_refuses() {
        assert_eq!(
            parse_members(" 10.0.0.1:1 ,10.0.0.2:2").unwrap(),
            vec!["10.0.0.1:1", "10.0.0.2:2"]
        );
        assert_eq!(parse_members(""), Err(ViewError::Empty));
        assert_eq!(
            parse_members("10.0.0.1:1,,"),
            Err(ViewError::BadEntry(String::new()))
        );
        assert_eq!(
            parse_members("node1:13800"),
            Err(ViewError::BadEntry("node1:13800".into()))
        );
    }

    #[test]
    fn spellings_of_one_address_are_one_member() {
        assert_eq!(
            parse_members("10.0.0.1:080,[0:0::1]:80").unwrap(),
            vec!["10.0.0.1:80", "[::1]:80"]
        );
    }

    #[test]
    fn identity_ignores_order_and_duplicates() {
        let a = vec!["10.0.0.1:1".to_string(), "10.0.0.2:2".to_string()];
        let b = vec![a[1].clone(), a[0].clone(), a[1].clone()];
        assert_eq!(view_id(&a), view_id(&b));
        let view = View::new(0, b, 4).unwrap();
        assert_eq!(view.members.len(), 2);
    }
}
