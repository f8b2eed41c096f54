//! Causal context of the replicated contract (assignment 4): what a client has seen, as
//! one version vector per shard, so its size grows with shards × replicas and never with
//! keys or operations.
//!
//! Each replica numbers the writes it accepts (1, 2, 3, ...); a shard's version vector
//! says, per replica, how many of that replica's writes have been seen. A replica serves a
//! request only once it has applied everything the request's context shows for its shard,
//! and its reply's context is the request's merged with what the replica has applied.
//!
//! The wire form is a JSON object the client passes back unread:
//! `{"epoch": 3, "shards": {"1": {"10.10.0.4:13800": 7, "10.10.0.5:13800": 2}}}`.
//! A context of another epoch (from before a view change) is ignored, never a failure.

use std::collections::BTreeMap;

use serde_json::{Map, Value};

/// The most shards and replicas per shard a context may name: a bigger one is not ours.
pub const MAX_SHARDS: usize = crate::ring::MAX_NODES;
pub const MAX_REPLICAS: usize = crate::ring::MAX_NODES;

/// Why a request's `causal-context` was refused (400 `Invalid causal context`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("Invalid causal context")]
pub struct InvalidContext;

/// Per replica (by address), how many of its writes have been seen.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct VersionVector(BTreeMap<String, u64>);

impl VersionVector {
    pub fn get(&self, replica: &str) -> u64 {
        self.0.get(replica).copied().unwrap_or(0)
    }

    /// Records that `replica`'s writes up to `count` have been seen.
    pub fn observe(&mut self, replica: &str, count: u64) {
        if count > self.get(replica) {
            self.0.insert(replica.to_string(), count);
        }
    }

    /// The pointwise maximum.
    pub fn merge(&mut self, other: &VersionVector) {
        for (replica, count) in &other.0 {
            self.observe(replica, *count);
        }
    }

    /// The pointwise minimum: what both have seen.
    pub fn meet(&self, other: &VersionVector) -> VersionVector {
        VersionVector(
            self.0
                .iter()
                .filter_map(|(r, c)| {
                    let both = (*c).min(other.get(r));
                    (both > 0).then(|| (r.clone(), both))
                })
                .collect(),
        )
    }

    /// Whether this vector has seen everything `other` has.
    pub fn covers(&self, other: &VersionVector) -> bool {
        other.0.iter().all(|(r, c)| self.get(r) >= *c)
    }

    /// The replicas whose writes `other` has seen more of than this vector, with how many
    /// this vector has: what to pull, and from where to start.
    pub fn missing(&self, other: &VersionVector) -> Vec<(String, u64)> {
        other
            .0
            .iter()
            .filter(|(r, c)| self.get(r) < **c)
            .map(|(r, _)| (r.clone(), self.get(r)))
            .collect()
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, u64)> {
        self.0.iter().map(|(r, c)| (r.as_str(), *c))
    }
}

/// What a client has seen, per shard, as of one epoch.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Context {
    epoch: u64,
    shards: BTreeMap<String, VersionVector>,
}

impl Context {
    /// An empty context at `epoch`.
    pub fn at(epoch: u64) -> Context {
        Context {
            epoch,
            shards: BTreeMap::new(),
        }
    }

    /// Reads a request's `causal-context` for a node at `epoch`: missing, `{}` or from
    /// another epoch is no history; anything but a JSON object, or an object naming more
    /// shards or replicas than a cluster has, is refused.
    pub fn parse(value: Option<&Value>, epoch: u64) -> Result<Context, InvalidContext> {
        let object = match value {
            None => return Ok(Context::at(epoch)),
            Some(Value::Object(object)) => object,
            Some(_) => return Err(InvalidContext),
        };
        if object.is_empty() || object.get("epoch").and_then(Value::as_u64) != Some(epoch) {
            return Ok(Context::at(epoch));
        }
        let shards = match object.get("shards") {
            Some(Value::Object(shards)) if shards.len() <= MAX_SHARDS => shards,
            None => return Ok(Context::at(epoch)),
            Some(_) => return Err(InvalidContext),
        };
        let mut context = Context::at(epoch);
        for (shard, vector) in shards {
            let Value::Object(vector) = vector else {
                return Err(InvalidContext);
            };
            if vector.len() > MAX_REPLICAS {
                return Err(InvalidContext);
            }
            let mut seen = VersionVector::default();
            for (replica, count) in vector {
                seen.observe(replica, count.as_u64().ok_or(InvalidContext)?);
            }
            context.shards.insert(shard.clone(), seen);
        }
        Ok(context)
    }

    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// What it has seen of `shard`.
    pub fn shard(&self, shard: &str) -> VersionVector {
        self.shards.get(shard).cloned().unwrap_or_default()
    }

