//! Shards of a replicated cluster (the course's assignment 4): the view's nodes grouped
//! into replica sets of exactly `repl-factor` nodes, ids `"1"`, `"2"`, .... The ring's
//! members are the shard ids ([`HashRing::of_names`]), so keys are placed on shards, and a
//! change of the shard count moves only the ranges whose shard changes.
//!
//! Two rules, both computed by every node on its own:
//! - [`Layout::initial`]: the start view cut into consecutive groups in view order
//!   (`VIEW=a,b,c,d` with 2 replicas: shard 1 is a and b, shard 2 is c and d);
//! - [`Layout::regroup`]: a view change keeps every shard id it can (the ids whose shards
//!   keep the most nodes), keeps a node that stays in its shard while the shard has room,
//!   and fills the places left with the nodes that joined or whose shard was dropped, in
//!   view order. A node moves only when its shard is dropped or shrinks.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

use crate::ring::{HashRange, HashRing, MovedRange, RingError};

/// Why a view and a replication factor make no layout; the message is a 400's `error`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LayoutError {
    #[error("repl-factor must be a positive integer")]
    BadFactor,
    #[error("the view's {nodes} nodes do not split into shards of {factor}")]
    NotAMultiple { nodes: usize, factor: usize },
    #[error("the view names {0} twice")]
    Duplicate(String),
}

/// One replica set.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Shard {
    pub id: String,
    /// Its nodes, in the order they were placed.
    pub replicas: Vec<String>,
}

/// Every shard of a view, in id order (`"1"` < `"2"` < `"10"`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Layout {
    factor: usize,
    shards: Vec<Shard>,
}

fn check(members: &[String], factor: usize) -> Result<(), LayoutError> {
    if factor == 0 {
        return Err(LayoutError::BadFactor);
    }
    if members.is_empty() || !members.len().is_multiple_of(factor) {
        return Err(LayoutError::NotAMultiple {
            nodes: members.len(),
            factor,
        });
    }
    let mut seen = BTreeSet::new();
    if let Some(twice) = members.iter().find(|m| !seen.insert(m.as_str())) {
        return Err(LayoutError::Duplicate(twice.clone()));
    }
    Ok(())
}

fn numeric(id: &str) -> u64 {
    id.parse().unwrap_or(u64::MAX)
}

impl Layout {
    /// The layout of a start view: consecutive groups of `factor` in view order.
    pub fn initial(members: &[String], factor: usize) -> Result<Layout, LayoutError> {
        check(members, factor)?;
        let shards = members
            .chunks(factor)
            .enumerate()
            .map(|(i, replicas)| Shard {
                id: (i + 1).to_string(),
                replicas: replicas.to_vec(),
            })
            .collect();
        Ok(Layout { factor, shards })
    }

    /// The layout after a view change to `members` with `factor` replicas per shard (see
    /// the module docs).
    pub fn regroup(&self, members: &[String], factor: usize) -> Result<Layout, LayoutError> {
        check(members, factor)?;
        let count = members.len() / factor;
        let staying: BTreeSet<&str> = members.iter().map(String::as_str).collect();
        // Shard ids kept: those keeping the most nodes, lower ids first on a tie.
        let mut ranked: Vec<(usize, &Shard)> = self
            .shards
            .iter()
            .map(|s| {
                let kept = s.replicas.iter().filter(|r| staying.contains(r.as_str()));
                (kept.count(), s)
            })
            .collect();
        ranked.sort_by_key(|(kept, s)| (std::cmp::Reverse(*kept), numeric(&s.id)));
        let mut shards: Vec<Shard> = ranked
            .iter()
            .take(count)
            .map(|(_, s)| Shard {
                id: s.id.clone(),
                replicas: s
                    .replicas
                    .iter()
                    .filter(|r| staying.contains(r.as_str()))
                    .take(factor)
                    .cloned()
                    .collect(),
            })
            .collect();
        shards.sort_by_key(|s| numeric(&s.id));
        let placed: BTreeSet<String> = shards.iter().flat_map(|s| s.replicas.clone()).collect();
        let mut free = members.iter().filter(|m| !placed.contains(*m));
        for shard in &mut shards {
            while shard.replicas.len() < factor {
                shard
                    .replicas
                    .push(free.next().expect("sizes add up").clone());
            }
        }
        let mut next_id = self
            .shards
            .iter()
            .map(|s| numeric(&s.id))
            .max()
            .unwrap_or(0);
        while shards.len() < count {
            next_id += 1;
            shards.push(Shard {
                id: next_id.to_string(),
                replicas: free.by_ref().take(factor).cloned().collect(),
            });
        }
        Ok(Layout { factor, shards })
    }

    pub fn factor(&self) -> usize {
        self.factor
    }

    pub fn shards(&self) -> &[Shard] {
        &self.shards
    }

    pub fn shard(&self, id: &str) -> Option<&Shard> {
        self.shards.iter().find(|s| s.id == id)
    }

    /// The shard `node` is a replica of.
    pub fn shard_of(&self, node: &str) -> Option<&Shard> {
        self.shards
            .iter()
            .find(|s| s.replicas.iter().any(|r| r == node))
    }

    /// The ring over the shard ids.
    pub fn ring(&self, vnodes: u32) -> Result<HashRing, RingError> {
        HashRing::of_names(self.shards.iter().map(|s| &s.id), vnodes)
    }
}

/// A layout with its ring over shard ids: where every key hash lives.
#[derive(Debug, Clone)]
pub struct ShardMap {
    layout: Layout,
    ring: HashRing,
}

impl ShardMap {
    pub fn new(layout: Layout, vnodes: u32) -> Result<ShardMap, RingError> {
        let ring = layout.ring(vnodes)?;
        Ok(ShardMap { layout, ring })
    }

    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// Each node's share of the ring: its shard's.
    pub fn ownership(&self) -> Vec<(std::sync::Arc<str>, f64)> {
        let shares = self.ring.ownership();
        self.layout
            .shards
            .iter()
            .flat_map(|shard| {
                let share = shares
                    .iter()
                    .find(|(id, _)| **id == *shard.id)
                    .map_or(0.0, |(_, s)| *s);
                shard
                    .replicas
                    .iter()
                    .map(move |r| (r.as_str().into(), share))
            })
            .collect()
    }

    /// The shard a key hash lives on.
    pub fn shard_of_hash(&self, hash: u64) -> &Shard {
        let id = self.ring.owner_of_hash(hash);
        self.layout
            .shard(id)
            .expect("the ring is made of the layout's shard ids")
    }
}

/// What one node does with its data when the layout changes from one map to another (see
/// [`handover`]).
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Handover {
    /// Ranges this node holds now, each with a node it ships them to.
    pub outgoing: Vec<MovedRange>,
    /// Ranges this node holds now and no longer holds after the change.
    pub dropping: Vec<HashRange>,
    /// Ranges this node holds only after the change.
    pub incoming: Vec<HashRange>,
}