    /// Adds what `seen` shows of `shard`.
    pub fn merge_shard(&mut self, shard: &str, seen: &VersionVector) {
        self.shards
            .entry(shard.to_string())
            .or_default()
            .merge(seen);
    }

    /// Adds everything `other` has seen (contexts of one epoch).
    pub fn merge(&mut self, other: &Context) {
        for (shard, seen) in &other.shards {
            self.merge_shard(shard, seen);
        }
    }

    /// The wire form.
    pub fn to_json(&self) -> Value {
        let shards: Map<String, Value> = self
            .shards
            .iter()
            .map(|(shard, seen)| {
                let vector: Map<String, Value> = seen
                    .iter()
                    .map(|(r, c)| (r.to_string(), c.into()))
                    .collect();
                (shard.clone(), Value::Object(vector))
            })
            .collect();
        serde_json::json!({"epoch": self.epoch, "shards": shards})
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const A: &str = "10.0.0.1:1";
    const B: &str = "10.0.0.2:1";

    fn vector(entries: &[(&str, u64)]) -> VersionVector {
        let mut v = VersionVector::default();
        for (r, c) in entries {
            v.observe(r, *c);
        }
        v
    }

    #[test]
    fn vectors_merge_cover_and_name_what_is_missing() {
        let mut a = vector(&[(A, 3), (B, 1)]);
        let b = vector(&[(B, 4)]);
        assert!(!a.covers(&b) && !b.covers(&a));
        assert_eq!(a.missing(&b), vec![(B.to_string(), 1)]);
        a.merge(&b);
        assert_eq!(a, vector(&[(A, 3), (B, 4)]));
        assert!(a.covers(&b) && a.covers(&VersionVector::default()));
        a.observe(A, 2);
        assert_eq!(a.get(A), 3, "observing less never goes back");
        assert_eq!(a.meet(&b), vector(&[(B, 4)]));
        assert_eq!(a.meet(&VersionVector::default()), VersionVector::default());
    }

    #[test]
    fn contexts_round_trip_and_other_epochs_are_ignored() {
        let mut context = Context::at(2);
        context.merge_shard("1", &vector(&[(A, 3)]));
        context.merge_shard("2", &vector(&[(B, 1)]));
        let wire = context.to_json();
        assert_eq!(
            wire,
            json!({"epoch": 2, "shards": {"1": {A: 3}, "2": {B: 1}}})
        );
        assert_eq!(Context::parse(Some(&wire), 2).unwrap(), context);
        assert_eq!(Context::parse(Some(&wire), 3).unwrap(), Context::at(3));
        assert_eq!(Context::parse(None, 3).unwrap(), Context::at(3));
        assert_eq!(Context::parse(Some(&json!({})), 3).unwrap(), Context::at(3));
    }

    #[test]
    fn what_is_not_a_context_is_refused() {
        for bad in [
            json!([]),
            json!("x"),
            json!(1),
            json!(null),
            json!({"epoch": 0, "shards": []}),
            json!({"epoch": 0, "shards": {"1": 5}}),
            json!({"epoch": 0, "shards": {"1": {A: -1}}}),
            json!({"epoch": 0, "shards": {"1": {A: "1"}}}),
        ] {
            assert_eq!(Context::parse(Some(&bad), 0), Err(InvalidContext), "{bad}");
        }
    }
}