/// What `me` ships and drops when `old` becomes `new`. On each piece of the ring where the
/// old and the new shard are constant, with old replicas O and new replicas N: every
/// replica in O ships the piece to the nodes of N that are not in O (a node that joins the
/// shard, or the shard a range moves to), and a replica in O that is not in N also ships
/// it to the nodes of N that stay (a replica dropped from a shard hands its writes to
/// those that keep it). Every old replica ships, not one chosen: each holds the writes it
/// accepted itself, and a replica that is down (left out) is covered by the others.
pub fn handover(old: &ShardMap, new: &ShardMap, me: &str) -> Handover {
    let mut out = Handover::default();
    for piece in HashRing::pieces(&old.ring, &new.ring) {
        let before = &old
            .layout
            .shard(&piece.from)
            .expect("ring of the layout")
            .replicas;
        let after = &new
            .layout
            .shard(&piece.to)
            .expect("ring of the layout")
            .replicas;
        let held = before.iter().any(|r| r == me);
        let keeps = after.iter().any(|r| r == me);
        if !held {
            if keeps {
                out.incoming.push(piece.range);
            }
            continue;
        }
        if !keeps {
            out.dropping.push(piece.range);
        }
        for target in after {
            let joins = !before.contains(target);
            if target != me && (joins || !keeps) {
                out.outgoing.push(MovedRange {
                    range: piece.range,
                    from: me.into(),
                    to: target.as_str().into(),
                });
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ring::key_hash;
    use proptest::prelude::*;

    fn nodes(range: std::ops::Range<u32>) -> Vec<String> {
        range.map(|i| format!("10.0.0.{i}:13800")).collect()
    }

    fn ids(layout: &Layout) -> Vec<&str> {
        layout.shards().iter().map(|s| s.id.as_str()).collect()
    }

    #[test]
    fn the_start_view_is_cut_in_view_order() {
        let view = nodes(1..7);
        let layout = Layout::initial(&view, 2).unwrap();
        assert_eq!(ids(&layout), ["1", "2", "3"]);
        assert_eq!(layout.shard("2").unwrap().replicas, view[2..4]);
        assert_eq!(layout.shard_of(&view[5]).unwrap().id, "3");
        assert_eq!(layout.shard("4"), None);
        assert_eq!(
            Layout::initial(&view, 4),
            Err(LayoutError::NotAMultiple {
                nodes: 6,
                factor: 4
            })
        );
        assert_eq!(Layout::initial(&view, 0), Err(LayoutError::BadFactor));
        let twice = [view[0].clone(), view[0].clone()];
        assert_eq!(
            Layout::initial(&twice, 1),
            Err(LayoutError::Duplicate(view[0].clone()))
        );
        assert!(Layout::initial(&[], 1).is_err());
    }

    #[test]
    fn growing_keeps_every_shard_and_adds_new_ids() {
        let old = Layout::initial(&nodes(1..5), 2).unwrap();
        let new = old.regroup(&nodes(1..7), 2).unwrap();
        assert_eq!(ids(&new), ["1", "2", "3"]);
        assert_eq!(new.shard("1"), old.shard("1"));
        assert_eq!(new.shard("2"), old.shard("2"));
        assert_eq!(new.shard("3").unwrap().replicas, nodes(5..7));
    }

    #[test]
    fn a_removed_node_is_replaced_in_its_shard_and_the_others_stay() {
        let old = Layout::initial(&nodes(1..7), 2).unwrap();
        // 10.0.0.3 (shard 2) leaves, 10.0.0.9 joins.
        let mut view = nodes(1..7);
        view.retain(|n| n != "10.0.0.3:13800");
        view.push("10.0.0.9:13800".into());
        let new = old.regroup(&view, 2).unwrap();
        assert_eq!(new.shard("1"), old.shard("1"));
        assert_eq!(new.shard("3"), old.shard("3"));
        assert_eq!(
            new.shard("2").unwrap().replicas,
            ["10.0.0.4:13800", "10.0.0.9:13800"]
        );
    }

    #[test]
    fn shrinking_drops_the_emptiest_shard_and_its_nodes_fill_the_others() {
        let old = Layout::initial(&nodes(1..7), 2).unwrap();
        // Shard 1 loses both nodes, shard 2 one: 4 nodes, 2 shards.
        let view = nodes(4..7);
        let view = [view, vec!["10.0.0.9:13800".into()]].concat();
        let new = old.regroup(&view, 2).unwrap();
        assert_eq!(ids(&new), ["2", "3"]);
        assert_eq!(new.shard("3"), old.shard("3"));
        assert_eq!(
            new.shard("2").unwrap().replicas,
            ["10.0.0.4:13800", "10.0.0.9:13800"]
        );
    }

    #[test]
    fn a_new_factor_regroups_and_keeps_ids() {
        let old = Layout::initial(&nodes(1..7), 2).unwrap();
        let new = old.regroup(&nodes(1..7), 3).unwrap();
        assert_eq!(ids(&new), ["1", "2"]);
        assert_eq!(
            new.shard("1").unwrap().replicas,
            ["10.0.0.1:13800", "10.0.0.2:13800", "10.0.0.5:13800"]
        );
        assert_eq!(
            new.shard("2").unwrap().replicas,
            ["10.0.0.3:13800", "10.0.0.4:13800", "10.0.0.6:13800"]
        );
    }

    #[test]
    fn growing_two_shards_to_three_moves_about_a_third_of_the_keys() {
        let old = Layout::initial(&nodes(1..5), 2).unwrap();
        let new = old.regroup(&nodes(1..7), 2).unwrap();
        let (before, after) = (old.ring(1024).unwrap(), new.ring(1024).unwrap());
        let keys = 30_000;
        let moved = (0..keys)
            .map(|i| key_hash(format!("key{i}").as_bytes()))
            .filter(|h| before.owner_of_hash(*h) != after.owner_of_hash(*h))
            .count();
        let share = moved as f64 / keys as f64;
        assert!((0.28..0.39).contains(&share), "{share}");
        // And every moved key moved to the new shard: nothing reshuffled between old ones.
        let to_new = (0..keys)
            .map(|i| key_hash(format!("key{i}").as_bytes()))
            .filter(|h| before.owner_of_hash(*h) != after.owner_of_hash(*h))
            .all(|h| &**after.owner_of_hash(h) == "3");
        assert!(to_new);
    }

    fn valid(layout: &Layout, members: &[String], factor: usize) -> Result<(), TestCaseError> {
        let placed: Vec<&String> = layout.shards().iter().flat_map(|s| &s.replicas).collect();
        prop_assert_eq!(placed.len(), members.len());
        let unique: BTreeSet<&String> = placed.iter().copied().collect();
        prop_assert_eq!(unique, members.iter().collect::<BTreeSet<_>>());
        prop_assert!(layout.shards().iter().all(|s| s.replicas.len() == factor));
        let ids: BTreeSet<&str> = layout.shards().iter().map(|s| s.id.as_str()).collect();
        prop_assert_eq!(ids.len(), layout.shards().len());
        Ok(())
    }

    /// Every node's hashes after a change, by [`handover`]: kept minus dropped, plus what
    /// the others shipped to it; and whether every hash each node ends with came from a
    /// node that held it.
    fn after_handover(old: &ShardMap, new: &ShardMap, hashes: &[u64]) -> BTreeSet<(String, u64)> {
        let nodes: BTreeSet<&String> = old
            .layout()
            .shards()
            .iter()
            .chain(new.layout().shards())
            .flat_map(|s| &s.replicas)
            .collect();
        let mut held = BTreeSet::new();
        for node in nodes {
            let plan = handover(old, new, node);
            for &hash in hashes {
                let had = old.shard_of_hash(hash).replicas.contains(node);
                let in_set = |ranges: &[HashRange]| ranges.iter().any(|r| r.contains(hash));
                assert_eq!(
                    in_set(&plan.incoming),
                    !had && new.shard_of_hash(hash).replicas.contains(node)
                );
                if had && !in_set(&plan.dropping) {
                    held.insert((node.clone(), hash));
                }
                for moved in plan.outgoing.iter().filter(|m| m.range.contains(hash)) {
                    assert!(had, "{node} ships a hash it does not hold");
                    held.insert((moved.to.to_string(), hash));
                }
            }
        }
        held
    }

    #[test]
    fn growing_two_shards_to_three_moves_a_third_only_to_the_new_shard() {
        let old = ShardMap::new(Layout::initial(&nodes(1..5), 2).unwrap(), 1024).unwrap();
        let new = ShardMap::new(old.layout().regroup(&nodes(1..7), 2).unwrap(), 1024).unwrap();
        let hashes: Vec<u64> = (0..20_000u32).map(|i| key_hash(&i.to_le_bytes())).collect();
        let moved: Vec<&u64> = hashes
            .iter()
            .filter(|h| old.shard_of_hash(**h).id != new.shard_of_hash(**h).id)
            .collect();
        assert!(moved.iter().all(|h| new.shard_of_hash(**h).id == "3"));
        let share = moved.len() as f64 / hashes.len() as f64;
        assert!((share - 1.0 / 3.0).abs() < 0.03, "{share}");
        // Each moved key is shipped by both old replicas to both new ones; nothing else.
        let shipped: usize = nodes(1..5)
            .iter()
            .map(|n| {
                let plan = handover(&old, &new, n);
                hashes
                    .iter()
                    .map(|h| {
                        plan.outgoing
                            .iter()
                            .filter(|m| m.range.contains(*h))
                            .count()
                    })
                    .sum::<usize>()
            })
            .sum();
        assert_eq!(shipped, moved.len() * 4);
    }

    /// A view after a change of `old`: the old nodes `kept` marks stay, new ones fill it
    /// up to `size`.
    fn changed_view(old: &[String], kept: &[bool], size: usize) -> Vec<String> {
        let mut view: Vec<String> = old
            .iter()
            .zip(kept.iter().cycle())
            .filter(|(_, k)| **k)
            .map(|(n, _)| n.clone())
            .take(size)
            .collect();
        let mut fresh = (100u32..).map(|i| format!("10.0.1.{i}:13800"));
        while view.len() < size {
            view.push(fresh.next().unwrap());
        }
        view
    }

    proptest! {
        #[test]
        fn regrouping_places_every_node_once_and_moves_only_what_it_must(
            old_nodes in 1usize..5,
            new_nodes in 1usize..5,
            old_factor in 1usize..4,
            new_factor in 1usize..4,
            kept in proptest::collection::vec(any::<bool>(), 16),
        ) {
            let old_view = nodes(0..(old_nodes * old_factor) as u32);
            let old = Layout::initial(&old_view, old_factor).unwrap();
            let view = changed_view(&old_view, &kept, new_nodes * new_factor);
            let new = old.regroup(&view, new_factor).unwrap();
            valid(&new, &view, new_factor)?;
            prop_assert_eq!(&new.regroup(&view, new_factor).unwrap(), &new, "a no-op stays");
            if new_factor == old_factor {
                // A node that stays keeps its shard whenever that shard id survives.
                for shard in old.shards() {
                    if let Some(now) = new.shard(&shard.id) {
                        for r in shard.replicas.iter().filter(|r| view.contains(r)) {
                            prop_assert_eq!(new.shard_of(r).map(|s| &s.id), Some(&now.id));
                        }
                    }
                }
            }
        }

        #[test]
        fn a_handover_leaves_every_key_exactly_on_its_new_replicas(
            old_nodes in 1usize..4,
            new_nodes in 1usize..4,
            old_factor in 1usize..4,
            new_factor in 1usize..4,
            kept in proptest::collection::vec(any::<bool>(), 12),
        ) {
            let old_view = nodes(0..(old_nodes * old_factor) as u32);
            let old = Layout::initial(&old_view, old_factor).unwrap();
            let view = changed_view(&old_view, &kept, new_nodes * new_factor);
            let new = old.regroup(&view, new_factor).unwrap();
            let (old, new) = (ShardMap::new(old, 64).unwrap(), ShardMap::new(new, 64).unwrap());
            let hashes: Vec<u64> = (0..300u32).map(|i| key_hash(&i.to_le_bytes())).collect();
            let want: BTreeSet<(String, u64)> = hashes
                .iter()
                .flat_map(|h| new.shard_of_hash(*h).replicas.iter().map(|r| (r.clone(), *h)))
                .collect();
            prop_assert_eq!(after_handover(&old, &new, &hashes), want);
        }
    }
}
